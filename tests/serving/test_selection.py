"""Selection without FastAPI or services: eligibility rules, arms, exploration, fallbacks."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from models.ranker import request_features
from models.testing import ProjectionBundle
from serving import eligibility
from serving.catalog import CATEGORIES, build_catalog
from serving.features_access import AdStats, GuardedReader
from serving.pacing import DAY_S, Pacer
from serving.protocols import AD_FRAME_COLUMNS
from serving.selection import Selector
from serving.selection_types import SelectionConfig, SelectionRequest, Slot, arm_of
from serving.serving_state import FALLBACK_VERSION, ServingState
from tests.support.serving import MemoryReader

TECH_USER = {"top_categories": ["tech"], "top_category_scores": [1.0]}
NOON = 20_500 * DAY_S + DAY_S / 2  # a fixed instant inside the catalog's flights


def make_selector(rows, *, model=True, epsilon=0.0, control_share=0.0, reader=None):
    catalog = build_catalog(rows, version="t")
    bundle = ProjectionBundle(rows) if model else None
    config = SelectionConfig(top_k=50, epsilon=epsilon, control_share=control_share)
    guarded = GuardedReader(reader or MemoryReader())
    return Selector(
        ServingState(catalog, bundle), config, pacer=Pacer(catalog), ad_stats=AdStats(catalog), features=guarded
    )


def request(*slots: Slot, **kw) -> SelectionRequest:
    return SelectionRequest(request_id="r", user_id=kw.pop("user_id", "user-targeted-0"), slots=list(slots), **kw)


def targeted_user() -> str:
    return next(f"u{i}" for i in range(1000) if arm_of(f"u{i}", share=0.5, salt="adloop-arm-v1") == "targeted")


def served(result) -> list[str]:
    return [c.ad_id for picks in result.slots.values() for c in picks]


def test_formats_are_honoured(catalog_rows) -> None:
    sel = make_selector(catalog_rows)
    catalog = sel.state.catalog
    result = sel.select_with(
        sel.state, request(Slot("a", "native", 3), Slot("b", "banner_728x90", 2)), TECH_USER, now=NOON
    )
    for slot_id, fmt in (("a", "native"), ("b", "banner_728x90")):
        picks = result.slots[slot_id]
        assert len(picks) == (3 if slot_id == "a" else 2)
        assert all(catalog.format_masks[fmt][c.row] for c in picks)
    assert len(set(served(result))) == 5  # no ad twice in one answer
    assert result.model_version == "projection-v1" and result.fallback is None


def test_targeting_prefers_the_users_category(catalog_rows) -> None:
    sel = make_selector(catalog_rows)
    catalog = sel.state.catalog
    result = sel.select_with(sel.state, request(Slot("a", "native", 5)), TECH_USER, now=NOON)
    cats = [catalog.categories[catalog.category_code[c.row]] for c in result.slots["a"]]
    assert cats.count("tech") >= 4


def test_frequency_caps_per_ad_and_per_campaign(catalog_rows) -> None:
    rows = [
        dict(
            r,
            freq_cap_ad="0",
            freq_cap_campaign="0",
            formats="native",
            category="tech",
            daily_budget="0",
            start_date="",
            end_date="",
        )
        for r in catalog_rows[:40]
    ]
    rows[0]["freq_cap_ad"] = "2"
    for r in rows:
        if r["campaign_id"] == rows[1]["campaign_id"]:
            r["freq_cap_campaign"] = "3"
    sel = make_selector(rows)
    capped_campaign = rows[1]["campaign_id"]
    user = {
        **TECH_USER,
        "freq_ad_ids": [rows[0]["ad_id"], rows[5]["ad_id"]],
        "freq_ad_impressions_24h": [2, 1],
        "freq_campaign_ids": [capped_campaign],
        "freq_campaign_impressions_24h": [3],
    }
    result = sel.select_with(sel.state, request(Slot("a", "native", 10)), user, now=NOON)
    ads = served(result)
    assert len(ads) == 10
    assert rows[0]["ad_id"] not in ads
    assert not any(
        sel.state.catalog.campaign_ids[sel.state.catalog.campaign_code[c.row]] == capped_campaign
        for c in result.slots["a"]
    )
    # under the cap: still eligible
    under = {**TECH_USER, "freq_ad_ids": [rows[0]["ad_id"]], "freq_ad_impressions_24h": [1]}
    eligible = eligibility.eligible(sel.state, sel.pacer, request(Slot("a", "native")), under, NOON)
    assert eligible[0]


def test_budgets_and_smooth_pacing(catalog_rows) -> None:
    rows = [dict(r, formats="native", daily_budget="100", start_date="", end_date="") for r in catalog_rows[:5]]
    sel = make_selector(rows)
    catalog, pacer = sel.state.catalog, sel.pacer
    pacer._day = int(NOON // DAY_S)
    assert pacer.allowed(catalog, NOON).all()
    pacer.charge(catalog, np.array([0]), np.array([60.0]))  # over 55% of the budget at noon (50% + 5% slack)
    pacer.charge(catalog, np.array([1]), np.array([40.0]))
    allowed = pacer.allowed(catalog, NOON)
    assert not allowed[0] and allowed[1]
    assert pacer.allowed(catalog, NOON + 0.2 * DAY_S)[0]  # later in the day the pace allows it again
    pacer.charge(catalog, np.array([1]), np.array([60.0]))  # 100 of 100: exhausted for the day
    assert not pacer.allowed(catalog, NOON + 0.49 * DAY_S)[1]
    result = sel.select_with(sel.state, request(Slot("a", "native", 5)), TECH_USER, now=NOON)
    assert set(served(result)) == {r["ad_id"] for r in rows[2:]}


def test_serving_charges_cpm_ads_their_bid_and_cpc_ads_nothing(catalog_rows) -> None:
    rows = [dict(r, formats="native", start_date="", end_date="", pricing=("cpm", "cpc")[i % 2])
            for i, r in enumerate(catalog_rows[:20])]  # fmt: skip
    sel = make_selector(rows)
    result = sel.select_with(sel.state, request(Slot("a", "native", 10)), TECH_USER, now=NOON)
    costs = sel.charge(sel.state, result)
    catalog = sel.state.catalog
    for choice in result.slots["a"]:
        cpm = bool(catalog.cpm[choice.row])
        expected = catalog.bid[choice.row] / 1000 if cpm else 0.0  # a CPC ad pays on its tracked click
        assert sel.pacer.spent(choice.ad_id) == pytest.approx(expected)
        assert costs.get(("a", choice.ad_id)) == (pytest.approx(expected) if cpm else None)
        if cpm:
            assert choice.price == pytest.approx(catalog.bid[choice.row])  # eCPM of a CPM ad: its bid


def test_flights_candidates_excludes_and_blocklists(catalog_rows) -> None:
    rows = [dict(r, formats="native", start_date="", end_date="", daily_budget="0") for r in catalog_rows[:30]]
    rows[0]["end_date"] = "2020-01-01"
    sel = make_selector(rows)
    ids = [r["ad_id"] for r in rows]
    result = sel.select_with(
        sel.state,
        request(Slot("a", "native", 10), candidate_ad_ids=ids[:4], exclude_ad_ids=[ids[1]]),
        TECH_USER,
        now=NOON,
    )
    assert sorted(served(result)) == sorted([ids[2], ids[3]])  # ids[0] expired, ids[1] excluded
    blocked = sel.select_with(
        sel.state,
        request(Slot("a", "native", 30), blocked_categories=["IAB19"], blocked_domains=[rows[5]["advertiser_domain"]]),
        TECH_USER,
        now=NOON,
    )
    catalog = sel.state.catalog
    for c in blocked.slots["a"]:
        assert catalog.categories[catalog.category_code[c.row]] != "tech"
        assert catalog.advertiser_domains[catalog.advertiser_code[c.row]] != rows[5]["advertiser_domain"]


def test_arms_are_stable_and_the_control_share_holds() -> None:
    users = [f"user-{i}" for i in range(20_000)]
    arms = [arm_of(u, share=0.2, salt="s") for u in users]
    assert arms == [arm_of(u, share=0.2, salt="s") for u in users]
    assert arms.count("control") / len(users) == pytest.approx(0.2, abs=0.01)
    assert all(arm_of(u, share=0.0, salt="s") == "targeted" for u in users[:100])


def test_control_arm_is_untargeted_with_uniform_propensity(catalog_rows) -> None:
    sel = make_selector(catalog_rows, control_share=1.0)
    catalog = sel.state.catalog
    cats = []
    for i in range(60):
        result = sel.select_with(sel.state, request(Slot("a", "native"), user_id=f"c{i}"), TECH_USER, now=NOON)
        assert result.arm == "control"
        choice = result.slots["a"][0]
        assert choice.propensity == pytest.approx(1 / result.n_eligible)
        cats.append(catalog.categories[catalog.category_code[choice.row]])
    assert cats.count("tech") < 30  # targeted would be nearly all tech


def test_exploration_propensity(catalog_rows) -> None:
    sel = make_selector(catalog_rows, epsilon=0.2)
    user_id = targeted_user()
    props = set()
    for _ in range(200):
        result = sel.select_with(sel.state, request(Slot("a", "native"), user_id=user_id), TECH_USER, now=NOON)
        props.add(round(result.slots["a"][0].propensity, 9))
    explored, greedy = min(props), max(props)
    assert len(props) == 2  # one greedy ad, the others explored, each with its own known probability
    assert greedy == pytest.approx(0.8 + explored)  # greedy: 1 - eps + eps/n; explored: eps/n
    assert explored < 0.05


def test_no_model_falls_back_to_ctr_x_bid(catalog_rows) -> None:
    sel = make_selector(catalog_rows, model=False)
    result = sel.select_with(sel.state, request(Slot("a", "native", 2)), TECH_USER, now=NOON)
    assert result.fallback == "no_model" and result.model_version == FALLBACK_VERSION
    assert len(result.slots["a"]) == 2


def test_cold_start_explores_uniformly_while_no_model_is_promoted(catalog_rows) -> None:
    sel = make_selector(catalog_rows, model=False)
    sel.config = replace(sel.config, epsilon_no_model=1.0)
    picks = [
        sel.select_with(sel.state, request(Slot("a", "native")), TECH_USER, now=NOON).slots["a"][0] for _ in range(60)
    ]
    assert len({p.ad_id for p in picks}) > 10  # not the one best CTR x bid ad every time
    assert len({round(p.propensity, 12) for p in picks}) == 1  # uniform: every pick has probability 1/n


def test_model_error_falls_back(catalog_rows) -> None:
    sel = make_selector(catalog_rows)
    sel.state.model.predict_ctr = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    result = sel.select_with(sel.state, request(Slot("a", "native")), TECH_USER, now=NOON)
    assert result.fallback == "model_error" and result.slots["a"]


def test_reader_failure_is_flagged_not_raised(catalog_rows) -> None:
    class Broken(MemoryReader):
        def user(self, user_id):
            raise ValueError("corrupt row")

    sel = make_selector(catalog_rows, reader=Broken())
    started = time.perf_counter()
    result = sel.select(request(Slot("a", "native")))
    assert result.fallback == "features_error" and result.slots["a"]
    assert time.perf_counter() - started < 0.5


def test_the_ranker_gets_one_row_per_candidate_with_text_ids(catalog_rows) -> None:
    sel = make_selector(catalog_rows)
    seen = {}

    def spy(user, frame, context, scores):
        seen.update(frame=frame, scores=scores, context=context)
        return np.full(len(scores), 0.01)

    sel.state.model.predict_ctr = spy
    sel.select_with(sel.state, request(Slot("a", "native"), context={"device": "mobile"}), TECH_USER, now=NOON)
    frame = seen["frame"]
    assert set(AD_FRAME_COLUMNS) <= set(frame)
    # prepared once per catalog and sliced per request, the ranker's matrix is the one training builds
    plain = {name: list(frame[name]) for name in AD_FRAME_COLUMNS}
    context = {**seen["context"], "ts_ms": int(NOON * 1000)}
    matrix = request_features(TECH_USER, frame, context, seen["scores"])
    np.testing.assert_array_equal(matrix, request_features(TECH_USER, plain, context, seen["scores"]))
    assert all(len(col) == len(seen["scores"]) for col in frame.values())
    row = sel.state.catalog.index[frame["ad_id"][0]]
    assert frame["campaign_id"][0] == catalog_rows[row]["campaign_id"] and frame["category"][0] in CATEGORIES
    assert seen["context"] == {"device": "mobile", "ts_ms": int(NOON * 1000), "slate_size": 1}


def test_ads_the_model_has_not_seen_are_embedded_from_catalog_columns(catalog_rows, catalog_file):
    """ModelBundle.embed_ads takes columns (models.bundle reads them so): unseen catalog ads get vectors."""
    from models.testing import ProjectionBundle
    from serving.catalog import load_catalog
    from serving.serving_state import ServingState

    bundle = ProjectionBundle(catalog_rows[:100])  # the model saw the first 100 ads only
    state = ServingState(load_catalog(catalog_file), bundle)
    expected = ProjectionBundle(catalog_rows).ad_matrix
    assert np.allclose(state.ad_matrix, expected, atol=1e-6)


def test_ad_stats_refresh_reads_every_ad_and_yields_the_gil(catalog_rows, monkeypatch) -> None:
    """The refresh runs beside the event loop: after each chunk it sleeps (1 / gil_share - 1) x the chunk's CPU,
    so it holds the GIL at most `gil_share` of the time (a fake clock: each chunk costs 2 ms of CPU)."""
    import serving.features_access as features_access

    catalog = build_catalog(catalog_rows, version="t")
    rows = {a: {"ad_ctr_24h": 0.01 * (i % 7), "ad_clicks_7d": i} for i, a in enumerate(catalog.ad_ids)}
    cpu, sleeps = [0.0], []

    class Reader(MemoryReader):
        def ads(self, ad_ids):
            cpu[0] += 0.002
            return super().ads(ad_ids)

    clock = type("Clock", (), {"thread_time": lambda: cpu[0], "sleep": sleeps.append, "time": time.time})
    monkeypatch.setattr(features_access, "time", clock)
    stats = AdStats(catalog)
    stats.refresh(Reader(ads=rows), catalog, chunk=7, gil_share=0.2)
    assert len(sleeps) == -(-len(catalog) // 7) and all(s == pytest.approx(0.008) for s in sleeps)
    expected = [rows[a]["ad_ctr_24h"] for a in catalog.ad_ids]
    assert np.array_equal(stats.columns["ad_ctr_24h"], expected)
    assert np.array_equal(stats.columns["ad_clicks_7d"], np.arange(len(catalog)))
