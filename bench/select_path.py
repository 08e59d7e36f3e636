"""The request path's CPU in one process, stage by stage, with no HTTP: where a `/v1/select` spends its time.

    .venv/bin/python -m bench.select_path [--requests 3000] [--stages-only] [--profile N] [--batch B] [--ads N]

Before/after pairs: copy this file into a checkout of the older commit and run both back to back with
`--stages-only` (the machine's speed drifts by ~20% over an hour; compare runs minutes apart).

Set-up as `bench.serve` (whose helpers it reuses): a 10,000-ad generated catalog, a trained model
(two-tower + LightGBM + Platt, lleaves-compiled), 2,000 users' `user_activity` rows and the ads'
`ad_performance` rows in Feast's Redis layout in db 7 (emptied before and after), one native slot of
2 ads per request (200 candidates ranked). Needs the local stack (`adloop stack up`).
Prints, per stage, the median and p99 over the requests (wall time in one thread, so a quiet machine
gives about the CPU time), the whole `Runtime.select` in process CPU per request, and baselines run
in the same process:
- the user tower through torch (what serving ran before) beside its numpy forward (what it runs on the CPU);
- the pacing sync (every second, in a thread that shares the GIL with the event loop) with a key and
  two commands per ad, MGET of every budgeted ad (what it did before) beside the one-script hash sync;
- the ad-stats refresh (in a thread): a full one's CPU and its share of the GIL without yielding beside
  serving's yielding one; a changed-ads one after 1,000 ads' rows were rewritten.
`--batch B`: the same requests also scored B at a time (`Selector.select_many`, what the pipeline does
with concurrent requests), CPU per request beside one at a time. `--ads N`: a catalog of N ads (the
10,000 with seeded features, then ads no event has touched; no ad-stats refresh, priors instead), and
for an indexed catalog the recall@200 of the approximate index against exact search and both times.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH_REDIS_DB = 7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the stages, cProfile the requests and print the N costliest functions",
    )
    parser.add_argument("--batch", type=int, default=0, help="also score B requests at a time")
    parser.add_argument("--ads", type=int, default=10_000, help="catalog size (>= 10,000)")
    parser.add_argument("--stages-only", action="store_true",
                        help="only Runtime.select (runs on older checkouts too, for a before/after pair)")  # fmt: skip
    args = parser.parse_args()
    assert args.requests <= 20_000 and 10_000 <= args.ads <= 2_000_000 and args.batch <= 256, "bounded benchmark"

    import redis
    import torch

    from adloop.settings import get_settings
    from bench.serve import seed_features, train_bench_model
    from features import store
    from models.two_tower import encode_users, to_tensors
    from serving.catalog import generate_catalog, write_catalog
    from serving.runtime import Runtime, freeze_heap
    from serving.selection_types import SelectionRequest, Slot

    base = get_settings()
    work = Path(tempfile.mkdtemp(prefix="adloop-bench-"))
    settings = base.model_copy(
        update={
            "redis_url": base.redis_url.rsplit("/", 1)[0] + f"/{BENCH_REDIS_DB}",
            "feast_data_dir": work / "feast",
            "catalog_path": work / "ads.csv",
            "model_registry_path": work / "models",
            "catalog_poll_s": 0,
            "serve_top_k": 200,
        }
    )
    ads = generate_catalog(10_000, seed=7)
    write_catalog(ads, settings.catalog_path)
    if args.ads > len(ads):  # the seeded ads first, then ads no event has touched
        large = generate_catalog(args.ads, seed=7)
        large[: len(ads)] = ads
        for row in large[len(ads) :]:
            row["ad_id"] = "l" + row["ad_id"]
        write_catalog(large, settings.catalog_path)
        del large
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    try:
        store.apply(settings)
        users, rows = seed_features(settings, client, ads)
        train_bench_model(ads, settings.model_registry_path)
        built = time.perf_counter()
        runtime = Runtime(settings)  # not started: no impression sender, no background threads
        index = runtime.state.index
        print(f"serving state of {len(runtime.state.catalog):,} ads built in {time.perf_counter() - built:.1f} s"
              + (" (approximate index: " + ", ".join(f"{p.index.ntotal:,} ads in {p.nlist} lists, {p.nprobe} probed"
                                    for p in index.parts) + ")" if index else ""))  # fmt: skip
        if args.ads == len(ads):
            runtime.ad_stats.refresh(runtime.reader, runtime.state.catalog)
        freeze_heap()

        def request(i: int) -> SelectionRequest:
            return SelectionRequest(f"r{i}", users[i % len(users)], [Slot("feed", "native", 2)],
                                    {"device": "mobile", "page_category": "tech"})  # fmt: skip

        for i in range(300):  # warm-up
            runtime.pipeline.run_with(request(i), log_impressions=False)
        stages: dict[str, list[float]] = {}
        cpu = time.process_time()
        for i in range(args.requests):
            _, result = runtime.pipeline.run_with(request(i))
            for stage, seconds in result.timings.items():
                stages.setdefault(stage, []).append(seconds)
        cpu_ms = (time.process_time() - cpu) * 1000 / args.requests
        print(f"\nRuntime.select in process, {args.requests} requests (200 candidates, trained model):")
        print(f"  process CPU {cpu_ms:.3f} ms per request (impressions queued, not sent)")
        unread = getattr(runtime.state.model, "unread_features", frozenset)()  # older checkouts compute them all
        names = runtime.state.model.feature_names
        print(
            f"  the ranker's trees read {len(names) - len(unread)} of its {len(names)} features (others: not computed)"
        )
        print(f"  {'stage':<14}{'p50 ms':>9}{'p99 ms':>9}")
        for stage, values in stages.items():
            print(f"  {stage:<14}{_ms(values, 50):>9}{_ms(values, 99):>9}")

        if args.batch:
            batched(runtime, request, args.requests, args.batch)
            if args.profile:
                profile(lambda: batched(runtime, request, args.requests, args.batch), args.profile)
        if index is not None:
            recall(runtime, rows, users)
        if args.profile:
            profile(lambda: [runtime.pipeline.run_with(request(i)) for i in range(args.requests)], args.profile)
        if args.stages_only:
            return
        bundle = runtime.state.model
        user_rows = [rows[u] for u in users[:500]]
        inputs = [encode_users([r], bundle.tower.config) for r in user_rows]
        tower = bundle.tower

        def torch_forward(batch):
            with torch.inference_mode():
                return tower.user_tower(to_tensors(batch, torch.device("cpu"))).numpy()

        bundle.user_vectors(user_rows[:1])  # builds the numpy twin
        numpy_forward = bundle._cpu_tower
        timed = {name: _each(forward, inputs) for name, forward in (("torch", torch_forward), ("numpy", numpy_forward))}
        print("\nuser tower forward, batch 1 (encoded inputs), 500 users:")
        for name, values in timed.items():
            print(f"  {name:<6} p50 {_ms(values, 50)} ms  p99 {_ms(values, 99)} ms")
        print(f"  numpy / torch (p50): {np.median(timed['numpy']) / np.median(timed['torch']):.3f}")

        ad_stats_refresh(runtime)  # before pacing, which empties the bench's Redis db
        pacing(runtime, client)
    finally:
        client.flushdb()
        shutil.rmtree(work, ignore_errors=True)


def batched(runtime, request, n: int, size: int) -> None:
    """The same requests B at a time through `Selector.select_many` (user reads done synchronously first,
    as the routes await them before queueing), charged and logged as the pipeline does, beside the same
    requests one at a time from the same reads."""
    selector, pipeline = runtime.selector, runtime.pipeline
    reads = [(request(i), selector.features.user(request(i).user_id)) for i in range(n)]
    items = [(r, (user, fallback, 0.0)) for r, (user, fallback) in reads]
    cpu = time.process_time()  # one at a time from the same reads (`alone_ms` includes each Redis read)
    for r, user_read in items:
        pipeline.run_with(r, user_read=user_read)
    alone_ms = (time.process_time() - cpu) * 1000 / n
    cpu = time.process_time()
    for lo in range(0, n, size):
        state = selector.state
        for (r, _), result in zip(items[lo : lo + size], selector.select_many(items[lo : lo + size], state=state),
                                  strict=True):  # fmt: skip
            pipeline._after(state, r, result, "select", True)
    ms = (time.process_time() - cpu) * 1000 / n
    print(
        f"  batches of {size}: process CPU {ms:.3f} ms per request "
        f"(one at a time, users read before either: {alone_ms:.3f}; x{ms / alone_ms:.2f})"
    )


def recall(runtime, rows: dict, users: list[str], k: int = 200) -> None:
    """Recall@k of the approximate index against exact search, over the bench users' vectors, with the
    native format's eligible ads as the filter (as a request of the bench asks)."""
    from serving.serving_state import top_k

    state = runtime.state
    mask = state.catalog.format_masks["native"] & state.live(int(time.time() // 86_400))
    found, reached, t_index, t_exact = [], [], [], []
    for user in users[:200]:
        u = state.model.user_vector(rows[user])
        clock = time.perf_counter()
        got = state.index.search(u, mask, k)
        t_index.append(time.perf_counter() - clock)
        clock = time.perf_counter()
        exact = top_k(state.ad_matrix @ u, [mask], k)
        t_exact.append(time.perf_counter() - clock)
        found.append(len(np.intersect1d(got, exact)) / k)
        # ads tied with the exact k-th score are interchangeable: count a returned ad at or above it as found
        kth = np.min(state.ad_matrix[exact] @ u)
        reached.append(min(k, int(np.sum(state.ad_matrix[got] @ u >= kth - 1e-6))) / k)
    print(f"\napproximate index over {len(state.catalog):,} ads ({int(mask.sum()):,} eligible), 200 users:")
    print(
        f"  recall@{k} against exact: mean {np.mean(found):.4f}, min {np.min(found):.4f} (ids); "
        f"mean {np.mean(reached):.4f}, min {np.min(reached):.4f} (scores: ties at the k-th score count)"
    )
    print(
        f"  search p50 {_ms(t_index, 50)} ms p99 {_ms(t_index, 99)} ms; "
        f"exact p50 {_ms(t_exact, 50)} ms p99 {_ms(t_exact, 99)} ms"
    )


def profile(run, top: int) -> None:
    """cProfile of `run`, the `top` functions by their own time (where to look next)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(run)
    print(f"\ncProfile, the {top} functions with the most own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def pacing(runtime, client) -> None:
    """One second of spend at ~500 requests/s (800 distinct ads charged), synced ten times each way."""
    from serving.pacing import Pacer

    catalog = runtime.state.catalog
    rng = np.random.default_rng(0)
    results: dict[str, list[float]] = {"per-key + MGET (before)": [], "one script, day hash": []}
    for name, sync in zip(results, (_legacy_sync, Pacer.sync), strict=True):
        client.flushdb()
        pacer = Pacer(catalog)
        for _ in range(10):
            pacer.charge(catalog, rng.integers(0, len(catalog), 800), np.full(800, 0.001))
            started = time.process_time()
            sync(pacer, client)
            results[name].append(time.process_time() - started)
    budgeted = int((catalog.daily_budget > 0).sum())
    print(f"\npacing sync, {budgeted:,} budgeted ads, 800 ads charged per sync, process CPU per sync (10 syncs):")
    for name, values in results.items():
        print(f"  {name:<26} p50 {_ms(values, 50)} ms  max {max(values) * 1000:.2f} ms")
    after, before = (np.median(v) for v in reversed(results.values()))
    print(f"  after / before (p50): {after / before:.3f}")


def ad_stats_refresh(runtime) -> None:
    """The background reads of the ads' `ad_performance` rows (serving.features_access.AdStats): a full
    refresh's CPU (what one worker spends each `ad_stats_full_refresh_s`) and wall time, holding the GIL
    throughout (gil_share 1, the baseline) and as serving runs it (yielding after each chunk); then a
    changed-ads refresh (each `ad_stats_refresh_s`) after 1,000 ads' rows were rewritten."""
    from features.online import write_rows
    from features.store import AD_VIEW
    from serving.features_access import REFRESH_GIL_SHARE

    catalog = runtime.state.catalog
    print(f"\nad-stats refresh of {len(catalog):,} ads (3 runs each; CPU of this thread, wall):")
    for share in (1.0, REFRESH_GIL_SHARE):
        cpu, wall = [], []
        for _ in range(3):
            started, clock = time.thread_time(), time.perf_counter()
            runtime.ad_stats.refresh(runtime.reader, catalog, gil_share=share)
            cpu.append(time.thread_time() - started)
            wall.append(time.perf_counter() - clock)
        print(f"  gil_share {share:<4} CPU p50 {_ms(cpu, 50)} ms ({np.median(cpu) / len(catalog) * 1e6:.1f} us per ad)"
              f"  wall p50 {_ms(wall, 50)} ms  CPU / wall {np.median(cpu) / np.median(wall):.2f}")  # fmt: skip
    full_cpu = float(np.median(cpu))
    reader, cpu, first = runtime.reader, [], []
    rows = reader.ads([str(a) for a in catalog.ad_ids[:1000]])
    candidates = np.sort(np.random.default_rng(0).choice(len(catalog), 200, replace=False))
    for _ in range(3):
        time.sleep(0.01)
        write_rows(
            reader.client, reader.layout, AD_VIEW, [(ad, int(time.time() * 1000), row) for ad, row in rows.items()]
        )
        started = time.thread_time()
        runtime.ad_stats.refresh_changed(reader, catalog, overlap_s=0)
        cpu.append(time.thread_time() - started)
        started = time.perf_counter()  # what the next request pays for the swapped stats: its candidates' columns
        runtime.state.ad_columns(runtime.ad_stats).take(candidates)
        first.append(time.perf_counter() - started)
    print(f"  changed ads only, {len(rows):,} rewritten: CPU p50 {_ms(cpu, 50)} ms"
          f"  (x{np.median(cpu) / full_cpu:.2f} a full refresh's);"
          f" the next request's ad columns p50 {_ms(first, 50)} ms")  # fmt: skip


def _legacy_sync(pacer, client) -> None:
    """The sync as it was (baseline): INCRBYFLOAT + EXPIRE per charged ad, MGET of every budgeted ad's key."""
    from serving.pacing import KEY_TTL_S

    catalog, day, pending = pacer._catalog, pacer._day, pacer._pending
    pacer._pending = np.zeros(len(catalog))
    budgeted = np.flatnonzero(catalog.daily_budget > 0)
    pipe = client.pipeline(transaction=False)
    for row in np.flatnonzero(pending):
        key = f"adloop:spend:{day}:{catalog.ad_ids[row]}"
        pipe.incrbyfloat(key, float(pending[row]))
        pipe.expire(key, KEY_TTL_S)
    pipe.mget([f"adloop:spend:{day}:{catalog.ad_ids[row]}" for row in budgeted])
    totals = pipe.execute()[-1]
    shared = np.array([float(v) if v is not None else 0.0 for v in totals])
    pacer._spend[budgeted] = shared + pacer._pending[budgeted]


def _each(forward, inputs) -> list[float]:
    for batch in inputs[:50]:
        forward(batch)
    out = []
    for batch in inputs:
        started = time.perf_counter()
        forward(batch)
        out.append(time.perf_counter() - started)
    return out


def _ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.3f}"


if __name__ == "__main__":
    main()
