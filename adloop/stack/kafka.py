"""Kafka for the local stack: Apache Kafka 4.x (KRaft, one node) from Maven Central's jars, and its topics."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from adloop.settings import Settings
from adloop.stack.processes import (
    StackError,
    _alive,
    _port_open,
    _read_pid_file,
    _spawn,
    _tail_file,
    _tail_text,
    _wait_until,
    _write_pid_file,
)

KAFKA_DIR = Path(__file__).resolve().parents[1] / "kafka"  # pom.xml and log4j2.xml, committed
MAVEN_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1"


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
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    from streaming import kafka_clients

    wanted = {settings.events_topic: settings.event_partitions, settings.dlq_topic: 1}
    deadline = time.monotonic() + settings.stack_start_timeout
    while True:  # the broker accepts connections a moment before its metadata is ready
        try:
            admin = kafka_clients.admin(settings, request_timeout_ms=10000)
            try:
                missing = set(wanted) - set(admin.list_topics())
                if missing:
                    with contextlib.suppress(TopicAlreadyExistsError):  # another process raced us
                        admin.create_topics([NewTopic(t, wanted[t], 1) for t in sorted(missing)])
                _check_partitions(admin, settings)
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


def _check_partitions(admin: Any, settings: Settings) -> None:
    """An events topic left with another partition count would be refused by every consumer (a user's
    state lives under its partition): say so now, and how to fix it. Growing the topic would move users
    between partitions, so it is not done here."""
    (topic,) = admin.describe_topics([settings.events_topic])
    count = len(topic["partitions"])
    if count and count != settings.event_partitions:
        raise StackError(
            f"topic {settings.events_topic} has {count} partitions, but ADLOOP_EVENT_PARTITIONS="
            f"{settings.event_partitions}: set ADLOOP_EVENT_PARTITIONS={count}, or, to start over losing the "
            f"topic's events, `adloop stack down`, remove {settings.stack_dir / 'kafka' / 'data'} and "
            "`adloop stack up`."
        )


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
