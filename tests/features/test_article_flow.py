"""features.article_flow: click counters, their rows and the ranker's features, checked against their definitions."""

from __future__ import annotations

import math
import random

import pytest

from features.article_flow import (
    ARTICLE,
    COOC_HALF_LIFE_MS,
    DAY_MS,
    FEATURES,
    HOUR_MS,
    MINUTE_MS,
    NEXT,
    POP_HALF_LIFE_MS,
    FlowCounters,
    article_row,
    candidate_features,
    click_counters,
    merge_field,
    pair_id,
    transition_row,
)
from tests.support.batch_features import assert_flow_row_equal

T0 = 1_700_000_000_000


def sessions_of(clicks: list[tuple[str, str, int]]) -> list[tuple[list[str], str, int]]:
    """(previous clicks of its session, newest last; article; ms) of each (session, article, ms) click."""
    seen: dict[str, list[str]] = {}
    out = []
    for session, article, ts in clicks:
        earlier = seen.setdefault(session, [])
        out.append((list(earlier), article, ts))
        earlier.append(article)
    return out


def random_clicks(n: int, seed: int = 0) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    ts, clicks = T0, []
    for _ in range(n):
        ts += rng.randrange(0, 90_000)
        clicks.append((f"s{rng.randrange(40)}", f"a{min(int(rng.expovariate(0.15)), 29)}", ts))
    return clicks


def counted(clicks: list[tuple[str, str, int]], prune_above: int = 256) -> FlowCounters:
    flow = FlowCounters(prune_above=prune_above)
    for previous, article, ts in sessions_of(clicks):
        flow.add(click_counters(previous, article, ts))
    return flow


def test_a_session_counts_its_transitions_and_near_followers() -> None:
    flow = counted([("s1", "A", T0), ("s1", "B", T0 + 1000), ("s1", "C", T0 + 2000), ("s2", "A", T0 + 3000),
                    ("s2", "B", T0 + 4000)])  # fmt: skip
    a, b = flow.article("A"), flow.article("B")
    assert (a["clicks_total"], a["transitions_out"], a["transitions_in"]) == (2, 2, 0)
    assert (b["clicks_total"], b["transitions_in"]) == (2, 2)
    assert (b["first_click_ms"], b["last_click_ms"]) == (T0 + 1000, T0 + 4000)
    ab, ac, bc = flow.transition("A", "B"), flow.transition("A", "C"), flow.transition("B", "C")
    assert (ab["transitions"], ab["transitions_near"], ab["transition_last_ms"]) == (2, 2, T0 + 4000)
    assert (ac["transitions"], ac["transitions_near"]) == (0, 1)  # C came two clicks after A
    assert (bc["transitions"], bc["transitions_near"]) == (1, 1)
    assert flow.transition("C", "A") is None


def test_rows_do_not_depend_on_how_clicks_are_split_over_partitions() -> None:
    """The consumer sums each partition's counters when it reads them: any split gives the same rows."""
    clicks = sessions_of(random_clicks(3000))
    whole = FlowCounters()
    parts = [FlowCounters() for _ in range(3)]
    for previous, article, ts in clicks:
        counters = click_counters(previous, article, ts)
        whole.add(counters)
        parts[hash(article) % 3 if not previous else len(previous) % 3].add(counters)
    merged: dict = {}
    for part in parts:
        for key, fields in part.hashes.items():
            target = merged.setdefault(key, {})
            for name, value in fields.items():
                merge_field(target, name, value)
    for (kind, article), fields in whole.hashes.items():
        if kind == ARTICLE:
            assert_flow_row_equal(article_row(merged[(kind, article)]), article_row(fields), article)
        else:
            for name in fields:
                if name.startswith("r:"):
                    b = name[2:]
                    assert_flow_row_equal(transition_row(merged[(kind, article)], b), transition_row(fields, b), b)


