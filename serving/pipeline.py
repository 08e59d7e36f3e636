"""The request path of `POST /v1/select` and the OpenRTB bid, top to bottom.

read the user's features (awaited: the event loop serves others while Redis answers) -> select
(eligibility -> retrieve and rank -> choose, `serving.selection`) -> count it in the metrics ->
charge pacing and log the impressions (`serving.impressions`, off the request path) -> the caller
builds its response from the result and the state it was computed on. Never raises: a failed
selection answers with no ads, flagged `internal_error`.
"""

from __future__ import annotations

import logging

from serving import metrics
from serving.impressions import ImpressionLogger, impression_records
from serving.selection import SelectionRequest, SelectionResult, Selector, ServingState
from serving.tracking import Touch, TouchStore

log = logging.getLogger(__name__)


class RequestPipeline:
    def __init__(self, selector: Selector, logger: ImpressionLogger, *, touches: TouchStore | None = None):
        self.selector = selector
        self.logger = logger
        self.touches = touches  # last-impression attribution: each user's last impression, written in batches

    async def run(
        self, request: SelectionRequest, *, route: str = "select", log_impressions: bool = True
    ) -> tuple[ServingState, SelectionResult]:
        """(state, result) of one request; selection runs in the loop (~1 ms of CPU, no thread-pool hop)."""
        user_read = await self.selector.read_user(request.user_id)
        return self.run_with(request, route=route, log_impressions=log_impressions, user_read=user_read)

    def run_with(
        self,
        request: SelectionRequest,
        *,
        route: str = "select",
        log_impressions: bool = True,
        user_read: tuple | None = None,
    ) -> tuple[ServingState, SelectionResult]:
        """`run` for a user read already done (`user_read`), or read synchronously here (benchmarks)."""
        state = self.selector.state  # one snapshot: the result's rows index this state
        try:
            result = self.selector.select(request, state=state, user_read=user_read)
        except Exception:
            log.exception("selection failed; answering with no ads")
            metrics.ERRORS.labels(route, "selection").inc()
            result = SelectionResult(request.request_id, request.user_id, "targeted", state.model_version,
                                     "internal_error", {s.slot_id: [] for s in request.slots}, 0, 0, {})  # fmt: skip
        _observe(result, route)
        if log_impressions:
            try:
                costs = self.selector.charge(state, result)
                records = impression_records(result, request, costs)
                self.logger.log(records)
                if self.touches is not None:
                    self.touches.remember_impressions([_touch(r) for r in records])
            except Exception:
                log.exception("impression logging failed")
                metrics.ERRORS.labels(route, "impressions").inc()
        return state, result


def _observe(result: SelectionResult, route: str) -> None:
    for stage, seconds in result.timings.items():
        metrics.child(metrics.STAGE_SECONDS, stage).observe(seconds)
    metrics.child(metrics.ARMS, result.arm).inc()
    if result.fallback:
        metrics.child(metrics.FALLBACKS, result.fallback).inc()
    empty = sum(1 for picks in result.slots.values() if not picks)
    if empty:
        metrics.NO_FILL.labels(route).inc(empty)


def _touch(record: dict) -> Touch:
    return Touch(record["request_id"], record["ad_id"], record["campaign_id"], record["arm"], record["model_version"],
                 record["propensity"], record["user_id"], record["slot_id"], record["ts"])  # fmt: skip
