"""Signed, idempotent billing notices (serving.signing, serving.notices, the OpenRTB billing route)."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qs, urlparse

import pytest
from fastapi.testclient import TestClient

from adloop.settings import Settings
from serving import signing
from serving.catalog import write_catalog
from serving.notices import NoticeLedger, notice_event_id, verify_notice
from tests.serving.test_openrtb import SIMPLE_BANNER

SECRET = b"k" * 32


def test_a_signature_covers_every_parameter_in_any_order() -> None:
    params = {"r": "req", "i": "1", "a": "ad-1", "u": "u-1"}
    sig = signing.sign(params, SECRET)
    assert signing.verify({**params, "sig": sig}, SECRET)
    assert signing.verify(dict(reversed(list({**params, "sig": sig}.items()))), SECRET)
    assert not signing.verify({**params, "a": "ad-2", "sig": sig}, SECRET)  # an edited parameter
    assert not signing.verify({**params, "x": "1", "sig": sig}, SECRET)  # an added one
    assert not signing.verify({**params, "sig": sig}, b"other")  # another secret
    assert not signing.verify(params, SECRET)  # no signature
    assert not signing.verify({**params, "sig": "\u00e9" * 22}, SECRET)  # not even ASCII


def test_the_generated_secret_is_made_once_per_stack_folder(tmp_path) -> None:
    settings = Settings(stack_dir=tmp_path)
    first = signing.secret_of(settings)
    assert len(first) >= 32 and signing.secret_of(settings) == first
    assert (tmp_path / "url-signing-secret").stat().st_mode & 0o077 == 0  # readable by its owner only
    assert signing.secret_of(Settings(stack_dir=tmp_path, url_signing_secret="set")) == b"set"


def test_the_price_macro_is_outside_the_signature() -> None:
    params = {"r": "req", "i": "1"}
    query = {**params, "sig": signing.sign(params, SECRET), "price": "1.25"}
    assert verify_notice(query, SECRET) and not verify_notice({**query, "r": "x"}, SECRET)


def test_event_ids_derive_from_bid_and_impression() -> None:
    assert notice_event_id("r", "1", "a") == notice_event_id("r", "1", "a")
    assert len({notice_event_id("r", "1", "a"), notice_event_id("r", "2", "a"), notice_event_id("r1", "", "a")}) == 3


def test_the_ledger_counts_a_notice_once_with_or_without_redis() -> None:
    class Down:
        def set(self, *args, **kwargs):
            raise OSError("Redis down")

    ledger = NoticeLedger(Down())
    assert ledger.first("e1") and not ledger.first("e1") and ledger.first("e2")


@pytest.fixture
def served(make_app, catalog_rows, catalog_file):
    write_catalog([dict(r, pricing="cpm") for r in catalog_rows], catalog_file)  # CPM: the notice is charged
    app, _ = make_app()
    with TestClient(app) as client:
        # A request id of its own: the ledger (Redis, when reachable) remembers notices across tests.
        body = client.post("/openrtb/2.6/bid", json={**SIMPLE_BANNER, "id": uuid.uuid4().hex}).json()
        bid = body["seatbid"][0]["bid"][0]
        url = urlparse(bid["burl"].replace("${AUCTION_PRICE}", "1.25"))
        yield app, client, url.path, {k: v[0] for k, v in parse_qs(url.query).items()}, bid


def test_a_retried_notice_logs_and_charges_once(served) -> None:
    app, client, path, query, bid = served
    runtime = app.state.runtime
    before = runtime.logger.counts["enqueued"]
    answers = [client.get(path, params=query).status_code for _ in range(3)]
    assert answers == [204, 204, 204]
    assert runtime.logger.counts["enqueued"] == before + 1
    assert runtime.pacer.spent(bid["adid"]) == pytest.approx(1.25 / 1000)
    logged = runtime.logger._buffer[-1]
    assert logged["event_id"] == notice_event_id(query["r"], query["i"], query["a"])


@pytest.mark.parametrize(
    "forge",
    [
        lambda q: {**q, "u": "someone-else"},
        lambda q: {**q, "arm": "control" if q["arm"] == "targeted" else "targeted"},
        lambda q: {**q, "sig": "A" * 22},
        lambda q: {k: v for k, v in q.items() if k != "sig"},
        lambda q: {**q, "extra": "1"},
    ],
)
def test_a_forged_notice_is_403_and_changes_nothing(served, forge) -> None:
    app, client, path, query, bid = served
    runtime = app.state.runtime
    before = runtime.logger.counts["enqueued"]
    response = client.get(path, params=forge(query))
    assert response.status_code in (403, 422)  # 422: a required parameter is missing
    assert runtime.logger.counts["enqueued"] == before and runtime.pacer.spent(bid["adid"]) == 0
