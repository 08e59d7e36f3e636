"""How far can popularity go on MIND's last day? Diagnostics behind issue #7's 0.63 group AUC target.

    python -m bench.mind_ceiling [MIND folder, default ../shared/data/mind] [--days 3]

Prints, for the last day (and the last `--days` days pooled, each scored by a model of the days before):
the news.tsv coverage of candidates, the share of requests from users never seen before that day, and
the group AUC of
- live popularity (`ad_ctr_7d`, the stream's click rate as of each request: what `adloop evaluate` shows);
- an ORACLE: the ad's click rate over the same day's other impressions, earlier and later (leave the
  row itself out). It reads the future, so no live system can have it: it bounds what a better live
  popularity estimate could give;
- the ranker (models.ranker features without the embedding score, same LightGBM) given that oracle as
  one more feature, trained on the earlier days: popularity as good as it gets plus everything the
  ranker knows about the user and the context.
Not a test and not an evaluation: the oracle rows are leaky on purpose.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

DAY_MS = 86_400_000


def main() -> None:
    from models.evaluate import load_mind
    from models.metrics import group_metrics
    from models.ranker import FEATURES, base_margin, frame_features, train_ranker
    from models.train import sort_requests
    from streaming.replay.mind import read_news

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", default="../shared/data/mind", type=Path)
    parser.add_argument("--days", type=int, default=3, help="last days pooled (each by a model of the days before)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    frame = sort_requests(load_mind(args.path))
    day = frame["ts"].to_numpy() // DAY_MS
    labels = frame["label"].to_numpy()
    same_day = frame.groupby([day, frame["ad_id"]])["label"]
    clicks, shown = same_day.transform("sum") - labels, same_day.transform("count") - 1
    oracle = ((clicks + 0.4) / (shown + 10)).to_numpy()  # prior: 4% click rate worth 10 impressions

    features = [f for f in FEATURES if f != "embedding_score"]
    x = np.column_stack([frame_features(frame, None, features), oracle])
    names = [*features, "oracle_same_day_ctr"]
    news = read_news(args.path / "news.tsv")
    first_day = frame.groupby("user_id")["ts"].transform("min").to_numpy() // DAY_MS

    def gauc(mask: np.ndarray, scores: np.ndarray) -> float:
        return group_metrics(frame["request_id"].to_numpy()[mask], labels[mask], scores)["group_auc"]

    rows: dict[str, dict[str, float]] = {}
    ranker = np.full(len(frame), np.nan)
    for d in np.unique(day)[-args.days :]:
        history = np.flatnonzero(day < d)
        requests = frame["request_id"].to_numpy()[history]
        late = pd.Index(pd.unique(requests)[int(0.85 * len(pd.unique(requests))) :])
        valid = history[late.get_indexer(requests) >= 0]
        learn = np.setdiff1d(history, valid)
        booster = train_ranker(x[learn], labels[learn], x[valid], labels[valid], features=names)
        rows_d = np.flatnonzero(day == d)
        ranker[rows_d] = base_margin(x[rows_d], names) + booster.predict(x[rows_d], raw_score=True)
    for label, mask in (("last day", day == day.max()), (f"last {args.days} days", day >= np.unique(day)[-args.days])):
        first_rows = mask & ~frame["request_id"].duplicated().to_numpy()  # one row per request
        rows[label] = {
            "requests": float(first_rows.sum()),
            "candidates in news.tsv": float(frame.loc[mask, "ad_id"].isin(news).mean()),
            "requests from users new that day": float((first_day[first_rows] == day[first_rows]).mean()),
            "live popularity (ad_ctr_7d)": gauc(mask, frame.loc[mask, "ad_ctr_7d"].to_numpy(dtype=float)),
            "ORACLE same-day click rate (leave-one-out)": gauc(mask, oracle[mask]),
            "ranker + ORACLE feature": gauc(mask, ranker[mask]),
        }  # fmt: skip
    table = pd.DataFrame(rows)
    print(table.to_markdown(floatfmt=".4f"))


if __name__ == "__main__":
    main()
