"""Feast's dask point-in-time join with dask's own tokens against `features.offline`'s, on the local stack.

    .venv/bin/python -m bench.point_in_time [--rows 1500]

Needs a served log on the local stack (run `make run` first): `--rows` labelled impressions sampled from
the events topic are joined with both views' features twice, first with dask hashing every list column
by pickling it (its default), then inside `features.offline._list_columns_tokenized_by_identity`;
prints both times and checks that the frames are identical.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from adloop.settings import get_settings
from features import offline
from features.store import AD_VIEW, USER_VIEW, open_store
from models.dataset import labelled_impressions
from streaming.topic_reader import read_events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1500)
    args = parser.parse_args()
    settings = get_settings()
    impressions = labelled_impressions(read_events(settings))
    if impressions.empty:
        raise SystemExit("no impressions on the events topic: run `make run` first")
    sample = impressions.sample(min(args.rows, len(impressions)), random_state=1)
    rows = sample.assign(event_timestamp=pd.to_datetime(sample["ts"], unit="ms", utc=True)).reset_index(drop=True)
    store, views = open_store(settings), (USER_VIEW, AD_VIEW)
    started = time.perf_counter()
    plain = offline._join(settings, store, rows.copy(), views)
    plain_s = time.perf_counter() - started
    with offline._list_columns_tokenized_by_identity():
        started = time.perf_counter()
        fast = offline._join(settings, store, rows.copy(), views)
        fast_s = time.perf_counter() - started
    pd.testing.assert_frame_equal(plain, fast)
    print(f"{len(rows):,} rows x {len(views)} views: dask's own tokens {plain_s:.1f} s, list columns by identity "
          f"{fast_s:.1f} s ({plain_s / fast_s:.0f}x); frames identical")  # fmt: skip


if __name__ == "__main__":
    main()
