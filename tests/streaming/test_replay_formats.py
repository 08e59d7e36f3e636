"""Each replay format on a tiny file written here in the real format, then on the shared data when present."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from streaming.events import Event, parse_event
from streaming.replay import ReplayFormatError, read
from tests.support.stack import shared_data


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _assert_time_ordered(events: list[Event]) -> None:
    assert all(a.ts <= b.ts for a, b in pairwise(events))


# --- taobao -------------------------------------------------------------------------------------------


def test_taobao_maps_behaviours_and_keeps_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "ub.csv",
        "1,100,7,pv,1511658000\n2,101,7,cart,1511658001\n1,102,8,fav,1511658001\n3,100,7,buy,1511658005\n",
    )
    events = list(read(path, "taobao"))
    assert [e.event_type.value for e in events] == ["page_view", "add_to_cart", "favorite", "purchase"]
    assert [e.event_id for e in events] == ["taobao-1", "taobao-2", "taobao-3", "taobao-4"]
    first = events[0]
    assert (first.user_id, first.item_id, first.category, first.source) == ("1", "100", "7", "replay:taobao")
    assert first.ts_ms == 1511658000 * 1000
    assert [e.event_id for e in read(path, "taobao")] == [e.event_id for e in events]  # same ids on a second replay


def test_taobao_bad_line_stops_with_its_line_number(tmp_path: Path) -> None:
    path = _write(tmp_path / "ub.csv", "1,100,7,pv,1511658000\n1,100,7,like,1511658001\n")
    with pytest.raises(ReplayFormatError, match=r"ub.csv:2: unknown behavior_type 'like'"):
        list(read(path, "taobao"))


def test_taobao_shared_slice() -> None:
    events = list(read(shared_data("taobao", "UserBehavior_timeslice.csv"), "taobao"))
    assert len(events) == 110_300
    _assert_time_ordered(events)
    assert len({e.event_id for e in events}) == len(events)


# --- mind ---------------------------------------------------------------------------------------------

BEHAVIORS = (
    "7\tU1\t11/12/2019 2:14:46 PM\tN1 N2\tN10-0 N11-1 N12-0\n"
    "3\tU2\t11/12/2019 9:00:00 AM\t\tN10-1 N13-0\n"  # earlier: replayed first; no history
    "9\tU1\t11/12/2019 2:14:46 PM\tN1 N2\tN14-0\n"  # U1 seen: no history again
)
NEWS = "N10\tsports\tbasketball\tTitle\tAbstract\thttps://x\t[]\t[]\nN11\tnews\tnewsworld\tT\tA\thttps://y\t[]\t[]\n"


def test_mind_impressions_clicks_and_history(tmp_path: Path) -> None:
    path = _write(tmp_path / "behaviors.tsv", BEHAVIORS)
    _write(tmp_path / "news.tsv", NEWS)
    events = list(read(path, "mind"))
    _assert_time_ordered(events)
    assert [e.event_id for e in events] == [
        "mind-3-1", "mind-3-2",  # 9:00 impression of U2
        "mind-3-1-click", "mind-3-1-click-view",  # its click, 1 s later, and the article it opened
        "mind-7-h0", "mind-7-h1",  # U1's history, just before the 14:14:46 impression
        "mind-7-1", "mind-7-2", "mind-7-3",
        "mind-9-1",  # same time, later line; U1 already seen: no history
        "mind-7-2-click", "mind-7-2-click-view",
    ]  # fmt: skip
    by_id = {e.event_id: e for e in events}
    shown = by_id["mind-7-2"]
    assert shown.event_type.value == "ad_impression"
    assert (shown.request_id, shown.ad_id, shown.position, shown.category) == ("mind-7", "N11", 2, "news")
    assert shown.context == {"subcategory": "newsworld"} and shown.campaign_id == "sub:newsworld"
    assert by_id["mind-7-3"].category is None  # N12 is not in news.tsv
    click = by_id["mind-7-2-click"]
    assert (click.event_type.value, click.ad_id, click.request_id) == ("ad_click", "N11", "mind-7")
    assert (click.ts - shown.ts).total_seconds() == 1
    history = [by_id["mind-7-h0"], by_id["mind-7-h1"]]
    assert [(h.event_type.value, h.item_id, h.category) for h in history] == [("page_view", "N1", None),
                                                                              ("page_view", "N2", None)]  # fmt: skip
    view = by_id["mind-7-2-click-view"]
    assert (view.event_type.value, view.item_id, view.category, view.ts) == ("page_view", "N11", "news", click.ts)
    assert history[0].ts < history[1].ts < shown.ts
    assert {e.source for e in events} == {"replay:mind"}


def test_mind_shared_subset_matches_readme() -> None:
    events = list(read(shared_data("mind", "behaviors.tsv"), "mind"))
    counts = Counter(e.event_type.value for e in events)
    assert counts["ad_impression"] == 149_984
    assert counts["ad_click"] == 6_053
    assert len({e.request_id for e in events if e.request_id}) == 4_032
    _assert_time_ordered(events)
    assert len({e.event_id for e in events}) == len(events)


# --- obd ----------------------------------------------------------------------------------------------

OBD_HEADER = (
    ",timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1,user_feature_2,"
    "user_feature_3,user-item_affinity_0,user-item_affinity_1\n"
)


def test_obd_impressions_propensities_and_clicks(tmp_path: Path) -> None:
    folder = tmp_path / "bts" / "men"
    path = _write(
        folder / "men.csv",
        OBD_HEADER
        + "0,2019-11-24 00:00:17.004101+00:00,1,2,1,0.25,a,b,c,d,0.0,3.0\n"
        + "1,2019-11-24 00:00:17.500000+00:00,0,1,0,0.5,a,b,c,e,0.0,0.0\n"
        + "2,2019-11-24 00:00:20.000000+00:00,1,3,0,0.125,a,b,c,d,0.0,3.0\n",
    )
    _write(folder / "item_context.csv", ",item_id,item_feature_0,item_feature_1\n0,0,0.1,hatA\n1,1,-0.2,hatB\n")
    events = list(read(path, "obd"))
    _assert_time_ordered(events)
    assert [e.event_id for e in events] == [
        "obd-bts-men-0", "obd-bts-men-1", "obd-bts-men-0-click", "obd-bts-men-2",
    ]  # fmt: skip
    first, second, click, third = events
    assert (first.event_type.value, first.ad_id, first.position, first.propensity) == ("ad_impression", "1", 2, 0.25)
    assert (first.category, first.model_version, first.slot_id) == ("hatB", "obd-bts", "zozotown-men")
    assert first.context["user_feature_3"] == "d" and first.context["user_item_affinity"] == 3.0
    assert first.user_id == third.user_id != second.user_id  # same four user features -> same user
    assert (click.event_type.value, click.ad_id, click.request_id) == ("ad_click", "1", first.request_id)
    assert (click.ts - first.ts).total_seconds() == 1


def test_obd_shared_sample() -> None:
    events = list(read(shared_data("obd", "random", "all", "all.csv"), "obd"))
    counts = Counter(e.event_type.value for e in events)
    assert counts["ad_impression"] == 10_000
    assert 0 < counts["ad_click"] < 100  # clicks are rare (~0.4%)
    assert all(e.propensity == 0.0125 for e in events)  # uniform random over 80 items
    _assert_time_ordered(events)


def test_obd_committed_slice_replays() -> None:
    root = Path(__file__).resolve().parents[2] / "data" / "obd"
    for policy in ("random", "bts"):
        events = list(read(root / policy / "all" / "all.csv", "obd"))
        assert sum(e.event_type.value == "ad_impression" for e in events) == 2_000
        assert all(e.category for e in events)  # every item has its row in item_context.csv


# --- jsonl --------------------------------------------------------------------------------------------


def test_jsonl_yields_events_and_keeps_invalid_lines_as_raw_bytes(tmp_path: Path) -> None:
    good = {"event_id": "e1", "schema_version": 1, "event_type": "search", "user_id": "u1", "ts": 1_700_000_000_000}
    lines = [
        json.dumps(good),
        "",  # blank: not an event
        "{not json",
        json.dumps({**good, "event_id": "e2", "event_type": "teleport"}),
        json.dumps({**good, "event_id": "e3", "ts": "2023-11-14T22:13:20Z"}),
    ]
    path = _write(tmp_path / "events.jsonl", "\n".join(lines) + "\n")
    out = list(read(path, "jsonl"))
    assert [type(x).__name__ for x in out] == ["Event", "bytes", "bytes", "Event"]
    assert out[0].event_id == "e1" and out[3].event_id == "e3"
    assert out[1] == b"{not json"  # the original bytes, without the line break, for the dead-letter topic
    reasons = []
    for raw in out[1:3]:
        with pytest.raises(Exception) as caught:
            parse_event(raw)
        reasons.append(caught.value.reason)
    assert reasons == ["invalid_json", "unknown_event_type"]


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown replay format 'csv'"):
        read(tmp_path / "x", "csv")
