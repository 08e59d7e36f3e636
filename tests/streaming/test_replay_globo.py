"""The `globo` replay format on a SYNTHETIC sample in the Globo clicks layout (made-up ids and codes)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from streaming.events import EventType, parse_event
from streaming.replay import ReplayFormatError, read
from streaming.replay.globo import HEADER

SAMPLE = Path(__file__).parent / "data" / "globo_clicks.SYNTHETIC.csv"


def test_clicks_become_page_views_with_session_and_context() -> None:
    events = list(read(SAMPLE, "globo"))
    assert len(events) == 7
    first = events[0]
    assert (first.event_type, first.user_id, first.item_id, first.session_id, first.ts_ms, first.source) == (
        EventType.page_view, "9001", "501", "1700000000001001", 1_700_000_005_000, "replay:globo")  # fmt: skip
    assert first.context == {"environment": 4, "deviceGroup": 1, "os": 17, "country": 1, "region": 25,
                             "referrer_type": 2}  # fmt: skip
    assert first.category is None and first.ad_id is None
    assert [e.ts_ms for e in events] == sorted(e.ts_ms for e in events)  # file order = time order
    assert all(parse_event(e.to_bytes()) == e for e in events)  # each is a valid contract message


def test_ids_come_from_the_content_not_the_line_number(tmp_path: Path) -> None:
    ids = [e.event_id for e in read(SAMPLE, "globo")]
    assert len(set(ids)) == len(ids) and all(i.startswith("globo-") for i in ids)
    assert [e.event_id for e in read(SAMPLE, "globo")] == ids  # the same ids on a second replay
    lines = SAMPLE.read_text().splitlines()
    shifted = tmp_path / "later.csv"  # an export that starts two clicks later: the shared clicks keep their ids
    shifted.write_text("\n".join([lines[0], *lines[3:]]) + "\n")
    assert [e.event_id for e in read(shifted, "globo")] == ids[2:]
    crlf = tmp_path / "crlf.csv"
    crlf.write_bytes(SAMPLE.read_bytes().replace(b"\n", b"\r\n"))
    assert [e.event_id for e in read(crlf, "globo")] == ids  # the line break is not part of the record


def test_gzip_and_plain_read_alike(tmp_path: Path) -> None:
    packed = tmp_path / "clicks.csv.gz"
    with open(SAMPLE, "rb") as source, gzip.open(packed, "wb") as target:
        shutil.copyfileobj(source, target)
    assert list(read(packed, "globo")) == list(read(SAMPLE, "globo"))


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        ("9001,1,2,3,501", "expected 12 comma-separated fields, got 5"),
        ("9001,1,2,3,501,soon,4,1,17,1,25,2", "must be integers"),
        ("9001,1,2,3,501,1700000005000,4,1,17,1,25,x", "must be integers"),
        (",1,2,3,501,1700000005000,4,1,17,1,25,2", "must not be empty"),
    ],
)
def test_a_bad_line_stops_with_its_line_number(tmp_path: Path, line: str, detail: str) -> None:
    path = tmp_path / "bad.csv"
    good = SAMPLE.read_text().splitlines()[1]
    path.write_text("\n".join([",".join(HEADER), good, line]) + "\n")
    with pytest.raises(ReplayFormatError, match=detail) as caught:
        list(read(path, "globo"))
    assert caught.value.line == 3


def test_a_file_without_the_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "noheader.csv"
    path.write_text("\n".join(SAMPLE.read_text().splitlines()[1:]) + "\n")
    with pytest.raises(ReplayFormatError, match="expected the header") as caught:
        list(read(path, "globo"))
    assert caught.value.line == 1
