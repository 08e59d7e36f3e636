"""Open-loop load on the serving API, against a constant FastAPI endpoint (and `feast serve`) as baselines.

    PYTHONPATH=. .venv/bin/python bench/serve.py [--rates 100,250,500] [--seconds 10]

What runs (all on 127.0.0.1, bounded in count and time):
- the app under uvicorn (one worker, a subprocess) with a 10,000-ad generated catalog, a
  projection model (32-d), real Redis holding the users' features (one read per request), impressions
  logged to a fresh Kafka topic (deleted afterwards); each request is one native slot of 2 ads, so
  200 candidates are ranked;
- a FastAPI endpoint returning a constant, under the same uvicorn settings;
- `feast serve` get-online-features for the same user: TODO(integrator) once features/repo is on main
  (start `feast serve` on the repo, point the same client at POST /get-online-features).

The client is open loop: request i is due at t0 + i / rate whatever happened before, and its latency is
measured from that due time (no coordinated omission); raw asyncio keep-alive connections, bodies built
in advance, so that the client stays cheap on a 2-core machine it shares with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
USERS = 2000
port_pid: dict[int, int] = {}


# --- the app under test (imported by uvicorn in the subprocess) ---------------------------


def app_factory():
    """`uvicorn bench.serve:app_factory --factory`: the real app with the benchmark's catalog, model, users."""
    import csv

    from adloop.settings import Settings
    from serving.app import create_app
    from serving.features_access import RedisJsonReader, request_path_redis
    from serving.scoring import ProjectionBundle, StaticRegistry

    settings = Settings()
    with open(settings.catalog_path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    bundle = ProjectionBundle(rows, version="bench-projection-v1")
    client = request_path_redis(settings.redis_url, timeout_s=settings.request_budget_ms / 1000)
    reader = RedisJsonReader(client, prefix=os.environ["BENCH_USER_PREFIX"])
    return create_app(
        settings,
        feature_reader=reader,
        registry=StaticRegistry({bundle.version: bundle}, bundle.version),
        redis_client=client,
    )


def constant_factory():
    """The baseline: FastAPI returning a constant, same server settings."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/constant")
    def constant() -> dict:
        return {"ok": True}

    return app


# --- the open-loop client -----------------------------------------------------------------


async def open_loop(port: int, path: str, bodies: list[bytes], rate: float, seconds: float) -> dict:
    loop = asyncio.get_running_loop()
    n = int(rate * seconds)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # (reader, writer, last used)
    latencies: list[float] = []
    errors, kinds = 0, {}
    start = loop.time() + 0.2
    done_at = start

    async def connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The most recently used idle connection, skipping any idle longer than uvicorn's 5 s keep-alive."""
        while idle:
            reader, writer, used = idle.pop()
            if loop.time() - used < 4.0:
                return reader, writer
            writer.close()
        return await asyncio.open_connection("127.0.0.1", port)

    async def one(i: int) -> None:
        nonlocal errors, done_at
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        try:
            reader, writer = await connection()
            body = bodies[i % len(bodies)]
            writer.write(
                b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
            )
            head = await reader.readuntil(b"\r\n\r\n")  # (ok counts answers; err counts non-200 and failures)
            length = int(
                next(
                    (ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")), b"0"
                )
            )
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
                kinds[head.split(b"\r\n", 1)[0].decode()] = kinds.get(head.split(b"\r\n", 1)[0].decode(), 0) + 1
            latencies.append(loop.time() - due)
            done_at = max(done_at, loop.time())
            idle.append((reader, writer, loop.time()))
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            errors += 1
            kinds[type(error).__name__] = kinds.get(type(error).__name__, 0) + 1

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout=seconds + 60)
    lat = np.array(latencies) * 1000
    return {
        "sent": n,
        "ok": len(lat),
        "errors": errors,
        "p50": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99": float(np.percentile(lat, 99)) if len(lat) else None,
        "achieved": len(lat) / max(1e-9, done_at - start),
        "error_kinds": kinds,
    }


# --- orchestration ------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,250,500")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    assert args.seconds <= 30 and max(rates) <= 2000, "bounded benchmark"

    import redis
    from kafka.admin import KafkaAdminClient, NewTopic

    from adloop.settings import get_settings
    from serving.catalog import CATEGORIES, generate_catalog, write_catalog
    from serving.features_access import RedisJsonReader

    settings = get_settings()
    work = Path(tempfile.mkdtemp(prefix="adloop-bench-"))
    catalog_path = work / "ads.csv"
    rows = generate_catalog(10_000, seed=7)
    write_catalog(rows, catalog_path)
    prefix = f"adloop:bench:{uuid.uuid4().hex[:8]}:"
    topic = f"adloop.bench.{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(settings.redis_url)
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, bootstrap_timeout_ms=5000)
    admin.create_topics([NewTopic(topic, 3, 1)])
    users = seed_users(RedisJsonReader(client, prefix=prefix), rows, CATEGORIES)
    bodies = [
        json.dumps(
            {
                "user_id": u,
                "slots": [{"slot_id": "feed", "format": "native", "count": 2}],
                "context": {"device": "mobile", "page_category": "tech"},
            }
        ).encode()
        for u in users
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ADLOOP_CATALOG_PATH": str(catalog_path),
        "ADLOOP_EVENTS_TOPIC": topic,
        "ADLOOP_CATALOG_POLL_S": "0",
        "ADLOOP_SERVE_TOP_K": "200",
        "BENCH_USER_PREFIX": prefix,
    }
    results: dict[str, dict[float, dict]] = {}
    try:
        for name, factory, path in (
            ("select", "app_factory", "/v1/select"),
            ("constant", "constant_factory", "/constant"),
        ):
            with uvicorn_process(f"bench.serve:{factory}", env) as port:
                asyncio.run(open_loop(port, path, bodies, 100, 2))  # warm-up, not reported
                results[name] = {}
                for rate in rates:
                    cpu = server_cpu_s(port_pid[port])
                    results[name][rate] = asyncio.run(open_loop(port, path, bodies, rate, args.seconds))
                    results[name][rate]["cpu_ms"] = (server_cpu_s(port_pid[port]) - cpu) * 1000 / (rate * args.seconds)
                if name == "select":
                    check = json.loads(subprocess_get(port, "/readyz"))
                    check["metrics"] = [
                        ln
                        for ln in subprocess_get(port, "/metrics").splitlines()
                        if ln.startswith(("adloop_fallback_total", "adloop_impressions_total"))
                    ]
        print("TODO(integrator): feast serve get-online-features for the same user (features/repo not on main yet)")
    finally:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        admin.delete_topics([topic])
        admin.close()
    report(results, rates, args.seconds, check)


