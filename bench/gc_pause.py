"""How long a full cyclic-GC collection stalls a serving process, with and without `gc.freeze`.

    .venv/bin/python -m bench.gc_pause [--ads 10000] [--repeat 5]

Builds the serving runtime as `bench/serve.py` does (a generated catalog of `--ads` ads, the projection
model, FastAPI and Feast imported), then times `gc.collect(2)` (what the interpreter runs by itself
once enough objects have survived) before and after `serving.runtime.freeze_heap()`, which the app
calls at start-up and after each reload. Prints the tracked object counts and median / max pause.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path


def pauses(repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        gc.collect(2)
        out.append((time.perf_counter() - started) * 1000)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ads", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import fastapi  # noqa: F401  (the server's imports, as in a running process)

    from adloop.settings import Settings
    from models.testing import ProjectionBundle, StaticRegistry
    from serving.catalog import generate_catalog, write_catalog
    from serving.runtime import Runtime, freeze_heap

    with tempfile.TemporaryDirectory() as work:
        rows = generate_catalog(args.ads, seed=7)
        write_catalog(rows, Path(work) / "ads.csv")
        bundle = ProjectionBundle(rows)
        settings = Settings(catalog_path=Path(work) / "ads.csv", catalog_poll_s=0, events_topic="adloop.unused")
        runtime = Runtime(settings, registry=StaticRegistry({bundle.version: bundle}, bundle.version))
        for label, prepare in (("as started", lambda: None), ("after freeze_heap()", freeze_heap)):
            prepare()
            tracked = len(gc.get_objects())
            ms = pauses(args.repeat)
            print(f"{label:<22} tracked objects {tracked:>8,}  frozen {gc.get_freeze_count():>8,}  "
                  f"full collection median {statistics.median(ms):7.2f} ms, max {max(ms):7.2f} ms")  # fmt: skip
        await runtime.stop()


if __name__ == "__main__":
    asyncio.run(main())
