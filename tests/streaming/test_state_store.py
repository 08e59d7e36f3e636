"""A partition's batch applies at most once, fenced by its stored offset, on standalone Redis and Redis Cluster."""

from __future__ import annotations

import uuid

import pytest

from adloop.settings import Settings
from features.aggregates import UserState
from features.redis_client import redis_client
from streaming.state_store import PartitionBatch, StaleWrite, StateStore

pytestmark = pytest.mark.integration


def _commit(store: StateStore, partition: int, *, user_state: int, offset: int, expected: int | None) -> None:
    batch = PartitionBatch(offset=offset, expected=expected, states={"u1": UserState(last_ts=user_state)},
                           ad_increments={"ad-1": {"h:1:0": 1}}, ad_last={"ad-1": user_state})  # fmt: skip
    store.commit(partition, batch)


def test_a_batch_computed_before_another_consumer_wrote_is_refused(any_feature_settings: Settings) -> None:
    from prometheus_client import REGISTRY

    client = redis_client(any_feature_settings)
    group = f"g-{uuid.uuid4().hex[:6]}"
    old_owner, new_owner = (StateStore(client, group=group, topic="t") for _ in range(2))
    _commit(old_owner, 0, user_state=1, offset=9, expected=None)
    _commit(old_owner, 1, user_state=1, offset=4, expected=None)
    # the old owner reads partition 0 at offset 9 and stalls; the new owner applies 10..19 meanwhile
    _commit(new_owner, 0, user_state=2, offset=19, expected=9)
    refused = REGISTRY.get_sample_value("adloop_consumer_stale_writes_total") or 0
    with pytest.raises(StaleWrite, match="partition 0: expected 9, stored 19"):
        _commit(old_owner, 0, user_state=3, offset=14, expected=9)
    assert REGISTRY.get_sample_value("adloop_consumer_stale_writes_total") == refused + 1
    assert old_owner.applied_offsets(range(3)) == {0: 19, 1: 4}  # no offset moved backwards
    assert old_owner.user_states([(0, "u1")])[(0, "u1")].last_ts == 2  # the successor's state is kept
    assert old_owner.ad_counters(["ad-1"], range(3))["ad-1"][0] == {"1": [3, 0]}  # 2 on partition 0, 1 on 1
    _commit(old_owner, 1, user_state=4, offset=8, expected=4)  # another partition, still its own: applies
    assert old_owner.applied_offsets(range(3)) == {0: 19, 1: 8}
    assert old_owner.written(1) == {"users": ["u1"], "ads": [], "articles": [], "pairs": []}
    assert old_owner.reset_offsets(range(3)) == {0: 19, 1: 8} and old_owner.applied_offsets(range(3)) == {}


def test_a_resent_commit_is_refused_by_its_own_offset(any_feature_settings: Settings) -> None:
    """redis-py resends a command after a lost reply: the fence finds the batch's own offset stored."""
    client = redis_client(any_feature_settings)
    store = StateStore(client, group=f"g-{uuid.uuid4().hex[:6]}", topic="t")
    _commit(store, 5, user_state=1, offset=41, expected=None)
    with pytest.raises(StaleWrite, match="expected None, stored 41"):
        _commit(store, 5, user_state=1, offset=41, expected=None)  # the same batch again
    assert store.ad_counters(["ad-1"], [5])["ad-1"][0] == {"1": [1, 0]}  # applied once
    ttl = client.ttl(f"{store.tag(5)}user:u1")
    assert 0 < ttl <= 30 * 86400 and client.ttl(f"{store.tag(5)}ad:ad-1") > 0  # every key expires


def test_every_key_of_a_partition_is_on_one_cluster_slot(cluster_stack: Settings) -> None:
    from redis.cluster import key_slot

    store = StateStore(redis_client(cluster_stack), group="g", topic="adloop.events")
    keys = [store.user_key(3, "u1"), store.user_key(3, "u2"), f"{store.tag(3)}offset:g", f"{store.tag(3)}ad:a"]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert len({key_slot(store.user_key(p, "u1").encode()) for p in range(12)}) == 12  # partitions spread


def test_article_flow_counters_merge_by_field_over_partitions(any_feature_settings: Settings) -> None:
    """Sums add, `f` keeps the minimum and `l`, `l:<b>` the maximum, in each partition and over partitions;
    stale fields are deleted with the commit."""
    from features.article_flow import ARTICLE, NEXT

    store = StateStore(redis_client(any_feature_settings), group=f"g-{uuid.uuid4().hex[:6]}", topic="t")
    first = PartitionBatch(offset=1, expected=None, flow={(ARTICLE, "A"): {"t": 2, "f": 50, "l": 90, "m:7": 2},
                                                          (NEXT, "A"): {"r:B": 1, "l:B": 90}})  # fmt: skip
    store.commit(0, first)
    again = PartitionBatch(offset=2, expected=1, flow={(ARTICLE, "A"): {"t": 1, "f": 60, "l": 80, "m:9": 1}},
                           flow_stale={(ARTICLE, "A"): ["m:7", "m:9"]})  # m:9 is written, not deleted  # fmt: skip
    store.commit(0, again)
    store.commit(3, PartitionBatch(offset=0, expected=None, flow={(ARTICLE, "A"): {"t": 4, "f": 40, "l": 70},
                                                                   (NEXT, "A"): {"r:B": 2, "l:B": 95}}))  # fmt: skip
    merged = store.flow_fields({(ARTICLE, "A"): None, (NEXT, "A"): ["r:B", "l:B", "n:B"]}, range(4))
    assert merged[(ARTICLE, "A")] == {"t": 7, "f": 40, "l": 90, "m:9": 1}
    assert merged[(NEXT, "A")] == {"r:B": 3, "l:B": 95}
    assert store.redis.ttl(f"{store.tag(0)}art:A") > 0
