"""The request path of `POST /v1/select` and the OpenRTB bid, top to bottom.

read the user's features (awaited: the event loop serves others while Redis answers) -> select
(eligibility -> retrieve and rank -> choose, `serving.selection`) -> count it in the metrics ->
charge pacing and log the impressions (`serving.impressions`, off the request path) -> the caller
builds its response from the result and the state it was computed on. Never raises: a failed
selection answers with no ads, flagged `internal_error`.

Requests are scored together: a request whose user read is done joins a queue that one task drains,
taking everything queued when it runs, and `Selector.select_many` scores the lot in one vectorised pass
(one user-tower call, one retrieval matmul, one ranker call) once it holds `VECTORISED_FROM` requests (fewer
cost less one by one on the CPU; the GPU takes any batch). Alone, a request waits for nobody: the
drain runs in the loop pass right after it was queued. Under load (the last batch held more than one
request) the drain may wait `batch_window_s` (at most 1 ms, never past a queued request's deadline)
for more company. The fixed cost of each numpy and predictor call is then paid once per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from serving import metrics
from serving.impression_records import impression_records
from serving.impressions import ImpressionLogger
from serving.selection import Selector
from serving.selection_types import SelectionRequest, SelectionResult, UserRead
from serving.serving_state import ServingState
from serving.tracking import Touch, TouchStore

log = logging.getLogger(__name__)


MAX_WINDOW_S = 0.001  # the longest a request may be held for company
# On the CPU a vectorised pass over 2 requests costs 1.13x their scoring one by one, over 3 1.05x, over 4 0.96x,
# over 16 0.72x (`python -m bench.select_path --batch N`): smaller batches are scored request by request.
VECTORISED_FROM = 4


@dataclass
class _Queued:
    request: SelectionRequest
    user_read: UserRead
    route: str
    log_impressions: bool
    deadline: float | None  # time.perf_counter() by which it must be answered
    future: asyncio.Future


class RequestPipeline:
    def __init__(
        self,
        selector: Selector,
        logger: ImpressionLogger,
        *,
        touches: TouchStore | None = None,
        batch_window_s: float = 0.0,
        max_batch: int = 64,
    ):
        if not 0.0 <= batch_window_s <= MAX_WINDOW_S:
            raise ValueError(f"batch window {batch_window_s * 1000:g} ms: must be within 0-1 ms")
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch}: must be at least 1")
        self.selector = selector
        self.logger = logger
        self.touches = touches  # last-impression attribution: each user's last impression, written in batches
        self.batch_window_s = batch_window_s
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Queued] | None = None
        self._drainer: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_batch = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="select-gpu")  # one batch on the device at a time

    async def run(
        self,
        request: SelectionRequest,
        *,
        route: str = "select",
        log_impressions: bool = True,
        deadline_s: float | None = None,
    ) -> tuple[ServingState, SelectionResult]:
        """(state, result) of one request, scored with whatever other requests are queued at the time;
        selection runs in the loop (no thread-pool hop). `deadline_s`: seconds from now within which the
        answer is due (a batch window never holds the request past it)."""
        started = time.perf_counter()
        user_read = await self.selector.read_user(request.user_id)
        queue = self._ensure_drainer()
        future = asyncio.get_running_loop().create_future()
        deadline = None if deadline_s is None else started + deadline_s
        queue.put_nowait(_Queued(request, user_read, route, log_impressions, deadline, future))
        return await future

    def _ensure_drainer(self) -> asyncio.Queue[_Queued]:
        """The queue and its draining task of the running loop (made on first use: a test client or a
        restarted app runs another loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._drainer is None or self._drainer.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._drainer = loop.create_task(self._drain(self._queue), name="select-batcher")
        assert self._queue is not None
        return self._queue

    async def _drain(self, queue: asyncio.Queue[_Queued]) -> None:
        while True:
            batch = [await queue.get()]
            if self.batch_window_s and self._last_batch > 1:  # busy: a little company is likely
                wait = self.batch_window_s
                deadlines = [q.deadline for q in batch if q.deadline is not None]
                if deadlines:
                    wait = min(wait, min(deadlines) - time.perf_counter())
                if wait > 0:
                    await asyncio.sleep(wait)
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            self._last_batch = len(batch)
            try:
                if self.selector.state.device is not None:  # CUDA: the loop serves others while the GPU works
                    answers = await asyncio.get_running_loop().run_in_executor(self._executor, self.score, batch)
                else:
                    answers = self.score(batch)
            except Exception:  # never lets the drainer die: each request is answered alone instead
                log.exception("batched selection failed; scoring the batch's requests one by one")
                metrics.ERRORS.labels(batch[0].route, "batch").inc()
                answers = [(q, self._alone(q)) for q in batch if not q.future.done()]
            for q, answer in answers:
                if not q.future.done():  # a cancelled request (client gone) gets nothing
                    q.future.set_result(answer)

    def score(self, batch: list[_Queued]) -> list[tuple[_Queued, tuple[ServingState, SelectionResult]]]:
        """Select for the batch in one pass, then count, charge and log each request; the answers are handed
        to the waiting requests by the loop (this may run in a worker thread)."""
        live = [q for q in batch if not q.future.done()]  # a cancelled request (client gone) is not served
        if not live:
            return []
        metrics.BATCH_SIZE.observe(len(live))
        state = self.selector.state  # one snapshot for the whole batch
        if len(live) < VECTORISED_FROM and state.device is None:  # a small batch costs more together than alone
            return [(q, self._alone(q)) for q in live]
        results = self.selector.select_many([(q.request, q.user_read) for q in live], state=state)
        for q, result in zip(live, results, strict=True):
            self._after(state, q.request, result, q.route, q.log_impressions)
        return [(q, (state, result)) for q, result in zip(live, results, strict=True)]

    def _alone(self, q: _Queued) -> tuple[ServingState, SelectionResult]:
        return self.run_with(q.request, route=q.route, log_impressions=q.log_impressions, user_read=q.user_read)

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
        self._after(state, request, result, route, log_impressions)
        return state, result

    def degraded(self, route: str) -> list[str]:
        """The degraded modes an answer given now is served in, counted per route: `impression_log` while
        the impression producer is not connected (impressions wait in its bounded buffer, and may be lost
        if the outage outlasts it), so the caller can tell its answer will reach the log late or never."""
        reasons = [] if self.logger.connected else ["impression_log"]
        for reason in reasons:
            metrics.DEGRADED.labels(route, reason).inc()
        return reasons

    def _after(self, state, request: SelectionRequest, result: SelectionResult, route: str, log_impressions: bool):
        """Count the result in the metrics, charge pacing and queue the impressions (never raises)."""
        _observe(result, route)
        if log_impressions:
            try:
                costs = self.selector.charge(state, result)
                records = impression_records(result, request, costs)
                self.logger.log(records)
                if self.touches is not None:
                    self.touches.remember_impressions([touch_of(r) for r in records])
            except Exception:
                log.exception("impression logging failed")
                metrics.ERRORS.labels(route, "impressions").inc()


def _observe(result: SelectionResult, route: str) -> None:
    for stage, seconds in result.timings.items():
        metrics.child(metrics.STAGE_SECONDS, stage).observe(seconds)
    metrics.child(metrics.ARMS, result.arm).inc()
    if result.fallback:
        metrics.child(metrics.FALLBACKS, result.fallback).inc()
    empty = sum(1 for picks in result.slots.values() if not picks)
    if empty:
        metrics.NO_FILL.labels(route).inc(empty)


def touch_of(record: dict) -> Touch:
    """An impression record as the touch a conversion can be attributed to (last-impression attribution)."""
    return Touch(record["request_id"], record["ad_id"], record["campaign_id"], record["arm"], record["model_version"],
                 record["propensity"], record["user_id"], record["slot_id"], record["ts"])  # fmt: skip
