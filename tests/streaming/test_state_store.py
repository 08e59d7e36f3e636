"""A batch's transaction applies at most once, even when the reply of its EXEC is lost (real Redis)."""

from __future__ import annotations

import socket
import threading
import uuid

import pytest
import redis

from adloop.settings import Settings
from features.aggregates import UserState
from streaming.state_store import StaleWrite, StateStore

pytestmark = pytest.mark.integration


class ReplyDropper:
    """A loopback proxy to Redis that, once, forwards an EXEC and closes the client's socket instead of
    answering: the transaction applied, the client never heard so."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        with client, upstream:
            while request := client.recv(1 << 20):
                upstream.sendall(request)
                reply = upstream.recv(1 << 20)
                if b"EXEC" in request and not self.dropped:
                    self.dropped += 1
                    return  # closes the client's socket: the reply is lost
                client.sendall(reply)

    def close(self) -> None:
        self.listener.close()


def test_a_lost_exec_reply_is_not_applied_twice(feature_settings: Settings) -> None:
    direct = redis.Redis.from_url(feature_settings.redis_url)
    pool = direct.connection_pool.connection_kwargs
    proxy = ReplyDropper((pool["host"], pool["port"]))
    try:
        # a client with redis-py's default retries, as `adloop consume` builds it
        client = redis.Redis(host="127.0.0.1", port=proxy.port, db=pool["db"])
        store = StateStore(client, group=f"g-{uuid.uuid4().hex[:6]}", topic="t")
        # the lost reply surfaces as a WATCH error; the check that follows finds the batch's own offset
        # stored, so it is not written again and the consumer reads on from that offset
        with pytest.raises(StaleWrite, match="expected None, stored 41"):
            store.commit_batch(states={}, seen_ids=[], ad_increments={"ad-1": {"h:1:0": 1}}, ad_last={},
                               offsets={0: 41}, expected={}, online=lambda pipe: None)  # fmt: skip
        assert proxy.dropped == 1
        assert direct.hget("adloop:ad:ad-1", "h:1:0") == b"1"  # applied once, not retried
        assert store.applied_offsets() == {0: 41}  # what a restarted consumer reads: the batch is in
    finally:
        proxy.close()
        direct.delete("adloop:ad:ad-1")


def _commit(store: StateStore, *, user_state: int, offsets: dict[int, int], expected: dict[int, int | None]) -> None:
    state = UserState(last_ts=user_state)
    store.commit_batch(states={"u1": state}, seen_ids=[], ad_increments={}, ad_last={}, offsets=offsets,
                       expected=expected, online=lambda pipe: None)  # fmt: skip


def test_a_batch_computed_before_another_consumer_wrote_is_refused(feature_settings: Settings) -> None:
    from prometheus_client import REGISTRY

    client = redis.Redis.from_url(feature_settings.redis_url)
    old_owner = StateStore(client, group="g", topic="t")
    new_owner = StateStore(client, group="g", topic="t")
    _commit(old_owner, user_state=1, offsets={0: 9, 1: 4}, expected={})
    # the old owner reads partition 0 at offset 9 and stalls; the new owner applies 10..19 meanwhile
    _commit(new_owner, user_state=2, offsets={0: 19}, expected={0: 9})
    refused = REGISTRY.get_sample_value("adloop_consumer_stale_writes_total") or 0
    with pytest.raises(StaleWrite, match="partition 0: expected 9, stored 19"):
        _commit(old_owner, user_state=3, offsets={0: 14}, expected={0: 9})
    assert REGISTRY.get_sample_value("adloop_consumer_stale_writes_total") == refused + 1
    assert old_owner.applied_offsets() == {0: 19, 1: 4}  # no offset moved backwards
    assert old_owner.user_states(["u1"])["u1"].last_ts == 2  # the successor's state is kept
    _commit(old_owner, user_state=4, offsets={1: 8}, expected={1: 4})  # another partition, still its own: applies
    assert old_owner.applied_offsets() == {0: 19, 1: 8}


def test_offsets_only_move_forwards_and_reset_forgets_them(feature_settings: Settings) -> None:
    store = StateStore(redis.Redis.from_url(feature_settings.redis_url), group="g", topic="t")
    _commit(store, user_state=1, offsets={0: 30}, expected={})
    _commit(store, user_state=1, offsets={0: 12}, expected={0: 30})  # a batch of replayed records only
    assert store.applied_offsets() == {0: 30}
    assert store.reset_offsets() == {0: 30} and store.applied_offsets() == {}
