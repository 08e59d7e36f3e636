"""Collect: replay and simulate events into Kafka, run the feature consumer, show features and the event schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import ProgressColumn
from rich.table import Table
from rich.text import Text

from adloop.cli.app import app, console, events_app, features_app
from adloop.settings import PROJECT_ROOT, get_settings
from features.redis_client import redis_client as open_redis


@app.command()
def consume(
    idle_exit: float = typer.Option(None, help="Exit after this many idle seconds (default: run forever)."),
    metrics_port: int = typer.Option(None, help="Port of the Prometheus /metrics endpoint (default: settings)."),
    reset_offsets: bool = typer.Option(
        False, "--reset-offsets", help="First forget the applied offsets stored in Redis (after recreating the topic)."
    ),
    processes: int = typer.Option(
        1, min=1, help="Consumer processes in the group, under one supervisor with one /metrics (1: in this process)."
    ),
) -> None:
    """Run the feature consumer: adloop.events -> user and ad features in Feast (Redis online, parquet offline)."""
    settings = get_settings()
    port = settings.consumer_metrics_port if metrics_port is None else metrics_port
    if reset_offsets:
        from streaming.consumer import GROUP
        from streaming.state_store import StateStore

        store = StateStore(open_redis(settings), group=GROUP, topic=settings.events_topic)
        forgotten = store.reset_offsets(range(settings.event_partitions))
        console.print(f"forgot the applied offsets of {settings.events_topic}: {dict(sorted(forgotten.items()))}")
    if processes > 1:
        # Before anything here imports prometheus_client: the supervisor sets its multiprocess folder.
        from adloop.runs.consumers import supervise

        summary = supervise(settings, processes, metrics_port=port, idle_exit_s=idle_exit)
        console.print(
            f"{processes} processes: applied {summary.applied:.0f}, duplicates {summary.duplicates:.0f}, "
            f"restarts {summary.restarts}"
        )
        raise typer.Exit(summary.exit_code)
    from prometheus_client import start_http_server

    from adloop.runs.consumers import stop_signals
    from streaming.consumer import FeatureConsumer, OffsetsAheadOfTopic

    client = open_redis(settings)
    start_http_server(port, addr="127.0.0.1")
    consumer = FeatureConsumer(settings, redis_client=client)
    try:
        with stop_signals() as stopping:  # SIGTERM too ends the batch in hand, then leaves the group
            report = consumer.run(stop=stopping.is_set, idle_exit_s=idle_exit)
    except OffsetsAheadOfTopic as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from error
    console.print(
        f"applied {report.applied}, duplicates {report.duplicates}, replayed {report.replayed}, "
        f"dead-lettered {sum(report.dead_lettered.values())} {report.dead_lettered or ''}"
    )


@features_app.command("show")
def features_show(user_id: str) -> None:
    """Print a user's current online features, read through Feast's get_online_features."""
    import json

    from features.online import user_features_via_feast

    console.print_json(json.dumps(user_features_via_feast(get_settings(), user_id), default=str))


@features_app.command("apply")
def features_apply() -> None:
    """`feast apply` for adloop's repo with the settings' Redis and data folder: entities, sources, views."""
    from features import store

    settings = get_settings()
    store.apply(settings)
    console.print(f"applied {settings.feast_repo_path} (registry and offline files in {settings.feast_data_dir})")


@features_app.command("env")
def features_env() -> None:
    """Print the `export` lines that let the `feast` CLI run on the repo: `eval "$(adloop features env)"`."""
    import shlex

    from features import store

    settings = get_settings()
    for name, value in store.feast_environment(settings).items():
        typer.echo(f"export {name}={shlex.quote(value)}")
    typer.echo(f"cd {shlex.quote(str(settings.feast_repo_path))}  # then e.g. `feast feature-views list`")


@app.command("replay")
def replay(
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="The data-set file (behaviors.tsv for MIND).")
    ],
    format: Annotated[str, typer.Option("--format", "-f", help="taobao | mind | obd | jsonl | globo")],
    speed: Annotated[
        float | None, typer.Option(help="Replay event time N times faster (default: as fast as possible).")
    ] = None,
    max_rate: Annotated[float | None, typer.Option(help="At most R events per second.")] = None,
    limit: Annotated[int | None, typer.Option(help="Send only the first N events.")] = None,
    topic: Annotated[str | None, typer.Option(help="Kafka topic (default: the events topic of the settings).")] = None,
) -> None:
    """Replay a data set to Kafka as contract events, key = user id."""
    from itertools import islice

    from streaming import replay as replays

    try:
        events = replays.read(path, format)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--format") from error
    _produce(islice(events, limit), topic, speed=speed, max_rate=max_rate, total=limit, label=f"replay {format}")


@app.command("simulate")
def simulate(
    users: Annotated[int, typer.Option(help="Synthetic users in the population.")] = 1_000,
    events: Annotated[int, typer.Option(help="Browsing events to generate.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same users and events.")] = 7,
    speed: Annotated[
        float | None, typer.Option(help="Send event time N times faster (default: as fast as possible).")
    ] = None,
    max_rate: Annotated[float | None, typer.Option(help="At most R events per second.")] = None,
    topic: Annotated[str | None, typer.Option(help="Kafka topic (default: the events topic of the settings).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write JSONL here instead of sending to Kafka.")] = None,
    start: Annotated[
        str | None,
        typer.Option(help="Event time of the first event: RFC 3339 or 'now' (default: a fixed day, reproducible)."),
    ] = None,
) -> None:
    """Send a SYNTHETIC population's browsing events (source=simulate), users with hidden preferences."""
    from datetime import UTC, datetime

    from streaming.simulate import Population, SimConfig

    config = SimConfig(users=users, seed=seed)
    if start:
        first = datetime.now(UTC) if start == "now" else datetime.fromisoformat(start.replace("Z", "+00:00"))
        config = SimConfig(users=users, seed=seed, start=first if first.tzinfo else first.replace(tzinfo=UTC))
    population = Population(config)
    console.print(f"[bold yellow]SYNTHETIC[/bold yellow] data: {users:,} simulated users, seed {seed}")
    if out is None:
        _produce(
            population.events(events), topic, speed=speed, max_rate=max_rate, total=events, label="simulate (SYNTHETIC)"
        )
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as file:
        for event in population.events(events):
            file.write(event.to_bytes() + b"\n")
    console.print(f"wrote {events:,} SYNTHETIC events to {out}")


