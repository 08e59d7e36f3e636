"""Ad features in serving's memory: full refreshes and re-reads of only the ads whose online rows changed."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from features.aggregates import CTR_PRIOR, ad_features
from features.online import FeastLayout, OnlineFeatureReader, write_rows
from features.redis_client import redis_client
from features.store import AD_VIEW
from models.ranker import ad_columns
from serving.catalog import build_catalog
from serving.features_access import AdStats, run_refresher
from serving.serving_state import ServingState
from tests.support.serving import MemoryReader


class ChangeLog(MemoryReader):
    """A reader with a changed-ads index, counting the ads it was asked for."""

    def __init__(self, ads: dict[str, dict]):
        super().__init__(ads=ads)
        self.changes: dict[str, int] = {}
        self.asked: list[str] = []

    def write(self, ad_id: str, row: dict) -> None:
        self.ad_rows[ad_id] = row
        self.changes[ad_id] = int(time.time() * 1000)

    def changed_ads(self, since_ms: int) -> dict[str, int]:
        return {a: ms for a, ms in self.changes.items() if ms >= since_ms}

    def ads(self, ad_ids):
        self.asked += ad_ids
        return super().ads(ad_ids)


def test_refresh_changed_reads_only_the_changed_ads(catalog_rows) -> None:
    catalog = build_catalog(catalog_rows, version="t")
    reader = ChangeLog({a: {"ad_ctr_24h": 0.01} for a in catalog.ad_ids})
    stats = AdStats(catalog)
    assert not stats.refresh_changed(reader, catalog)  # no full refresh yet: nothing to start from
    stats.refresh(reader, catalog, gil_share=1.0)
    assert len(reader.asked) == len(catalog) and np.all(stats.columns["ad_ctr_24h"] == 0.01)
    before, reader.asked = stats.columns, []
    assert stats.refresh_changed(reader, catalog, overlap_s=0) and reader.asked == []
    assert stats.columns is before  # nothing changed: the same dict, so serving keeps its ranker columns
    changed = catalog.ad_ids[3]
    reader.write(changed, {"ad_ctr_24h": 0.2, "ad_clicks_7d": 9})
    assert stats.refresh_changed(reader, catalog, overlap_s=0)
    assert reader.asked == [changed]
    row = catalog.index[changed]
    assert stats.columns["ad_ctr_24h"][row] == 0.2 and stats.columns["ad_clicks_7d"][row] == 9
    assert before["ad_ctr_24h"][row] == 0.01  # a copy: requests holding the old dict see it unchanged
    others = np.delete(stats.columns["ad_ctr_24h"], row)
    assert np.all(others == 0.01)
    reader.asked = []
    assert stats.refresh_changed(reader, catalog, overlap_s=60) and reader.asked == []  # in the overlap, read already
    time.sleep(0.002)
    reader.write(changed, {"ad_ctr_24h": 0.3})  # written again: a new stamp
    assert stats.refresh_changed(reader, catalog, overlap_s=60) and reader.asked == [changed]
    assert stats.columns["ad_ctr_24h"][row] == 0.3


def test_a_reader_without_the_index_gets_full_refreshes(catalog_rows) -> None:
    catalog = build_catalog(catalog_rows, version="t")
    stats = AdStats(catalog)
    stats.refresh(MemoryReader(), catalog, gil_share=1.0)
    assert not stats.refresh_changed(MemoryReader(), catalog)


def test_the_refresher_thread_reads_changes_every_interval_and_everything_less_often(catalog_rows) -> None:
    catalog = build_catalog(catalog_rows, version="t")
    reader = ChangeLog({a: {"ad_ctr_24h": 0.01} for a in catalog.ad_ids})
    stats, stop = AdStats(catalog), threading.Event()
    thread = threading.Thread(
        target=run_refresher,
        args=(stats, reader, lambda: catalog),
        kwargs={"every_s": 0.02, "full_every_s": 3600, "stop": stop},
        daemon=True,
    )
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while stats.read_since_ms is None and time.monotonic() < deadline:
            time.sleep(0.01)
        reader.write(catalog.ad_ids[0], {"ad_ctr_24h": 0.3})
        while stats.columns["ad_ctr_24h"][0] != 0.3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(5)
    assert stats.columns["ad_ctr_24h"][0] == 0.3
    assert reader.asked.count(catalog.ad_ids[1]) == 1  # one full refresh, then changes only


@pytest.mark.integration
def test_online_ad_writes_are_indexed_for_changed_ad_reads(any_feature_settings, catalog_rows) -> None:
    """`write_rows` stamps ad rows in the changed-ads index; serving reads back
    exactly those through `OnlineFeatureReader`, Feast's own layout (standalone, and Redis Cluster: the ads'
    rows through a ClusterPipeline)."""
    client = redis_client(any_feature_settings)
    layout = FeastLayout.from_settings(any_feature_settings)
    reader = OnlineFeatureReader(client, layout)
    catalog = build_catalog(catalog_rows, version="t")
    now = int(time.time() * 1000)
    first, second = catalog.ad_ids[:2]

    def write(ad_id: str, clicks: int) -> None:
        hours = {str(now // 3_600_000): [100, clicks]}
        write_rows(client, layout, AD_VIEW, [(ad_id, now, ad_features(hours, {}, now))])

    write(first, 5)
    stats = AdStats(catalog)
    stats.refresh(reader, catalog, gil_share=1.0)
    assert stats.columns["ad_clicks_24h"][catalog.index[first]] == 5
    assert list(reader.changed_ads(now - 60_000)) == [first]
    time.sleep(0.01)
    since = int(time.time() * 1000)
    write(second, 7)
    assert list(reader.changed_ads(since)) == [second]
    assert stats.refresh_changed(reader, catalog)
    assert stats.columns["ad_clicks_24h"][catalog.index[second]] == 7
    assert client.zcard(layout.changes_key(AD_VIEW)) == 2


def test_an_app_reads_every_ads_row_before_its_first_request_and_not_again_at_once(make_app, catalog_rows) -> None:
    """A new process ranks with the ads' stats from its first request (not priors until a throttled first
    refresh is done); its refresher then reads changes only, not the whole catalog a second time."""
    from fastapi.testclient import TestClient

    ids = [row["ad_id"] for row in catalog_rows]

    class Threads(ChangeLog):
        def ads(self, ad_ids):
            readers.add(threading.current_thread().name)
            return super().ads(ad_ids)

    readers: set[str] = set()
    reader = Threads({a: {"ad_ctr_24h": 0.25} for a in ids})
    app, _ = make_app(reader=reader, ad_stats_refresh_s=0.02, ad_stats_full_refresh_s=3600)
    with TestClient(app):
        stats = app.state.runtime.ad_stats
        assert np.all(stats.columns["ad_ctr_24h"] == 0.25)  # before any request
        time.sleep(0.3)  # a dozen of the refresher's rounds
    assert sorted(reader.asked) == sorted(ids)  # every ad once: the start-up read; nothing changed since
    assert "ad-stats" not in readers  # read by the start-up itself, not by the refresher thread


def test_an_app_whose_ads_cannot_be_read_at_start_serves_on_priors(make_app, catalog_rows) -> None:
    from fastapi.testclient import TestClient

    class Down(MemoryReader):
        def ads(self, ad_ids):
            raise ConnectionError("Redis is down")

    app, _ = make_app(reader=Down())
    with TestClient(app) as client:
        assert np.all(app.state.runtime.ad_stats.columns["ad_ctr_24h"] == CTR_PRIOR)
        body = {"user_id": "u1", "slots": [{"slot_id": "s", "format": catalog_rows[0]["formats"].split("|")[0]}]}
        assert client.post("/v1/select", json=body).status_code == 200


def test_a_requests_ad_columns_equal_the_whole_catalogs_prepared_at_once(catalog_rows) -> None:
    """Serving prepares a catalog's fixed columns once and, per request, its candidates' ad_performance values
    (`LiveAdColumns.take`: a refresh costs no O(catalog) work on the request path): the same columns, value
    for value, as `models.ranker.ad_columns` over the whole catalog with those stats, then taken."""
    catalog = build_catalog(catalog_rows, version="v")
    state = ServingState(catalog, None)
    stats = AdStats(catalog)
    rng = np.random.default_rng(1)
    stats.columns = {name: rng.integers(0, 60, len(catalog)).astype(float) for name in stats.columns}
    stats.columns["ad_last_seen_ms"][::3] = 0.0  # never seen
    rows = np.sort(rng.choice(len(catalog), len(catalog) // 2, replace=False))
    frame = {"ad_id": catalog.ad_ids, **state.text_columns, "bid": catalog.bid, **stats.columns}
    want = ad_columns(frame).take(rows)
    got = state.ad_columns(stats).take(rows)
    assert got.keys() == want.keys()
    for name, column in want.items():
        np.testing.assert_array_equal(got[name], column, err_msg=name)
    priors = state.ad_columns(AdStats(build_catalog(catalog_rows[:3], version="other"))).take(rows)
    assert (priors["ad_ctr_24h"] == CTR_PRIOR).all() and not priors["ad_impressions_1h"].any()  # another catalog's