def test_pruning_stale_counters_changes_no_row() -> None:
    clicks = random_clicks(3000, seed=1)
    kept, pruned = counted(clicks, prune_above=10**9), counted(clicks, prune_above=5)
    for key, fields in kept.hashes.items():
        if key[0] == ARTICLE:
            assert len(pruned.hashes[key]) <= len(fields)
            assert_flow_row_equal(article_row(pruned.hashes[key]), article_row(fields), key)


def test_features_at_a_moment_follow_their_definitions() -> None:
    clicks = random_clicks(4000, seed=2)
    flow = counted(clicks)
    now = clicks[-1][2] + 5 * MINUTE_MS
    session = ["a3", "a1", "a0"]  # newest last: the session's last click is a0
    candidates = [f"a{k}" for k in range(30)]
    articles, transitions = flow.rows_for(candidates, session)
    got = candidate_features(candidates, articles, transitions, session, 7, now - 2 * MINUTE_MS, now)
    assert list(got) == FEATURES
    minute = now // MINUTE_MS
    flows = sessions_of(clicks)
    for j, c in enumerate(candidates):
        mine = [ts for _, article, ts in clicks if article == c]
        assert got["pop_total"][j] == len(mine)
        assert got["pop_1h"][j] == sum(minute - 60 < ts // MINUTE_MS <= minute for ts in mine)
        assert got["pop_10m"][j] == sum(minute - 10 < ts // MINUTE_MS <= minute for ts in mine)
        recent = [ts for ts in mine if ts // HOUR_MS > max(mine) // HOUR_MS - 24] if mine else []
        decayed = sum(2 ** (-(now - ts) / POP_HALF_LIFE_MS) for ts in recent)
        assert got["pop_decayed"][j] == pytest.approx(decayed, rel=1e-5, abs=1e-9)
        if mine:
            assert got["age_h"][j] == pytest.approx((now - min(mine)) / HOUR_MS)
            assert got["since_last_min"][j] == pytest.approx((now - max(mine)) / MINUTE_MS)
        else:
            assert math.isnan(got["since_last_min"][j])
        follows = {a: [ts for previous, article, ts in flows if article == c and previous and previous[-1] == a]
                   for a in session}  # fmt: skip
        assert got["cooc_last"][j] == len(follows["a0"])
        assert got["cooc_vote"][j] == len(follows["a0"]) + 0.5 * len(follows["a1"]) + 0.25 * len(follows["a3"])
        near = sum(c == article and a in previous[-3:] for previous, article, _ in flows for a in ["a0"])
        assert got["cooc_near_vote"][j] >= near
        assert got["cooc_in"][j] == sum(article == c and bool(previous) for previous, article, _ in flows)
        # decayed over the days of the pair's last follow (near ones too) and the day before
        near_times = [ts for previous, article, ts in flows if article == c and "a0" in previous[-3:]]
        day = max(near_times, default=0) // DAY_MS
        decayed_last = sum(2 ** (-(now - ts) / COOC_HALF_LIFE_MS) for ts in follows["a0"] if ts // DAY_MS > day - 2)
        assert got["cooc_last_decayed"][j] == pytest.approx(decayed_last, rel=1e-5, abs=1e-9)
    out_of_last = sum(bool(previous) and previous[-1] == "a0" for previous, _, _ in flows)
    assert got["cooc_last_share"] == pytest.approx(got["cooc_last"] / out_of_last)
    assert set(got["session_length"]) == {7.0} and set(got["gap_min"]) == {2.0}


def test_counters_name_their_hashes_and_merge_rules() -> None:
    counters = click_counters(["X", "Y"], "Z", T0)
    assert set(counters) == {(ARTICLE, "Z"), (ARTICLE, "Y"), (NEXT, "Y"), (NEXT, "X")}
    assert counters[(ARTICLE, "Y")] == {"o": 1}
    fields: dict[str, int] = {}
    for name, value in (("f", 5), ("f", 3), ("l", 5), ("l", 9), ("t", 1), ("t", 1), ("l:b", 2), ("l:b", 1)):
        merge_field(fields, name, value)
    assert fields == {"f": 3, "l": 9, "t": 2, "l:b": 2}
    assert pair_id("a", "b") == "a b"
