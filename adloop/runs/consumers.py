"""`adloop consume --processes N`: a supervisor of N feature consumers, each in a child process of its own.

The children are `streaming.consumer.FeatureConsumer`s of one consumer group: Kafka spreads the
partitions over them, and effect-once holds across them through the offsets stored in Redis with
each batch and the fence on them (streaming.state_store). The supervisor
  - starts the children, forked from a fork server that imported the consumer's modules once (no
    inherited Kafka or Redis sockets, no threads; a restart takes milliseconds, not an import);
  - restarts a child that died (crash, OOM kill, signal) after a back-off, logs it and counts it
    (`adloop_consumer_restarts_total`); a child that exits for good reason is not restarted:
    idle (`idle_exit_s`) or a recreated topic (`OffsetsAheadOfTopic`, which stops them all: exit 2);
  - on SIGTERM or SIGINT stops every child gracefully (SIGTERM: it finishes its batch and closes its
    Kafka consumer, so the group rebalances at once), kills those still alive after `grace_s`, exits 0;
  - serves one /metrics for all of them: prometheus_client's multiprocess mode, every process
    counting in files of one fresh folder (PROMETHEUS_MULTIPROC_DIR, set before any of them imports
    prometheus_client) that a MultiProcessCollector sums. Counters of a dead child stay in the sum.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from adloop.settings import Settings

log = logging.getLogger(__name__)

EXIT_FATAL = 2  # a child's exit code when restarting cannot help (a recreated topic): the supervisor stops
GRACE_S = 30.0  # a stopping child finishes its batch (seconds at most) and leaves the group
LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
# Both names: prometheus_client reads the first; Feast, when imported, makes a folder of its own unless the
# second is set too (feast.metrics), and its metrics then count in ours like everyone else's.
MULTIPROC_VARS = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR")
PRELOAD = ["features.redis_client", "streaming.consumer"]


@dataclass(frozen=True)
class Backoff:
    """Seconds before restarting a child that died: doubling per consecutive death, reset by a long enough life."""

    first_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0  # a child that lived this long died of something new: start again from first_s

    def delay(self, consecutive: int) -> float:
        return min(self.max_s, self.first_s * 2 ** max(0, consecutive - 1))


@dataclass
class SupervisorReport:
    exit_code: int
    applied: float = 0.0  # summed over every child that ever ran (from the shared metric files)
    duplicates: float = 0.0
    restarts: int = 0


@dataclass
class _Slot:
    """One of the N places; the process in it changes with each restart."""

    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    deaths: int = 0  # consecutive
    restart_at: float | None = None
    done: bool = False  # exited for good (idle): not restarted


@dataclass
class _Metrics:
    restarts: Any
    alive: Any
    registry: Any
    folder: Path
    server: Any = None


def supervise(
    settings: Settings,
    processes: int,
    *,
    metrics_port: int,
    idle_exit_s: float | None = None,
    grace_s: float = GRACE_S,
    backoff: Backoff = Backoff(),
    stop: threading.Event | None = None,
) -> SupervisorReport:
    """Run `processes` feature consumers until SIGTERM/SIGINT (or `stop`), or until all of them went idle."""
    with stop_signals(stop) as stopping:
        return _supervise(settings, processes, metrics_port, idle_exit_s, grace_s, backoff, stopping)


def _supervise(
    settings: Settings,
    processes: int,
    metrics_port: int,
    idle_exit_s: float | None,
    grace_s: float,
    backoff: Backoff,
    stopping: threading.Event,
) -> SupervisorReport:
    folder = Path(tempfile.mkdtemp(prefix="adloop-consume-metrics-"))
    saved_env = {name: os.environ.get(name) for name in MULTIPROC_VARS}
    os.environ.update(dict.fromkeys(MULTIPROC_VARS, str(folder)))  # before the children start, inherited
    metrics = _serve_metrics(folder, metrics_port)
    context = multiprocessing.get_context("forkserver")
    # The fork server, a fresh interpreter started with the first child, imports the consumer's stack
    # (Feast, pandas, kafka-python: seconds) once; each child, forked from it, starts at once.
    context.set_forkserver_preload(PRELOAD)
    slots = [_Slot(i) for i in range(processes)]
    exit_code = 0
    try:
        with _interruptible(stopping):
            for slot in slots:
                if stopping.is_set():
                    break
                _start(context, slot, settings, idle_exit_s, metrics)
        exit_code = _watch(context, slots, settings, idle_exit_s, metrics, stopping, backoff)
    finally:
        _stop_all(slots, grace_s, metrics)
        report = _report(metrics, exit_code)
        if metrics.server is not None:
            metrics.server.shutdown()
            metrics.server.server_close()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)
    return report


def _watch(
    context: Any,
    slots: list[_Slot],
    settings: Settings,
    idle_exit_s: float | None,
    metrics: _Metrics,
    stopping: threading.Event,
    backoff: Backoff,
) -> int:
    """Until stopped: reap children that exited, restart the dead after their back-off. Returns the exit code."""
    while not stopping.is_set():
        running = [s.process.sentinel for s in slots if s.process is not None]
        if not running and all(s.done for s in slots):
            log.info("every consumer went idle: done")
            return 0
        wait(running, timeout=0.2)  # wakes at once when a child exits
        now = time.monotonic()
        for slot in slots:
            process = slot.process
            if process is not None and process.exitcode is not None:
                process.join()
                _forget(process, metrics)
                slot.process = None
                code = process.exitcode
                if code == EXIT_FATAL:
                    log.error("consumer %d (pid %s) stopped for good (exit %d): stopping all", slot.index,
                              process.pid, code)  # fmt: skip
                    return EXIT_FATAL
                if code == 0 and idle_exit_s is not None:
                    slot.done = True
                    continue
                slot.deaths = 1 if now - slot.started >= backoff.stable_s else slot.deaths + 1
                delay = backoff.delay(slot.deaths)
                slot.restart_at = now + delay
                metrics.restarts.inc()
                log.error("consumer %d (pid %s) died (%s); restarting it in %.1f s (death %d in a row)",
                          slot.index, process.pid, _how(code), delay, slot.deaths)  # fmt: skip
            if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                _start(context, slot, settings, idle_exit_s, metrics)
    log.info("stop requested: stopping %d consumers", sum(s.process is not None for s in slots))
    return 0


def _start(context: Any, slot: _Slot, settings: Settings, idle_exit_s: float | None, metrics: _Metrics) -> None:
    quiet = {
        name: logger.level
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and logger.level
    }  # the levels set here (e.g. the CLI quietening kafka's INFO) hold in the child
    process = context.Process(
        target=_child,
        args=(settings, idle_exit_s, str(metrics.folder), logging.getLogger().getEffectiveLevel(), quiet),
        name=f"consumer-{slot.index}",
        daemon=False,  # a daemonic process cannot have children; and it must get its SIGTERM, not be killed
    )
    process.start()
    slot.process, slot.started, slot.restart_at = process, time.monotonic(), None
    metrics.alive.inc()
    log.info("consumer %d started (pid %s)", slot.index, process.pid)


def _forget(process: BaseProcess, metrics: _Metrics) -> None:
    """A child gone: its live gauges leave the sum (its counters stay, they happened)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(process.pid, str(metrics.folder))
    metrics.alive.dec()


