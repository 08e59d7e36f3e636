"""`GET /dashboard`: one HTML page (inline SVG charts, no build step) polling `/v1/outcomes` and
`GET /v1/ops/summary`: serving latency percentiles from this process's Prometheus histograms, and
dead letters landed by the outcomes lander."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from prometheus_client import REGISTRY

from outcomes.store import OutcomeStore
from serving.deps import SettingsDep
from serving.http import JSONRoute

router = APIRouter(tags=["dashboard"], route_class=JSONRoute)
PAGE = (Path(__file__).resolve().parent.parent / "dashboard.html").read_text(encoding="utf-8")
QUANTILES = (0.5, 0.9, 0.99)


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> HTMLResponse:
    """The analysts' page: click rate by arm over time, campaigns, segments, model versions, operations."""
    return HTMLResponse(PAGE)


@router.get("/v1/ops/summary")
def ops_summary(settings: SettingsDep) -> dict[str, Any]:
    """Latency percentiles per route (ms, from the histogram buckets), request and fallback counts, dead letters."""
    latency = {}
    for route, buckets in _histograms("adloop_request_seconds").items():
        count = buckets[-1][1] if buckets else 0
        latency[route] = {"count": count, **{f"p{round(q * 100)}_ms": _quantile(buckets, q) for q in QUANTILES}}
    counts = OutcomeStore(settings.outcomes_path).counts()
    return {
        "latency": latency,
        "fallbacks": _counter("adloop_fallback_total", "reason"),
        "arms": _counter("adloop_arm_total", "arm"),
        "impressions_logged": _counter("adloop_impressions_total", "outcome"),
        "dead_letters": {k.removeprefix("dlq:"): v for k, v in counts.items() if k.startswith("dlq:")},
        "events_landed": {k: v for k, v in counts.items() if not k.startswith("dlq:")},
    }


def _histograms(name: str) -> dict[str, list[tuple[float, float]]]:
    """route -> [(upper bound in s, cumulative count)] in bound order."""
    out: dict[str, list[tuple[float, float]]] = {}
    for metric in REGISTRY.collect():
        if metric.name != name:
            continue
        for sample in metric.samples:
            if sample.name == name + "_bucket":
                out.setdefault(sample.labels.get("route", ""), []).append((float(sample.labels["le"]), sample.value))
    return {route: sorted(b) for route, b in out.items()}


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket holding rank q x count; in ms."""
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return round(lower * 1000, 3)  # beyond the last finite bound: report that bound
            share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
            return round((lower + (upper - lower) * share) * 1000, 3)
        lower, below = upper, cumulative
    return None


def _counter(name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if metric.name == name.removesuffix("_total"):
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels[label]] = sample.value
    return out
