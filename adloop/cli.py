"""The `adloop` command: a thin layer that parses options and calls plain functions."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from adloop.settings import get_settings

app = typer.Typer(help="adloop: real-time ad targeting (collect -> predict -> act).", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: real Kafka (KRaft) and Redis on loopback.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
models_app = typer.Typer(help="The model registry: list, promote, roll back versions.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)


def _show_status(services) -> None:
    table = Table("service", "address", "pid", "since (UTC)", "state")
    for s in services:
        since = s.since.replace("T", " ")[:19] if s.since else "-"
        table.add_row(s.name, s.address, str(s.pid or "-"), since, s.detail)
    console.print(table)


@stack_app.command("up")
def stack_up() -> None:
    """Install what is missing, start Kafka and Redis, wait until they answer, create the topics."""
    from adloop import stack

    started = time.monotonic()
    try:
        services = stack.up(get_settings())
    except stack.StackError as error:
        console.print(f"[red]stack up failed:[/red] {error}", markup=True, highlight=False)
        raise typer.Exit(1) from error
    _show_status(services)
    console.print(f"stack ready in {time.monotonic() - started:.1f} s")


@stack_app.command("down")
def stack_down() -> None:
    """Stop what `adloop stack up` started, nothing else."""
    from adloop import stack

    stopped = stack.down(get_settings())
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing (no service started by adloop runs)"))


@stack_app.command("status")
def stack_status() -> None:
    """What runs, where, since when."""
    from adloop import stack

    services = stack.status(get_settings())
    _show_status(services)
    if not all(s.running for s in services):
        raise typer.Exit(1)


def _mind_path(path: Path | None) -> Path:
    """The MIND folder: the argument, else ../shared/data/mind from here or from the project root."""
    from adloop.settings import PROJECT_ROOT

    candidates = [path] if path else [Path("../shared/data/mind"), PROJECT_ROOT.parent / "shared" / "data" / "mind"]
    for candidate in candidates:
        if (candidate / "behaviors.tsv").is_file():
            return candidate
    console.print(f"[red]no MIND data:[/red] none of {', '.join(map(str, candidates))} holds behaviors.tsv")
    raise typer.Exit(2)


def _print_table(out: dict) -> None:
    from models.evaluate import format_table

    holdout = out["holdout"]
    days = "last day" if holdout["days"] == 1 else f"last {holdout['days']} days, each by a model of the days before"
    console.print(f"holdout: {days}; {holdout['requests']} requests, {holdout['rows']} candidates", soft_wrap=True)
    console.print(format_table(out["rows"]), highlight=False, markup=False, soft_wrap=True)
    _print_reliability(out["reliability"])


def _print_reliability(rows: list[dict]) -> None:
    table = Table("full model: predicted range", "rows", "mean predicted", "observed click rate")
    for row in rows:
        table.add_row(f"{row['lo']:.4f}-{row['hi']:.4f}", str(row["rows"]), f"{row['predicted']:.4f}",
                      f"{row['observed']:.4f}")  # fmt: skip
    console.print(table)


@app.command("train")
def train_cmd(
    data: Annotated[Path | None, typer.Option("--data", help="MIND folder; default ../shared/data/mind.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the two-tower, sampling and LightGBM.")] = 0,
) -> None:
    """Train on all days but the last of the MIND stream, evaluate on the last, save a version (not promoted)."""
    from models.evaluate import evaluation_table, load_mind
    from models.registry import Registry
    from models.train import TrainConfig
    from models.two_tower import TwoTowerConfig

    started = time.monotonic()
    frame = load_mind(_mind_path(data))
    config = TrainConfig(seed=seed, tower=TwoTowerConfig(seed=seed))
    out = evaluation_table(frame, config, ablation=False)
    registry = Registry(get_settings().model_registry_path)
    version = registry.save(
        out["bundle"], report=out["report"], metrics=out["rows"] | {"reliability": out["reliability"]}
    )
    _print_table(out)
    console.print(f"saved {version} in {registry.root} ({time.monotonic() - started:.1f} s); "
                  f"promote it with `adloop models promote {version}`", highlight=False)  # fmt: skip


@app.command("evaluate")
def evaluate_cmd(
    path: Annotated[Path | None, typer.Argument(help="MIND folder; default ../shared/data/mind.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="A saved version to score PATH's last day.")] = None,
    days: Annotated[int, typer.Option("--days", help="Holdout days, each scored by a model of the days before.")] = 1,
) -> None:
    """The evaluation table (train on earlier days, score the last day prequentially), or one saved version's."""
    from models.evaluate import evaluate_bundle, evaluation_table, format_table, holdout_split, load_mind
    from models.registry import Registry, RegistryError

    frame = load_mind(_mind_path(path))
    if model is None:
        _print_table(evaluation_table(frame, days=days))
        return
    try:
        bundle = Registry(get_settings().model_registry_path).load(model)
    except RegistryError as error:
        console.print(f"[red]cannot load {model}:[/red] {error}", highlight=False)
        raise typer.Exit(1) from error
    out = evaluate_bundle(bundle, holdout_split(frame)[1])
    console.print(format_table({f"{bundle.version}": out["metrics"]}), highlight=False, markup=False, soft_wrap=True)
    _print_reliability(out["reliability"])


@models_app.command("list")
def models_list() -> None:
    """Every saved version, with its holdout group AUC; * marks the promoted one."""
    from models.registry import Registry

    table = Table("", "version", "created (UTC)", "group AUC", "manifest")
    for row in Registry(get_settings().model_registry_path).list():
        auc = f"{row['group_auc']:.4f}" if row["group_auc"] is not None else "-"
        table.add_row("*" if row["promoted"] else "", row["version"], row["created_at"] or "-", auc,
                      "ok" if row["ok"] else "unreadable")  # fmt: skip
    console.print(table)


@models_app.command("promote")
def models_promote(version: str = typer.Argument(..., help="The version to serve, e.g. v0003.")) -> None:
    """Validate a version (load every artifact) and make it the promoted one."""
    from models.registry import Registry, RegistryError

    try:
        Registry(get_settings().model_registry_path).promote(version)
    except RegistryError as error:
        console.print(f"[red]not promoted:[/red] {error}", highlight=False)
        raise typer.Exit(1) from error
    console.print(f"promoted {version}")


@models_app.command("rollback")
def models_rollback() -> None:
    """Promote the previously promoted version again."""
    from models.registry import Registry, RegistryError

    try:
        version = Registry(get_settings().model_registry_path).rollback()
    except RegistryError as error:
        console.print(f"[red]no rollback:[/red] {error}", highlight=False)
        raise typer.Exit(1) from error
    console.print(f"promoted {version} again")


if __name__ == "__main__":
    app()
