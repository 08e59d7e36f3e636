"""Can a personalised live signal beat live popularity on MIND's last day? An experiment for issue #7.

    python -m bench.mind_coclick [MIND folder, default ../shared/data/mind] [--days 3] [--shrink 5]

Every signal is prequential, as `models.mind` replays the stream: a request at time T sees the
impressions of earlier requests (time < T) and their clicks once due (click time = request time + 1 s
<= T); its own labels are revealed only after it is scored. A user's item set at T is their MIND
`history` plus the articles they clicked in the stream so far ("live clicks").

Per (candidate c, item h) the stream keeps impressions and clicks of c to users whose item set held h:
- `co-click NB`: sum over the user's items h of logit(ctr(c | h)) - logit(ctr(c)), each ctr(c | h)
  shrunk to ctr(c) = live popularity (naive Bayes over the history: a lift against c's impressed users);
- `co-click PMI`: sum over h of log((clicks(c, h) + 1) / (clicks(c) * share of users holding h + 1)),
  a lift against the whole user population;
- `user-kNN`: mean cosine of the user's item set to c's past clickers minus that to its past
  non-clickers (users as 1/sqrt(|items|)-normalised indicator vectors; a sum over the same (c, h) counts);
- `live-click NB`: co-click NB with only live clicks as the item sets (session/day co-clicks);
- `category x segment CTR`: live click rate of (user's top news.tsv category, candidate's category).
Combinations: rank average with popularity, and a logistic regression over the signals trained on the
days before each scored day. Two ORACLE rows read the future (leaky on purpose, no live system has them):
the ad's same-day click rate (as bench.mind_ceiling) and co-click NB from all five days' counts, the
row itself left out: what these signals could give if the stream had already seen everything.
Differences are paired per impression against live popularity (`ad_ctr_7d`, the project's feature, read
from models.mind; the script asserts its own ad counts equal the replay's), with their standard error.
About 45 s and 2 GB on the 2-core development machine (5.2 M (candidate, item) pairs).
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

DAY_MS = 86_400_000
CLICK_DELAY_MS = 1_000


def prior_sums(key: np.ndarray, t: np.ndarray, weight: np.ndarray, query_t: np.ndarray, *, strict: bool) -> np.ndarray:
    """Per row: the sum of `weight` over rows with the same key and t < query_t (`strict`) or t <= query_t."""
    times = np.unique(np.r_[t, query_t])
    m = len(times) + 1
    event = key * m + np.searchsorted(times, t)
    order = np.argsort(event, kind="stable")
    cum = np.r_[0.0, np.cumsum(weight[order])]
    event = event[order]
    hi = np.searchsorted(event, key * m + np.searchsorted(times, query_t), side="left" if strict else "right")
    return cum[hi] - cum[np.searchsorted(event, key * m, side="left")]


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def item_sets(frame: pd.DataFrame, history: dict[str, list[str]], *, live_only: bool) -> list[list[str]]:
    """Per request (in frame order of first rows): the user's items at request time."""
    first = frame.drop_duplicates("request_id")
    clicks = frame[frame["label"] == 1]
    live: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for user, ts, ad in zip(clicks["user_id"], clicks["ts"] + CLICK_DELAY_MS, clicks["ad_id"], strict=True):
        live[user].append((int(ts), ad))
    sets = []
    for request, user, ts in zip(first["request_id"], first["user_id"], first["ts"], strict=True):
        seen = [ad for due, ad in live[user] if due <= ts]
        sets.append(list(dict.fromkeys(seen if live_only else [*history[request], *seen])))
    return sets


