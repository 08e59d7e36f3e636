"""`adloop demo`: the whole loop in one bounded command (collect -> predict -> act -> observe).

  stack up (real Kafka + Redis) and `feast apply`
  -> a demo catalog whose ad categories are the simulator's (so hidden preferences can show)
  -> the SYNTHETIC population's browsing to Kafka (features to learn from), then a SYNTHETIC served log:
     requests shown two ads drawn uniformly (propensity logged), clicked by hidden preference
  -> subprocesses: feature consumer (`adloop consume`), outcomes lander (`adloop land`), API (`adloop serve`)
  -> train the first model on that log (labelled impressions + point-in-time Feast features,
     models.retrain), promote, POST /v1/admin/reload
  -> traffic, first half: simulated users ask `POST /v1/select`; each served ad may be clicked by the
     user's hidden preference (`Population.click_event`), clicks go to Kafka; the API logs the impressions
  -> retrain on everything logged so far (the new impressions and clicks included), promote, reload
     (too little data or a failed training: serving keeps what it had)
  -> traffic, second half (the new model's version is on every impression: the report compares them)
  -> wait until the lander has every impression and click, stop everything started, report.

This module is an entry point (like the CLI): it assembles processes and talks to the API over HTTP.
Progress goes through `on_step(text)` so the CLI decides how to show it.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

from adloop.settings import Settings
from serving.catalog import generate_catalog, write_catalog
from streaming.events import SCHEMA_VERSION, Event, EventType
from streaming.simulate import CATEGORIES, Population, SimConfig

log = logging.getLogger(__name__)
SLOT = {"slot_id": "feed", "format": "native", "count": 2}
START_TIMEOUT_S = 90.0  # the API and the consumers import the whole stack: seconds on a busy laptop
CATCH_UP_TIMEOUT_S = 60.0
HISTORY_SPAN = timedelta(seconds=30)  # the served log's event times: the half-minute before the processes start
HISTORY_VERSION = "simulated-uniform"  # model_version on the served log's impressions


@dataclass(frozen=True)
class DemoConfig:
    minutes: float = 2.0  # traffic phase, wall time
    users: int = 500  # simulated users
    seed: int = 7
    browsing_events: int = 20  # per user, sent before traffic (the features targeting learns from)
    history_requests: int = 1000  # the SYNTHETIC explored log the first model is trained on
    requests_per_second: float = 20.0  # traffic rate cap
    max_requests: int | None = None  # stop traffic earlier (tests)
    control_share: float = 0.2  # share of users served without targeting (a demo wants a visible control)
    base_ctr: float = 0.05  # the simulated users' click rate on an ad of average preference
    conversion_rate: float = 0.2  # mean chance that a click converts (hidden, per category: 0.5x to 1.5x this)
    order_value: float = 40.0  # mean value of a conversion, USD (log-normal)
    ads: int = 200  # demo catalog size
    hold_s: float = 0.0  # keep the API (and dashboard) up this long after traffic
    folder: Path | None = None  # demo catalog and process logs (default: <stack_dir>/demo)


@dataclass
class TrafficReport:
    requests: int = 0
    impressions: Counter[str] = field(default_factory=Counter)  # arm -> ads served
    clicks: Counter[str] = field(default_factory=Counter)  # arm -> clicks produced
    conversions: Counter[str] = field(default_factory=Counter)  # arm -> conversions posted
    revenue: Counter[str] = field(default_factory=Counter)  # arm -> USD of the conversions posted
    fallbacks: Counter[str] = field(default_factory=Counter)  # reason -> requests
    model_versions: Counter[str] = field(default_factory=Counter)
    errors: int = 0


@dataclass
class DemoResult:
    traffic: TrafficReport
    landed: dict[str, int]  # impressions / clicks in the outcomes store at the end
    model_version: str | None  # the version retrained after the first half, None when training failed
    dashboard_url: str
    folder: Path
    since: datetime  # start of this run's traffic: the report's filter
    first_model_version: str | None = None  # trained on the explored log, served in the first half


# --- learning ------------------------------------------------------------------------------------


def train_and_promote(settings: Settings) -> str | None:
    """Train a version on what serving logged (impressions and clicks on Kafka, features as of each
    impression through Feast: `models.retrain.train_from_log`), promote it and return its name; None
    when the log is still too small to train on or training fails (serving keeps what it has)."""
    from models.evaluate import summary
    from models.retrain import train_from_log
    from streaming.topic_reader import read_events

    try:
        done = train_from_log(settings, read_events(settings), promote=True)
    except ValueError as error:  # too few impressions or clicks yet
        log.warning("not training: %s", error)
        return None
    except Exception:  # a failed training must not stop the demo
        log.exception("training failed; serving keeps its current ranking")
        return None
    if not done["promoted"]:  # the gate found it worse than the promoted version beyond noise
        log.warning("trained %s, not promoted: %s", done["version"], done["gate"]["reason"])
        return None
    log.info("trained and promoted %s; holdout: %s", done["version"], summary(done["holdout"]))
    return done["version"]


# --- the demo -------------------------------------------------------------------------------------


def run(settings: Settings, config: DemoConfig, *, on_step: Callable[[str], None] = log.info) -> DemoResult:
    """Everything, bounded in time; every process started here is stopped before returning."""
    from adloop import stack
    from features import store as feature_store
    from outcomes.store import OutcomeStore

    folder = config.folder or Path(settings.stack_dir) / "demo"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    on_step("stack up: Kafka (KRaft) + Redis")
    stack.up(settings)
    feature_store.apply(settings)
    population = Population(_sim_config(config))
    catalog_path = folder / "ads.csv"
    categories = write_demo_catalog(catalog_path, n_ads=config.ads, seed=config.seed)
    n_browsing = config.browsing_events * config.users
    on_step(f"SYNTHETIC population: {config.users:,} users, seed {config.seed}; {n_browsing:,} browsing events")
    _send(settings, population.events(n_browsing), "browsing")
    history_start = datetime.now(UTC) - HISTORY_SPAN - timedelta(seconds=5)
    with catalog_path.open(encoding="utf-8") as handle:
        history, shown = explored_log(population, list(csv.DictReader(handle)), config.history_requests,
                                      seed=config.seed, start=history_start)  # fmt: skip
    on_step(f"SYNTHETIC served log: {config.history_requests:,} requests of 2 uniformly drawn ads, "
            f"{sum(shown.clicks.values()):,} clicks")  # fmt: skip
    _send(settings, history, "served-log")
    port = _free_port()
    token = secrets.token_hex(8)
    env = _environment(settings, catalog_path=catalog_path, port=port, token=token, config=config)
    base = f"http://127.0.0.1:{port}"
    store = OutcomeStore(settings.outcomes_path)
    with _processes(folder / "logs", env, port) as started:
        on_step(f"started: {', '.join(started)}; waiting for the API")
        _wait_ready(base, started)
        on_step(f"dashboard: {base}/dashboard  (API {base}/docs)")
        on_step("train the first model on the served log, promote, reload")
        wait_landed(store, shown, since=history_start, timeout_s=CATCH_UP_TIMEOUT_S)
        first = _train_and_reload(settings, base, token, on_step)
        since = datetime.now(UTC)  # this run's traffic (the store keeps the served log and earlier runs')
        phase = replace(config, minutes=config.minutes / 2,
                        max_requests=None if config.max_requests is None else config.max_requests // 2)  # fmt: skip
        on_step(f"traffic 1/2: {phase.minutes:g} min at up to {config.requests_per_second:g} requests/s")
        traffic = drive_http(base, settings, population, categories, phase)
        on_step("retrain on everything served and clicked so far, promote, reload")
        wait_landed(store, traffic, since=since, timeout_s=CATCH_UP_TIMEOUT_S)
        version = _train_and_reload(settings, base, token, on_step)
        left = None if config.max_requests is None else config.max_requests - traffic.requests
        phase = replace(phase, seed=config.seed + 1, max_requests=left)
        on_step(f"traffic 2/2: {phase.minutes:g} min")
        traffic = merge(traffic, drive_http(base, settings, population, categories, phase))
        on_step(
            f"traffic done: {traffic.requests:,} requests, {sum(traffic.impressions.values()):,} ads served, "
            f"{sum(traffic.clicks.values()):,} clicks"
        )
        on_step("waiting for the outcomes lander to catch up")
        landed = wait_landed(store, traffic, since=since, timeout_s=CATCH_UP_TIMEOUT_S)
        if config.hold_s > 0:
            on_step(f"holding the API {config.hold_s:g} s for the dashboard: {base}/dashboard")
            time.sleep(config.hold_s)
    return DemoResult(traffic, landed, version, f"{base}/dashboard", folder, since, first)


def _train_and_reload(settings: Settings, base: str, token: str, on_step: Callable[[str], None]) -> str | None:
    """Train on the log, promote, make the API load it; the version, or None (serving keeps what it has)."""
    version = train_and_promote(settings)
    if version:
        try:
            _post(base + "/v1/admin/reload", None, token=token)
        except Exception as error:  # the API keeps serving what it had: say so, go on
            on_step(f"reload of {version} failed ({error}); serving keeps its previous ranking")
            version = None
    on_step(f"model: {version or 'none promoted: serving keeps its previous ranking'}")
    return version


def explored_log(
    population: Population, catalog_rows: list[dict[str, str]], n_requests: int, *, seed: int, start: datetime
) -> tuple[list[Event], TrafficReport]:
    """A SYNTHETIC served log over `HISTORY_SPAN` from `start`: each request shows two catalog ads drawn
    uniformly (propensity 2 / n ads), clicked by the user's hidden preference. (events, their counts)."""
    rng = np.random.default_rng([seed, 5])
    weights = np.array([u.activity for u in population.users])
    events, report = [], TrafficReport()
    for r in range(n_requests):
        user = population.users[int(rng.choice(len(population.users), p=weights / weights.sum()))]
        answer = {"request_id": f"served-log-{seed}-{r}", "user_id": user.user_id, "model_version": HISTORY_VERSION,
                  "arm": "targeted"}  # fmt: skip
        ts = start + HISTORY_SPAN * (r / max(n_requests, 1))
        for rank, i in enumerate(rng.choice(len(catalog_rows), size=2, replace=False), start=1):
            row = catalog_rows[int(i)]
            ad = {"ad_id": row["ad_id"], "campaign_id": row["campaign_id"], "rank": rank,
                  "propensity": 2 / len(catalog_rows)}  # fmt: skip
            context = {"device": user.device, "country": user.country, "advertiser_id": row["advertiser_id"],
                       "synthetic": True}  # fmt: skip
            shown = _impression(answer, SLOT["slot_id"], ad, row["category"], ts)
            shown = shown.model_copy(update={"source": "simulate", "context": context})
            events.append(shown)
            report.impressions["targeted"] += 1
            click = population.click_event(shown)
            if click is not None:
                events.append(click)
                report.clicks["targeted"] += 1
        report.requests += 1
    return events, report


