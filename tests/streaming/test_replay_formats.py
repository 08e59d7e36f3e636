"""Each replay format on a tiny file written here in the real format, then on the shared data when present."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from streaming.events import Event, parse_event
from streaming.replay import ReplayFormatError, read
from streaming.replay.globo import HEADER as GLOBO_HEADER
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
    assert all(re.fullmatch(r"taobao-[0-9a-f]{20}", e.event_id) for e in events)
    assert len({e.event_id for e in events}) == 4
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
    row = {
        e.request_id.removeprefix("mind-"): e.event_id.rsplit("-", 1)[0]
        for e in events
        if e.position == 1 and e.event_type.value == "ad_impression"
    }
    u1_history = [e.event_id for e in events if e.event_id.endswith("-h")]
    assert [e.event_id for e in events] == [
        f"{row['3']}-1", f"{row['3']}-2",  # 9:00 impression of U2
        f"{row['3']}-1-click", f"{row['3']}-1-click-view",  # its click, 1 s later, and the article it opened
        *u1_history,  # U1's history, just before the 14:14:46 impression
        f"{row['7']}-1", f"{row['7']}-2", f"{row['7']}-3",
        f"{row['9']}-1",  # same time, later line; U1 already seen: no history
        f"{row['7']}-2-click", f"{row['7']}-2-click-view",
    ]  # fmt: skip
    assert len(u1_history) == 2 and len(set(row.values())) == 3
    assert all(re.fullmatch(r"mind-[0-9a-f]{20}", r) for r in row.values())
    by_id = {e.event_id: e for e in events}
    shown = by_id[f"{row['7']}-2"]
    assert shown.event_type.value == "ad_impression"
    assert (shown.request_id, shown.ad_id, shown.position, shown.category) == ("mind-7", "N11", 2, "news")
    assert shown.context == {"subcategory": "newsworld"} and shown.campaign_id == "sub:newsworld"
    assert by_id[f"{row['7']}-3"].category is None  # N12 is not in news.tsv
    click = by_id[f"{row['7']}-2-click"]
    assert (click.event_type.value, click.ad_id, click.request_id) == ("ad_click", "N11", "mind-7")
    assert (click.ts - shown.ts).total_seconds() == 1
    history = [by_id[i] for i in u1_history]
    assert [(h.event_type.value, h.item_id, h.category) for h in history] == [("page_view", "N1", None),
                                                                              ("page_view", "N2", None)]  # fmt: skip
    view = by_id[f"{row['7']}-2-click-view"]
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
    first, second, click, third = events
    assert [e.event_type.value for e in events] == ["ad_impression", "ad_impression", "ad_click", "ad_impression"]
    assert click.event_id == f"{first.event_id}-click" and first.request_id == first.event_id
    assert len({first.event_id, second.event_id, third.event_id}) == 3
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


# --- identity: from the record's content and source, never its line number or path ---------------------


def _taobao_lines(n: int) -> list[str]:
    return [f"{i % 7},{100 + i % 13},{i % 3},{('pv', 'cart', 'fav', 'buy')[i % 4]},{1511658000 + i}" for i in range(n)]


def _mind_lines(n: int) -> list[str]:
    return [f"{i + 1}\tU{i % 4}\t11/12/2019 {1 + i % 11}:{i % 60:02d}:00 PM\tN1 N{2 + i % 4}\tN{10 + i}-{i % 2} N9-0"
            for i in range(n)]  # fmt: skip


def _obd_lines(n: int) -> list[str]:
    return [f"{i},2019-11-24 00:{i // 60:02d}:{i % 60:02d}.000000+00:00,{i % 2},{1 + i % 3},{i % 5 // 4},0.5,"
            f"a,b,{i % 3},d,0.0,1.0" for i in range(n)]  # fmt: skip


def _jsonl_lines(n: int) -> list[str]:
    return [json.dumps({"event_id": f"mine-{i}", "schema_version": 1, "event_type": "search", "user_id": f"u{i % 3}",
                        "ts": 1_700_000_000_000 + i}) for i in range(n)]  # fmt: skip


def _globo_lines(n: int) -> list[str]:
    return [f"u{i % 5},s{i % 9},1507000000000,2,{100 + i},{1507000000000 + i * 1000},4,1,17,1,25,2" for i in range(n)]


FILES = {  # format -> (file name under a folder, header line or None, n lines -> data lines)
    "taobao": ("ub.csv", None, _taobao_lines),
    "mind": ("behaviors.tsv", None, _mind_lines),
    "obd": ("men.csv", OBD_HEADER.rstrip("\n"), _obd_lines),
    "jsonl": ("events.jsonl", None, _jsonl_lines),
    "globo": ("clicks.csv", ",".join(GLOBO_HEADER), _globo_lines),
}


def _replay_ids(folder: Path, format: str, lines: list[str]) -> list[str]:
    name, header, _ = FILES[format]
    path = _write(folder / "bts" / name.removesuffix(".csv") / name if format == "obd" else folder / name,
                  "\n".join(([header] if header else []) + lines) + "\n")  # fmt: skip
    return [e.event_id for e in read(path, format)]


@pytest.mark.parametrize("format", sorted(FILES))
def test_replay_ids_come_from_the_records_content(tmp_path: Path, format: str) -> None:
    lines = FILES[format][2](40)
    first, last = lines[:20], lines[20:]
    whole = _replay_ids(tmp_path / "whole", format, lines)
    again = _replay_ids(tmp_path / "elsewhere" / "copy", format, lines)  # the same file under another path
    head = _replay_ids(tmp_path / "head", format, first)
    tail = _replay_ids(tmp_path / "tail", format, last)  # its records now start at line 1
    assert len(set(whole)) == len(whole)  # distinct records, distinct ids
    assert again == whole  # the same file twice: the same ids, so it applies once
    common = set(head) & set(tail)  # two different files: no id in common, so both apply...
    assert common == ({i for i in head if i.endswith("-h")} if format == "mind" else set())  # ...but MIND's
    # history: its users' clicks before the data window, repeated by every row, are the same records in both
    assert set(head) | set(tail) == set(whole)  # a record's id does not depend on its line or neighbours


def test_a_repeated_taobao_line_is_two_events_with_stable_ids(tmp_path: Path) -> None:
    line = "1,100,7,pv,1511658000"
    ids = _replay_ids(tmp_path / "a", "taobao", [line, "2,100,7,pv,1511658000", line])
    assert len(set(ids)) == 3  # a user viewing an item twice in one second: two events
    assert _replay_ids(tmp_path / "b", "taobao", [line, line]) == [ids[0], ids[2]]


def test_mind_history_applies_once_across_files(tmp_path: Path) -> None:
    rows = _mind_lines(8)

    def history_of(folder: str, row: str) -> list[Event]:
        return [
            e
            for e in read(_write(tmp_path / folder / "behaviors.tsv", row + "\n"), "mind")
            if e.event_id.endswith("-h")
        ]

    history, again = history_of("a", rows[0]), history_of("b", rows[4])
    assert len(history) == 2 and [e.user_id for e in history] == [e.user_id for e in again] == ["U0", "U0"]
    assert [e.event_id for e in history] == [e.event_id for e in again]  # U0's history in both files: once


def test_jsonl_keeps_the_users_own_ids(tmp_path: Path) -> None:
    assert _replay_ids(tmp_path, "jsonl", _jsonl_lines(3)) == ["mine-0", "mine-1", "mine-2"]
