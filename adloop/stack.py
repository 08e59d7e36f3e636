"""The local stack: a real Kafka 4.x broker (KRaft, one node) and Redis, on loopback.

`up` installs what is missing (the broker's jars through Maven, Debian's redis-server),
starts what is not running, waits with a bound until both answer, and creates the topics.
`down` stops only what `up` started (pid files under `settings.stack_dir`). Every failure
is a `StackError` whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from adloop.settings import Settings

KAFKA_DIR = Path(__file__).resolve().parent / "kafka"  # pom.xml and log4j2.xml, committed
MAVEN_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1"
LOG_TAIL_LINES = 30


class StackError(RuntimeError):
    """A stack step failed; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    running: bool
    owned: bool  # started by `adloop stack up` (so `down` stops it)
    pid: int | None = None
    since: str | None = None  # ISO time the process was started
    detail: str = ""


# --- public API ---------------------------------------------------------------------------


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


# --- Redis --------------------------------------------------------------------------------


def start_redis(settings: Settings) -> None:
    host, port = _redis_address(settings)
    if _redis_answers(settings.redis_url):
        return  # ours from an earlier `up`, or one the user runs: use it, leave it alone
    if not _is_loopback(host):
        raise StackError(
            f"Redis at {settings.redis_url} does not answer. Start it, or point ADLOOP_REDIS_URL at one that runs."
        )
    if _port_open(host, port):
        raise StackError(
            f"Port {host}:{port} is taken by something that is not Redis. Stop it, or set ADLOOP_REDIS_URL "
            "to a free port (e.g. redis://127.0.0.1:6380/0)."
        )
    server = _redis_server_binary()
    folder = settings.stack_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "redis.log"
    log.unlink(missing_ok=True)
    command = [
        server,
        "--bind",
        host,
        "--port",
        str(port),
        "--dir",
        str(folder),
        "--daemonize",
        "no",
        "--logfile",
        str(log),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--protected-mode",
        "yes",
    ]
    proc = _spawn(command, log_path=None)
    _write_pid_file(settings, "redis", proc.pid, f"{host}:{port}", marker="redis-server")
    _wait_until(
        lambda: _redis_answers(settings.redis_url),
        proc=proc,
        what=f"Redis on {host}:{port}",
        log=log,
        timeout=settings.stack_start_timeout,
    )


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError("redis-server is not installed. Install it: sudo apt-get install -y redis-server")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "redis-server"],
    ):
        done = subprocess.run(step, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise StackError(
                "Redis is not installable: `"
                + " ".join(step)
                + "` failed:\n"
                + _tail_text(done.stdout + done.stderr)
                + "\nInstall redis-server by hand, or point ADLOOP_REDIS_URL at a running Redis."
            )
    # Debian starts its own service on install; stop it so only the project's instance runs.
    subprocess.run(["service", "redis-server", "stop"], capture_output=True)
    found = shutil.which("redis-server")
    if not found:
        raise StackError("apt-get installed redis-server but it is not on PATH; check /usr/bin/redis-server.")
    return found


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def _redis_address(settings: Settings) -> tuple[str, int]:
    parsed = urlparse(settings.redis_url)
    return parsed.hostname or "127.0.0.1", parsed.port or 6379


# --- Kafka --------------------------------------------------------------------------------


def start_kafka(settings: Settings) -> None:
    host, port = _kafka_address(settings)
    record = _read_pid_file(settings, "kafka")
    if record and _alive(record["pid"], record["marker"]):
        if _port_open(host, port):
            return  # ours, already serving
        raise StackError(
            f"The broker started earlier (pid {record['pid']}) runs but does not answer on {host}:{port}. "
            "Run `adloop stack down` then `adloop stack up`.\n"
            + _tail_file(settings.stack_dir / "kafka" / "server.log")
        )
    if _port_open(host, port) and _kafka_answers(settings.kafka_bootstrap_servers):
        return  # a broker the user runs (or another checkout's): use it, leave it alone
    for taken in (port, settings.kafka_controller_port):
        if _port_open(host, taken):
            raise StackError(
                f"Port {host}:{taken} is taken by another process, so the local Kafka broker cannot bind it. "
                "Stop that process, or choose free ports with ADLOOP_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:<port> "
                "and ADLOOP_KAFKA_CONTROLLER_PORT=<port>."
            )
    java = _java_binary()
    libs = ensure_kafka_jars(settings)
    folder = settings.stack_dir / "kafka"
    properties = folder / "server.properties"
    properties.write_text(_server_properties(settings, folder / "data"))
    classpath = str(libs / "*")
    if not (folder / "data" / "meta.properties").exists():
        _format_storage(java, classpath, properties)
    log = folder / "server.log"
    command = [
        java,
        *settings.kafka_heap.split(),
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.xml'}",
        "-cp",
        classpath,
        "kafka.Kafka",
        str(properties),
    ]
    proc = _spawn(command, log_path=log)
    _write_pid_file(settings, "kafka", proc.pid, f"{host}:{port}", marker="kafka.Kafka")
    _wait_until(
        lambda: _port_open(host, port),
        proc=proc,
        what=f"the Kafka broker on {host}:{port}",
        log=log,
        timeout=settings.stack_start_timeout,
    )


def ensure_kafka_jars(settings: Settings) -> Path:
    """Copy the broker's jars from Maven Central (through ~/.m2) once per pom.xml version."""
    libs = settings.stack_dir / "kafka" / "libs"
    stamp = libs / ".pom-sha256"
    digest = hashlib.sha256((KAFKA_DIR / "pom.xml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return libs
    mvn = shutil.which("mvn")
    if not mvn:
        raise StackError("Maven (mvn) is needed to fetch the Kafka broker's jars. Install it: apt-get install -y maven")
    if libs.exists():
        shutil.rmtree(libs)
    libs.mkdir(parents=True)
    done = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(KAFKA_DIR / "pom.xml"),
            f"{MAVEN_DEPENDENCY_PLUGIN}:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={libs}",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        output = done.stdout + done.stderr
        hint = (
            "Maven Central looks unreachable (check the network or a proxy in ~/.m2/settings.xml)."
            if re.search(r"Could not (transfer|resolve)|UnknownHost|Connection refused|timed out", output)
            else "Maven could not copy the Kafka jars."
        )
        raise StackError(f"{hint}\n{_tail_text(output)}")
    stamp.write_text(digest)
    return libs


def _java_binary() -> str:
    java = shutil.which("java")
    if not java:
        raise StackError(
            "Java 17 or newer is needed for the Kafka broker and none is on PATH. "
            "Install it: apt-get install -y openjdk-17-jre-headless"
        )
    shown = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', shown)
    if not match or int(match.group(1)) < 17:
        raise StackError(
            f"Kafka 4.x needs Java 17 or newer; `java -version` says: {shown.strip()!r}. "
            "Install openjdk-17 and put it first on PATH."
        )
    return java


def _server_properties(settings: Settings, data: Path) -> str:
    host, port = _kafka_address(settings)
    controller = f"{host}:{settings.kafka_controller_port}"
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers={controller}",
            f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{controller}",
            f"advertised.listeners=PLAINTEXT://{host}:{port},CONTROLLER://{controller}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={data}",
            f"num.partitions={settings.event_partitions}",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",  # a small machine: fewer internal partitions start faster
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",  # the 3 s default slows every first group join
            "num.network.threads=2",
            "num.io.threads=2",
            "auto.create.topics.enable=false",
            "",
        ]
    )


def _format_storage(java: str, classpath: str, properties: Path) -> None:
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if cluster_id.startswith("-"):
        cluster_id = "A" + cluster_id[1:]
    done = subprocess.run(
        [
            java,
            "-cp",
            classpath,
            f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.xml'}",
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "--ignore-formatted",
            "-t",
            cluster_id,
            "-c",
            str(properties),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise StackError("Formatting the Kafka storage failed:\n" + _tail_text(done.stdout + done.stderr))


def create_topics(settings: Settings) -> None:
    """Create the events and dead-letter topics unless they exist."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    wanted = {settings.events_topic: settings.event_partitions, settings.dlq_topic: 1}
    deadline = time.monotonic() + settings.stack_start_timeout
    while True:  # the broker accepts connections a moment before its metadata is ready
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=settings.kafka_bootstrap_servers, bootstrap_timeout_ms=5000, request_timeout_ms=10000
            )
            try:
                missing = set(wanted) - set(admin.list_topics())
                if missing:
                    with contextlib.suppress(TopicAlreadyExistsError):  # another process raced us
                        admin.create_topics([NewTopic(t, wanted[t], 1) for t in sorted(missing)])
                return
            finally:
                admin.close()
        except KafkaError as error:
            if time.monotonic() > deadline:
                raise StackError(
                    f"Could not create topics on {settings.kafka_bootstrap_servers}: {error!r}. "
                    "Is the broker up? `adloop stack status`."
                ) from error
            time.sleep(0.5)


def _kafka_answers(bootstrap_servers: str) -> bool:
    """A Kafka broker (not just any listener) answers a metadata request there."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        KafkaAdminClient(
            bootstrap_servers=bootstrap_servers, bootstrap_timeout_ms=3000, request_timeout_ms=3000
        ).close()
        return True
    except KafkaError:
        return False


def _kafka_address(settings: Settings) -> tuple[str, int]:
    first = settings.kafka_bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return host or "127.0.0.1", int(port)


# --- processes ----------------------------------------------------------------------------


def _spawn(command: list[str], log_path: Path | None) -> subprocess.Popen[bytes]:
    """Start a server in its own session, so it outlives the `adloop` command that started it."""
    output = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    finally:
        if log_path:
            output.close()  # type: ignore[union-attr]


def _wait_until(ready, *, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise StackError(
                f"{what} exited with code {proc.returncode} while starting. Its log ({log}):\n{_tail_file(log)}"
            )
        if time.monotonic() > deadline:
            _terminate(proc.pid)
            raise StackError(
                f"{what} did not answer within {timeout:.0f} s; stopped it. Its log ({log}):\n{_tail_file(log)}"
            )
        time.sleep(0.2)


def _terminate(pid: int, grace: float = 30.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)  # its own session: the group is the server and its children
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _pid_exists(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _pid_exists(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _alive(pid: int, marker: str) -> bool:
    """The pid runs and is the server we started (not a recycled pid)."""
    if not _pid_exists(pid):
        return False
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.stack_dir / f"{name}.pid.json"


def _write_pid_file(settings: Settings, name: str, pid: int, address: str, *, marker: str) -> None:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    record = {"pid": pid, "address": address, "since": started, "marker": marker}
    _pid_file(settings, name).write_text(json.dumps(record))


def _read_pid_file(settings: Settings, name: str) -> dict | None:
    path = _pid_file(settings, name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


# --- small helpers ------------------------------------------------------------------------


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _is_loopback(host: str) -> bool:
    return host in {"localhost", "::1"} or host.startswith("127.")


def _tail_text(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _tail_file(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return _tail_text(path.read_text(errors="replace"), lines)
    except OSError:
        return "(no log written)"
