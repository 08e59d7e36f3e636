"""Credentials reach every client: Redis AUTH (a password-protected local redis-server) and Kafka SASL/TLS settings."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import pytest
import redis

from adloop.settings import Settings
from features.store import feast_environment
from serving.features_access import request_path_redis
from serving.redis_async import AsyncRedis, tls_context
from streaming import kafka_clients
from tests.support.serving import free_port

PASSWORD = "s3cret-p@ss"


@pytest.fixture(scope="module")
def protected_redis():
    """A redis-server of its own with `requirepass`, no persistence, stopped afterwards (bounded start)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server (make stack does)")
    port = free_port()
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            PASSWORD,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, password=PASSWORD, socket_timeout=0.5).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.wait(10)


def test_the_async_reader_authenticates(protected_redis) -> None:
    url = f"redis://:{PASSWORD.replace('@', '%40')}@127.0.0.1:{protected_redis}/2"

    async def roundtrip(client_url: str):
        client = AsyncRedis(client_url, timeout_s=2.0)
        try:
            await client.execute("SET", "k", "v")
            return await client.execute("GET", "k")
        finally:
            client.close()

    assert asyncio.run(roundtrip(url)) == b"v"
    assert redis.Redis(port=protected_redis, password=PASSWORD, db=2).get("k") == b"v"  # SELECT 2 was sent
    with pytest.raises(redis.AuthenticationError):
        asyncio.run(roundtrip(f"redis://:wrong@127.0.0.1:{protected_redis}/0"))
    with pytest.raises(redis.ConnectionError):  # no password: NOAUTH on the first command
        asyncio.run(roundtrip(f"redis://127.0.0.1:{protected_redis}/0"))


def test_the_sync_clients_authenticate(protected_redis) -> None:
    url = f"redis://:{PASSWORD.replace('@', '%40')}@127.0.0.1:{protected_redis}/0"
    assert request_path_redis(Settings(redis_url=url), timeout_s=1.0).ping()
    with pytest.raises(redis.AuthenticationError):
        request_path_redis(Settings(redis_url=f"redis://:nope@127.0.0.1:{protected_redis}/0"), timeout_s=1.0).ping()


def test_tls_urls_make_a_tls_context() -> None:
    from redis.connection import parse_url

    assert tls_context(parse_url("redis://h:1/0")) is None
    context = tls_context(parse_url("rediss://h:1/0?ssl_cert_reqs=none"))
    assert context is not None and context.check_hostname is False
    assert tls_context(parse_url("rediss://h:1/0")).check_hostname is True


def test_feast_gets_the_redis_password() -> None:
    env = feast_environment(Settings(redis_url=f"redis://:{PASSWORD}@10.0.0.1:6380/3"))
    assert env["ADLOOP_FEAST_REDIS"] == f"10.0.0.1:6380,db=3,password={PASSWORD}"


def test_kafka_sasl_and_tls_settings_reach_every_client() -> None:
    settings = Settings(
        kafka_bootstrap_servers="b1:9093,b2:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="adloop",
        kafka_sasl_password="kafka-secret",
        kafka_ssl_cafile="/etc/ca.pem",
    )
    assert kafka_clients.connection(settings) == {
        "bootstrap_servers": ["b1:9093", "b2:9093"],
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "adloop",
        "sasl_plain_password": "kafka-secret",
        "ssl_cafile": "/etc/ca.pem",
    }
    assert "kafka-secret" not in repr(settings)
