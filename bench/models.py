"""Model benchmarks on MIND: training time, user-tower latency, LightGBM vs the compiled predictor.

    python -m bench.models [MIND folder, default ../shared/data/mind] [--threads N]
    python -m bench.models --tower-only     # user tower alone (CPU, and CUDA when present)

Prints medians and p99 in milliseconds (wall clock, perf_counter). LightGBM runs with num_threads=1
and lleaves with n_jobs=1, on the same 200-candidate matrices in the same process, interleaved.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def timed(fn: Callable[[], object], repeat: int, warmup: int = 20) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeat)
    for i in range(repeat):
        start = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - start) * 1000
    return out


def line(name: str, ms: np.ndarray) -> str:
    return f"{name:<48} median {np.median(ms):8.3f} ms   p99 {np.percentile(ms, 99):8.3f} ms"


def bench_user_tower(bundle, users: list[dict], repeat: int) -> None:
    """User-vector latency, batch 1 and 64, on the CPU and on CUDA when there is one (bundle left on CPU)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        bundle.tower.to(device)
        bundle.device = device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        one = timed(lambda sync=sync: (bundle.user_vector(users[0]), sync()), repeat)
        many = timed(lambda sync=sync: (bundle.user_vectors(users[:64]), sync()), repeat // 2)
        print(line(f"  {device.type} batch 1", one))
        print(line(f"  {device.type} batch 64", many))
    bundle.tower.to("cpu")
    bundle.device = torch.device("cpu")


def tower_only(repeat: int) -> None:
    """The user tower alone, default config, synthetic users (20 recent items): needs only torch + numpy."""
    from dataclasses import dataclass

    from models.two_tower import TwoTower, TwoTowerConfig, encode_users, to_tensors

    @dataclass
    class TowerOnly:  # the two methods of ModelBundle this bench calls, without LightGBM and pandas
        tower: TwoTower
        device: torch.device

        def user_vectors(self, rows):
            with torch.inference_mode():
                return self.tower.user_tower(to_tensors(encode_users(rows, self.tower.config), self.device)).cpu()

        def user_vector(self, row):
            return self.user_vectors([row])[0]

    torch.manual_seed(0)
    users = [{"recent_items": [f"N{i * 31 + j}" for j in range(20)], "recent_categories": ["news"] * 5,
              "page_view_24h": 20, "ad_click_7d": 2} for i in range(64)]  # fmt: skip
    bench = TowerOnly(TwoTower(TwoTowerConfig()).eval(), torch.device("cpu"))
    print(f"user tower only (torch {torch.__version__}, threads {torch.get_num_threads()})")
    bench_user_tower(bench, users, repeat)
    if torch.cuda.is_available():  # same code, same weights: CPU and CUDA vectors agree
        cpu = bench.user_vectors(users).numpy()
        bench.tower.to("cuda")
        bench.device = torch.device("cuda")
        gpu = bench.user_vectors(users).numpy()
        print(f"  max |cpu - cuda| over 64 user vectors: {np.abs(cpu - gpu).max():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default="../shared/data/mind", type=Path)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the serving process's setting)")
    parser.add_argument("--repeat", type=int, default=500)
    parser.add_argument("--tower-only", action="store_true", help="only the user tower (torch + numpy, no data)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.tower_only:
        tower_only(args.repeat)
        return

    from models.evaluate import holdout_split
    from models.mind import impression_frame
    from models.ranker import AD_SCALARS, request_features
    from models.registry import Registry
    from models.train import sort_requests, train

    start = time.perf_counter()
    frame = impression_frame(args.data)
    replay_s = time.perf_counter() - start
    history, holdout = holdout_split(frame)
    start = time.perf_counter()
    bundle, report = train(history)
    train_s = time.perf_counter() - start
    print(f"MIND replay (prequential features, {len(frame)} rows): {replay_s:.1f} s")
    print(f"training (two-tower + LightGBM + calibration, {len(history)} rows, torch threads {args.threads}): "
          f"{train_s:.1f} s, {bundle.booster.num_trees()} trees, device {report['device']}")  # fmt: skip

    with tempfile.TemporaryDirectory() as root:
        registry = Registry(root)
        version = registry.save(bundle, report=report)
        start = time.perf_counter()
        loaded = registry.load(version, compiled=True)
        print(f"registry load incl. lleaves compile: {time.perf_counter() - start:.1f} s "
              f"(compiled predictor: {'yes' if loaded.compiled is not None else 'NO (lleaves missing)'})")  # fmt: skip

        holdout = sort_requests(holdout)
        users = holdout.drop_duplicates("request_id")
        users = users[users["recent_items"].map(len) > 0].to_dict("records")
        print("\nuser tower (recent items + categories + activity -> vector)")
        bench_user_tower(loaded, users, args.repeat)

        rng = np.random.default_rng(0)
        rows = holdout.iloc[rng.choice(len(holdout), 200, replace=False)]  # 200 candidates, one user's features
        user = users[0]
        ads = {c: rows[c].to_numpy() for c in ["ad_id", "category", "campaign_id", *AD_SCALARS, "ad_last_seen_ms"]}
        context = {"ts_ms": int(user["ts"]), "hour": user["hour"]}
        emb = loaded.embed_ads(rows) @ loaded.user_vector(user)
        x = request_features(user, ads, context, emb, loaded.feature_names)
        print(f"\nranker on 200 candidates x {x.shape[1]} features ({loaded.booster.num_trees()} trees)")
        feats = timed(lambda: request_features(user, ads, context, emb, loaded.feature_names), args.repeat)
        print(line("  feature matrix (numpy)", feats))
        lgb_ms, llvm_ms = [], []
        for _ in range(args.repeat // 50):  # interleaved blocks: both see the same machine load
            lgb_ms.append(timed(lambda: loaded.booster.predict(x, raw_score=True, num_threads=1), 50, 5))
            if loaded.compiled is not None:
                llvm_ms.append(timed(lambda: loaded.compiled.predict(x, n_jobs=1), 50, 5))
        lgb_ms = np.concatenate(lgb_ms)
        print(line("  LightGBM predict (num_threads=1)", lgb_ms))
        if llvm_ms:
            llvm_ms = np.concatenate(llvm_ms)
            diff = np.abs(loaded.compiled.predict(x, n_jobs=1) - loaded.booster.predict(x, raw_score=True)).max()
            print(line("  lleaves predict (n_jobs=1)", llvm_ms))
            print(f"  ratio LightGBM / lleaves (medians): {np.median(lgb_ms) / np.median(llvm_ms):.1f}x; "
                  f"max |margin difference| {diff:.1e}")  # fmt: skip
        full = timed(lambda: loaded.predict_ctr(user, ads, context, emb), args.repeat)
        print(line("  predict_ctr end to end (features+predict+calib)", full))


if __name__ == "__main__":
    main()
