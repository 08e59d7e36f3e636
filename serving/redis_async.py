"""One pipelined Redis connection for the event loop: the request path's HMGET without blocking the loop.

redis-py's synchronous HMGET blocks the event loop until Redis answers (a profile of a busy worker
shows the loop waiting in `recv`), and redis.asyncio costs more CPU per read than
the read itself. This is the least that does the job: an `asyncio.Protocol` that writes commands packed
by hiredis and parses replies with hiredis' reader, answering futures in order (Redis replies in the
order it received the commands, so concurrent requests share the connection, pipelined).

Credentials come from the URL as for redis-py: `redis://user:password@host:port/db` sends AUTH, and
`rediss://` connects over TLS (query options as redis-py's: `ssl_ca_certs=<CA file>`,
`ssl_cert_reqs=none` to skip verification, e.g. a self-signed local Redis).

Errors are redis-py's types, so callers treat both clients alike: `redis.TimeoutError` when a reply
takes longer than `timeout_s` (the reply still arrives later and is dropped, the connection stays in
step), `redis.ConnectionError` when Redis cannot be reached or the connection drops, and its subclass
`redis.BusyLoadingError` for a `LOADING` reply (a restarted Redis still reading its data: down, as
redis-py's own client says).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from typing import Any

import hiredis
import redis
from redis.connection import parse_url

MAX_PENDING = 10_000  # replies awaited at once: beyond it Redis is not keeping up, answer "slow" at once


class _Replies(asyncio.Protocol):
    """Feeds bytes to hiredis and hands each parsed reply to the oldest waiting future."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()  # made by create_connection, in the loop it serves
        self.reader = hiredis.Reader(replyError=redis.ResponseError)
        self.waiting: deque[asyncio.Future] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.waiting.popleft()
            if not future.done():  # done: timed out, its reply is dropped
                if isinstance(reply, redis.ResponseError):
                    text = str(reply)
                    if text.startswith(("NOAUTH", "WRONGPASS")):  # credentials missing: a connection problem
                        reply = redis.AuthenticationError(text)
                    elif text.startswith("LOADING"):  # still loading its data: down for now (the breaker opens)
                        reply = redis.BusyLoadingError(text)
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = redis.ConnectionError(f"Redis connection lost: {exc or 'closed'}")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.lost)


class AsyncRedis:
    """`await client.execute("HMGET", key, *fields)`; connects on first use in the running loop, and again
    after a drop (or when called from another loop, as tests' clients do)."""

    def __init__(self, url: str, *, timeout_s: float):
        options = parse_url(url)
        self.host = options.get("host", "127.0.0.1")
        self.port = int(options.get("port", 6379))
        self.db = int(options.get("db", 0))
        self.username, self.password = options.get("username"), options.get("password")
        self.tls = tls_context(options)
        self.timeout_s = timeout_s
        self._replies: _Replies | None = None
        self._connecting: asyncio.Task | None = None

    async def execute(self, *args: Any) -> Any:
        replies = self._replies
        if replies is None or replies.lost is not None or replies.loop is not asyncio.get_running_loop():
            replies = await self._connect()
        return await self._send(replies, args)

    def close(self) -> None:
        replies, self._replies = self._replies, None
        if replies is not None and replies.transport is not None and not replies.transport.is_closing():
            with contextlib.suppress(RuntimeError):  # its loop has ended (another asyncio.run): nothing to close
                replies.transport.close()

    async def _send(self, replies: _Replies, args: tuple) -> Any:
        if len(replies.waiting) >= MAX_PENDING:
            raise redis.TimeoutError(f"{MAX_PENDING} Redis replies pending")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        replies.waiting.append(future)
        replies.transport.write(hiredis.pack_command(args))  # type: ignore[union-attr]
        timer = loop.call_later(self.timeout_s, _expire, future, self.timeout_s)
        try:
            return await future
        finally:
            timer.cancel()

    async def _connect(self) -> _Replies:
        """One connect for all the requests that arrive while it is under way."""
        loop = asyncio.get_running_loop()
        if self._connecting is None or self._connecting.get_loop() is not loop:
            self._connecting = loop.create_task(self._open(loop))
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Replies:
        self.close()
        try:
            tls = {"ssl": self.tls, "server_hostname": self.host} if self.tls is not None else {}
            _, replies = await asyncio.wait_for(
                loop.create_connection(_Replies, self.host, self.port, **tls), timeout=self.timeout_s
            )
        except OSError as error:  # TimeoutError and ssl.SSLError included
            raise redis.ConnectionError(f"cannot reach Redis at {self.host}:{self.port}: {error!r}") from error
        try:
            if self.password:
                auth = (self.username, self.password) if self.username else (self.password,)
                await self._send(replies, ("AUTH", *auth))
            if self.db:
                await self._send(replies, ("SELECT", self.db))
        except (redis.ResponseError, redis.AuthenticationError) as error:  # WRONGPASS, NOAUTH: a connection failure
            replies.transport.close()  # type: ignore[union-attr]
            raise redis.AuthenticationError(f"Redis at {self.host}:{self.port} refused: {error}") from None
        self._replies = replies
        return replies


def tls_context(options: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS context of a `rediss://` URL's options (redis.connection.parse_url), None for plain TCP."""
    if options.get("connection_class") is not redis.SSLConnection:
        return None
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if str(options.get("ssl_cert_reqs", "required")).lower() in ("none", "optional"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _expire(future: asyncio.Future, timeout_s: float, recheck: bool = True) -> None:
    """Fail a reply still missing at its deadline. Timers run before the loop reads its sockets, so on a
    busy loop a reply that came in time may still be unread: look once more 1 ms later (a timer not due
    in this pass, so the loop polls its sockets first)."""
    if future.done():
        return
    if recheck:
        asyncio.get_running_loop().call_later(0.001, _expire, future, timeout_s, False)
    else:
        future.set_exception(redis.TimeoutError(f"no Redis reply within {timeout_s * 1000:.0f} ms"))
