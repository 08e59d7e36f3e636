"""Microsoft MIND: `behaviors.tsv` impressions (and `news.tsv` beside it, when present).

Each impression row `impression_id, user_id, time, history, impressions` is one ad-slot request.
Its events' ids start with the row's id, `mind-<digest of the row's line>` (`RecordIds`: the same
row in another file is the same request, a different row is another one), then the event's role:
- `request_id` = `mind-<impression_id>` (what models.mind joins on); one `ad_impression` per
  candidate (`ad_id` = news id, `position` = its index + 1, `category` / `subcategory` from
  news.tsv when the article is there), ids `<row id>-<position>`;
- an `ad_click` for each clicked candidate, 1 s after the impression (MIND has no click times),
  ids `<row id>-<position>-click`, followed by a `page_view` of the article (the click opens it),
  ids `...-click-view`;
- the first time a user is seen, their `history` (news they clicked before the data window)
  becomes `page_view` events of those articles (with their category), 1 ms apart and ending
  1 ms before the impression. Page views, not ad clicks: they give the user's reading interests
  to the features without counting as clicks on ads, and they come only once per user because
  MIND repeats the whole history on every impression row. Their ids come from the user, the
  index in the history and the article (`mind-<digest>-h`), not from the row: a user's history
  replayed from a second file is the same history and applies once.
MIND has no campaigns: `campaign_id` = `sub:<subcategory>` where news.tsv has the article.
These are the very events `models.mind.Replay` folds for training and evaluation, so a model
trained there sees the features this replay builds through the consumer (tests/models prove it).
`time` (`11/12/2019 2:14:46 PM`) carries no zone; it is read as UTC. Rows are sorted by time
(ties by file order) before the replay, so the whole file is read first (MIND-small: ~157k rows).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from streaming.events import SCHEMA_VERSION, Event, EventType
from streaming.replay import RecordIds, ReplayFormatError, in_time_order

SOURCE = "replay:mind"
SLOT_ID = "mind-news"
CLICK_DELAY = timedelta(seconds=1)
HISTORY_STEP = timedelta(milliseconds=1)
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"


@dataclass(frozen=True)
class MindRow:
    """One line of behaviors.tsv."""

    line: int
    row_id: str  # `mind-<digest of the line>`: the prefix of its events' ids
    impression_id: str
    user_id: str
    ts: datetime
    history: list[str]
    candidates: list[tuple[str, bool]]  # (news id, clicked)


def read(path: Path) -> Iterator[Event]:
    """The impressions of `behaviors.tsv` as events, in time order."""
    news = read_news(path.with_name("news.tsv"))
    ids = RecordIds("mind")
    rows = sorted(read_rows(path), key=lambda row: (row.ts, row.line))
    seen_users: set[str] = set()
    last_ts = datetime.min.replace(tzinfo=UTC)

    def groups() -> Iterator[tuple[list[Event], list[Event]]]:
        nonlocal last_ts
        for row in rows:
            history = [] if row.user_id in seen_users else _history(row, news, ids, after=last_ts)
            seen_users.add(row.user_id)
            shown, clicked = _candidates(row, news)
            last_ts = row.ts
            yield history + shown, clicked

    return in_time_order(groups())


def read_news(path: Path) -> dict[str, tuple[str, str]]:
    """news id -> (category, subcategory), from `news.tsv`; empty when the file is absent."""
    if not path.exists():
        return {}
    with open(path, encoding="utf-8", newline="") as file:
        rows = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        return {row[0]: (row[1], row[2]) for row in rows if len(row) >= 3}


def read_rows(path: Path) -> Iterator[MindRow]:
    """The lines of behaviors.tsv in file order (`line` numbers from 1); `ReplayFormatError` on a bad one."""
    ids = RecordIds("mind")
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            text = line.rstrip("\r\n")
            fields = text.split("\t")
            if len(fields) != 5:
                raise ReplayFormatError(path, number, f"expected 5 tab-separated fields, got {len(fields)}")
            impression_id, user_id, time_text, history, impressions = fields
            try:
                ts = datetime.strptime(time_text, TIME_FORMAT).replace(tzinfo=UTC)
                candidates = [
                    (news_id, label == "1") for news_id, label in (c.rsplit("-", 1) for c in impressions.split())
                ]
            except ValueError as error:
                raise ReplayFormatError(path, number, f"unreadable time or impressions: {error}") from error
            row_id = ids.of(text.encode())
            yield MindRow(number, row_id, impression_id, user_id, ts, history.split(), candidates)


def _history(row: MindRow, news: dict[str, tuple[str, str]], ids: RecordIds, *, after: datetime) -> list[Event]:
    """Page views of the user's earlier clicks, just before the impression (never before `after`)."""
    n = len(row.history)
    return [
        Event(
            event_id=ids.plain("history", row.user_id, str(index), news_id) + "-h",
            schema_version=SCHEMA_VERSION,
            event_type=EventType.page_view,
            user_id=row.user_id,
            ts=max(after, row.ts - (n - index) * HISTORY_STEP),
            item_id=news_id,
            category=news.get(news_id, (None, None))[0],
            source=SOURCE,
        )
        for index, news_id in enumerate(row.history)
    ]


def _candidates(row: MindRow, news: dict[str, tuple[str, str]]) -> tuple[list[Event], list[Event]]:
    shown, clicked = [], []
    for index, (news_id, was_clicked) in enumerate(row.candidates):
        category, subcategory = news.get(news_id, (None, None))
        common = {
            "schema_version": SCHEMA_VERSION,
            "user_id": row.user_id,
            "ad_id": news_id,
            "item_id": news_id,
            "category": category,
            "campaign_id": f"sub:{subcategory}" if subcategory else None,
            "request_id": f"mind-{row.impression_id}",
            "slot_id": SLOT_ID,
            "position": index + 1,
            "source": SOURCE,
            "context": {"subcategory": subcategory} if subcategory else None,
        }
        event_id = f"{row.row_id}-{index + 1}"
        shown.append(Event(event_id=event_id, event_type=EventType.ad_impression, ts=row.ts, **common))
        if was_clicked:
            click_ts = row.ts + CLICK_DELAY
            clicked.append(Event(event_id=f"{event_id}-click", event_type=EventType.ad_click, ts=click_ts, **common))
            clicked.append(Event(event_id=f"{event_id}-click-view", schema_version=SCHEMA_VERSION,
                                 event_type=EventType.page_view, user_id=row.user_id, ts=click_ts, item_id=news_id,
                                 category=category, source=SOURCE))  # fmt: skip
    return shown, clicked