def seed_users(reader, rows, categories) -> list[str]:
    rng = random.Random(1)
    pipe = reader.client.pipeline(transaction=False)
    users = [f"bench-user-{i}" for i in range(USERS)]
    for user in users:
        cats = rng.sample(categories, 3)
        ads = rng.sample(rows, 10)
        features = {
            "top_categories": cats,
            "top_category_scores": [3.0, 2.0, 1.0],
            "recent_items": [f"item-{rng.randrange(10**6)}" for _ in range(20)],
            "freq_ad_ids": [a["ad_id"] for a in ads],
            "freq_ad_impressions_24h": [rng.randint(1, 6) for _ in ads],
            "freq_campaign_ids": sorted({a["campaign_id"] for a in ads}),
            "user_ctr": 0.05,
        }
        features["freq_campaign_impressions_24h"] = [rng.randint(1, 12) for _ in features["freq_campaign_ids"]]
        pipe.hset(f"{reader.prefix}user:{user}", mapping={k: json.dumps(v) for k, v in features.items()})
    pipe.execute()
    return users


class uvicorn_process:
    """A uvicorn subprocess on a free loopback port, waited for and stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, target: str, env: dict):
        self.target, self.env = target, env

    def __enter__(self) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                self.target,
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--no-access-log",
                "--log-level",
                "warning",
                "--loop",
                "uvloop",
                "--http",
                "httptools",
            ],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                subprocess_get(self.port, "/healthz" if "app_factory" in self.target else "/docs")
                port_pid[self.port] = self.proc.pid
                return self.port
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"uvicorn exited: {self.proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.3)
        raise RuntimeError("uvicorn did not answer within 60 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def subprocess_get(port: int, path: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def report(results: dict, rates: list[float], seconds: float, ready: dict) -> None:
    print(f"\nopen-loop, {seconds:.0f} s per rate, loopback, 1 uvicorn worker each; latency from the due time (ms)")
    print(
        f"{'target':<10}{'rate':>7}{'sent':>7}{'ok':>7}{'err':>5}{'p50':>9}{'p99':>9}{'achieved/s':>12}"
        f"{'server CPU ms/req':>19}"
    )
    for name, by_rate in results.items():
        for rate in rates:
            r = by_rate[rate]
            print(
                f"{name:<10}{rate:>7.0f}{r['sent']:>7}{r['ok']:>7}{r['errors']:>5}{r['p50']:>9.2f}{r['p99']:>9.2f}"
                f"{r['achieved']:>12.1f}{r['cpu_ms']:>19.2f}"
            )
    for name, by_rate in results.items():
        for rate in rates:
            if by_rate[rate]["error_kinds"]:
                print(f"errors {name} {rate:.0f}/s: {by_rate[rate]['error_kinds']}")
    print("\nratios select / constant (p50, p99):")
    for rate in rates:
        s, c = results["select"][rate], results["constant"][rate]
        print(f"  {rate:>5.0f}/s  p50 x{s['p50'] / c['p50']:.2f}  p99 x{s['p99'] / c['p99']:.2f}")
    kafka = ready["checks"]["kafka"]
    print(
        f"\nserver state after the run: model {ready['checks']['model']['version']}, "
        f"kafka ok={kafka['ok']} buffered={kafka['buffered']}, ads={ready['checks']['catalog']['ads']}"
    )
    print("  " + "\n  ".join(ready["metrics"]))


if __name__ == "__main__":
    main()
