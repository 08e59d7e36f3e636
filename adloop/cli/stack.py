"""`adloop stack up | down | status`: the local Kafka and Redis."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from adloop.cli.app import console, stack_app
from adloop.settings import get_settings


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
    from features import store

    store.apply(get_settings())  # `feast apply`: registry and offline folders ready for the consumer
    _show_status(services)
    console.print(f"stack ready in {time.monotonic() - started:.1f} s (Feast repo applied)")


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