def drive(
    post: Callable[[dict[str, Any]], dict[str, Any]],
    population: Population,
    categories: dict[str, str],
    send_click: Callable[[Event], None] | None,
    *,
    seconds: float,
    rate: float,
    max_requests: int | None = None,
    seed: int = 0,
    follow: Callable[[str, Event], None] | None = None,
    convert: Callable[[Event, float], None] | None = None,
    conversion_rate: float = 0.2,
    order_value: float = 40.0,
) -> TrafficReport:
    """Simulated users request ads through `post(body) -> response`; each served ad is clicked by the user's
    hidden preference and the click handed to `send_click`, or `follow(click_url, click)` (the tracker). A
    click converts with a hidden chance per category (`conversion_rate` x 0.5..1.5): `convert(click, value)`.
    Bounded by `seconds` and `max_requests`."""
    rng = np.random.default_rng([seed, 3])
    hidden = np.random.default_rng([population.config.seed, 6]).uniform(0.5, 1.5, len(CATEGORIES))
    convert_p = {c: min(1.0, conversion_rate * float(h)) for c, h in zip(CATEGORIES, hidden, strict=True)}
    weights = np.array([u.activity for u in population.users])
    report = TrafficReport()
    started = time.monotonic()
    while time.monotonic() - started < seconds and (max_requests is None or report.requests < max_requests):
        due = started + report.requests / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        user = population.users[int(rng.choice(len(population.users), p=weights / weights.sum()))]
        body = {"user_id": user.user_id, "slots": [SLOT], "context": {"device": user.device, "country": user.country}}
        try:
            answer = post(body)
        except Exception as error:  # the API must answer; count, keep going (bounded by time anyway)
            report.errors += 1
            log.warning("select failed: %s", error)
            continue
        report.requests += 1
        arm = answer["arm"]
        report.model_versions[answer["model_version"]] += 1
        if answer.get("fallback_reason"):
            report.fallbacks[answer["fallback_reason"]] += 1
        now = datetime.now(UTC)
        for slot in answer["slots"]:
            for ad in slot["ads"]:
                report.impressions[arm] += 1
                shown = _impression(answer, slot["slot_id"], ad, categories.get(ad["ad_id"]), now)
                click = population.click_event(shown)
                if click is None:
                    continue
                if follow is not None:
                    follow(ad["click_url"], click)
                else:
                    send_click(click)
                report.clicks[arm] += 1
                if convert is not None and rng.random() < convert_p.get(click.category or "", conversion_rate):
                    value = round(float(rng.lognormal(np.log(order_value) - 0.125, 0.5)), 2)  # mean order_value
                    convert(click, value)
                    report.conversions[arm] += 1
                    report.revenue[arm] += value
    return report


