"""A SYNTHETIC click log in the Globo `clicks.csv.gz` format, generated from a seed (no real data).

Articles are published through the days and fade; a session's next click is, with probability
`follow`, the article "after" its previous click (a fixed successor per article: what co-occurrence
and the sequence model can learn), else a pick by current popularity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["user_id", "session_id", "session_start", "session_size", "click_article_id", "click_timestamp",
           "click_environment", "click_deviceGroup", "click_os", "click_country", "click_region",
           "click_referrer_type"]  # fmt: skip
START_MS = 1_507_507_200_000  # 2017-10-09 00:00 UTC
SAMPLE = Path(__file__).parent / "data" / "globo_sample.csv.gz"  # write_synthetic(SAMPLE) with the defaults


def synthetic_frame(*, days: int = 4, sessions_per_hour: int = 40, follow: float = 0.6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    hours = days * 24
    per_hour = 6  # articles published each hour
    n_articles = (hours + 12) * per_hour  # the first 12 hours' worth published before the log starts
    published = START_MS + (np.arange(n_articles) // per_hour - 12) * 3_600_000
    successor = rng.permutation(n_articles)  # the article most read after each one
    appeal = rng.lognormal(0.0, 1.0, n_articles)
    rows = []
    session_id = 0
    for hour in range(hours):
        for _ in range(rng.poisson(sessions_per_hour)):
            t = START_MS + hour * 3_600_000 + int(rng.integers(0, 3_600_000))
            live = np.flatnonzero((published <= t) & (published > t - 12 * 3_600_000))
            weights = appeal[live] * np.exp(-(t - published[live]) / 4 / 3_600_000)
            size = int(rng.integers(2, 7))
            clicks, user = [], int(rng.integers(0, 5_000))
            article = int(rng.choice(live, p=weights / weights.sum()))
            for _ in range(size):
                clicks.append((article, t))
                t += int(rng.integers(20_000, 300_000))
                nxt = int(successor[article])
                if rng.random() < follow and published[nxt] <= t and nxt not in {a for a, _ in clicks}:
                    article = nxt
                else:
                    fresh = [a for a in live if a not in {c for c, _ in clicks}]
                    w = appeal[fresh] * np.exp(-(t - published[fresh]) / 4 / 3_600_000)
                    article = int(rng.choice(fresh, p=w / w.sum()))
            session_id += 1
            sid = START_MS * 1000 + session_id
            for article, ts in clicks:
                rows.append((user, sid, clicks[0][1], size, 1000 + article, ts, 4, 1, 17, 1, 25, 2))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.sort_values("click_timestamp", kind="stable").reset_index(drop=True)


def write_synthetic(path: Path, **kwargs: int | float) -> Path:
    synthetic_frame(**kwargs).to_csv(path, index=False, compression="gzip")  # type: ignore[arg-type]
    return path


if __name__ == "__main__":  # python -m tests.models.globo_data: rewrites the committed sample
    out = write_synthetic(SAMPLE)
    print(out, len(pd.read_csv(out)), "clicks")