def coclick_signals(
    frame: pd.DataFrame, sets: list[list[str]], pop: np.ndarray, oracle_pop: np.ndarray, shrink: float
) -> dict[str, np.ndarray]:
    """NB, PMI and kNN scores per row from the (candidate, user item) counters, as of each request; and an
    ORACLE NB from the counts over all five days, the row itself left out, shrunk to `oracle_pop`."""
    ids = {a: i for i, a in enumerate(pd.unique(np.r_[frame["ad_id"].to_numpy(), [h for s in sets for h in s]]))}
    is_first = ~frame["request_id"].duplicated().to_numpy()
    first_row = np.flatnonzero(is_first)
    request = np.cumsum(is_first) - 1  # per row: its request's index in `sets`
    set_size = np.array([max(len(s), 1) for s in sets], dtype=float)[request]
    rows, items = [], []
    for lo, hi, s in zip(first_row, np.r_[first_row[1:], len(frame)], sets, strict=True):
        h = np.array([ids[x] for x in s], dtype=np.int64)
        rows.append(np.repeat(np.arange(lo, hi), len(h)))
        items.append(np.tile(h, hi - lo))
    row, item = np.concatenate(rows), np.concatenate(items)
    cand = np.array([ids[a] for a in frame["ad_id"]], dtype=np.int64)
    ts, label = frame["ts"].to_numpy(), frame["label"].to_numpy().astype(float)
    key, t, y, w = cand[row] * len(ids) + item, ts[row], label[row], 1.0 / np.sqrt(set_size[row])
    imp = prior_sums(key, t, np.ones(len(key)), t, strict=True)
    clk = prior_sums(key, t + CLICK_DELAY_MS, y, t, strict=False)
    imp_w = prior_sums(key, t, w, t, strict=True)
    clk_w = prior_sums(key, t + CLICK_DELAY_MS, y * w, t, strict=False)
    imp_c = prior_sums(cand, ts, np.ones(len(frame)), ts, strict=True)
    clk_c = prior_sums(cand, ts + CLICK_DELAY_MS, label, ts, strict=False)
    # share of users seen before T whose first item set held h (the PMI's population rate of h)
    new_user = ~frame["user_id"].iloc[first_row].duplicated().to_numpy()
    u_item = np.concatenate([[ids[x] for x in s] for s, new in zip(sets, new_user, strict=True) if new] or [[]])
    u_t = np.concatenate([[ts[lo]] * len(s) for lo, s, new in zip(first_row, sets, new_user, strict=True) if new]
                         or [[]])  # fmt: skip
    holders = prior_sums(
        np.r_[u_item, item].astype(np.int64),
        np.r_[u_t, t],
        np.r_[np.ones(len(u_item)), np.zeros(len(item))],
        np.r_[u_t, t],
        strict=True,
    )[len(u_item) :]
    users_before = np.searchsorted(np.sort(ts[first_row[new_user]]), t, side="left").astype(float)
    p_c = pop[row]
    nb = np.bincount(row, logit((clk + shrink * p_c) / (imp + shrink)) - logit(p_c), minlength=len(frame))
    _, pair = np.unique(key, return_inverse=True)
    imp_all, clk_all = np.bincount(pair)[pair] - 1.0, np.bincount(pair, y)[pair] - y
    p_o = oracle_pop[row]
    oracle = np.bincount(row, logit((clk_all + shrink * p_o) / (imp_all + shrink)) - logit(p_o), minlength=len(frame))
    share = (holders + 1) / (users_before + 2)
    pmi = np.bincount(row, np.log((clk + 1) / (clk_c[row] * share + 1)), minlength=len(frame))
    s_clk = np.bincount(row, clk_w, minlength=len(frame))
    s_non = np.bincount(row, imp_w - clk_w, minlength=len(frame))
    non = imp_c - clk_c
    knn = np.where((clk_c > 0) & (non > 0), s_clk / np.maximum(clk_c, 1) - s_non / np.maximum(non, 1), 0.0)
    covered = np.bincount(row, clk > 0, minlength=len(frame)) > 0  # some item of the user co-clicked with c
    return {"nb": nb, "pmi": pmi, "knn": knn / np.sqrt(set_size), "imp_c": imp_c, "clk_c": clk_c,
            "covered": covered, "pairs": np.array(len(row)), "oracle": oracle}  # fmt: skip


def category_signal(frame: pd.DataFrame, history: dict[str, list[str]], news: dict[str, tuple[str, str]]) -> np.ndarray:
    """Live click rate of (user's top category in news.tsv, candidate category); 0.04 where either is unknown."""
    top = {}
    for request, items in history.items():
        cats = Counter(news[h][0] for h in items if h in news)
        top[request] = cats.most_common(1)[0][0] if cats else None
    seg = frame["request_id"].map(top)
    cat = frame["ad_id"].map(lambda a: news.get(a, (None,))[0])
    known = (seg.notna() & cat.notna()).to_numpy()
    out = np.full(len(frame), 0.04)
    if known.any():
        codes = pd.factorize(seg[known] + "|" + cat[known])[0].astype(np.int64)
        ts, label = frame["ts"].to_numpy()[known], frame["label"].to_numpy()[known].astype(float)
        imp = prior_sums(codes, ts, np.ones(len(codes)), ts, strict=True)
        clk = prior_sums(codes, ts + CLICK_DELAY_MS, label, ts, strict=False)
        out[known] = (clk + 0.4) / (imp + 10)
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 25) -> np.ndarray:
    """L2-regularised logistic regression by Newton steps; weights for [x, 1]."""
    x = np.c_[x, np.ones(len(x))]
    beta = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ beta))
        grad = x.T @ (p - y) + l2 * np.r_[beta[:-1], 0]
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.diag(np.r_[np.ones(len(beta) - 1), 0])
        beta -= np.linalg.solve(hess, grad)
    return beta


