"""Budgets paced by several serving processes at once: spend shared through Redis (serving/pacing.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from features.redis_client import redis_client
from serving.catalog import build_catalog
from serving.pacing import DAY_S, LEGACY_PREFIX, LIFETIME_KEY, Pacer, adopt_legacy_spend, spend_key
from tests.support.serving import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def budgeted(catalog_rows):
    rows = [dict(r, daily_budget="100", start_date="", end_date="") for r in catalog_rows[:3]]
    rows[2]["daily_budget"] = "0"  # unlimited: never read back, never blocked
    return build_catalog(rows, version="budgeted")


def test_two_replicas_pace_one_budget_through_redis(any_feature_settings, budgeted) -> None:
    """On standalone Redis and on Redis Cluster (the script's two hashes share the `{spend}` hash tag)."""
    client = redis_client(any_feature_settings, retries=False)
    day, ad = int(time.time() // DAY_S), budgeted.ad_ids[0]
    # slack 1: the whole budget is spendable at any time of day, so the test does not depend on the clock
    first, second = Pacer(budgeted, slack=1.0), Pacer(budgeted, slack=1.0)
    first.charge(budgeted, np.array([0, 2]), np.array([60.0, 500.0]))
    second.charge(budgeted, np.array([0]), np.array([60.0]))
    assert first.allowed(budgeted)[0] and second.allowed(budgeted)[0]  # each alone: 60 of 100
    first.sync(client)
    second.sync(client)
    first.sync(client)  # reads back the second one's spend
    assert float(client.hget(spend_key(day), ad)) == pytest.approx(120.0)
    assert 0 < client.ttl(spend_key(day)) <= 2 * DAY_S
    assert not first.allowed(budgeted)[0] and not second.allowed(budgeted)[0]  # together: 120 of 100
    assert first.allowed(budgeted)[2]  # unlimited
    second.charge(budgeted, np.array([1]), np.array([10.0]))
    assert second.spent(budgeted.ad_ids[1]) == pytest.approx(10.0)  # charged at once, before any sync


def test_spend_survives_a_redis_outage(feature_settings, budgeted) -> None:
    dead = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    live = redis.Redis.from_url(feature_settings.redis_url)
    pacer = Pacer(budgeted, slack=1.0)
    pacer.charge(budgeted, np.array([1]), np.array([30.0]))
    with pytest.raises(redis.ConnectionError):
        pacer.sync(dead)
    assert pacer.spent(budgeted.ad_ids[1]) == pytest.approx(30.0)  # still paced locally
    pacer.sync(live)  # the spend charged during the outage reaches the shared counter
    assert float(live.hget(spend_key(int(time.time() // DAY_S)), budgeted.ad_ids[1])) == pytest.approx(30.0)
    assert pacer.spent(budgeted.ad_ids[1]) == pytest.approx(30.0)  # not counted twice


def test_spend_recorded_before_the_hash_tag_is_merged_once(feature_settings, budgeted) -> None:
    """An upgrade keeps today's spend and the lifetime ledger of the untagged hashes (standalone Redis)."""
    client = redis_client(feature_settings)
    day, ad = int(time.time() // DAY_S), budgeted.ad_ids[0]
    client.hset(f"{LEGACY_PREFIX}{day}", ad, 40.0)
    client.hset(f"{LEGACY_PREFIX}lifetime", ad, 90.0)
    client.hset(LIFETIME_KEY, ad, 10.0)  # a replica already upgraded has charged since
    assert adopt_legacy_spend(client, day) == 2
    assert adopt_legacy_spend(client, day) == 0  # merged once: the old hashes are gone
    assert float(client.hget(spend_key(day), ad)) == pytest.approx(40.0)
    assert 0 < client.ttl(spend_key(day)) <= 2 * DAY_S
    assert float(client.hget(LIFETIME_KEY, ad)) == pytest.approx(100.0) and client.ttl(LIFETIME_KEY) == -1
    pacer = Pacer(budgeted, slack=1.0)
    pacer.sync(client)
    assert pacer.spent(ad) == pytest.approx(40.0)