def drive_http(base: str, settings: Settings, population: Population, categories, config: DemoConfig):
    """`drive` against a running API: clicks through each ad's tracker URL, conversions posted back (signed)."""
    import httpx

    from serving.routes.conversions import sign_postback
    from serving.signing import secret_of

    secret = secret_of(settings)  # the API's: same stack folder
    with httpx.Client(base_url=base, timeout=5.0) as client:

        def post(body: dict[str, Any]) -> dict[str, Any]:
            response = client.post("/v1/select", json=body)
            response.raise_for_status()
            return response.json()

        def follow(url: str, click: Event) -> None:
            response = client.get(urlsplit(url).path)  # the tracker answers 302 to the landing page: not followed
            if response.status_code != 302:
                log.warning("click tracker answered %s", response.status_code)

        def convert(click: Event, value: float) -> None:
            body = orjson.dumps({"idempotency_key": f"{click.request_id}:{click.ad_id}", "user_id": click.user_id,
                                 "value": value, "currency": "USD"})  # fmt: skip
            headers = {"X-Adloop-Signature": sign_postback(body, secret), "Content-Type": "application/json"}
            client.post("/v1/conversions", content=body, headers=headers).raise_for_status()

        return drive(
            post,
            population,
            categories,
            None,
            seconds=config.minutes * 60,
            rate=config.requests_per_second,
            max_requests=config.max_requests,
            seed=config.seed,
            follow=follow,
            convert=convert,
            conversion_rate=config.conversion_rate,
            order_value=config.order_value,
        )


