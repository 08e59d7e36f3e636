"""`/v1/outcomes`, `/v1/ops/summary` and `/dashboard` over a real DuckDB file; the page in headless Chromium."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adloop.settings import Settings
from outcomes.store import OutcomeStore
from serving.app import create_app
from serving.catalog import generate_catalog, write_catalog
from streaming.events import Event, EventType
from tests.support.serving import MemoryReader, NoKafka, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NOW = datetime.now(UTC).replace(second=0, microsecond=0)


def _events() -> list[Event]:
    """3 minutes x 2 arms x 3 campaigns; targeted clicks 1 in 5, control 1 in 10. Money: an impression costs
    $0.01 and a click $0.25; a click with k < 20 converts for $20 (targeted k 0, 5, 10, 15; control k 0, 10)."""
    events, n = [], 0
    for minute in range(3):
        for arm, every in (("targeted", 5), ("control", 10)):
            for k in range(30):
                n += 1
                imp = Event(
                    event_id=f"i{n}", schema_version=1, event_type=EventType.ad_impression, user_id=f"u{k % 9}",
                    ts=NOW - timedelta(minutes=3 - minute, seconds=-k), ad_id=f"ad-{k % 6}", campaign_id=f"cmp-{k % 3}",
                    request_id=f"r{n}", arm=arm, model_version="m-1" if minute < 2 else "m-2", propensity=0.9,
                    context={"device": ("mobile", "desktop")[k % 2], "country": "DE"}, cost=0.01,
                )  # fmt: skip
                events.append(imp)
                if k % every == 0:
                    click = {"event_id": f"i{n}c", "event_type": EventType.ad_click, "cost": 0.25}
                    events.append(imp.model_copy(update=click))
                    if k < 20:
                        conversion = {"event_id": f"i{n}v", "event_type": EventType.conversion, "cost": None,
                                      "value": 20.0, "currency": "USD"}  # fmt: skip
                        events.append(imp.model_copy(update=conversion))
    return events


@pytest.fixture
def app_settings(tmp_path: Path) -> Settings:
    catalog = tmp_path / "ads.csv"
    write_catalog(generate_catalog(60, seed=3), catalog)
    settings = Settings(
        catalog_path=catalog, catalog_poll_s=0, ad_stats_refresh_s=3600, events_topic="adloop.test.unused",
        outcomes_path=tmp_path / "outcomes.duckdb", redis_url="redis://127.0.0.1:6379/9",
    )  # fmt: skip
    store = OutcomeStore(settings.outcomes_path)
    store.setup()
    store.write(_events(), dead_letters=[("adloop.events.dlq", 0, 0, "schema"), ("adloop.events.dlq", 0, 1, "schema")])
    return settings


def _app(settings: Settings):
    return create_app(settings, feature_reader=MemoryReader(), producer_factory=NoKafka())


def test_outcomes_groups_filters_and_lift(app_settings):
    with TestClient(_app(app_settings)) as client:
        body = client.get("/v1/outcomes", params={"group_by": "arm"}).json()
        arms = {r["arm"]: r for r in body["rows"]}
        assert (arms["targeted"]["impressions"], arms["targeted"]["clicks"]) == (90, 18)
        assert (arms["control"]["impressions"], arms["control"]["clicks"]) == (90, 9)
        assert arms["control"]["ctr_low"] < 0.1 < arms["control"]["ctr_high"]
        assert body["lift"]["difference"]["value"] == pytest.approx(0.1)
        assert body["lift"]["relative"]["value"] == pytest.approx(1.0)
        assert body["total"]["impressions"] == 180

        since = (NOW - timedelta(minutes=1)).isoformat()
        params = {"from": since, "model_version": "m-2", "group_by": "campaign,minute"}
        later = client.get("/v1/outcomes", params=params).json()
        assert sum(r["impressions"] for r in later["rows"]) == 60
        assert {r["campaign"] for r in later["rows"]} == {"cmp-0", "cmp-1", "cmp-2"}
        only = client.get("/v1/outcomes", params={"arm": "control", "ad_id": "ad-0"}).json()
        assert only["total"]["impressions"] == 15 and only["lift"]["relative"] is None

        assert client.get("/v1/outcomes", params={"group_by": "arm,planet"}).status_code == 422
        assert client.get("/v1/outcomes", params={"arm": "both"}).status_code == 422

        client.post("/v1/select", json={"user_id": "u1", "slots": [{"slot_id": "s", "format": "native"}]})
        ops = client.get("/v1/ops/summary").json()
        assert ops["dead_letters"] == {"schema": 2}
        assert ops["latency"]["select"]["count"] >= 1 and ops["latency"]["select"]["p50_ms"] > 0


def _cells(page, table: str, key: str) -> list[str]:
    return page.locator(f"#{table} tbody tr[data-key='{key}'] td").all_inner_texts()


def _check_money_breakdowns(page) -> None:
    """Per campaign, model version and segment: the numbers of the landed events (see `_events`)."""
    assert page.locator("#money-campaigns tbody tr").count() == 3
    # cmp-0: 60 impressions, 9 clicks, 9 conversions (6 targeted + 3 control) of $20; 0.60 + 9 x 0.25 = $2.85
    impressions, conversions, rate, interval, revenue, spend, cpa, roas = _cells(page, "money-campaigns", "cmp-0")[1:]
    assert (impressions, conversions, rate, revenue, spend, cpa) == ("60", "9", "15.00%", "$180.00", "$2.85", "$0.32")
    assert roas == f"{180 / 2.85:.2f}"
    low, high = (float(x.rstrip("%")) for x in interval.strip("[]").split(", "))
    assert low < 15 < high
    # m-2 is the last minute: targeted 4 conversions of 30 impressions, control 2
    assert _cells(page, "money-models", "m-2|targeted")[2:5] == ["30", "4", "13.33%"]
    assert _cells(page, "money-models", "m-1|control")[2:5] == ["60", "4", "6.67%"]
    # every user has 20 impressions (heavy); even k are mobile: targeted k 0 and 10 convert, control k 0 and 10
    assert _cells(page, "money-segments", "heavy/mobile/DE|targeted")[2:4] == ["45", "6"]
    assert _cells(page, "money-segments", "heavy/desktop/DE|control")[2:4] == ["45", "0"]
    assert page.locator("#money-segments tbody tr").count() == 4


def _serve(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return server, thread


def test_dashboard_renders_live_data_in_headless_chromium(app_settings, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed for this test: apt-get update && apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    port = free_port()
    server, thread = _serve(_app(app_settings), port)
    try:
        import httpx

        for i in range(5):  # some requests, so that the latency table has numbers
            httpx.post(f"http://127.0.0.1:{port}/v1/select",
                       json={"user_id": f"u{i}", "slots": [{"slot_id": "s", "format": "native"}]})  # fmt: skip
        problems: list[str] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                      "--disable-sync", "--no-first-run"],
            )  # fmt: skip
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on(
                "console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
            )
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.goto(f"http://127.0.0.1:{port}/dashboard")
            page.wait_for_selector("body[data-ready='1']", timeout=15_000)
            assert page.locator("#ctr-time circle.targeted").count() == 3  # one point per minute
            assert page.locator("#ctr-time circle.control").count() == 3
            assert page.locator("#campaigns rect.bar").count() == 6  # 3 campaigns x (impressions, clicks)
            assert page.locator("#models rect.bar").count() == 4  # 2 versions x 2 arms
            assert page.locator("#segments tbody tr").count() >= 2
            assert "100.0%" in page.locator("#kpis").inner_text()  # relative lift of 20% over 10%
            assert "schema" in page.locator("#dlq").inner_text()
            assert page.locator("#latency tbody tr").count() >= 1
            assert page.locator("#money tbody tr").count() == 2  # conversions, revenue, spend, ROAS per arm
            assert "unattributed conversions" in page.locator("#money-kpis").inner_text()
            _check_money_breakdowns(page)

            # live: a new impression shows up at the next poll without a reload
            imp = _events()[0].model_copy(update={"event_id": "late", "request_id": "late", "ts": NOW})
            OutcomeStore(app_settings.outcomes_path).write([imp])
            page.wait_for_function("document.querySelector('#kpis b').textContent === '181'", timeout=10_000)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            browser.close()
        assert problems == []
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    finally:
        server.should_exit = True
        thread.join(10)
