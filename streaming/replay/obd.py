"""Open Bandit Dataset (ZOZO, CC BY 4.0): `<policy>/<campaign>/<campaign>.csv` with `item_context.csv` beside it.

Each row is one item a logging policy showed in one of three slots of a ZOZOTOWN page:
- one `ad_impression`: `ad_id` = `item_id`, `position` (1-3), `propensity` = `propensity_score`
  (the probability the logging policy chose this item: what off-policy estimators weight by),
  `model_version` = `obd-<policy>`, `slot_id` = `zozotown-<campaign>`, `request_id` = the event id;
- an `ad_click` 1 s later when `click` = 1 (the data set has no click times).
OBD has no user id: users are described by four hashed features. The user id here is
`obd-` + 16 hex digits of the SHA-1 of those four values (the same features -> the same "user",
~240 in a 10,000-row file); the features themselves go to `context` with the user-item affinity
of the shown item. `category` is the item's hashed `item_feature_1` from item_context.csv
(the data set does not say which category level it is). Event ids are `obd-<digest>` of the
row's line with its policy and campaign (`RecordIds`; the same row read again is the same
impression, whatever the file's path or the row's line number), `-click` for clicks.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

from streaming.events import SCHEMA_VERSION, Event, EventType
from streaming.replay import RecordIds, ReplayFormatError, in_time_order

SOURCE = "replay:obd"
POLICIES = ("random", "bts")
USER_FEATURES = [f"user_feature_{i}" for i in range(4)]
CLICK_DELAY = timedelta(seconds=1)


def read(path: Path) -> Iterator[Event]:
    """The rows of one OBD campaign file as impressions and clicks, in time order."""
    return in_time_order(_groups(path))


def read_item_categories(path: Path) -> dict[str, str]:
    """item_id -> hashed category, from item_context.csv; empty when the file is absent."""
    if not path.exists():
        return {}
    with open(path, encoding="utf-8", newline="") as file:
        return {row["item_id"]: row["item_feature_1"] for row in csv.DictReader(file)}


def _groups(path: Path) -> Iterator[tuple[list[Event], list[Event]]]:
    categories = read_item_categories(path.with_name("item_context.csv"))
    policy, campaign = _policy_and_campaign(path)
    ids = RecordIds("obd", scope=f"{policy}\x00{campaign}".encode())
    with open(path, encoding="utf-8", newline="") as file:
        for line, row in enumerate(csv.DictReader(file), start=2):
            try:
                impression = _impression(row, ids.of(_content(row)), policy, campaign, categories)
                clicked = row["click"] == "1"
            except (KeyError, ValueError) as error:
                raise ReplayFormatError(path, line, f"not an Open Bandit Dataset row: {error}") from error
            later = [_click(impression)] if clicked else []
            yield [impression], later


def _content(row: dict[str, str]) -> bytes:
    """The row's fields, named: the same row in any file with these columns gives the same bytes."""
    return "\x00".join(f"{name}\x01{value}" for name, value in row.items()).encode()


def _impression(row: dict[str, str], event_id: str, policy: str, campaign: str, categories: dict[str, str]) -> Event:
    item_id = row["item_id"]
    users = [row[name] for name in USER_FEATURES]
    context: dict[str, str | float] = dict(zip(USER_FEATURES, users, strict=True))
    affinity = row.get(f"user-item_affinity_{item_id}")
    if affinity is not None:
        context["user_item_affinity"] = float(affinity)
    context.update(policy=policy, campaign=campaign)
    return Event(
        event_id=event_id,
        schema_version=SCHEMA_VERSION,
        event_type=EventType.ad_impression,
        user_id="obd-" + hashlib.sha1("|".join(users).encode()).hexdigest()[:16],
        ts=datetime.fromisoformat(row["timestamp"]),
        ad_id=item_id,
        item_id=item_id,
        category=categories.get(item_id),
        request_id=event_id,
        slot_id=f"zozotown-{campaign}",
        position=int(row["position"]),
        propensity=float(row["propensity_score"]),
        model_version=f"obd-{policy}",
        source=SOURCE,
        context=context,
    )


def _click(impression: Event) -> Event:
    return impression.model_copy(
        update={
            "event_id": f"{impression.event_id}-click",
            "event_type": EventType.ad_click,
            "ts": impression.ts + CLICK_DELAY,
        }
    )


def _policy_and_campaign(path: Path) -> tuple[str, str]:
    """(`random` | `bts` | `log`, campaign) from the obp layout `<policy>/<campaign>/<campaign>.csv`."""
    policy = path.parent.parent.name
    return (policy if policy in POLICIES else "log"), path.stem