def _stop_all(slots: list[_Slot], grace_s: float, metrics: _Metrics) -> None:
    """SIGTERM to every child, wait `grace_s` for them to finish their batch and leave, SIGKILL the rest."""
    alive = [s.process for s in slots if s.process is not None]
    for process in alive:
        if process.exitcode is None:
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in alive:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            log.warning("consumer pid %s still running %.0f s after SIGTERM: killed", process.pid, grace_s)
            process.kill()
            process.join(5)
        _forget(process, metrics)
    for slot in slots:
        slot.process = None


def _child(settings: Settings, idle_exit_s: float | None, folder: str, level: int, quiet: dict[str, int]) -> None:
    """A child's life: one FeatureConsumer until SIGTERM/SIGINT (the batch in hand is finished) or idle."""
    stopping = threading.Event()
    _install_signals(stopping)
    _stop_with_parent(stopping)
    # prometheus_client opens this process's files on its first count (a pid of its own) in the folder the
    # environment names then: this supervisor's, even from a fork server started by an earlier one.
    os.environ.update(dict.fromkeys(MULTIPROC_VARS, folder))
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stdout)
    for name, value in quiet.items():
        logging.getLogger(name).setLevel(value)
    from features.redis_client import redis_client
    from streaming.consumer import FeatureConsumer, OffsetsAheadOfTopic

    consumer = FeatureConsumer(settings, redis_client=redis_client(settings))
    try:
        report = consumer.run(stop=stopping.is_set, idle_exit_s=idle_exit_s)
    except OffsetsAheadOfTopic as error:
        log.error("%s", error)
        sys.exit(EXIT_FATAL)
    log.info("applied %d, duplicates %d, replayed %d, erased %d, dead-lettered %d", report.applied,
             report.duplicates, report.replayed, report.erased, sum(report.dead_lettered.values()))  # fmt: skip


