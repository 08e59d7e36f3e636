"""Observe: land outcomes, report what targeting achieved, check the off-policy estimators."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from adloop.cli.app import app, console
from adloop.settings import PROJECT_ROOT, get_settings


@app.command("report")
def report(
    charts: Annotated[
        Path | None, typer.Option(help="Folder of the PNG charts (default: settings' report_dir).")
    ] = None,
    since_minutes: Annotated[float | None, typer.Option(help="Only impressions of the last M minutes.")] = None,
) -> None:
    """What targeting achieved: CTR per arm with CI, lift with CI, campaigns, model versions; PNG charts."""
    from outcomes import report as reports
    from outcomes.store import Filters, OutcomeStore

    settings = get_settings()
    filters = None
    if since_minutes is not None:
        from datetime import UTC, datetime, timedelta

        filters = Filters(start=datetime.now(UTC) - timedelta(minutes=since_minutes))
    data = reports.collect(OutcomeStore(settings.outcomes_path), filters)
    reports.render(console, data)
    for path in reports.write_charts(data, charts or settings.report_dir):
        console.print(f"chart: {path}")


@app.command("land")
def land(
    idle_exit: float = typer.Option(None, help="Exit after this many idle seconds (default: run until stopped)."),
) -> None:
    """Run the outcomes lander: ad events of adloop.events (and dead letters) -> DuckDB (settings' outcomes_path)."""
    import signal

    from outcomes.lander import OutcomeLander
    from outcomes.store import OutcomeStore

    settings = get_settings()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    lander = OutcomeLander(settings, OutcomeStore(settings.outcomes_path))
    result = lander.run(stop=lambda: bool(stopping), idle_exit_s=idle_exit)
    console.print(
        f"landed {result.landed}, duplicates {result.duplicates}, other events {result.skipped}, "
        f"invalid {result.invalid}, dead letters {result.dead_letters}"
    )


@app.command("ope")
def ope(
    root: Annotated[
        Path | None,
        typer.Option(
            help="Open Bandit Dataset folder (default: ../shared/data/obd, else the committed slice data/obd)."
        ),
    ] = None,
    campaign: str = typer.Option("all", help="all, men or women (the committed slice has only all)."),
) -> None:
    """Off-policy check on the Open Bandit Dataset: each policy's CTR estimated from the other's logs."""
    from outcomes import ope

    if root is None:
        shared = Path(os.environ.get("ADLOOP_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data") / "obd"
        root = shared if (shared / "random").exists() else PROJECT_ROOT / "data" / "obd"
    table = Table("target", "from logs of", "rows", "observed CTR", "IPS", "SNIPS", "DR", title=f"OPE on {root}")
    for target in ope.POLICIES:
        result = ope.check(root, target, campaign)

        def cell(name: str, result=result) -> str:
            est = getattr(result, name)
            return f"{est.value:.3%} ± {1.96 * est.se:.3%} (z {result.z(name):+.2f})"

        observed = f"{result.observed.value:.3%} ± {1.96 * result.observed.se:.3%}"
        table.add_row(target, result.behaviour, f"{result.rows:,}", observed, cell("ips"), cell("snips"), cell("dr"))
    console.print(table)
    console.print("± is a 95% interval; z = (estimate - observed) / combined standard error")
