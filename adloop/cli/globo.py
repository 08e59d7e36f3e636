"""`adloop evaluate --data globo [PATH]`: the Globo next-in-session table (models.globo_eval), printed."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

import typer

from adloop import settings as settings_module
from adloop.cli.app import console
from adloop.settings import get_settings


def globo_path(path: Path | None) -> Path:
    """The clicks file: the argument (the file or its folder), else $ADLOOP_SHARED_DATA/globo, else
    ../shared/data/globo from here or from the project root."""
    root = settings_module.PROJECT_ROOT  # read at call time (tests move it)
    folders = [path] if path else [Path("../shared/data/globo"), root.parent / "shared" / "data" / "globo"]
    if not path and os.environ.get("ADLOOP_SHARED_DATA"):
        folders.insert(0, Path(os.environ["ADLOOP_SHARED_DATA"]) / "globo")
    for candidate in folders:
        if candidate.is_file():
            return candidate
        if (candidate / "clicks.csv.gz").is_file():
            return candidate / "clicks.csv.gz"
    console.print(f"[red]no Globo data:[/red] no clicks.csv.gz in {' or '.join(map(str, folders))}")
    raise typer.Exit(2)


def evaluate_globo_cmd(
    path: Path | None, *, model: str | None, all_events: bool, eval_from: str | None, sample: float
) -> None:
    """Train and evaluate on PATH (the frozen models saved as a new Globo version), or with `model` score
    PATH's evaluated days with that saved version, without training."""
    from models.globo import Protocol, format_paired, format_table, read_clicks
    from models.globo_eval import GloboConfig, evaluate_globo, evaluate_saved

    source = globo_path(path)
    began = time.perf_counter()
    clicks = read_clicks(source)
    read_seconds = time.perf_counter() - began
    protocol = Protocol(eval_from=eval_from, sample=1.0 if all_events else sample)
    registry = get_settings().model_registry_path
    if model is not None:
        try:
            report = evaluate_saved(clicks, registry, model, protocol)
        except FileNotFoundError as error:
            console.print(f"[red]cannot load {model}:[/red] {error}", highlight=False)
            raise typer.Exit(1) from error
    else:
        report = evaluate_globo(clicks, GloboConfig(protocol=protocol), save_to=registry)
    info = report.info
    start, end = (datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M") for ms in info["window"])
    share = "all" if all_events else f"a seeded {protocol.sample:.0%}"
    console.print(
        f"{source}: {len(clicks):,} clicks (read in {read_seconds:.1f} s); evaluated [{start}, {end}) UTC: "
        f"{share} of {info['eligible']:,} next-in-session clicks = {info['events']:,} events "
        f"({info['sessions']:,} sessions), {protocol.negatives} negatives each from the last hour's clicks; "
        f"clicked article in that pool for {info['in_pool']:.1%}; first clicked within the "
        f"evaluated days for {info['new_articles']:.1%}",
        highlight=False, markup=False, soft_wrap=True,
    )  # fmt: skip
    console.print(format_table(report.rows), highlight=False, markup=False, soft_wrap=True)
    console.print("Paired differences (95% intervals, sessions as clusters):", highlight=False)
    console.print(format_paired(report.paired), highlight=False, markup=False, soft_wrap=True)
    if model is not None:
        console.print(f"version {model}: {info['known_articles']:.1%} of PATH's articles known to it; "
                      f"{info['total_seconds']:.0f} s", highlight=False, soft_wrap=True)  # fmt: skip
        return
    console.print(
        f"saved as {info['version']} (`adloop evaluate --data globo PATH --model {info['version']}`); "
        f"training {info['training_seconds']:.0f} s (sequence model {info['sequence_seconds']:.0f} s on "
        f"{info['sequence_pairs']:,} pairs incl. {info['refreshes']} refreshes in the evaluated days; "
        f"trees {info['tree_seconds']:.0f} s on "
        f"{info['ranker_events']:,} events); probes {info['probe_seconds']:.0f} s; "
        f"evaluation in all {info['total_seconds']:.0f} s",
        highlight=False, markup=False, soft_wrap=True,
    )  # fmt: skip
