"""Open-loop load on the serving API, against a constant FastAPI endpoint and `feast serve` as baselines.

    .venv/bin/python -m bench.serve [--rates 100,250,400,500,700,900] [--seconds 10] [--workers 1]
                                     [--connections 10] [--targets ...] [--large-ads 1000000] [--ad-writes 200]

(Every bench runs as a module from the project root: `python -m bench.<name>`.)

What runs (all on 127.0.0.1, bounded in count and time):
- the app under uvicorn (`--workers`, default one; a subprocess) with a 10,000-ad generated catalog,
  a trained model from the registry (two-tower + LightGBM ranker + Platt calibration, lleaves-compiled
  at load: `train_bench_model`, on a synthetic log over that catalog) and the default feature reader
  (`OnlineFeatureReader`: one HMGET per request in Feast's own Redis layout); 2,000 users'
  `user_activity` rows and the ads' `ad_performance` rows are written in that layout to Redis db 7
  (emptied before and after; on a Redis Cluster, `ADLOOP_REDIS_CLUSTER_NODES`, which has only db 0, the
  whole cluster is emptied, so `--own-cluster` must say that it is the bench's own) with a Feast registry
  applied in a temporary folder; impressions are
  logged to a fresh Kafka topic (deleted afterwards); each request is one native slot of 2 ads, so
  200 candidates are ranked;
- a FastAPI endpoint returning a constant, under the same uvicorn settings;
- `feast serve` (as many workers, no access log, no worker recycling) on the same registry and Redis db:
  POST /get-online-features of 10 `user_activity` features for the same users at the same rates;
- while the rates run, `--ad-writes` random ads' `ad_performance` rows (default 200 of the 10,000) are
  rewritten each second by a process of its own, as the consumer does while ads take traffic, so that
  every app's changed-ads refresh re-reads them as in production;
- `select-1`: the same app scoring every request alone (`ADLOOP_SERVE_BATCH_MAX=1`), so that the CPU per
  request of batched and unbatched scoring are printed side by side;
- `select-large` (with `--large-ads N`, at 100/s only): the same app and model over a generated N-ad
  catalog (the first 10,000 ads keep the features seeded in Redis; the others are ads no event has
  touched), retrieval through the approximate index; its full ad-stats refresh is set to once an hour
  (reading a million rows costs ~15 s of CPU; the changed-ads refresh still runs every second).

Capacity = the highest offered rate with p99 under 20 ms and no errors, among the rates run.

The three servers run side by side (idle while another is loaded); each rate loads them one after the
other, so that other load on a shared machine drifts over all three alike. The client is open loop:
request i is due at t0 + i / rate whatever happened before, and its latency is measured from that due
time (no coordinated omission); raw asyncio keep-alive connections, bodies built in advance, so that
the client stays cheap on a 2-core machine it shares with the servers. Requests rotate over
`--connections` keep-alive connections (least recently used first, as hey's 10 workers each keep one):
with several server workers each worker holds some of them and gets its share of the load (reusing the
most recently used connection would send nearly every request to one worker).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
USERS = 2000
BENCH_REDIS_DB = 7  # emptied before and after the run
USERS_TOKEN = "bench-users-token"  # ADLOOP_USERS_TOKEN of the app under test
FEAST_FEATURES = ("top_categories", "top_category_scores", "recent_items", "recent_categories", "freq_ad_ids",
                  "freq_ad_impressions_24h", "freq_campaign_ids", "freq_campaign_impressions_24h", "user_ctr",
                  "last_seen_ms")  # fmt: skip
PROMETHEUS_MULTIPROCESS_VARS = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR", "prometheus_multiproc_dir")
port_pid: dict[int, int] = {}


# --- the app under test (imported by uvicorn in the subprocess) ---------------------------


def train_bench_model(ads: list[dict], registry_path: Path) -> str:
    """Train and promote a real model on a SYNTHETIC log over the benchmark catalog (users prefer one
    category; 3,000 requests of 15 ads, features replayed by `models.mind.Replay` with the consumer's
    aggregates), so that the request path pays what production pays: user tower, top-K, ranker."""
    from models.mind import Impression, Replay
    from models.registry import Registry
    from models.train import TrainConfig, train

    rng = np.random.default_rng(3)
    categories = sorted({a["category"] for a in ads})
    by_category = {c: [a["ad_id"] for a in ads if a["category"] == c] for c in categories}
    start = int(time.time() * 1000) - 3 * 86_400_000
    impressions = []
    for r in range(3000):
        user = int(rng.integers(USERS))
        liked = categories[user % len(categories)]
        shown = rng.choice(len(ads), 15, replace=False)
        labels = [int(rng.random() < (0.25 if ads[i]["category"] == liked else 0.03)) for i in shown]
        history = [str(a) for a in rng.choice(by_category[liked], 5)]
        impressions.append(Impression(f"r{r}", f"bench-user-{user}", start + r * 60_000, history,
                                      [ads[i]["ad_id"] for i in shown], labels))  # fmt: skip
    frame = Replay({a["ad_id"]: (a["category"], a["campaign_id"]) for a in ads}).run(impressions)
    bundle, report = train(frame, TrainConfig(seed=0))
    registry = Registry(registry_path)
    version = registry.save(bundle, report=report)
    registry.promote(version)
    return version


def constant_factory():
    """The baseline: FastAPI returning a constant, same server settings."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/constant")
    def constant() -> dict:
        return {"ok": True}

    return app


