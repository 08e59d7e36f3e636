"""Learn: train and evaluate models, and the model registry (`adloop models ...`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from adloop import settings as settings_module
from adloop.cli.app import app, console, models_app
from adloop.settings import get_settings


def _mind_path(path: Path | None) -> Path:
    """The MIND folder: the argument (the folder or its behaviors.tsv), else $ADLOOP_SHARED_DATA/mind, else
    ../shared/data/mind from here or from the project root."""
    if path is not None and path.name == "behaviors.tsv":
        path = path.parent
    root = settings_module.PROJECT_ROOT  # read at call time (tests move it)
    candidates = [path] if path else [Path("../shared/data/mind"), root.parent / "shared" / "data" / "mind"]
    if not path and os.environ.get("ADLOOP_SHARED_DATA"):
        candidates.insert(0, Path(os.environ["ADLOOP_SHARED_DATA"]) / "mind")
    for candidate in candidates:
        if (candidate / "behaviors.tsv").is_file():
            return candidate
    console.print(f"[red]no MIND data:[/red] no behaviors.tsv in {' or '.join(map(str, candidates))}")
    raise typer.Exit(2)


def _print_table(out: dict) -> None:
    from models.evaluate import format_table

    holdout = out["holdout"]
    days = "last day" if holdout["days"] == 1 else f"last {holdout['days']} days, each by a model of the days before"
    console.print(f"holdout: {days}; {holdout['requests']} requests, {holdout['rows']} candidates", soft_wrap=True)
    console.print(format_table(out["rows"]), highlight=False, markup=False, soft_wrap=True)
    for name, gap in out.get("paired", {}).items():
        console.print(f"group AUC, {name}: {gap['difference']:+.4f} (paired standard error {gap['se']:.4f}, "
                      f"{gap['impressions']} impressions)", highlight=False, markup=False, soft_wrap=True)  # fmt: skip
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
    from_log: Annotated[
        bool, typer.Option("--from-log", help="Train on the impressions and clicks logged on Kafka, through Feast.")
    ] = False,
    click_window: Annotated[float, typer.Option(help="--from-log: a click counts within this many seconds.")] = 1800,
    promote: Annotated[bool, typer.Option(help="--from-log: promote the new version.")] = False,
) -> None:
    """Train a version: on the MIND stream (default; all days but the last, evaluated on the last), or on
    the served log (--from-log: labelled impressions joined with point-in-time Feast features)."""
    if from_log:
        from models.retrain import train_from_log
        from streaming.topic_reader import read_events

        settings = get_settings()
        try:
            done = train_from_log(
                settings, read_events(settings), click_window_s=click_window, seed=seed, promote=promote
            )
        except ValueError as error:
            console.print(f"[red]cannot train:[/red] {error}", highlight=False)
            raise typer.Exit(1) from error
        console.print_json(data={k: v for k, v in done.items() if k != "reliability"})
        return
    from models.evaluate import evaluation_table, load_mind
    from models.registry import Registry
    from models.train import TrainConfig
    from models.two_tower import TwoTowerConfig

    started = time.monotonic()
    frame = load_mind(_mind_path(data))
    config = TrainConfig(seed=seed, tower=TwoTowerConfig(seed=seed))
    out = evaluation_table(frame, config, ablation=False)
    registry = Registry.from_settings(get_settings())
    version = registry.save(
        out["bundle"], report=out["report"], metrics=out["rows"] | {"reliability": out["reliability"]}
    )
    _print_table(out)
    console.print(f"saved {version} in {registry.root} ({time.monotonic() - started:.1f} s); "
                  f"promote it with `adloop models promote {version}`", highlight=False)  # fmt: skip


@app.command("learn")
def learn_cmd(
    once: Annotated[bool, typer.Option("--once", help="One check (and training if due), then exit.")] = False,
) -> None:
    """Retrain continuously from the served log: every ADLOOP_LEARN_EVERY_IMPRESSIONS new impressions or
    ADLOOP_LEARN_EVERY_MINUTES, train, evaluate, promote through the gate; serving follows by itself."""
    import signal
    import threading

    from prometheus_client import start_http_server

    from models.learn_service import LearnService

    settings = get_settings()
    service = LearnService(settings)
    if once:
        console.print_json(data=service.step())
        return
    start_http_server(settings.learn_metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(f"learning from {settings.events_topic}; metrics on :{settings.learn_metrics_port}", highlight=False)
    service.run(stop)


@app.command("evaluate")
def evaluate_cmd(
    path: Annotated[Path | None, typer.Argument(help="MIND folder; default ../shared/data/mind.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="A saved version to score PATH's last day.")] = None,
    days: Annotated[int, typer.Option("--days", help="Holdout days, each scored by a model of the days before.")] = 1,
    pipeline: Annotated[
        bool, typer.Option("--pipeline", help="With --model: replay PATH through Kafka, the consumer and Redis.")
    ] = False,
    data: Annotated[str, typer.Option("--data", help="mind, or globo (next-in-session clicks).")] = "mind",
    all_events: Annotated[bool, typer.Option("--all", help="globo: score every eligible event.")] = False,
    sample: Annotated[float, typer.Option("--sample", help="globo: share of eligible events scored.")] = 0.1,
    eval_from: Annotated[str | None, typer.Option("--from", help="globo: first evaluated UTC day.")] = None,
) -> None:
    """The evaluation table (train on earlier days, score the last day prequentially), or one saved version's."""
    if data == "globo":
        from adloop.cli.globo import evaluate_globo_cmd

        evaluate_globo_cmd(path, model=model, all_events=all_events, eval_from=eval_from, sample=sample)
        return
    if data != "mind":
        console.print(f"[red]--data {data}:[/red] use mind or globo")
        raise typer.Exit(2)
    from models.evaluate import evaluate_bundle, evaluation_table, format_table, holdout_split, load_mind
    from models.registry import Registry, RegistryError

    frame = load_mind(_mind_path(path))
    if model is None:
        _print_table(evaluation_table(frame, days=days))
        return
    try:
        bundle = Registry.from_settings(get_settings()).load(model)
    except RegistryError as error:
        console.print(f"[red]cannot load {model}:[/red] {error}", highlight=False)
        raise typer.Exit(1) from error
    if pipeline:
        _evaluate_through_pipeline(_mind_path(path), bundle)
        return
    out = evaluate_bundle(bundle, holdout_split(frame)[1])
    console.print(format_table({f"{bundle.version}": out["metrics"]}), highlight=False, markup=False, soft_wrap=True)
    _print_reliability(out["reliability"])