def _stop_with_parent(stopping: threading.Event) -> None:
    """Stop when the supervisor ends, however it ends: killed outright (SIGKILL, OOM), it leaves no consumer
    behind. The parent's sentinel (a pipe the supervisor holds open) reads as ready once the supervisor is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        log.warning("the supervisor is gone: stopping")
        stopping.set()

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


class _StopDuringStart(Exception):
    """Raised by the signal handler while the first children start: `process.start()` waits for the fork
    server's imports (seconds, minutes on a loaded machine), and a stop must not wait for them."""


@contextmanager
def _interruptible(stopping: threading.Event) -> Iterator[None]:
    """A SIGTERM/SIGINT meanwhile abandons the start. A child the fork server forks afterwards finds the
    supervisor gone (`_stop_with_parent`) and stops at once; the fork server ends once it has no client."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stopping.set()
        raise _StopDuringStart

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except _StopDuringStart:
        log.info("stop requested while the consumers started")
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def stop_signals(stopping: threading.Event | None = None) -> Iterator[threading.Event]:
    """SIGTERM and SIGINT set the event instead of ending the process (outside the main thread, where
    signal handlers cannot be set, only the event stops): a consumer finishes its batch, then closes."""
    stopping = stopping or threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return
    previous = _install_signals(stopping)
    try:
        yield stopping
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _install_signals(stopping: threading.Event) -> dict[int, Any]:
    def handler(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}


def _serve_metrics(folder: Path, port: int) -> _Metrics:
    """The supervisor's /metrics: every process's files summed; its own restart counter and live-children gauge."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, multiprocess, start_http_server, values

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    # prometheus_client picks in-memory or file-backed values once, when first imported: imported before
    # the folder was set (a caller of `supervise` in a process that already counts), the supervisor's own
    # metrics are registered directly instead of through their files.
    own = None if values.ValueClass is not values.MutexValue else registry
    restarts = Counter(
        "adloop_consumer_restarts_total", "Consumer processes that died unexpectedly (restarted after a back-off).",
        registry=own,
    )  # fmt: skip
    alive = Gauge(
        "adloop_consumer_processes", "Consumer processes running under the supervisor.", registry=own,
        multiprocess_mode="livesum",
    )  # fmt: skip
    metrics = _Metrics(restarts=restarts, alive=alive, registry=registry, folder=folder)
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    metrics.server = server
    log.info("metrics of all consumers on http://127.0.0.1:%d/metrics", server.server_port)
    return metrics


def _report(metrics: _Metrics, exit_code: int) -> SupervisorReport:
    totals = _sample_totals(metrics.registry)
    return SupervisorReport(
        exit_code=exit_code,
        applied=totals.get("adloop_consumer_events_applied_total", 0.0),
        duplicates=totals.get("adloop_consumer_duplicates_total", 0.0),
        restarts=int(totals.get("adloop_consumer_restarts_total", 0.0)),
    )


def _sample_totals(registry: Any) -> dict[str, float]:
    """Sample name -> value summed over labels, of what `registry` exposes."""
    totals: dict[str, float] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"
