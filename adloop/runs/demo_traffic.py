"""The demo's SIMULATED traffic: an explored served log to train the first model on, and users who ask
the API for ads, click by hidden preference and convert, counted per arm."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from streaming.events import SCHEMA_VERSION, Event, EventType
from streaming.simulate import CATEGORIES, Population

log = logging.getLogger(__name__)
SLOT = {"slot_id": "feed", "format": "native", "count": 2}
HISTORY_SPAN = timedelta(seconds=30)  # the served log's event times: the half-minute before the processes start
HISTORY_VERSION = "simulated-uniform"  # model_version on the served log's impressions


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
            shown = seen_impression(answer, SLOT["slot_id"], ad, row["category"], ts)
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
                shown = seen_impression(answer, slot["slot_id"], ad, categories.get(ad["ad_id"]), now)
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


def seen_impression(answer: dict, slot_id: str, ad: dict, category: str | None, now: datetime) -> Event:
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
