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
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from adloop.runs.demo_processes import environment, free_port, post, processes, wait_ready
from adloop.runs.demo_traffic import HISTORY_SPAN, TrafficReport, drive, explored_log, merge
from adloop.settings import Settings
from serving.catalog import generate_catalog, write_catalog
from streaming.events import Event
from streaming.simulate import CATEGORIES, Population, SimConfig

log = logging.getLogger(__name__)
CATCH_UP_TIMEOUT_S = 60.0


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
    port = free_port()
    token = secrets.token_hex(8)
    env = environment(settings, catalog_path=catalog_path, port=port, token=token, control_share=config.control_share)
    base = f"http://127.0.0.1:{port}"
    store = OutcomeStore(settings.outcomes_path)
    with processes(folder / "logs", env, port) as started:
        on_step(f"started: {', '.join(started)}; waiting for the API")
        wait_ready(base, started)
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
            post(base + "/v1/admin/reload", None, token=token)
        except Exception as error:  # the API keeps serving what it had: say so, go on
            on_step(f"reload of {version} failed ({error}); serving keeps its previous ranking")
            version = None
    on_step(f"model: {version or 'none promoted: serving keeps its previous ranking'}")
    return version


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