@events_app.command("schema")
def events_schema(
    out: Annotated[Path, typer.Option(help="Where to write the JSON Schema.")] = PROJECT_ROOT
    / "docs"
    / "events.schema.json",
    check: Annotated[
        bool, typer.Option(help="Do not write: fail if the file differs from the generated schema.")
    ] = False,
) -> None:
    """Write the JSON Schema of the event contract (generated from streaming.events)."""
    import json

    from streaming.events import json_schema

    text = json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    if check:
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            console.print(f"[red]{out} is out of date:[/red] run `adloop events schema`")
            raise typer.Exit(1)
        console.print(f"{out} is up to date")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    console.print(f"wrote {out}")


def _produce(events, topic: str | None, *, speed, max_rate, total: int | None, label: str) -> None:
    """Send events with a progress bar (count, rate) and print a summary table; exit 1 on failures."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from streaming.producer import BrokerUnavailable, build_producer, produce_events
    from streaming.replay import ReplayFormatError

    settings = get_settings()
    topic = topic or settings.events_topic
    try:
        producer = build_producer(settings)
    except BrokerUnavailable as error:
        console.print(str(error), style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeElapsedColumn()]
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"{label} -> {topic}", total=total)
            summary = produce_events(
                producer, topic, events, speed=speed, max_rate=max_rate, progress=lambda n: progress.advance(task, n)
            )
    except ReplayFormatError as error:
        message = f"replay stopped at {error} (the events before that line were sent)"
        console.print(message, style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error
    finally:
        producer.close()
    _show_summary(summary, topic, label)
    if summary.failed:
        console.print(f"[red]{summary.failed} messages were not acknowledged by the broker[/red]")
        raise typer.Exit(1)


class _RateColumn(ProgressColumn):
    """Events per second, as rich measures the task's speed."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} ev/s" if task.speed else "- ev/s")


def _show_summary(summary, topic: str, label: str) -> None:
    table = Table("event_type", "count", title=f"{label} -> {topic}")
    for kind, count in sorted(summary.by_type.items()):
        table.add_row(kind, f"{count:,}")
    table.add_section()
    table.add_row("total", f"{summary.count:,}")
    console.print(table)
    console.print(
        f"{summary.count:,} events in {summary.seconds:.2f} s ({summary.rate:,.0f} events/s); "
        f"event time {summary.first_ts or '-'} .. {summary.last_ts or '-'}; "
        f"invalid (sent for dead-lettering) {summary.invalid:,}; failed {summary.failed:,}",
        highlight=False,
    )
