"""schemathesis over the whole OpenAPI schema, every check, against a uvicorn process on loopback.

Positive and negative cases for every operation (examples, coverage and fuzzing phases), with the
admin token, so that the checks that compare answers with the schema (status codes, content types,
bodies, schema-valid requests accepted, schema-invalid ones rejected, auth ignored) all run.
Bounded: `-n` examples per operation and a fixed seed (a failure reproduces); ~1,000 requests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from kafka.admin import KafkaAdminClient, NewTopic

from tests.serving.fuzz_app import ADMIN_TOKEN
from tests.support.serving import free_port
from tests.support.stack import TEST_REDIS_DB

BIN = Path(sys.executable).parent
EXAMPLES = 6  # per operation and phase (10: ~110 s, no finding, on a loaded 2-core machine)
START_S = 120  # uvicorn's start on a loaded 2-core machine (imports torch)


@pytest.fixture
def served_api(local_stack, tmp_path):
    topic = f"adloop.test.fuzz.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=local_stack.kafka_bootstrap_servers, bootstrap_timeout_ms=5000)
    admin.create_topics([NewTopic(topic, 1, 1)])
    host, port = local_stack.redis_url.split("//", 1)[1].split("/", 1)[0], free_port()
    env = {
        **os.environ,
        "ADLOOP_FUZZ_DIR": str(tmp_path),
        "ADLOOP_FUZZ_TOPIC": topic,
        "ADLOOP_FUZZ_REDIS": f"redis://{host}/{TEST_REDIS_DB}",
    }
    command = [str(BIN / "uvicorn"), "--factory", "tests.serving.fuzz_app:build", "--port", str(port)]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([*command, "--log-level", "warning"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the fuzzed API did not become ready"
            time.sleep(0.5)
        yield url, tmp_path / "server.log"
    finally:
        server.terminate()
        server.wait(10)
        admin.delete_topics([topic])
        admin.close()


@pytest.mark.integration
def test_schemathesis_finds_nothing(served_api) -> None:
    url, server_log = served_api
    run = subprocess.run(
        [
            *(str(BIN / "schemathesis"), "run", f"{url}/openapi.json", "--checks", "all"),
            *("-n", str(EXAMPLES), "--seed", "16", "--continue-on-failure", "--no-color"),
            *("-H", f"Authorization: Bearer {ADMIN_TOKEN}"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=server_log.parent,  # schemathesis keeps its cache (.schemathesis/) in the working directory
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:] + server_log.read_text()[-3000:]