def within_rank(groups: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each row's rank inside its request, scaled to (0, 1]."""
    frame = pd.DataFrame({"g": groups, "s": scores})
    return frame.groupby("g")["s"].rank(pct=True).to_numpy()


def main() -> None:
    from models.evaluate import load_mind
    from models.metrics import group_metrics, paired_group_auc
    from models.mind import read_behaviors
    from streaming.replay.mind import read_news

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", default="../shared/data/mind", type=Path)
    parser.add_argument("--days", type=int, default=3, help="last days pooled (regression trained on days before)")
    parser.add_argument("--shrink", type=float, default=5.0, help="impressions of prior at ctr(c) in ctr(c | h)")
    args = parser.parse_args()

    frame = load_mind(args.path)  # the project's prequential rows, in replay order
    history = {imp.request_id: imp.history for imp in read_behaviors(args.path / "behaviors.tsv")}
    news = read_news(args.path / "news.tsv")
    pop = frame["ad_ctr_7d"].to_numpy(dtype=float)
    groups, labels = frame["request_id"].to_numpy(), frame["label"].to_numpy()
    day = frame["ts"].to_numpy() // DAY_MS
    same_day = frame.groupby([day, frame["ad_id"]])["label"]  # as bench.mind_ceiling: reads the day's future
    oracle_pop = ((same_day.transform("sum") - labels + 0.4) / (same_day.transform("count") - 1 + 10)).to_numpy()
    both = coclick_signals(frame, item_sets(frame, history, live_only=False), pop, oracle_pop, args.shrink)
    live_sets = item_sets(frame, history, live_only=True)
    assert np.array_equal(both["imp_c"], frame["ad_impressions_7d"]), "replay order differs from models.mind"
    assert np.array_equal(both["clk_c"], frame["ad_clicks_7d"]), "click reveal differs from models.mind"
    live = coclick_signals(frame, live_sets, pop, oracle_pop, args.shrink)
    signals = {
        "live popularity (ad_ctr_7d)": pop,
        "co-click NB (history + live clicks)": both["nb"],
        "co-click PMI (history + live clicks)": both["pmi"],
        "user-kNN clickers - non-clickers": both["knn"],
        "live-click NB (stream clicks only)": live["nb"],
        "category x segment CTR": category_signal(frame, history, news),
    }
    signals["NB + logit(popularity)"] = both["nb"] + logit(pop)
    signals["rank average popularity, NB"] = within_rank(groups, pop) + within_rank(groups, both["nb"])
    x = np.column_stack([logit(pop), np.log1p(both["imp_c"]), np.log1p(both["clk_c"]), both["nb"], both["pmi"],
                         both["knn"], live["nb"], logit(signals["category x segment CTR"])])  # fmt: skip
    lr = np.full(len(frame), np.nan)
    for d in np.unique(day)[-args.days :]:
        train, test = day < d, day == d
        mu, sd = x[train].mean(axis=0), x[train].std(axis=0) + 1e-9
        beta = fit_logistic((x[train] - mu) / sd, labels[train].astype(float))
        lr[test] = np.c_[(x[test] - mu) / sd, np.ones(int(test.sum()))] @ beta
    signals["logistic regression, all signals"] = lr
    signals["ORACLE popularity (same day, leave-one-out)"] = oracle_pop
    signals["ORACLE NB (all days, leave-one-out) + ORACLE popularity"] = both["oracle"] + logit(oracle_pop)

    last, pooled = day == day.max(), day >= np.unique(day)[-args.days]
    table = {}
    for name, score in signals.items():
        row: dict[str, float] = {}
        for label, mask in (("last day", last), (f"last {args.days} days", pooled)):
            row[f"gAUC {label}"] = group_metrics(groups[mask], labels[mask], score[mask])["group_auc"]
            paired = paired_group_auc(groups[mask], labels[mask], score[mask], pop[mask])
            row[f"vs pop {label}"] = paired["difference"]
            row[f"se {label}"] = paired["se"]
        table[name] = row
    print(pd.DataFrame(table).T.to_markdown(floatfmt=".4f"))
    last_requests = last[~frame["request_id"].duplicated().to_numpy()]
    with_live = np.mean([len(s) > 0 for s, m in zip(live_sets, last_requests, strict=True) if m])
    print(f"\nlast day: {last_requests.sum()} requests, {with_live:.1%} with a live click before them;"
          " last-day rows where an item of the user was"
          f" co-clicked with the candidate before: {both['covered'][last].mean():.1%} (live clicks only:"
          f" {live['covered'][last].mean():.1%}); (candidate, item) pairs counted: {int(both['pairs']):,}")  # fmt: skip


if __name__ == "__main__":
    main()
