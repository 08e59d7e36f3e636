"""The `adloop` command: a thin layer that parses options and calls plain functions."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import ProgressColumn
from rich.table import Table
from rich.text import Text

from adloop.settings import PROJECT_ROOT, get_settings

app = typer.Typer(help="adloop: real-time ad targeting (collect -> predict -> act).", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: real Kafka (KRaft) and Redis on loopback.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
events_app = typer.Typer(help="The event contract (schema_version 1).", no_args_is_help=True)
app.add_typer(events_app, name="events")
models_app = typer.Typer(help="The model registry: list, promote, roll back versions.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("kafka", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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


@app.command("replay")
def replay(
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="The data-set file (behaviors.tsv for MIND).")
    ],
    format: Annotated[str, typer.Option("--format", "-f", help="taobao | mind | obd | jsonl")],
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


@app.command("report")
def report(
    charts: Annotated[
        Path | None, typer.Option(help="Folder of the PNG charts (default: settings' report_dir).")
    ] = None,
    since_minutes: Annotated[float | None, typer.Option(help="Only impressions of the last M minutes.")] = None,
) -> None:
    """What targeting achieved: CTR per arm with CI, lift with CI, campaigns, model versions; PNG charts."""
    from adloop import report as reports
    from streaming.outcomes import Filters, OutcomeStore

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

    from streaming.outcomes import OutcomeLander, OutcomeStore

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
    from streaming import obd_ope

    if root is None:
        shared = Path(os.environ.get("ADLOOP_SHARED_DATA") or PROJECT_ROOT.parent / "shared" / "data") / "obd"
        root = shared if (shared / "random").exists() else PROJECT_ROOT / "data" / "obd"
    table = Table("target", "from logs of", "rows", "observed CTR", "IPS", "SNIPS", "DR", title=f"OPE on {root}")
    for target in obd_ope.POLICIES:
        result = obd_ope.check(root, target, campaign)

        def cell(name: str, result=result) -> str:
            est = getattr(result, name)
            return f"{est.value:.3%} ± {1.96 * est.se:.3%} (z {result.z(name):+.2f})"

        observed = f"{result.observed.value:.3%} ± {1.96 * result.observed.se:.3%}"
        table.add_row(target, result.behaviour, f"{result.rows:,}", observed, cell("ips"), cell("snips"), cell("dr"))
    console.print(table)
    console.print("± is a 95% interval; z = (estimate - observed) / combined standard error")


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

    from adloop import demo as demos
    from adloop import report as reports
    from streaming.outcomes import Filters, OutcomeStore

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


@app.command("serve")
def serve(
    host: str = typer.Option(None, help="Bind address (default: ADLOOP_API_HOST)."),
    port: int = typer.Option(None, help="Port (default: ADLOOP_API_PORT)."),
    workers: int = typer.Option(
        1, min=1, help="Worker processes (they share budget spend through Redis: serving/pacing.py)."
    ),
) -> None:
    """Run the ad-serving API (uvicorn)."""
    import shutil

    import uvicorn

    settings = get_settings()
    port = port or settings.api_port
    if workers > 1:  # each worker counts in files there and /metrics sums them (serving/metrics.py)
        folder = settings.stack_dir / f"prometheus-{port}"
        shutil.rmtree(folder, ignore_errors=True)  # an earlier run's counts would add to this one's
        folder.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ["ADLOOP_METRICS_DIR"] = str(folder)
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=False,  # one canonical line per request belongs in the app, not per-hit access logs
    )


def _mind_path(path: Path | None) -> Path:
    """The MIND folder: the argument, else $ADLOOP_SHARED_DATA/mind, else ../shared/data/mind from here or
    from the project root."""
    from adloop.settings import PROJECT_ROOT

    candidates = [path] if path else [Path("../shared/data/mind"), PROJECT_ROOT.parent / "shared" / "data" / "mind"]
    if not path and os.environ.get("ADLOOP_SHARED_DATA"):
        candidates.insert(0, Path(os.environ["ADLOOP_SHARED_DATA"]) / "mind")
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
        from streaming.log import read_events

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
    pipeline: Annotated[
        bool, typer.Option("--pipeline", help="With --model: replay PATH through Kafka, the consumer and Redis.")
    ] = False,
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
    if pipeline:
        _evaluate_through_pipeline(_mind_path(path), bundle)
        return
    out = evaluate_bundle(bundle, holdout_split(frame)[1])
    console.print(format_table({f"{bundle.version}": out["metrics"]}), highlight=False, markup=False, soft_wrap=True)
    _print_reliability(out["reliability"])


def _evaluate_through_pipeline(path: Path, bundle: Any) -> None:
    """The saved version's metrics on PATH's last day, replayed through Kafka, the consumer and Redis."""
    from rich.progress import Progress

    from adloop.pipeline_eval import score_through_pipeline
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