def _evaluate_through_pipeline(path: Path, bundle: Any) -> None:
    """The saved version's metrics on PATH's last day, replayed through Kafka, the consumer and Redis."""
    from rich.progress import Progress

    from adloop.runs.pipeline_eval import score_through_pipeline
    from models.evaluate import format_table, metrics_row
    from models.metrics import reliability_table

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("requests of the last day, scored from Redis", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        rows = score_through_pipeline(get_settings(), path / "behaviors.tsv", bundle, progress=advance)
    probs = rows["prob"].to_numpy()
    title = f"{bundle.version} through Kafka, the consumer and Redis"
    console.print(format_table({title: metrics_row(rows, probs, probs)}), highlight=False, markup=False, soft_wrap=True)
    _print_reliability(reliability_table(rows["label"].to_numpy(), probs, 10, "quantile"))


@models_app.command("list")
def models_list() -> None:
    """Every saved version, with its holdout group AUC; * marks the promoted one."""
    from models.registry import Registry

    table = Table("", "version", "created (UTC)", "group AUC", "manifest", "gate", "last load failure")
    for row in Registry.from_settings(get_settings()).list():
        auc = f"{row['group_auc']:.4f}" if row["group_auc"] is not None else "-"
        failure = row["load_failure"]
        gate = row["gate"]["decision"] if row["gate"] else "-"
        table.add_row("*" if row["promoted"] else "", row["version"], row["created_at"] or "-", auc,
                      "ok" if row["ok"] else "unreadable", gate,
                      f"{failure['at']} {failure['process']}: {failure['reason']}" if failure else "-")  # fmt: skip
    console.print(table)


@models_app.command("promote")
def models_promote(
    version: str = typer.Argument(..., help="The version to serve, e.g. v0003."),
    force: Annotated[bool, typer.Option("--force", help="Promote even when the gate refuses.")] = False,
    hours: Annotated[float, typer.Option(help="The gate replays this many hours of the served log.")] = 6.0,
    click_window: Annotated[float, typer.Option(help="A click counts within this many seconds.")] = 1800,
) -> None:
    """Validate a version (load every artifact), compare it with the promoted one on recent logged traffic
    neither trained on (the gate: models/gate.py), store the comparison in its manifest, and promote it
    unless it is worse beyond noise (or --force)."""
    from models.gate import GateRefused, promote_through_gate
    from models.registry import Registry, RegistryError

    settings = get_settings()
    registry = Registry.from_settings(settings)
    try:
        gate = promote_through_gate(settings, registry, version, _logged(settings, registry, version), force=force,
                                    hours=hours, click_window_s=click_window)  # fmt: skip
    except GateRefused as refused:
        _print_gate(refused.gate)
        console.print(f"[red]not promoted:[/red] {refused} (--force promotes anyway)", highlight=False)
        raise typer.Exit(1) from refused
    except RegistryError as error:
        console.print(f"[red]not promoted:[/red] {error}", highlight=False)
        raise typer.Exit(1) from error
    _print_gate(gate)
    console.print(f"promoted {version}" + (" (forced past the gate)" if gate.get("forced") else ""))


def _logged(settings: Any, registry: Any, version: str) -> Any:
    """The served log, read only when the gate needs it (a promoted version other than `version`)."""
    from streaming.topic_reader import read_events

    current = registry.promoted()
    return read_events(settings) if current is not None and current != version else iter(())


def _print_gate(gate: dict[str, Any]) -> None:
    console.print(f"gate: {gate['decision']} ({gate['reason']}); rule: {gate['rule']}", highlight=False)
    if not gate.get("table"):
        return
    table = Table("version", "logloss", "group AUC", "AUC", "mean pCTR", "observed CTR", "SNIPS CTR [95%]",
                  title=f"{gate['impressions']} unseen impressions, {gate['clicks']} clicks")  # fmt: skip
    for version, row in gate["table"].items():
        keys = ("logloss", "group_auc", "auc", "mean_pctr", "observed_ctr")
        scores = (f"{row[k]:.4f}" if k in row else "" for k in keys)
        snips = ""
        if "snips_ctr" in row:
            snips = f"{row['snips_ctr']:.4f} [{row['snips_low']:.4f}, {row['snips_high']:.4f}]"
        table.add_row(version, *scores, snips)
    loss, group = gate["paired"]["logloss"], gate["paired"]["group_auc"]
    ope = gate.get("off_policy", {}).get("difference")
    table.add_row("difference", f"{loss['difference']:+.4f} ± {loss['se']:.4f}",
                  f"{group['difference']:+.4f} ± {group['se']:.4f}", "", "", "",
                  f"{ope['difference']:+.4f} ± {ope['se']:.4f}" if ope else "")  # fmt: skip
    console.print(table)
    off = gate.get("off_policy") or {}
    if off.get("decision") == "no evidence":
        console.print(f"off-policy estimate: no evidence ({off['reason']})", highlight=False)
    console.print(table)


@models_app.command("export")
def models_export(
    version: str = typer.Argument(..., help="The version to export, e.g. v0003."),
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder to write; default .stack/exports/VERSION-onnx.")
    ] = None,
) -> None:
    """Write the user tower as ONNX and the ad vectors as .npy, with a scorer that needs only onnxruntime
    (docs/models.md, "Export for the edge")."""
    from models.export import export_onnx
    from models.registry import Registry, RegistryError

    if fmt != "onnx":
        console.print(f"[red]unknown format {fmt!r}:[/red] only onnx", highlight=False)
        raise typer.Exit(2)
    settings = get_settings()
    out = out or settings.stack_dir / "exports" / f"{version}-onnx"
    try:
        bundle = Registry.from_settings(settings).load(version, compiled=False)
        manifest = export_onnx(bundle, out)
    except (RegistryError, FileExistsError) as error:
        console.print(f"[red]not exported:[/red] {error}", highlight=False)
        raise typer.Exit(1) from error
    console.print(f"exported {version} ({manifest['ads']} ad vectors, dim {manifest['dim']}) to {out}")
    console.print(f'score a user there: python {out / "score_user.py"} {out} \'{{"recent_items": ["N1"]}}\'')


@models_app.command("rollback")
def models_rollback() -> None:
    """Promote the previously promoted version again."""
    from models.registry import Registry, RegistryError

    try:
        version = Registry.from_settings(get_settings()).rollback()
    except RegistryError as error:
        console.print(f"[red]no rollback:[/red] {error}", highlight=False)
        raise typer.Exit(1) from error
    console.print(f"promoted {version} again")
