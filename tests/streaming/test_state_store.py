"""A batch's transaction applies at most once, even when the reply of its EXEC is lost (real Redis)."""

from __future__ import annotations

import socket
import threading
import uuid

import pytest
import redis

from adloop.settings import Settings
from streaming.state_store import StateStore

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
        with pytest.raises(redis.ConnectionError):
            store.commit_batch(states={}, seen_ids=[], ad_increments={"ad-1": {"h:1:0": 1}}, ad_last={},
                               offsets={0: 41}, online=lambda pipe: None)  # fmt: skip
        assert proxy.dropped == 1
        assert direct.hget("adloop:ad:ad-1", "h:1:0") == b"1"  # applied once, not retried
        assert store.applied_offsets() == {0: 41}  # what a restarted consumer reads: the batch is in
    finally:
        proxy.close()
        direct.delete("adloop:ad:ad-1")
