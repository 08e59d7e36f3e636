"""OpenRTB 2.6 bidding: requests shaped like the spec's examples get valid BidResponses; 204 and 400 cases."""

from __future__ import annotations

import html
import json
import re
import uuid
from urllib.parse import parse_qs, urlparse

import pytest
from fastapi.testclient import TestClient

from serving.catalog import write_catalog
from serving.openrtb import BidResponse
from serving.tracking import Touch, decode_token

SIMPLE_BANNER = {  # OpenRTB 2.x spec, example 1 "simple banner"
    "id": "80ce30c53c16e6ede735f123ef6e32361bfc7b22",
    "at": 1,
    "cur": ["USD"],
    "imp": [{"id": "1", "bidfloor": 0.03, "banner": {"h": 250, "w": 300, "pos": 0}}],
    "site": {
        "id": "102855",
        "cat": ["IAB3-1"],
        "domain": "www.foobar.com",
        "page": "http://www.foobar.com/1234.html",
        "publisher": {"id": "8953", "name": "foobar.com", "cat": ["IAB3-1"], "domain": "foobar.com"},
    },
    "device": {"ua": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_6_8)", "ip": "123.145.167.10"},
    "user": {"id": "55816b39711f9b5acf3b90e313ed29e51665623f"},
}
MOBILE_APP = {  # example 3 "mobile"
    "id": "IxexyLDIIk",
    "at": 2,
    "bcat": ["IAB25", "IAB7-39", "IAB8-18", "IAB8-5", "IAB9-9"],
    "badv": ["apple.com", "go-text.me", "heywire.com"],
    "imp": [
        {
            "id": "1",
            "bidfloor": 0.5,
            "instl": 0,
            "tagid": "agltb3B1Yi1pbmNyDQsSBFNpdGUY7fD0FAw",
            "banner": {"w": 728, "h": 90, "pos": 1, "btype": [4], "battr": [14], "api": [3]},
        }
    ],
    "app": {
        "id": "agltb3B1Yi1pbmNyDAsSA0FwcBiJkfIUDA",
        "name": "Yahoo Weather",
        "cat": ["IAB15", "IAB15-10"],
        "ver": "1.0.2",
        "bundle": "12345",
        "storeurl": "https://itunes.apple.com/id628677149",
        "publisher": {"id": "agltb3B1Yi1pbmNyDAsSA0FwcBiJkfTUCV", "name": "yahoo", "domain": "www.yahoo.com"},
    },
    "device": {
        "dnt": 0,
        "ua": "Mozilla/5.0 (iPhone; CPU iPhone OS 6_1 like Mac OS X)",
        "ip": "123.145.167.189",
        "ifa": "AA000DFE74168477C70D291f574D344790E0BB11",
        "carrier": "VERIZON",
        "language": "en",
        "make": "Apple",
        "model": "iPhone",
        "os": "iOS",
        "osv": "6.1",
        "js": 1,
        "connectiontype": 3,
        "devicetype": 1,
        "geo": {
            "lat": 35.012345,
            "lon": -115.12345,
            "country": "USA",
            "metro": "803",
            "region": "CA",
            "city": "Los Angeles",
            "zip": "90049",
        },
    },
    "user": {"id": "ffffffd5135596709273b3a1a07e466ea2bf4fff", "yob": 1984, "gender": "M"},
}
NATIVE_REQUEST = {
    "native": {
        "ver": "1.2",
        "assets": [
            {"id": 123, "required": 1, "title": {"len": 140}},
            {"id": 128, "required": 0, "img": {"wmin": 836, "hmin": 627, "type": 3}},
            {"id": 126, "required": 1, "data": {"type": 1, "len": 25}},
        ],
    }
}
NATIVE = {  # example 5 "native"
    "id": "80ce30c53c16e6ede735f123ef6e32361bfc7b22",
    "at": 1,
    "cur": ["USD"],
    "imp": [{"id": "1", "bidfloor": 0.03, "native": {"request": json.dumps(NATIVE_REQUEST), "ver": "1.2"}}],
    "site": {"id": "102855", "cat": ["IAB3-1"], "domain": "www.foobar.com", "page": "http://www.foobar.com/1234.html"},
    "device": {"ua": "Mozilla/5.0", "ip": "123.145.167.10"},
    "user": {"id": "55816b39711f9b5acf3b90e313ed29e51665623f"},
}
PMP = {  # example 4 "expandable creative" with a private marketplace
    "id": "1234567893",
    "at": 2,
    "tmax": 120,
    "imp": [
        {
            "id": "1",
            "bidfloor": 0.03,
            "banner": {"w": 300, "h": 250, "pos": 1, "battr": [13], "expdir": [2, 4]},
            "pmp": {
                "private_auction": 1,
                "deals": [
                    {"id": "AB-Agency1-0001", "at": 1, "bidfloor": 2.5, "wseat": ["Agency1"]},
                    {"id": "XY-Agency2-0001", "at": 2, "bidfloor": 2, "wseat": ["Agency2"]},
                ],
            },
        }
    ],
    "site": {"id": "102855", "domain": "www.foobar.com", "page": "http://www.foobar.com/1234.html"},
    "device": {"ua": "Mozilla/5.0", "ip": "123.145.167.10"},
    "user": {"id": "55816b39711f9b5acf3b90e313ed29e51665623f"},
}


