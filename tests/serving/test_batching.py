"""Requests scored together: `Selector.select_many` and the pipeline's batcher give the one-at-a-time picks."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from models.mind import Replay
from models.testing import ProjectionBundle
from models.train import TrainConfig, train
from models.two_tower import TwoTowerConfig
from serving import metrics
from serving.catalog import CATEGORIES, build_catalog, generate_catalog
from serving.features_access import AdStats, GuardedReader
from serving.pacing import DAY_S, Pacer
from serving.pipeline import VECTORISED_FROM, RequestPipeline
from serving.selection import Selector
from serving.selection_types import SelectionConfig, SelectionRequest, Slot
from serving.serving_state import ServingState
from tests.support.models import synthetic_world
from tests.support.serving import MemoryReader

NOON = 20_500 * DAY_S + DAY_S / 2  # a fixed instant inside the catalog's flights


def users(n: int) -> dict[str, dict]:
    """Varied users: categories, frequency entries, and some with no features at all (unknown users)."""
    rng = np.random.default_rng(5)
    out = {}
    for i in range(n):
        if i % 5 == 4:
            out[f"u{i}"] = {}
            continue
        cats = list(rng.choice(CATEGORIES, 3, replace=False))
        out[f"u{i}"] = {
            "top_categories": cats,
            "top_category_scores": sorted(rng.uniform(0.1, 5, 3).round(3).tolist(), reverse=True),
            "recent_items": [f"item-{int(j)}" for j in rng.integers(0, 50, 6)],
            "recent_categories": [str(c) for c in rng.choice(cats, 6)],
            "page_view_24h": int(rng.integers(0, 40)),
            "impressions_total": int(rng.integers(0, 300)),
        }
    return out


def requests(n: int) -> list[SelectionRequest]:
    shapes = [[Slot("a", "native", 2)], [Slot("a", "native", 1), Slot("b", "banner_300x250", 2)]]
    return [
        SelectionRequest(f"r{i}", f"u{i}", shapes[i % 2], {"device": "mobile" if i % 3 else "desktop"})
        for i in range(n)
    ]


def selector(rows, model, *, epsilon=0.3, control_share=0.3) -> Selector:
    catalog = build_catalog(rows, version="t")
    config = SelectionConfig(top_k=40, epsilon=epsilon, control_share=control_share)
    return Selector(ServingState(catalog, model), config, pacer=Pacer(catalog), ad_stats=AdStats(catalog),
                    features=GuardedReader(MemoryReader()))  # fmt: skip


def picks(result) -> list[tuple]:
    return [(c.slot_id, c.rank, c.ad_id, round(c.propensity, 12)) for p in result.slots.values() for c in p]


def assert_same(one_by_one, together) -> None:
    assert len(one_by_one) == len(together)
    for a, b in zip(one_by_one, together, strict=True):
        assert (a.request_id, a.arm, a.model_version, a.fallback) == (b.request_id, b.arm, b.model_version, b.fallback)
        assert picks(a) == picks(b)
        assert (a.n_eligible, a.n_candidates) == (b.n_eligible, b.n_candidates)
        got = [c.pctr for p in b.slots.values() for c in p]
        np.testing.assert_allclose(got, [c.pctr for p in a.slots.values() for c in p], rtol=1e-6)


def run_both(sel: Selector, n: int = 24, seed: int = 11):
    feats, reqs = users(n), requests(n)
    sel._local.rng = np.random.default_rng(seed)
    one_by_one = [sel.select(r, user_read=(feats[r.user_id], None, 0.0), now=NOON) for r in reqs]
    sel._local.rng = np.random.default_rng(seed)
    together = sel.select_many([(r, (feats[r.user_id], None, 0.0)) for r in reqs], now=NOON)
    return one_by_one, together


@pytest.fixture(scope="module")
def trained_bundle():
    return train_small_bundle()


def train_small_bundle():
    """A real model (two-tower + LightGBM + Platt) on a small synthetic log: seconds to train."""
    news, impressions = synthetic_world(n_requests=200, seed=1)
    tower = TwoTowerConfig(item_buckets=2048, attribute_buckets=256, category_buckets=64, epochs=1, batch_size=64)
    bundle, _ = train(Replay(news).run(impressions), TrainConfig(seed=3, tower=tower, num_boost_round=30))
    return bundle


def test_batch_equals_one_at_a_time_with_the_projection_model(catalog_rows) -> None:
    one_by_one, together = run_both(selector(catalog_rows, ProjectionBundle(catalog_rows)))
    assert {r.arm for r in together} == {"targeted", "control"}  # both arms took part
    assert any(r.n_candidates for r in together)
    assert_same(one_by_one, together)


def test_batch_equals_one_at_a_time_with_a_trained_model(catalog_rows, trained_bundle) -> None:
    """The real bundle: the batch's numpy tower, one matmul and one stacked ranker call against the
    one-user forward, a matrix-vector product and one ranker call per request."""
    one_by_one, together = run_both(selector(catalog_rows, trained_bundle, control_share=0.1), n=30)
    assert sum(r.arm == "targeted" and r.fallback is None for r in together) >= 20
    assert_same(one_by_one, together)


def test_batch_fallbacks_equal_one_at_a_time(catalog_rows) -> None:
    assert_same(*run_both(selector(catalog_rows, None)))  # no model: CTR x bid, flagged no_model
    broken = ProjectionBundle(catalog_rows)
    broken.predict_ctr = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    one_by_one, together = run_both(selector(catalog_rows, broken))
    assert {r.fallback for r in together if r.arm == "targeted"} == {"model_error"}
    assert_same(one_by_one, together)


def test_batch_fallbacks_equal_one_at_a_time_with_cpm_ads() -> None:
    """Without a model, and for users the model does not know, both paths retrieve by expected value: a CPM
    ad's is its bid per impression, not CTR x bid (which would rank it 50x too high here)."""
    rows = generate_catalog(300, seed=7, cpm_share=0.5)
    one_by_one, together = run_both(selector(rows, None))
    assert_same(one_by_one, together)
    served = [c for r in together for p in r.slots.values() for c in p]
    assert any(build_catalog(rows, version="t").cpm[c.row] for c in served)  # CPM ads took part
    assert_same(*run_both(selector(rows, ProjectionBundle(rows))))  # unknown users of a model, too


