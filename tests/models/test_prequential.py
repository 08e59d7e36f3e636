"""A click is never visible in the features of its own impression (score first, then reveal)."""

import numpy as np
import pandas as pd

from features.aggregates import UserState, apply_user, user_features
from models.mind import Impression, Replay, impression_frame, read_behaviors
from streaming.events import EventType
from streaming.replay import mind as replay_mind
from tests.support.stack import shared_data

T0 = 1_700_000_000_000
NEWS = {"A": ("sports", "golf"), "B": ("news", "politics")}


def test_own_click_is_invisible_then_visible():
    frame = Replay(NEWS).run([
        Impression("r1", "U1", T0, ["B"], ["A", "B"], [1, 0]),
        Impression("r2", "U1", T0 + 60_000, [], ["A"], [0]),
    ])  # fmt: skip
    first = frame[(frame.request_id == "r1") & (frame.ad_id == "A")].iloc[0]
    assert first.ad_clicks_7d == 0 and first.ad_impressions_7d == 0
    assert first.clicks_total == 0 and first.ad_click_7d == 0
    assert "A" not in first.freq_ad_ids and "A" not in first.recent_items
    assert first.recent_items == ["B"]  # the history, folded in before the first impression
    later = frame[frame.request_id == "r2"].iloc[0]
    assert later.ad_clicks_7d == 1 and later.ad_impressions_7d == 1
    assert later.clicks_total == 1 and later.freq_ad_clicks_24h[later.freq_ad_ids.index("A")] == 1


def test_same_timestamp_impressions_do_not_see_each_other_and_clicks_come_a_second_later():
    frame = Replay(NEWS).run([
        Impression("r1", "U1", T0, [], ["A"], [1]),
        Impression("r2", "U2", T0, [], ["A"], [0]),
        Impression("r3", "U3", T0 + 1, [], ["A"], [0]),
        Impression("r4", "U3", T0 + 1000, [], ["A"], [0]),
    ])  # fmt: skip
    impressions = frame.set_index("request_id").ad_impressions_7d.to_dict()
    assert impressions == {"r1": 0, "r2": 0, "r3": 2, "r4": 3}
    clicks = frame.set_index("request_id").ad_clicks_7d.to_dict()
    assert clicks == {"r1": 0, "r2": 0, "r3": 0, "r4": 1}  # r1's click is sent 1 s after it (streaming.replay.mind)


def test_training_features_are_those_the_kafka_replay_builds(tmp_path):
    """No training/serving skew: the events `adloop replay --format mind` sends, folded by the consumer's own
    aggregates, give every request exactly the user features `models.mind.Replay` trains and evaluates on."""
    source = shared_data("mind")
    lines = (source / "behaviors.tsv").read_text().splitlines(keepends=True)[:1500]
    (tmp_path / "behaviors.tsv").write_text("".join(lines))
    (tmp_path / "news.tsv").symlink_to(source / "news.tsv")
    frame = impression_frame(tmp_path)
    trained = frame[frame.position == 1].set_index("request_id")
    states: dict[str, UserState] = {}
    served = {}
    for event in replay_mind.read(tmp_path / "behaviors.tsv"):
        if event.event_type == EventType.ad_impression and event.position == 1:  # the request, before its events
            served[event.request_id.removeprefix("mind-")] = user_features(states.get(event.user_id) or UserState())
        states[event.user_id] = apply_user(states.get(event.user_id) or UserState(), event)
    assert len(served) == len(trained) == 1500
    for request_id, features in served.items():
        row = trained.loc[request_id]
        assert {name: _plain(row[name]) for name in features} == features, request_id


def test_mind_features_count_only_strictly_earlier_clicks():
    path = shared_data("mind")
    frame = impression_frame(path, limit=400)
    assert len(frame) == sum(len(imp.ad_ids) for imp in read_behaviors(path / "behaviors.tsv", 400))
    assert frame["ts"].is_monotonic_increasing
    # per ad, the clicks the features show are exactly its clicks in strictly earlier requests
    earlier = frame.groupby(["ad_id", "ts"]).label.sum().groupby(level=0).cumsum()
    earlier = earlier.groupby(level=0).shift(fill_value=0)
    seen = pd.Series(earlier.to_numpy(), index=pd.MultiIndex.from_tuples(earlier.index))
    before = seen.reindex(pd.MultiIndex.from_arrays([frame.ad_id, frame.ts])).to_numpy()
    np.testing.assert_array_equal(frame["ad_clicks_7d"].to_numpy(), before)  # all inside 7 d: every one counted


def _plain(value):
    """A frame cell as the plain value `user_features` gives (lists, Python numbers)."""
    if isinstance(value, list | np.ndarray):
        return list(value)
    return value.item() if isinstance(value, np.generic) else value