# --- the open-loop client -----------------------------------------------------------------


async def open_loop(port: int, path: str, bodies: list[bytes], rate: float, seconds: float, connections: int) -> dict:
    loop = asyncio.get_running_loop()
    n = int(rate * seconds)
    idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = deque()  # (reader, writer, last used)
    for _ in range(connections):  # opened before the clock starts, as a load balancer keeps its upstream pool
        idle.append((*await asyncio.open_connection("127.0.0.1", port), loop.time()))
    latencies: list[float] = []
    errors, kinds = 0, {}
    start = loop.time() + 0.2
    done_at = start

    async def connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The least recently used idle connection (requests rotate over the pool, so that every server
        worker holding some of its connections gets its share), skipping any idle longer than uvicorn's
        5 s keep-alive; a new one when all are busy (open loop: a request never waits for another)."""
        while idle:
            reader, writer, used = idle.popleft()
            if loop.time() - used < 4.0:
                return reader, writer
            writer.close()
        return await asyncio.open_connection("127.0.0.1", port)

    async def one(i: int, due: float) -> None:
        nonlocal errors, done_at
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

    tasks = []
    for i in range(n):  # each request starts at its due time (tasks made in advance would cost the client a burst)
        due = start + i / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        tasks.append(asyncio.create_task(one(i, due)))
    _, late = await asyncio.wait(tasks, timeout=60)  # an answer later than a minute counts as an error
    for task in late:
        task.cancel()
    if late:
        errors += len(late)
        kinds["no answer within 60 s"] = len(late)
        await asyncio.gather(*late, return_exceptions=True)
    for _, writer, _ in idle:
        writer.close()
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
    parser.add_argument("--rates", default="100,250,400,500,700,900")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--targets", default="select,select-1,constant,feast", help="a subset, e.g. to profile one server"
    )
    parser.add_argument("--large-ads", type=int, default=0, help="also serve a catalog of this many ads (at 100/s)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of every server (same for all)")
    parser.add_argument("--own-cluster", action="store_true",
                        help="on Redis Cluster: the cluster is this bench's own, emptied before and after")  # fmt: skip
    parser.add_argument("--ad-writes", type=int, default=200,
                        help="ads whose ad_performance row is rewritten each second while the rates run")  # fmt: skip
    parser.add_argument("--connections", type=int, default=10,
                        help="keep-alive connections the client rotates over; more open when all are busy")  # fmt: skip
    args = parser.parse_args()
    chosen = args.targets.split(",")
    rates = [float(r) for r in args.rates.split(",")]
    assert args.seconds <= 30 and max(rates) <= 2000 and args.large_ads <= 2_000_000, "bounded benchmark"
    assert 0 <= args.ad_writes <= 10_000, "bounded benchmark"
    if args.large_ads:
        chosen.append("select-large")

    from kafka.admin import KafkaAdminClient, NewTopic

    from adloop.settings import get_settings
    from features import store
    from features.redis_client import is_cluster, redis_client
    from serving.catalog import generate_catalog, write_catalog

    base = get_settings()
    if is_cluster(base) and not args.own_cluster:
        parser.error("on Redis Cluster the bench empties the whole cluster: pass --own-cluster if it is the bench's")
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="adloop-bench-"))
    topic = f"adloop.bench.{uuid.uuid4().hex[:8]}"
    settings = base.model_copy(
        update={
            "redis_url": base.redis_url.rsplit("/", 1)[0] + f"/{BENCH_REDIS_DB}",
            "feast_data_dir": work / "feast",
            "catalog_path": work / "ads.csv",
            "events_topic": topic,
        }
    )
    ads = generate_catalog(10_000, seed=7)
    write_catalog(ads, settings.catalog_path)
    if args.large_ads:  # the 10,000 ads first (their features are seeded), then ads no event has touched
        large = generate_catalog(args.large_ads, seed=7)
        large[: len(ads)] = ads
        for row in large[len(ads) :]:
            row["ad_id"] = "l" + row["ad_id"]
        write_catalog(large, work / "ads-large.csv")
        del large
    client = redis_client(settings)  # the topology the served app uses (ADLOOP_REDIS_CLUSTER_NODES or the URL)
    client.flushdb()
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, bootstrap_timeout_ms=5000)
    admin.create_topics([NewTopic(topic, 3, 1)])
    results: dict[str, dict[float, dict]] = {}
    try:
        store.apply(settings)
        users, seeded = seed_features(settings, client, ads)
        model_version = train_bench_model(ads, work / "models")
        targets = {
            "select": (select_bodies(users), "/v1/select"),
            "select-1": (select_bodies(users), "/v1/select"),
            "select-large": (select_bodies(users), "/v1/select"),
            "constant": (select_bodies(users), "/constant"),
            "feast": (feast_bodies(users), "/get-online-features"),
        }
        # Feast's metrics module, once imported here, sets PROMETHEUS_MULTIPROC_DIR: a server inheriting it
        # would count in mmapped files (prometheus' multiprocess mode), which `adloop serve` does not.
        inherited = {k: v for k, v in os.environ.items() if k not in PROMETHEUS_MULTIPROCESS_VARS}
        env = {
            **inherited,
            "PYTHONPATH": str(ROOT),
            "ADLOOP_REDIS_URL": settings.redis_url,
            "ADLOOP_FEAST_DATA_DIR": str(settings.feast_data_dir),
            "ADLOOP_CATALOG_PATH": str(settings.catalog_path),
            "ADLOOP_EVENTS_TOPIC": topic,
            "ADLOOP_CATALOG_POLL_S": "0",
            "ADLOOP_SERVE_TOP_K": "200",
            "ADLOOP_MODEL_REGISTRY_PATH": str(work / "models"),
            "ADLOOP_USERS_TOKEN": USERS_TOKEN,  # the pre-flight check reads a user's features (personal data)
        }
        select_env = dict(env)
        if args.workers > 1:  # as `adloop serve --workers N`: /metrics sums the workers' files
            (work / "prometheus").mkdir()
            select_env["PROMETHEUS_MULTIPROC_DIR"] = select_env["ADLOOP_METRICS_DIR"] = str(work / "prometheus")
        large_env = {**select_env, "ADLOOP_CATALOG_PATH": str(work / "ads-large.csv"),
                     "ADLOOP_AD_STATS_FULL_REFRESH_S": "3600"}  # fmt: skip
        servers = {
            "select": lambda: uvicorn_process("serving.app:create_app", select_env, args.workers),
            "select-1": lambda: uvicorn_process(
                "serving.app:create_app", {**select_env, "ADLOOP_SERVE_BATCH_MAX": "1"}, args.workers
            ),
            "select-large": lambda: uvicorn_process("serving.app:create_app", large_env, args.workers, timeout_s=900),
            "constant": lambda: uvicorn_process("bench.serve:constant_factory", env, args.workers),
            "feast": lambda: feast_process(settings, args.workers),
        }
        servers = {name: start for name, start in servers.items() if name in chosen}
        with contextlib.ExitStack() as running:  # all three up at once; each rate runs them back to back
            ports = {name: running.enter_context(server()) for name, server in servers.items()}
            for name in ("select", "select-1", "select-large"):
                if name in ports:
                    check_app_reads_feast_layout(ports[name], users[0], seeded)
                    served = json.loads(subprocess_get(ports[name], "/readyz"))["checks"]["model"]
                    assert served["version"] == model_version and served["loaded"], f"the app serves {served}"
            if "feast" in ports:
                check_feast_answers(ports["feast"], users[0], seeded)
            for name, port in ports.items():
                asyncio.run(
                    open_loop(port, targets[name][1], targets[name][0], 100, 2, args.connections)
                )  # warm-up, not reported
            results = {name: {} for name in ports}
            running.enter_context(ad_traffic(settings, [a["ad_id"] for a in ads], args.ad_writes))
            for rate in rates:
                for name, port in ports.items():
                    if name == "select-large" and rate != 100:
                        continue  # the comparison: 1 M ads against 10 k at 100/s
                    bodies, path = targets[name]
                    cpu = tree_cpu_s(port_pid[port])
                    results[name][rate] = asyncio.run(
                        open_loop(port, path, bodies, rate, args.seconds, args.connections)
                    )
                    results[name][rate]["cpu_ms"] = (tree_cpu_s(port_pid[port]) - cpu) * 1000 / (rate * args.seconds)
                    print(f"measured {name} at {rate:g}/s: {_progress(results[name][rate])}", flush=True)
            state = {}
            if "select" in ports:
                state = json.loads(subprocess_get(ports["select"], "/readyz"))
                state["metrics"] = server_metrics(subprocess_get(ports["select"], "/metrics"))
    finally:
        client.flushdb()
        admin.delete_topics([topic])
        admin.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n1-min load average (other processes share these cores): {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after, on {os.cpu_count()} cores")  # fmt: skip
    report(results, rates, args.seconds, state, args.workers)


def server_metrics(text: str) -> list[str]:
    """Fallback and impression counters, the cyclic GC's full collections (each one a stall of the whole
    process: `python -m bench.gc_pause`), the mean handler / selection-stage time over the whole run, and
    how many took over 20 ms (a stall: in the features stage, Redis answered late; elsewhere, the process)."""
    counters = ("adloop_fallback_total", "adloop_impressions_total", 'python_gc_collections_total{generation="2"}')
    lines = [ln for ln in text.splitlines() if ln.startswith(counters)]
    sums: dict[str, float] = {}
    for ln in text.splitlines():
        if ln.startswith(("adloop_stage_seconds_", "adloop_request_seconds_", "adloop_gc_pause_seconds_")):
            name, value = ln.rsplit(" ", 1)
            sums[name if "{" in name else name + "{}"] = float(value)
    for name, total in sums.items():
        count = sums.get(name.replace("_sum{", "_count{"))
        if "_sum{" in name and count:
            under = sums.get(name.replace("_sum{", '_bucket{le="0.02",').replace(",}", "}"))
            slow = f", {count - under:.0f} of {count:.0f} over 20 ms" if under is not None else ""
            lines.append(f"mean {name.replace('_sum', '').replace('{}', '')}: {1000 * total / count:.3f} ms{slow}")
    return lines


def seed_features(settings, client, ads: list[dict]) -> tuple[list[str], dict[str, dict]]:
    """Every user's full `user_activity` row and every ad's `ad_performance` row, written in Feast's layout
    (the consumer's write path); returns the user ids and their rows."""
    from features.aggregates import EVENT_TYPES, RECENT_N, TOP_CATEGORIES_N, WINDOWS, ad_features, smoothed_ctr
    from features.online import FeastLayout, write_rows
    from features.store import AD_VIEW, USER_VIEW
    from serving.catalog import CATEGORIES

    rng = random.Random(1)
    now_ms = int(time.time() * 1000)
    layout = FeastLayout.from_settings(settings)
    users = [f"bench-user-{i}" for i in range(USERS)]
    rows: dict[str, dict] = {}
    for user in users:
        cats = rng.sample(CATEGORIES, min(TOP_CATEGORIES_N, len(CATEGORIES)))
        shown = rng.sample(ads, rng.randint(5, 15))
        scales = zip(WINDOWS, (3, 40, 200), strict=True)  # event counts per 1 h, 24 h, 7 d
        row = {f"{kind}_{w}": rng.randint(0, scale) for w, scale in scales for kind in EVENT_TYPES}
        row["top_categories"] = cats
        row["top_category_scores"] = sorted((round(rng.uniform(0.1, 8.0), 3) for _ in cats), reverse=True)
        row["recent_items"] = [f"item-{rng.randrange(10**6)}" for _ in range(RECENT_N)]
        row["recent_categories"] = [rng.choice(cats[:4]) for _ in range(RECENT_N)]
        row["freq_ad_ids"] = [a["ad_id"] for a in shown]
        row["freq_ad_impressions_24h"] = [rng.randint(1, 6) for _ in shown]
        row["freq_ad_clicks_24h"] = [int(rng.random() < 0.1) for _ in shown]
        row["freq_campaign_ids"] = sorted({a["campaign_id"] for a in shown})
        row["freq_campaign_impressions_24h"] = [rng.randint(1, 12) for _ in row["freq_campaign_ids"]]
        row["freq_campaign_clicks_24h"] = [int(rng.random() < 0.2) for _ in row["freq_campaign_ids"]]
        row["impressions_total"] = rng.randint(20, 500)
        row["clicks_total"] = rng.randint(0, row["impressions_total"] // 10)
        row["user_ctr"] = smoothed_ctr(row["clicks_total"], row["impressions_total"])
        row["last_seen_ms"] = now_ms - rng.randrange(3_600_000)
        row["session_id"] = f"{user}-s1"
        row["session_items"] = row["recent_items"][-5:]
        row["session_length"] = rng.randint(1, 12)
        row["session_last_ms"] = row["last_seen_ms"]
        rows[user] = row
    missing = set(layout.views[USER_VIEW].features) ^ set(next(iter(rows.values())))
    assert not missing, f"seeded rows differ from the user_activity view: {sorted(missing)}"
    write_rows(client, layout, USER_VIEW, [(u, r["last_seen_ms"], r) for u, r in rows.items()])
    ad_rows = [(a["ad_id"], now_ms, ad_features(_ad_hours(rng, now_ms), {}, now_ms)) for a in ads]
    write_rows(client, layout, AD_VIEW, ad_rows)
    return users, rows


@contextlib.contextmanager
def ad_traffic(settings, ad_ids: list[str], per_s: int):
    """While the rates run, a process of its own rewrites `per_s` random ads' `ad_performance` rows each
    second, as the consumer does while ads take traffic: the servers' changed-ads refresh then runs as it
    does in production (the million-ad server: on its first 10,000 ads, the ones seeded)."""
    import multiprocessing

    if per_s <= 0:
        yield
        return
    forked = multiprocessing.get_context("fork")
    stop = forked.Event()
    writer = forked.Process(target=_rewrite_ads, args=(settings, ad_ids, per_s, stop), daemon=True)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join(timeout=10)
        if writer.is_alive():
            writer.kill()


def _rewrite_ads(settings, ad_ids: list[str], per_s: int, stop) -> None:
    from features.aggregates import ad_features
    from features.online import FeastLayout, write_rows
    from features.redis_client import redis_client
    from features.store import AD_VIEW

    client, layout, rng = redis_client(settings), FeastLayout.from_settings(settings), random.Random(2)
    while not stop.wait(1.0):
        now_ms = int(time.time() * 1000)
        rows = [(ad, now_ms, ad_features(_ad_hours(rng, now_ms), {}, now_ms)) for ad in rng.sample(ad_ids, per_s)]
        write_rows(client, layout, AD_VIEW, rows)


def _ad_hours(rng: random.Random, now_ms: int) -> dict[str, list[int]]:
    """A day of hourly [impressions, clicks] counters of one ad."""
    hour = now_ms // 3_600_000
    return {str(hour - h): [rng.randint(0, 300), rng.randint(0, 15)] for h in range(24)}


def select_bodies(users: list[str]) -> list[bytes]:
    return [
        json.dumps(
            {
                "user_id": u,
                "slots": [{"slot_id": "feed", "format": "native", "count": 2}],
                "context": {"device": "mobile", "page_category": "tech"},
            }
        ).encode()
        for u in users
    ]


def feast_bodies(users: list[str]) -> list[bytes]:
    features = [f"user_activity:{f}" for f in FEAST_FEATURES]
    return [json.dumps({"features": features, "entities": {"user_id": [u]}}).encode() for u in users]


def check_app_reads_feast_layout(port: int, user: str, seeded: dict[str, dict]) -> None:
    """Before timing: the app's default reader decodes the seeded row (not the empty stand-in fallback)."""
    answer = json.loads(subprocess_get(port, f"/v1/users/{user}/features", token=USERS_TOKEN))
    got, want = answer["features"], seeded[user]
    assert answer["known"] and got["top_categories"] == want["top_categories"], f"app read {answer}"
    assert got["freq_ad_ids"] == want["freq_ad_ids"] and len(got) == len(want), f"app read {answer}"


def check_feast_answers(port: int, user: str, seeded: dict[str, dict]) -> None:
    """Before timing: feast serve answers 200 with the seeded values for a seeded user."""
    status, body = http_post(port, "/get-online-features", feast_bodies([user])[0])
    assert status == 200, f"feast serve answered {status}: {body[:500]!r}"
    answer = json.loads(body)
    names = answer["metadata"]["feature_names"]
    values = {n: r["values"][0] for n, r in zip(names, answer["results"], strict=True)}
    statuses = {n: r["statuses"][0] for n, r in zip(names, answer["results"], strict=True)}
    assert all(statuses[f] == "PRESENT" for f in FEAST_FEATURES), f"feast serve statuses: {statuses}"
    assert values["top_categories"] == seeded[user]["top_categories"], f"feast serve values: {values}"
    assert values["recent_items"] == seeded[user]["recent_items"], f"feast serve values: {values}"


class feast_process:
    """`feast -c <repo> serve` on a free loopback port (no access log, workers not recycled),
    waited for (GET /health) and stopped (SIGTERM to its process group, then SIGKILL)."""

    def __init__(self, settings, workers: int = 1):
        from features.store import feast_environment

        self.settings, self.workers = settings, workers
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **feast_environment(settings)}

    def __enter__(self) -> int:
        self.port = free_port()
        feast = Path(sys.executable).with_name("feast")
        self.proc = _server(
            [str(feast), "-c", str(self.settings.feast_repo_path), "serve", "-h", "127.0.0.1", "-p", str(self.port),
             "-w", str(self.workers), "--no-access-log", "--max-requests", "0", "--max-requests-jitter", "0"],
            self.env,
        )  # fmt: skip
        wait_until_answers(self.proc, self.port, "/health", "feast serve")
        port_pid[self.port] = self.proc.pid
        return self.port

    def __exit__(self, *exc) -> None:
        _stop_and_tell(self.proc, failed=exc[0] is not None)


class uvicorn_process:
    """A uvicorn subprocess on a free loopback port, waited for and stopped (SIGTERM, then SIGKILL)."""

    def __init__(self, target: str, env: dict, workers: int = 1, timeout_s: float = 300):
        self.target, self.env, self.workers, self.timeout_s = target, env, workers, timeout_s

    def __enter__(self) -> int:
        self.port = free_port()
        self.proc = _server(
            [sys.executable, "-m", "uvicorn", self.target, "--factory", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", str(self.workers), "--no-access-log", "--log-level", "warning",
             "--loop", "uvloop", "--http", "httptools"],
            self.env,
        )  # fmt: skip
        path = "/healthz" if "create_app" in self.target else "/docs"
        wait_until_answers(self.proc, self.port, path, "uvicorn", self.timeout_s)
        port_pid[self.port] = self.proc.pid
        return self.port

    def __exit__(self, *exc) -> None:
        _stop_and_tell(self.proc, failed=exc[0] is not None)


def _server(command: list[str], env: dict) -> subprocess.Popen:
    """A server in its own process group, its stderr to a temporary file (a pipe nobody reads fills and
    blocks the server's next log line), kept as `proc.log` for a failure's message."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _stop_and_tell, after the server)
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def log_tail(proc: subprocess.Popen, chars: int = 3000) -> str:
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read().decode(errors="replace")[-chars:]  # type: ignore[attr-defined]


def _stop_and_tell(proc: subprocess.Popen, *, failed: bool) -> None:
    """Stop the server; when the bench failed while it ran, print what it logged."""
    stop_group(proc)
    if failed:
        print(f"--- the server's log (pid {proc.pid}), last lines ---\n{log_tail(proc)}", file=sys.stderr)
    proc.log.close()  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(proc: subprocess.Popen, port: int, path: str, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            subprocess_get(port, path)
            return
        except (OSError, IndexError):
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited: {log_tail(proc)}") from None
            time.sleep(0.3)
    stop_group(proc)
    raise RuntimeError(f"{what} did not answer within {timeout_s:.0f} s")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (gunicorn's workers included), SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (gunicorn's worker), from /proc."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
    children: dict[int, list[int]] = {}
    for p, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(p)
    todo, total = [pid], 0.0
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / os.sysconf("SC_CLK_TCK")
        todo.extend(children.get(p, []))
    return total


def subprocess_get(port: int, path: str, *, token: str | None = None) -> str:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def http_post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    """(status, body) of one JSON POST on a fresh connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


def report(results: dict, rates: list[float], seconds: float, state: dict, workers: int = 1) -> None:
    print(f"\nopen-loop, {seconds:.0f} s per rate, loopback, {workers} server worker(s) each")
    print("latency from each request's due time (ms)")
    print(
        f"{'target':<13}{'rate':>7}{'sent':>7}{'ok':>7}{'err':>5}{'p50':>9}{'p99':>9}{'achieved/s':>12}"
        f"{'server CPU ms/req':>19}"
    )
    for name, by_rate in results.items():
        for rate in rates:
            if rate not in by_rate:
                continue
            r = by_rate[rate]
            print(
                f"{name:<13}{rate:>7.0f}{r['sent']:>7}{r['ok']:>7}{r['errors']:>5}{_ms(r['p50']):>9}{_ms(r['p99']):>9}"
                f"{r['achieved']:>12.1f}{r['cpu_ms']:>19.2f}"
            )
    for name, by_rate in results.items():
        for rate, r in by_rate.items():
            if r["error_kinds"]:
                print(f"errors {name} {rate:.0f}/s: {r['error_kinds']}")
    if state:
        kafka = state["checks"]["kafka"]
        print(
            f"\nserver state after the run: model {state['checks']['model']['version']}, "
            f"kafka ok={kafka['ok']} buffered={kafka['buffered']}, ads={state['checks']['catalog']['ads']}"
        )
        print("  " + "\n  ".join(state["metrics"]))
    caps = {name: capacity(by_rate) for name, by_rate in results.items()}
    print("\ncapacity (highest offered rate with p99 < 20 ms and no errors, among the rates run):")
    for name, cap in caps.items():
        print(f"  {name:<13}{'-' if cap is None else f'{cap:.0f}/s'}")
    if "select" in results and "select-1" in results:
        near = min(rates, key=lambda r: abs(r - 400))
        b, u = results["select"][near], results["select-1"][near]
        print(
            f"\nserver CPU per request at {near:.0f}/s: batched {b['cpu_ms']:.2f} ms, "
            f"one at a time {u['cpu_ms']:.2f} ms"
        )
    if not {"select", "constant", "feast"} <= set(results):
        return  # a subset (profiling): no ratios
    s250 = results["select"].get(250.0)
    c250 = results["constant"].get(250.0)
    checks = {}
    if caps["select"] is not None and caps["feast"] is not None:
        checks[f"select capacity {caps['select']:.0f}/s >= 2x feast serve's {caps['feast']:.0f}/s"] = (
            caps["select"] >= 2 * caps["feast"]
        )
    if s250 and c250:
        checks[f"select p99 at 250/s <= 3x constant's (x{_ratio(s250['p99'], c250['p99'])})"] = (
            s250["p99"] is not None and s250["p99"] <= 3 * c250["p99"]
        )
    large = results.get("select-large", {}).get(100.0)
    if large and 100.0 in results["select"]:
        small = results["select"][100.0]
        checks[f"p99 at 100/s with the large catalog <= 2x 10 k's (x{_ratio(large['p99'], small['p99'])})"] = (
            large["p99"] is not None and not large["errors"] and large["p99"] <= 2 * small["p99"]
        )
    print("\nissue targets (#19):")
    for what, met in checks.items():
        print(f"  {'met    ' if met else 'NOT met'}  {what}")


def _progress(row: dict) -> str:
    return (
        f"p50 {_ms(row['p50'])} ms, p99 {_ms(row['p99'])} ms, achieved {row['achieved']:.1f}/s, "
        f"{row['errors']} errors {row['error_kinds'] or ''}, server CPU {row['cpu_ms']:.2f} ms/req"
    )


def capacity(by_rate: dict[float, dict]) -> float | None:
    """The highest offered rate with p99 under 20 ms, no errors and the rate achieved (within 2%)."""
    ok = [rate for rate, r in by_rate.items()
          if r["p99"] is not None and r["p99"] < 20 and not r["errors"] and r["achieved"] >= 0.98 * rate]  # fmt: skip
    return max(ok) if ok else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


if __name__ == "__main__":
    main()