def bid(client: TestClient, body: dict):
    return client.post("/openrtb/2.6/bid", json=body)


@pytest.fixture
def app(make_app):
    return make_app()[0]


@pytest.mark.parametrize(("example", "w", "h"), [(SIMPLE_BANNER, 300, 250), (MOBILE_APP, 728, 90)])
def test_banner_examples_get_a_valid_bid(app, example: dict, w: int, h: int) -> None:
    with TestClient(app) as client:
        response = bid(client, example)
    assert response.status_code == 200
    parsed = BidResponse.model_validate(response.json())
    assert parsed.id == example["id"] and parsed.cur == "USD"
    (b,) = parsed.seatbid[0].bid
    assert b.impid == "1" and b.price >= example["imp"][0]["bidfloor"]
    assert (b.w, b.h) == (w, h) and "<img" in b.adm and "${AUCTION_PRICE}" in b.burl
    touch = _tracked(app, re.search(r'<a href="([^"]+)"', b.adm)[1])  # the link is the signed click tracker
    burl = parse_qs(urlparse(b.burl).query)
    assert (touch.request_id, touch.slot_id, touch.ad_id, touch.arm) == (example["id"], "1", b.adid, burl["arm"][0])
    assert b.adomain and b.adomain[0] not in example.get("badv", [])
    assert not any(b.cat[0] == c or b.cat[0].startswith(c + "-") for c in example.get("bcat", []))


def test_answers_served_while_impression_logging_is_down_are_flagged_and_counted(app) -> None:
    """NoKafka: the impression producer never connects, so /readyz says Kafka is down and every answer says so."""
    from serving import metrics

    def counted(route: str) -> float:
        return metrics.DEGRADED.labels(route, "impression_log")._value.get()

    before = {route: counted(route) for route in ("select", "openrtb")}
    with TestClient(app) as client:
        assert client.get("/readyz").json()["checks"]["kafka"]["ok"] is False
        selected = client.post("/v1/select", json={"user_id": "u1", "slots": [{"slot_id": "s", "format": "native"}]})
        response = bid(client, SIMPLE_BANNER)
    assert selected.status_code == 200 and selected.json()["degraded"] == ["impression_log"]
    assert response.status_code == 200 and response.json()["ext"] == {"adloop": {"degraded": ["impression_log"]}}
    assert all(counted(route) == before[route] + 1 for route in before)


def test_native_example_fills_the_requested_assets(app) -> None:
    with TestClient(app) as client:
        response = bid(client, NATIVE)
    assert response.status_code == 200
    (b,) = response.json()["seatbid"][0]["bid"]
    adm = json.loads(b["adm"])["native"]
    assert sorted(a["id"] for a in adm["assets"]) == [123, 126, 128]
    touch = _tracked(app, adm["link"]["url"])
    assert (touch.request_id, touch.ad_id, touch.campaign_id) == (NATIVE["id"], b["adid"], b["cid"])


def _tracked(app, url: str) -> Touch:
    """The impression a bid's click-through URL tracks (it must be our `GET /c/{token}`)."""
    runtime = app.state.runtime
    prefix = f"{runtime.settings.public_url.rstrip('/')}/c/"
    assert url.startswith(prefix), url
    return decode_token(html.unescape(url).removeprefix(prefix), runtime.secret)