def merge(a: TrafficReport, b: TrafficReport) -> TrafficReport:
    """Two phases' traffic as one report."""
    return TrafficReport(
        a.requests + b.requests,
        a.impressions + b.impressions,
        a.clicks + b.clicks,
        a.conversions + b.conversions,
        a.revenue + b.revenue,
        a.fallbacks + b.fallbacks,
        a.model_versions + b.model_versions,
        a.errors + b.errors,
    )


def wait_landed(store, traffic: TrafficReport, *, since: datetime, timeout_s: float) -> dict[str, int]:
    """Poll the outcomes store until it holds every impression served and click produced since `since`
    (or time runs out); returns what it holds."""
    from outcomes.store import Filters

    want = (sum(traffic.impressions.values()), sum(traffic.clicks.values()), sum(traffic.conversions.values()))
    deadline = time.monotonic() + timeout_s
    while True:
        total = store.outcomes([], Filters(start=since))[0]
        got = (total["impressions"], total["clicks"], total["conversions"])
        if got == want or time.monotonic() > deadline:
            return {"impressions": got[0], "clicks": got[1], "conversions": got[2]}
        time.sleep(0.5)


def write_demo_catalog(path: Path, *, n_ads: int, seed: int) -> dict[str, str]:
    """A catalog in the simulator's categories (one per campaign), every ad native and 300x250, no caps,
    budgets or deals; returns ad_id -> category."""
    rows = generate_catalog(
        n_ads, seed=seed, categories=CATEGORIES, formats=("banner_300x250", "native"), plain=True, cpm_share=1 / 3
    )  # a third of the campaigns buy impressions
    write_catalog(rows, path)
    return {r["ad_id"]: r["category"] for r in rows}


