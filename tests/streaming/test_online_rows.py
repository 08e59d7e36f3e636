"""Partial writes of online user rows: only the changed fields, and only over a row this process wrote."""

from __future__ import annotations

from typing import Any

from features.online import FeastLayout, ViewLayout, encode_timestamp
from streaming.online_rows import OnlineRows

VIEW = ViewLayout(
    name="v", join_key="user_id", features=("n", "items", "score"), kinds=("Int64", "Array(String)", "Float64"),
    fields=(b"F-n", b"F-items", b"F-score"), ts_field=b"_ts:v", key_prefix=b"k:",
)  # fmt: skip
LAYOUT = FeastLayout("p", {"v": VIEW})


class Pipe:
    """Records the HSETs queued on it, as {key: {field: value}}."""

    def __init__(self) -> None:
        self.hsets: list[tuple[bytes, dict[bytes, bytes]]] = []

    def execute_command(self, name: str, key: bytes, *args: Any) -> None:
        assert name == "HSET"
        self.hsets.append((key, dict(zip(args[::2], args[1::2], strict=True))))


def write(rows: OnlineRows, row: dict[str, Any], *, ts: int, loaded: int | None, stored: int) -> dict[bytes, bytes]:
    pipe = Pipe()
    rows.queue(pipe, [("u", ts, row)], {} if loaded is None else {"u": loaded})
    rows.committed({"u": stored})
    [(key, fields)] = pipe.hsets
    assert key == LAYOUT.key("v", "u")
    return fields


def test_only_changed_fields_are_written_over_a_remembered_row() -> None:
    rows = OnlineRows(LAYOUT, "v")
    first = {"n": 1, "items": ["a"], "score": 0.5}
    assert write(rows, first, ts=1000, loaded=None, stored=11) == LAYOUT.encode("v", 1000, first)

    second = {"n": 2, "items": ["a"], "score": 0.5}
    assert write(rows, second, ts=2000, loaded=11, stored=12) == {
        b"_ts:v": encode_timestamp(2000),
        b"F-n": LAYOUT.encode("v", 0, second)[b"F-n"],
    }
    # Nothing but the time changed: the timestamp alone.
    assert write(rows, second, ts=3000, loaded=12, stored=13) == {b"_ts:v": encode_timestamp(3000)}
    # A list that grows, a value set to None (an empty Value): written.
    third = {"n": 2, "items": ["a", "b"], "score": None}
    assert set(write(rows, third, ts=3000, loaded=13, stored=14)) == {b"_ts:v", b"F-items", b"F-score"}


def test_a_row_over_a_state_this_process_did_not_write_is_written_whole() -> None:
    rows = OnlineRows(LAYOUT, "v")
    row = {"n": 1, "items": ["a"], "score": 0.5}
    full = LAYOUT.encode("v", 1000, row)
    write(rows, row, ts=1000, loaded=None, stored=11)
    assert write(rows, row, ts=1000, loaded=99, stored=12) == full  # someone else wrote the state since
    assert write(rows, row, ts=1000, loaded=None, stored=13) == full  # the state was deleted since

    # A transaction that failed: the consumer forgets everything; the next write is whole.
    pipe = Pipe()
    rows.queue(pipe, [("u", 1000, row)], {"u": 13})
    assert pipe.hsets[0][1] == {b"_ts:v": encode_timestamp(1000)}
    rows.forget()
    assert write(rows, row, ts=1000, loaded=13, stored=14) == full


def test_the_least_recently_written_rows_are_forgotten_first() -> None:
    rows = OnlineRows(LAYOUT, "v", capacity=2)
    row = {"n": 1, "items": [], "score": 1.0}
    for user, fingerprint in (("a", 1), ("b", 2), ("a", 3), ("c", 4)):
        rows.queue(Pipe(), [(user, 1, row)], {})
        rows.committed({user: fingerprint})
    pipe = Pipe()
    rows.queue(pipe, [("a", 1, row), ("b", 1, row), ("c", 1, row)], {"a": 3, "b": 2, "c": 4})
    assert [len(fields) for _, fields in pipe.hsets] == [1, 4, 1]  # b, written least recently, was evicted