def test_pmp_private_auction_bids_a_deal_ad_at_its_floor(make_app, catalog_rows, catalog_file) -> None:
    rows = [dict(r) for r in catalog_rows]
    for r in rows:
        r["deal_ids"] = ""
    deal_ads = [r for r in rows if "banner_300x250" in r["formats"] and r["end_date"] > "2027"][:3]
    for r in deal_ads:
        r.update(deal_ids="AB-Agency1-0001", bid="4.0", daily_budget="0")
    write_catalog(rows, catalog_file)
    app, _ = make_app()
    with TestClient(app) as client:
        response = bid(client, PMP)
        open_only = bid(
            client,
            {
                **PMP,
                "imp": [
                    {**PMP["imp"][0], "pmp": {"private_auction": 1, "deals": [{"id": "unknown-deal", "bidfloor": 1.0}]}}
                ],
            },
        )
    assert response.status_code == 200
    (b,) = response.json()["seatbid"][0]["bid"]
    assert b["dealid"] == "AB-Agency1-0001" and b["adid"] in {r["ad_id"] for r in deal_ads}
    assert b["price"] >= 2.5
    assert open_only.status_code == 204  # private auction, none of our ads in its deals


@pytest.mark.parametrize(
    "change",
    [
        {"imp": [{"id": "1", "bidfloor": 100000.0, "banner": {"w": 300, "h": 250}}]},  # floor above any eCPM
        {"imp": [{"id": "1", "video": {"mimes": ["video/mp4"]}}]},  # video only
        {"imp": [{"id": "1", "banner": {"w": 1, "h": 1}}]},  # no creative of that size
        {"tmax": 3},  # less than the network margin
        {"cur": ["EUR"]},
        {"bcat": ["IAB18", "IAB17", "IAB19", "IAB20", "IAB8", "IAB10", "IAB2", "IAB13", "IAB9"]},  # every category
    ],
)
def test_no_bid_is_204(app, change: dict) -> None:
    with TestClient(app) as client:
        response = bid(client, {**SIMPLE_BANNER, **change})
    assert response.status_code == 204 and response.content == b""


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({k: v for k, v in SIMPLE_BANNER.items() if k != "id"}, "id"),
        ({**SIMPLE_BANNER, "imp": []}, "imp"),
        ({**SIMPLE_BANNER, "app": {"id": "x"}}, "site and app"),
        ({**SIMPLE_BANNER, "imp": [{"id": "1"}]}, "banner, native"),
        ({**SIMPLE_BANNER, "imp": [{"id": "1", "bidfloor": -1, "banner": {"w": 300, "h": 250}}]}, "bidfloor"),
        ({**SIMPLE_BANNER, "tmax": "soon"}, "tmax"),
    ],
)
def test_invalid_bid_requests_are_400_naming_the_field(app, body: dict, field: str) -> None:
    with TestClient(app) as client:
        response = bid(client, body)
    assert response.status_code == 400
    assert field in json.dumps(response.json()["detail"])


def test_not_json_is_400(app) -> None:
    with TestClient(app) as client:
        response = client.post("/openrtb/2.6/bid", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400


@pytest.mark.parametrize("pricing", ["cpm", "cpc"])
def test_billing_notice_logs_the_impression(make_app, catalog_rows, catalog_file, pricing: str) -> None:
    write_catalog([dict(r, pricing=pricing) for r in catalog_rows], catalog_file)
    app, _ = make_app()
    with TestClient(app) as client:  # a request id of its own: notices count once per request, imp and ad
        b = bid(client, {**SIMPLE_BANNER, "id": uuid.uuid4().hex}).json()["seatbid"][0]["bid"][0]
        logger = app.state.runtime.logger
        before = logger.counts["enqueued"]
        url = urlparse(b["burl"].replace("${AUCTION_PRICE}", "1.25"))
        notice = client.get(url.path, params={k: v[0] for k, v in parse_qs(url.query).items()})
        bad = client.get(url.path, params={"r": "x"})
        spent = app.state.runtime.pacer.spent(b["adid"])
    assert notice.status_code == 204 and logger.counts["enqueued"] == before + 1
    # a CPM ad pays the clearing price; a CPC ad pays on its tracked click, not here
    assert spent == pytest.approx(1.25 / 1000 if pricing == "cpm" else 0.0)
    assert bad.status_code == 422
