"""Campaign budgets on two replicas: two `adloop serve` processes on two ports sharing Redis; a campaign out of
budget on one stops on the other within a second (two pacing syncs of 0.5 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import ExitStack

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adloop.settings import PROJECT_ROOT, Settings
from serving.catalog import build_catalog, generate_catalog, write_catalog
from serving.pacing import STALE_RECHECKS, Pacer
from tests.support.serving import free_port

pytestmark = pytest.mark.integration
BUDGET = 3.0  # USD over the campaign's life: three impressions at a $1,000 CPM
NOON = 20_000 * 86_400 + 43_200.0


def _select(port: int, ads: list[str]) -> list[str]:
    body = {"user_id": f"u-{uuid.uuid4().hex[:6]}", "slots": [{"slot_id": "s", "format": "native"}],
            "candidate_ad_ids": ads}  # fmt: skip
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/select", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as answer:
        return [a["ad_id"] for s in json.loads(answer.read())["slots"] for a in s["ads"]]


def _replica(stack: ExitStack, env: dict[str, str], port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "adloop.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def stop() -> None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    stack.callback(stop)
    return server


def _wait(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
            return
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "adloop serve did not answer"
            time.sleep(0.2)


def test_a_campaign_out_of_budget_stops_on_every_replica_within_a_second(local_stack: Settings, tmp_path) -> None:
    tag = uuid.uuid4().hex[:8]  # the lifetime ledger in Redis is shared: a campaign of this test only
    rows = generate_catalog(3, seed=2)
    for i, row in enumerate(rows):
        row.update(ad_id=f"ad-{tag}-{i}", campaign_id=f"cmp-{tag}", formats="native", start_date="", end_date="",
                   daily_budget="0", freq_cap_ad="0", freq_cap_campaign="0", pricing="cpm", bid="1000",
                   campaign_lifetime_budget=str(BUDGET))  # fmt: skip
    catalog = tmp_path / "ads.csv"
    write_catalog(rows, catalog)
    ads = [r["ad_id"] for r in rows]
    env = {k: v for k, v in os.environ.items() if "PROMETHEUS" not in k.upper()}
    env.update(ADLOOP_STACK_DIR=str(tmp_path / "stack"), ADLOOP_MODEL_REGISTRY_PATH=str(tmp_path / "models"),
               ADLOOP_FEAST_DATA_DIR=str(tmp_path / "feast"), ADLOOP_EVENTS_TOPIC="adloop.test.budgets",
               ADLOOP_CATALOG_PATH=str(catalog), ADLOOP_CATALOG_POLL_S="0", ADLOOP_PACING_SYNC_S="0.5",
               ADLOOP_REDIS_URL=local_stack.redis_url, PYTHONPATH=str(PROJECT_ROOT))  # fmt: skip
    first, second = free_port(), free_port()
    with ExitStack() as stack:
        replicas = {port: _replica(stack, env, port) for port in (first, second)}  # starting side by side
        for port, server in replicas.items():
            _wait(server, port)
        assert _select(second, ads)  # the other replica serves the campaign to begin with (spends $1)
        served = 1
        while _select(first, ads):
            served += 1
            assert served < 20, "the first replica never stopped"
        stopped = time.monotonic()
        assert BUDGET <= served <= BUDGET + 2  # overshoot: at most what the other replica spent unseen
        while _select(second, ads):
            assert time.monotonic() - stopped < 1.2, "the second replica kept serving"
            time.sleep(0.02)
        lag = time.monotonic() - stopped
        time.sleep(0.6)
        assert not _select(second, ads) and not _select(first, ads)  # and stays stopped
    print(f"stopped on the second replica {lag:.2f} s after the first")


def test_a_campaign_daily_budget_is_paced_through_the_day(catalog_rows) -> None:
    rows = [dict(r, campaign_id="cmp-x", daily_budget="0", campaign_daily_budget="240", campaign_lifetime_budget="0")
            for r in catalog_rows[:4]]  # fmt: skip
    catalog = build_catalog(rows, version="daily")
    pacer = Pacer(catalog, slack=0.0)
    noon = 20_000 * 86_400 + 43_200.0
    pacer._day = int(noon // 86_400)
    pacer.charge(catalog, np.array([0, 1]), np.array([50.0, 50.0]))  # the campaign: $100 of $120 allowed by noon
    assert pacer.allowed(catalog, noon).all()
    pacer.charge(catalog, np.array([2]), np.array([25.0]))  # $125: ahead of the pace, every ad of it waits
    assert not pacer.allowed(catalog, noon).any()
    assert pacer.allowed(catalog, noon + 3 * 3_600).all()  # by 3 pm $150 is allowed
    assert pacer.campaign_spent("cmp-x") == (pytest.approx(125.0), pytest.approx(125.0))


@settings(max_examples=60, deadline=None)
@given(
    charges=st.lists(
        st.tuples(
            st.lists(st.integers(0, 39), min_size=1, max_size=3),
            st.floats(0.5, 40.0),
            st.sampled_from([0.0, 0.0, 0.3, 0.6, 5.0, 1_800.0]),
        ),
        min_size=1,
        max_size=40,
    ),
    seed=st.integers(0, 2**16),
)
def test_the_kept_allowance_never_allows_what_a_full_recheck_refuses(charges, seed) -> None:
    """`Pacer.allowed` keeps its mask for `recheck_s` and re-checks only what each charge touched: at the
    mask's own moment it equals a full recompute (a pacer with `recheck_s=0`), later it may only refuse
    more (an allowance that grew with the day), and after `recheck_s` it is the full recompute again."""
    catalog = _budgeted_catalog(seed)
    now = NOON
    kept, full = Pacer(catalog, slack=0.0, recheck_s=1.0), Pacer(catalog, slack=0.0, recheck_s=0.0)
    kept._day = full._day = int(now // 86_400)
    for ads, amount, later in charges:
        for pacer in (kept, full):
            pacer.charge(catalog, np.array(ads), np.full(len(ads), amount))
        now += later  # seconds: within `recheck_s` of the kept mask or past it
        got, want = kept.allowed(catalog, now), full.allowed(catalog, now)
        assert not (got & ~want).any()
        if kept._allowed.at == now:  # recomputed now, or kept from this very moment through charges
            assert (got == want).all()


def test_a_background_pacer_recomputes_in_its_thread_not_on_the_request_path() -> None:
    """With `background=True` (the runtime's pacing thread calls `recheck`) a request uses the kept mask however
    old, up to `STALE_RECHECKS` rechecks (a ~10 ms recompute over a million ads was a request's once a second)."""
    catalog = _budgeted_catalog(3)
    pacer = Pacer(catalog, slack=0.0, recheck_s=1.0, background=True)
    pacer._day = int(NOON // 86_400)
    pacer.recheck(NOON)
    kept = pacer.allowed(catalog, NOON)
    computed = []
    original = pacer._compute
    pacer._compute = lambda *a: computed.append(1) or original(*a)  # type: ignore[method-assign]
    assert pacer.allowed(catalog, NOON + 3.0) is kept and not computed  # past recheck_s: still the kept mask
    pacer.recheck(NOON + 3.5)
    assert computed == [1]
    pacer.allowed(catalog, NOON + 3.5 + STALE_RECHECKS * 1.0)  # the thread fell silent: the request recomputes
    assert computed == [1, 1]


@settings(max_examples=40, deadline=None)
@given(
    during=st.lists(st.tuples(st.lists(st.integers(0, 39), min_size=1, max_size=3), st.floats(0.5, 60.0)), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_a_recheck_keeps_the_charges_made_while_it_computed(during, seed) -> None:
    """`recheck` computes from a copy of the counters, without the lock (requests keep charging); what they
    charged meanwhile is applied to the new mask before it is kept: it equals a full recompute afterwards."""
    catalog = _budgeted_catalog(seed)
    background, full = Pacer(catalog, slack=0.0, background=True), Pacer(catalog, slack=0.0, recheck_s=0.0)
    background._day = full._day = int(NOON // 86_400)
    original = background._compute

    def charged_meanwhile(*args):
        result = original(*args)
        for ads, amount in during:  # requests charging while the thread computes
            for pacer in (background, full):
                pacer.charge(catalog, np.array(ads), np.full(len(ads), amount))
        return result

    background._compute = charged_meanwhile  # type: ignore[method-assign]
    background.recheck(NOON)
    background._compute = original  # type: ignore[method-assign]
    assert (background.allowed(catalog, NOON) == full.allowed(catalog, NOON)).all()


def _budgeted_catalog(seed: int):
    """40 ads in 6 campaigns, ad, daily campaign and lifetime budgets mixed."""
    rng = np.random.default_rng(seed)
    rows = generate_catalog(40, seed=seed % 7)
    for r in rows:
        r.update(start_date="", end_date="", campaign_id=f"c{rng.integers(6)}",
                 daily_budget=str(rng.choice([0, 30, 80])))  # fmt: skip
    for r in rows:  # one budget per campaign, as a catalog states it on each of its rows
        code = int(r["campaign_id"][1:])
        r.update(campaign_daily_budget=str([0, 100, 200, 0, 150, 60][code]),
                 campaign_lifetime_budget=str([0, 0, 300, 120, 0, 0][code]))  # fmt: skip
    return build_catalog([{k: str(v) for k, v in r.items()} for r in rows], version="kept")
