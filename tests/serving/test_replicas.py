"""API replicas share their money and dedup state through Redis, standalone and Redis Cluster alike: two apps
(two `Runtime`s, as two `adloop serve` processes have) on one Redis. Spend charged on one stops the other when
the budget runs out; a click, a conversion postback and a billing notice delivered to both count once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from adloop.settings import Settings
from models.testing import EmptyRegistry
from serving.app import create_app
from serving.catalog import generate_catalog, write_catalog
from serving.routes.conversions import sign_postback
from tests.support.serving import MemoryReader, NoKafka

pytestmark = pytest.mark.integration
BUDGET = 3.0  # USD over the campaign's life: three impressions at a $1,000 CPM
NATIVE = [{"slot_id": "feed", "format": "native"}]


@pytest.fixture
def replicas(any_feature_settings: Settings, tmp_path: Path) -> Iterator[tuple[list, list[str]]]:
    """Two started apps on the same Redis ([(app, client), (app, client)]) and the ids of their catalog's ads:
    a CPM ad ($1 an impression) and a CPC ad ($0.80 a click) of one campaign with a $3 lifetime budget."""
    tag = uuid.uuid4().hex[:8]  # the lifetime ledger lives for good: a campaign of this test only
    rows = generate_catalog(2, seed=3)
    for i, row in enumerate(rows):
        row.update(ad_id=f"ad-{tag}-{i}", campaign_id=f"cmp-{tag}", formats="native", start_date="", end_date="",
                   daily_budget="0", freq_cap_ad="0", freq_cap_campaign="0", pricing=("cpm", "cpc")[i],
                   bid=("1000", "0.80")[i], campaign_lifetime_budget=str(BUDGET))  # fmt: skip
    write_catalog(rows, tmp_path / "ads.csv")
    settings = any_feature_settings.model_copy(
        update={
            "catalog_path": tmp_path / "ads.csv",
            "catalog_poll_s": 0,
            "ad_stats_refresh_s": 3600,
            "control_share": 0.0,
            "serve_epsilon_no_model": 0.0,
            "pacing_sync_s": 0.1,
            "stack_dir": tmp_path / "stack",
            "url_signing_secret": SecretStr("replicas-test-secret"),  # model_copy does not validate
        }
    )
    with ExitStack() as stack:
        pair = []
        for _ in range(2):
            app = create_app(settings, feature_reader=MemoryReader(), registry=EmptyRegistry(),
                             producer_factory=NoKafka())  # fmt: skip
            pair.append((app, stack.enter_context(TestClient(app))))
        yield pair, [r["ad_id"] for r in rows]


def _served(client: TestClient, user: str | None = None, only: str | None = None) -> list[dict]:
    body = {"user_id": user or f"u-{uuid.uuid4().hex[:6]}", "slots": NATIVE}
    if only:
        body["candidate_ad_ids"] = [only]
    answer = client.post("/v1/select", json=body)
    assert answer.status_code == 200, answer.text
    return [ad for slot in answer.json()["slots"] for ad in slot["ads"]]


def test_spend_charged_on_one_replica_stops_the_other_when_the_budget_runs_out(replicas) -> None:
    (_, on_a), (b, on_b) = replicas[0]
    runtime = b.state.runtime
    assert runtime.pacer.allowed(runtime.state.catalog).all()  # B may serve the campaign to begin with
    served = 0
    while ads := _served(on_a):  # a alone spends: $1 a CPM impression (the CPC ad costs only when clicked)
        served += sum(ad["ad_id"].endswith("-0") for ad in ads)
        assert served <= BUDGET + 1, "replica A never stopped"
    assert served == BUDGET
    campaign = runtime.state.catalog.campaign_ids[0]
    deadline = time.monotonic() + 10.0  # B's pacing sync (every 0.1 s) reads A's spend back; slow on a busy host
    while runtime.pacer.allowed(runtime.state.catalog).any():  # asked without serving: B spends nothing itself
        assert time.monotonic() < deadline, "replica B never saw the spend charged on A"
        time.sleep(0.05)
    assert runtime.pacer.campaign_spent(campaign)[1] == pytest.approx(BUDGET)  # A's, through Redis
    assert not _served(on_b)  # B does not serve the spent campaign
    assert not _served(on_a)


def test_a_click_and_a_conversion_delivered_to_both_replicas_count_once(replicas) -> None:
    (a, on_a), (b, on_b) = replicas[0]
    ads = replicas[1]
    cpc = ads[1]
    user = f"u-{uuid.uuid4().hex[:8]}"
    (ad,) = _served(on_a, user, only=cpc)
    path = urlsplit(ad["click_url"]).path
    logged = [app.state.runtime.logger.counts["enqueued"] for app in (a, b)]
    hops = [client.get(path, follow_redirects=False).status_code for client in (on_a, on_b, on_b)]
    assert hops == [302, 302, 302]
    counts = [app.state.runtime.logger.counts["enqueued"] - before for app, before in zip((a, b), logged, strict=True)]
    assert counts == [1, 0]  # logged by the replica that saw it first; a duplicate on the other
    assert _shared_spend((a, b), cpc, 0.80) == pytest.approx([0.80, 0.80])  # charged once, seen by both
    body = orjson.dumps({"idempotency_key": f"order-{user}", "user_id": user, "value": 5.0})
    secret = a.state.runtime.secret
    headers = {"X-Adloop-Signature": sign_postback(body, secret), "Content-Type": "application/json"}
    first = on_b.post("/v1/conversions", content=body, headers=headers).json()  # B sees the click A recorded
    assert first["attributed"] and first["ad_id"] == cpc and first["duplicate"] is False
    assert on_a.post("/v1/conversions", content=body, headers=headers).json()["duplicate"] is True


def test_a_billing_notice_delivered_to_both_replicas_charges_once(replicas) -> None:
    (a, on_a), (b, on_b) = replicas[0]
    native = orjson.dumps({"native": {"ver": "1.2", "assets": [{"id": 1, "title": {"len": 90}}]}}).decode()
    request = {"id": uuid.uuid4().hex, "imp": [{"id": "imp-1", "native": {"request": native}}],
               "site": {"id": "s-1", "domain": "news.example"}, "user": {"id": "u-rtb"}}  # fmt: skip
    answer = on_a.post("/openrtb/2.6/bid", json=request)
    assert answer.status_code == 200, answer.text
    (bid,) = answer.json()["seatbid"][0]["bid"]
    burl = urlsplit(bid["burl"].replace("${AUCTION_PRICE}", "2.0"))
    notice = dict(parse_qsl(burl.query))
    logged = [app.state.runtime.logger.counts["enqueued"] for app in (a, b)]
    assert [client.get(burl.path, params=notice).status_code for client in (on_b, on_a, on_b)] == [204, 204, 204]
    counts = [app.state.runtime.logger.counts["enqueued"] - before for app, before in zip((a, b), logged, strict=True)]
    assert counts == [0, 1]  # the exchange's retry reached the other replica: not logged, not charged again
    assert _shared_spend((a, b), bid["adid"], 2.0 / 1000) == pytest.approx([2.0 / 1000] * 2)


def _shared_spend(apps, ad_id: str, amount: float) -> list[float]:
    """Each replica's view of an ad's spend today, once the pacing syncs (every 0.1 s) shared `amount` of it:
    charged twice, it would read twice `amount`."""
    deadline = time.monotonic() + 10.0  # a busy host delays the sync threads
    while True:
        seen = [app.state.runtime.pacer.spent(ad_id) for app in apps]
        if min(seen) >= amount * 0.999 or time.monotonic() > deadline:
            time.sleep(0.25)  # two more syncs: a second charge would arrive too
            return [app.state.runtime.pacer.spent(ad_id) for app in apps]
        time.sleep(0.05)
