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


@app.command()
def consume(
    idle_exit: float = typer.Option(None, help="Exit after this many idle seconds (default: run forever)."),
    metrics_port: int = typer.Option(None, help="Port of the Prometheus /metrics endpoint (default: settings)."),
) -> None:
    """Run the feature consumer: adloop.events -> user and ad features in Feast (Redis online, parquet offline)."""
    import redis
    from prometheus_client import start_http_server

    from streaming.consumer import FeatureConsumer

    settings = get_settings()
    start_http_server(settings.consumer_metrics_port if metrics_port is None else metrics_port, addr="127.0.0.1")
    consumer = FeatureConsumer(settings, redis_client=redis.Redis.from_url(settings.redis_url))
    report = consumer.run(idle_exit_s=idle_exit)
    console.print(
        f"applied {report.applied}, duplicates {report.duplicates}, replayed {report.replayed}, "
        f"dead-lettered {sum(report.dead_lettered.values())} {report.dead_lettered or ''}"
    )


@app.command()
def features(user_id: str) -> None:
    """Print a user's current online features, read through Feast's get_online_features."""
    import json

    from features.online import user_features_via_feast

    console.print_json(json.dumps(user_features_via_feast(get_settings(), user_id), default=str))


if __name__ == "__main__":
    app()
