"""The local stack: a real Kafka 4.x broker (KRaft, one node) and Redis, on loopback.

`up` installs what is missing (the broker's jars through Maven, Debian's redis-server),
starts what is not running, waits with a bound until both answer, and creates the topics.
`down` stops only what `up` started (pid files under `settings.stack_dir`). Every failure
is a `StackError` whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

from adloop.settings import Settings
from adloop.stack.kafka import _kafka_address, _kafka_answers, create_topics, ensure_kafka_jars, start_kafka
from adloop.stack.processes import ServiceStatus, StackError, _alive, _pid_file, _read_pid_file, _terminate
from adloop.stack.redis import _redis_address, _redis_answers, start_redis

__all__ = [
    "ServiceStatus",
    "StackError",
    "create_topics",
    "down",
    "ensure_kafka_jars",
    "start_kafka",
    "start_redis",
    "status",
    "up",
]


def up(settings: Settings) -> list[ServiceStatus]:
    """Start Redis and Kafka unless already running, wait until they answer, create the topics."""
    settings.stack_dir.mkdir(parents=True, exist_ok=True)
    start_redis(settings)
    start_kafka(settings)
    create_topics(settings)
    return status(settings)


def down(settings: Settings) -> list[str]:
    """Stop what `up` started (nothing else); return the names of the services stopped."""
    stopped = []
    for name in ("kafka", "redis"):
        record = _read_pid_file(settings, name)
        if record is None:
            continue
        if _alive(record["pid"], record["marker"]):
            _terminate(record["pid"])
            stopped.append(name)
        _pid_file(settings, name).unlink(missing_ok=True)
    return stopped


def status(settings: Settings) -> list[ServiceStatus]:
    """What runs, where, since when."""
    return [
        _status_of(settings, "redis", _redis_address(settings)),
        _status_of(settings, "kafka", _kafka_address(settings)),
    ]


def _status_of(settings: Settings, name: str, address: tuple[str, int]) -> ServiceStatus:
    host, port = address
    shown = f"{host}:{port}"
    answers = (
        _redis_answers(settings.redis_url) if name == "redis" else _kafka_answers(settings.kafka_bootstrap_servers)
    )
    record = _read_pid_file(settings, name)
    if record and _alive(record["pid"], record["marker"]):
        return ServiceStatus(
            name,
            shown,
            answers,
            True,
            record["pid"],
            record["since"],
            "started by adloop" if answers else "process runs but does not answer",
        )
    detail = "running, not started by adloop (left alone)" if answers else "not running"
    return ServiceStatus(name, shown, answers, False, detail=detail)
