"""The `adloop` command: a thin layer that parses options and calls plain functions."""

from __future__ import annotations

import logging
import time

import typer
from rich.console import Console
from rich.table import Table

from adloop.settings import get_settings

app = typer.Typer(help="adloop: real-time ad targeting (collect -> predict -> act).", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: real Kafka (KRaft) and Redis on loopback.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
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


@app.command("serve")
def serve(
    host: str = typer.Option(None, help="Bind address (default: ADLOOP_API_HOST)."),
    port: int = typer.Option(None, help="Port (default: ADLOOP_API_PORT)."),
    workers: int = typer.Option(
        1, min=1, help="Worker processes (each paces budgets on its own: see serving/pacing.py)."
    ),
) -> None:
    """Run the ad-serving API (uvicorn)."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        log_level="info",
        access_log=False,  # one canonical line per request belongs in the app, not per-hit access logs
    )


if __name__ == "__main__":
    app()
