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


DEFAULT_CLUSTER = "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"


def _show_slots(settings) -> None:
    from adloop.stack import redis_cluster as cluster

    table = Table("Redis Cluster node", "slots", "ranges", title="Redis Cluster")
    for node, count, ranges in cluster.slot_table(settings):
        table.add_row(node, f"{count:,}", ranges)
    console.print(table)


@stack_app.command("up")
def stack_up(
    redis_cluster: bool = typer.Option(False, help="Also start a local 3-master Redis Cluster (its nodes setting)."),
) -> None:
    """Install what is missing, start Kafka and Redis, wait until they answer, create the topics."""
    from adloop import stack
    from adloop.stack import redis_cluster as cluster

    started = time.monotonic()
    settings = get_settings()
    if redis_cluster and not settings.redis_cluster_nodes:
        settings = settings.model_copy(update={"redis_cluster_nodes": DEFAULT_CLUSTER})
        console.print(f"Redis Cluster on {DEFAULT_CLUSTER} (set ADLOOP_REDIS_CLUSTER_NODES to choose)")
    try:
        services = stack.up(settings)
        if redis_cluster:
            cluster.start_cluster(settings)
    except stack.StackError as error:
        console.print(f"[red]stack up failed:[/red] {error}", markup=True, highlight=False)
        raise typer.Exit(1) from error
    from features import store

    store.apply(get_settings())  # `feast apply`: registry and offline folders ready for the consumer
    _show_status(services)
    if redis_cluster:
        _show_slots(settings)
    console.print(f"stack ready in {time.monotonic() - started:.1f} s (Feast repo applied)")


@stack_app.command("down")
def stack_down() -> None:
    """Stop what `adloop stack up` started, nothing else."""
    from adloop import stack
    from adloop.stack import redis_cluster as cluster

    settings = get_settings()
    stopped = stack.down(settings) + cluster.stop_cluster(settings)
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing (no service started by adloop runs)"))


@stack_app.command("status")
def stack_status() -> None:
    """What runs, where, since when."""
    from adloop import stack

    settings = get_settings()
    services = stack.status(settings)
    _show_status(services)
    if settings.redis_cluster_nodes:
        _show_slots(settings)
    if not all(s.running for s in services):
        raise typer.Exit(1)
