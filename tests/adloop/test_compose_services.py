"""docker-compose.yml's adloop services, run without Docker: each service's exact command and environment as a
subprocess against the local stack, in the order its `depends_on` conditions give, until its own
health check passes (one-shot services: until they exit 0).

What differs from a container, and only that, is mapped: the compose host names (kafka:29092,
redis:6379) to the local stack, the /data volume to a tmp folder, the container ports to free local
ones, and a fresh events topic pair per run (the local broker is shared by other tests)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import yaml
from kafka.admin import KafkaAdminClient, NewTopic

from adloop.settings import PROJECT_ROOT, Settings
from tests.support.serving import free_port

pytestmark = pytest.mark.integration
COMPOSE = PROJECT_ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent
PORT_SETTINGS = {"9108": "ADLOOP_CONSUMER_METRICS_PORT", "9109": "ADLOOP_LEARN_METRICS_PORT", "8000": None}


def _services() -> dict[str, dict]:
    return {name: s for name, s in yaml.safe_load(COMPOSE.read_text())["services"].items() if s.get("build")}


def _start_order(services: dict[str, dict]) -> list[str]:
    order: list[str] = []
    while len(order) < len(services):
        ready = [n for n, s in services.items() if n not in order
                 and all(d in order or d not in services for d in s.get("depends_on", {}))]  # fmt: skip
        assert ready, f"depends_on has a cycle among {set(services) - set(order)}"
        order.extend(sorted(ready))
    return order


def test_compose_declares_the_loop_with_health_checks_and_conditions() -> None:
    services = _services()
    assert {"feast-apply", "consumer", "api", "learn"} <= set(services)
    assert services["feast-apply"]["command"] == ["adloop", "features", "apply"]
    for name in ("consumer", "api", "learn"):
        assert services[name]["depends_on"]["feast-apply"]["condition"] == "service_completed_successfully"
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    order = _start_order(services)
    assert order.index("feast-apply") < min(order.index(n) for n in ("consumer", "api", "learn"))


def test_each_compose_service_runs_and_becomes_healthy_on_the_local_stack(local_stack: Settings, tmp_path) -> None:
    services = _services()
    topic = f"adloop.test.compose.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=local_stack.kafka_bootstrap_servers, bootstrap_timeout_ms=5000)
    admin.create_topics([NewTopic(topic, 12, 1), NewTopic(topic + ".dlq", 1, 1)])  # kafka-topics' job
    redis_url = re.sub(r"/\d+$", "/13", local_stack.redis_url)
    redis.Redis.from_url(redis_url).flushdb()
    ports = {container: str(free_port()) for container in PORT_SETTINGS}
    running: dict[str, subprocess.Popen] = {}
    try:
        for name in _start_order(services):
            service = services[name]
            env = _local_env(service.get("environment", {}), local_stack, redis_url, tmp_path, topic, ports)
            command = [str(BIN / service["command"][0]), *_ports(service["command"][1:], ports)]
            log = (tmp_path / f"{name}.log").open("w")
            process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
            if service.get("restart") == "no":  # one shot: must finish well before its dependants start
                assert process.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
                continue
            running[name] = process
        for name, process in running.items():
            if "healthcheck" not in services[name]:  # none declared: it must at least keep running
                continue
            check = services[name]["healthcheck"]["test"][1:]
            check = [sys.executable if c == "python" else c for c in _ports(check, ports)]
            deadline = time.monotonic() + 360  # two API workers importing torch on 2 shared cores
            while (done := subprocess.run(check, capture_output=True, text=True, timeout=30)).returncode != 0:
                assert process.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"{name} never became healthy: {done.stderr[-1500:]}" + (
                    tmp_path / f"{name}.log").read_text()[-3000:]  # fmt: skip
                time.sleep(1)
        time.sleep(2)
        exited = {n: p.returncode for n, p in running.items() if p.poll() is not None}
        assert not exited, {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in exited}
    finally:
        for process in running.values():
            process.send_signal(signal.SIGINT)
        for process in running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        admin.delete_topics([topic, topic + ".dlq"])
        admin.close()


def _local_env(compose_env: dict, settings: Settings, redis_url: str, data: Path, topic: str, ports: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADLOOP_") and "PROMETHEUS" not in k}
    env.pop("PYTHONPATH", None)
    for key, value in compose_env.items():
        value = str(value).replace("kafka:29092", settings.kafka_bootstrap_servers)
        value = value.replace("redis://redis:6379/0", redis_url).replace("/data", str(data))
        env[key] = value
    env |= {"ADLOOP_EVENTS_TOPIC": topic, "ADLOOP_DLQ_TOPIC": topic + ".dlq", "ADLOOP_LEARN_CHECK_S": "5"}
    env |= {setting: ports[container] for container, setting in PORT_SETTINGS.items() if setting}
    return env


def _ports(args: list[str], ports: dict[str, str]) -> list[str]:
    out = []
    for arg in args:
        for container, local in ports.items():
            arg = arg.replace(f"127.0.0.1:{container}", f"127.0.0.1:{local}")
        out.append(ports.get(arg, arg) if arg.isdigit() else arg)
    return out