# --- helpers --------------------------------------------------------------------------------------


def _sim_config(config: DemoConfig) -> SimConfig:
    """Browsing ends a little before now (the consumer dead-letters events from the future)."""
    span = config.browsing_events * config.users / SimConfig.events_per_second
    start = datetime.now(UTC) - timedelta(seconds=span + 60)
    return SimConfig(users=config.users, seed=config.seed, start=start, base_ctr=config.base_ctr)


def _send(settings: Settings, events: Iterable[Event], what: str) -> None:
    from streaming.producer import build_producer, produce_events

    producer = build_producer(settings)
    try:
        summary = produce_events(producer, settings.events_topic, events)
    finally:
        producer.close()
    if summary.failed:
        raise RuntimeError(f"{summary.failed} {what} events were not acknowledged by Kafka")


def _impression(answer: dict, slot_id: str, ad: dict, category: str | None, now: datetime) -> Event:
    """The served ad as the user sees it (the API logs its own copy to Kafka; the join key is the same)."""
    return Event(
        event_id=f"{answer['request_id']}-{ad['ad_id']}",
        schema_version=SCHEMA_VERSION,
        event_type=EventType.ad_impression,
        user_id=answer["user_id"],
        ts=now,
        ad_id=ad["ad_id"],
        campaign_id=ad["campaign_id"],
        category=category,
        request_id=answer["request_id"],
        slot_id=slot_id,
        position=ad["rank"],
        model_version=answer["model_version"],
        arm=answer["arm"],
        propensity=ad["propensity"],
    )


def _environment(settings: Settings, *, catalog_path: Path, port: int, token: str, config: DemoConfig):
    """ADLOOP_* for the subprocesses: these settings, the demo catalog, the arm split, the admin token."""
    names = ("kafka_bootstrap_servers", "events_topic", "dlq_topic", "redis_url", "feast_repo_path",
             "feast_data_dir", "model_registry_path", "outcomes_path", "stack_dir", "consumer_batch_size")  # fmt: skip
    env = {**os.environ, **{f"ADLOOP_{n.upper()}": str(getattr(settings, n)) for n in names}}
    env.update(
        ADLOOP_CATALOG_PATH=str(catalog_path),
        ADLOOP_API_PORT=str(port),
        ADLOOP_ADMIN_TOKEN=token,
        ADLOOP_CONTROL_SHARE=str(config.control_share),
        ADLOOP_AD_STATS_REFRESH_S="5",
        ADLOOP_SERVE_EPSILON_NO_MODEL="1.0",  # the first phase explores: the first model needs varied ads
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                 os.environ.get("PYTHONPATH")])),
    )  # fmt: skip
    return env


@contextmanager
def _processes(logs: Path, env: dict[str, str], port: int) -> Iterator[dict[str, subprocess.Popen]]:
    """Start the feature consumer, the lander and the API; always stop them (SIGTERM, then SIGKILL)."""
    cli = [sys.executable, "-m", "adloop.cli"]
    commands = {
        "feature consumer": [*cli, "consume", "--metrics-port", str(_free_port())],
        "outcomes lander": [*cli, "land"],
        "API": [*cli, "serve", "--host", "127.0.0.1", "--port", str(port)],
    }
    started: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            out = open(logs / f"{name.replace(' ', '_')}.log", "wb")  # noqa: SIM115  (closed with the process)
            started[name] = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            out.close()
        yield started
    finally:
        for process in started.values():
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in started.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _wait_ready(base: str, started: dict[str, subprocess.Popen]) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for name, process in started.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} (see the demo folder's logs/)")
        with suppress(httpx.HTTPError):
            if httpx.get(base + "/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the API did not answer at {base} within {START_TIMEOUT_S:g} s")


def _post(url: str, body: dict | None, *, token: str) -> dict:
    import httpx

    response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    response.raise_for_status()
    return response.json()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
