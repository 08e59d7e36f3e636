"""`adloop demo`: the whole loop end to end on SYNTHETIC users."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from adloop.cli.app import app, console
from adloop.settings import get_settings


@app.command("demo")
def demo(
    minutes: Annotated[float, typer.Option(help="Traffic phase, wall-clock minutes.")] = 2.0,
    users: Annotated[int, typer.Option(help="SYNTHETIC users in the population.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the population and its clicks.")] = 7,
    rate: Annotated[float, typer.Option(help="At most this many ad requests per second.")] = 20.0,
    control_share: Annotated[float, typer.Option(help="Share of users served without targeting.")] = 0.2,
    hold: Annotated[float, typer.Option(help="Keep the API and dashboard up this many seconds after traffic.")] = 0.0,
) -> None:
    """The loop end to end: stack, SYNTHETIC users, features, API, clicks, outcomes; then the report."""
    from rich.status import Status

    from adloop.runs import demo as demos
    from outcomes import report as reports
    from outcomes.store import Filters, OutcomeStore

    settings = get_settings()
    config = demos.DemoConfig(
        minutes=minutes, users=users, seed=seed, requests_per_second=rate, control_share=control_share, hold_s=hold
    )
    started = time.monotonic()
    with Status("starting", console=console) as status:

        def step(text: str) -> None:
            console.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {text}", highlight=False)
            status.update(text)

        try:
            result = demos.run(settings, config, on_step=step)
        except Exception as error:
            console.print(f"[red]demo failed:[/red] {error}", markup=True, highlight=False)
            raise typer.Exit(1) from error
    traffic = result.traffic
    console.print(
        f"served {sum(traffic.impressions.values()):,} ads ({dict(traffic.impressions)}), "
        f"{sum(traffic.clicks.values()):,} clicks ({dict(traffic.clicks)}); landed {result.landed}; "
        f"fallbacks {dict(traffic.fallbacks) or 'none'}; model versions {dict(traffic.model_versions)}",
        highlight=False,
    )
    data = reports.collect(OutcomeStore(settings.outcomes_path), Filters(start=result.since))  # this run only
    reports.render(console, data)
    for path in reports.write_charts(data, settings.report_dir):
        console.print(f"chart: {path}")
    console.print(
        f"the demo's API has stopped; `adloop serve` then http://127.0.0.1:{settings.api_port}/dashboard "
        "shows the same outcomes (use --hold S to keep the demo's dashboard up)"
    )