class Recorder:
    """An impression logger stand-in that keeps what was logged (the pipeline's unit tests need no Kafka)."""

    def __init__(self):
        self.records = []

    def log(self, records) -> None:
        self.records.extend(records)


def counted_selector(catalog_rows) -> tuple[Selector, list[int]]:
    """A selector over 12 known users whose `select_many` records each batch's size."""
    sel = selector(catalog_rows, ProjectionBundle(catalog_rows))
    sel.features = GuardedReader(MemoryReader(users(12)))
    sizes: list[int] = []
    select_many = sel.select_many
    sel.select_many = lambda items, **kw: (sizes.append(len(items)), select_many(items, **kw))[1]
    return sel, sizes


def test_pipeline_scores_concurrent_requests_together(catalog_rows) -> None:
    sel, sizes = counted_selector(catalog_rows)
    logger = Recorder()
    pipeline = RequestPipeline(sel, logger)

    async def main():
        alone = await pipeline.run(requests(1)[0])  # nobody else queued: scored alone, at once
        together = await asyncio.gather(*(pipeline.run(r) for r in requests(12)))
        return alone, together

    (state, alone), together = asyncio.run(main())
    assert alone.slots["a"] and state is sel.state
    assert sizes == [12]  # the lone request went the one-request path; the 12 concurrent ones in one pass
    assert [r.request_id for _, r in together] == [f"r{i}" for i in range(12)]  # each caller gets its own
    assert all(r.user_id == f"u{i}" for i, (_, r) in enumerate(together))
    assert len(logger.records) == sum(len(picks(r)) for _, r in [(state, alone), *together])


def test_a_batch_smaller_than_vectorised_from_is_scored_request_by_request(catalog_rows) -> None:
    """Fewer than `VECTORISED_FROM` queued requests cost more in one vectorised pass than one by one on the CPU."""
    sel, sizes = counted_selector(catalog_rows)
    pipeline = RequestPipeline(sel, Recorder())

    async def main():
        return await asyncio.gather(*(pipeline.run(r) for r in requests(VECTORISED_FROM - 1)))

    results = asyncio.run(main())
    assert sizes == [] and all(r.slots["a"] for _, r in results)
    assert [r.user_id for _, r in results] == [f"u{i}" for i in range(VECTORISED_FROM - 1)]


def test_pipeline_batch_failure_answers_each_request_alone(catalog_rows) -> None:
    sel = selector(catalog_rows, ProjectionBundle(catalog_rows))
    sel.select_many = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    before = metrics.ERRORS.labels("select", "batch")._value.get()
    pipeline = RequestPipeline(sel, Recorder())

    async def main():
        return await asyncio.gather(*(pipeline.run(r) for r in requests(6)))

    results = asyncio.run(main())
    assert all(r.fallback is None and r.slots["a"] for _, r in results)
    assert metrics.ERRORS.labels("select", "batch")._value.get() == before + 1


def test_batch_window_is_bounded_and_waits_only_under_load(catalog_rows) -> None:
    sel = selector(catalog_rows, ProjectionBundle(catalog_rows))
    with pytest.raises(ValueError, match="0-1 ms"):
        RequestPipeline(sel, Recorder(), batch_window_s=0.002)
    pipeline = RequestPipeline(sel, Recorder(), batch_window_s=0.001)
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def spy(seconds, *a):
        slept.append(seconds)
        await real_sleep(seconds, *a)

    async def main():
        asyncio.sleep = spy  # the drainer's wait (restored below)
        try:
            await pipeline.run(requests(1)[0])  # idle: no wait
            await asyncio.gather(*(pipeline.run(r) for r in requests(4)))  # a batch of 4: busy from now on
            await pipeline.run(requests(1)[0], deadline_s=0.0005)  # busy: waits, but not past its deadline
        finally:
            asyncio.sleep = real_sleep

    asyncio.run(main())
    assert len(slept) == 1 and 0 < slept[0] <= 0.0005
