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

On Redis Cluster (`async_redis_client` picks by the settings, as features.redis_client does) the
same connection serves each node: `AsyncRedisCluster` sends a command to the node owning its key's
slot (`redis.crc.key_slot`, the node map from `CLUSTER SLOTS`), one pipelined connection per node.
A `MOVED` reply (a slot moved by resharding or a failover) is followed once at once, that slot is
remapped and the whole map re-read in the background; `ASK` (a slot being migrated) is followed once
with `ASKING`, the map unchanged; a connection error re-reads the map before the next command (a
failed master's replica may have taken over). Its errors are redis-py's cluster types as well:
`redis.exceptions.ClusterDownError` (`CLUSTERDOWN`, or a slot no node serves), `MovedError`, `AskError`.
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
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError

from adloop.settings import Settings
from features.redis_client import cluster_nodes, is_cluster

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
                    elif text.startswith(("MOVED ", "ASK ")):  # a cluster's redirects, typed as redis-py types them
                        kind, _, where = text.partition(" ")
                        reply = (MovedError if kind == "MOVED" else AskError)(where)
                    elif text.startswith("CLUSTERDOWN"):
                        reply = ClusterDownError(text)
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

    def __init__(self, url: str, *, timeout_s: float, host: str | None = None, port: int | None = None):
        """`host` and `port` override the URL's (a cluster's nodes share its credentials and TLS)."""
        options = parse_url(url)
        self.host = host or options.get("host", "127.0.0.1")
        self.port = int(port or options.get("port", 6379))
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

    async def execute_asking(self, *args: Any) -> Any:
        """`ASKING` then the command, back to back on the connection (an `ASK` redirect: ASKING lets only the
        next command of this connection into a slot being imported)."""
        replies = self._replies
        if replies is None or replies.lost is not None or replies.loop is not asyncio.get_running_loop():
            replies = await self._connect()
        asking = self._queue(replies, ("ASKING",))
        asking.add_done_callback(_consume)  # its "OK" (or error) matters only through the command's reply
        return await self._wait(self._queue(replies, args))

    def close(self) -> None:
        replies, self._replies = self._replies, None
        if replies is not None and replies.transport is not None and not replies.transport.is_closing():
            with contextlib.suppress(RuntimeError):  # its loop has ended (another asyncio.run): nothing to close
                replies.transport.close()

    async def _send(self, replies: _Replies, args: tuple) -> Any:
        return await self._wait(self._queue(replies, args))

    def _queue(self, replies: _Replies, args: tuple) -> asyncio.Future:
        """Write one command; its reply's future (no await: commands queued together stay together)."""
        if len(replies.waiting) >= MAX_PENDING:
            raise redis.TimeoutError(f"{MAX_PENDING} Redis replies pending")
        future = replies.loop.create_future()
        replies.waiting.append(future)
        replies.transport.write(hiredis.pack_command(args))  # type: ignore[union-attr]
        return future

    async def _wait(self, future: asyncio.Future) -> Any:
        timer = future.get_loop().call_later(self.timeout_s, _expire, future, self.timeout_s)
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


_KEY_FIRST = frozenset({"HMGET", "HGETALL", "GET", "SET", "HSET"})  # their key follows the command
KEYLESS = frozenset({"PING", "ECHO", "INFO", "TIME", "CLUSTER", "CLIENT", "SCRIPT", "DBSIZE", "COMMAND"})  # any node


class AsyncRedisCluster:
    """`await client.execute("HMGET", key, *fields)` on Redis Cluster: the command goes to the master owning
    the slot of its key (the argument after the command; EVAL's first key), over that node's `AsyncRedis`. A
    command with several keys must keep them in one slot (Redis answers CROSSSLOT otherwise)."""

    def __init__(self, url: str, nodes: list[tuple[str, int]], *, timeout_s: float):
        if not nodes:
            raise ValueError("a cluster client needs at least one seed node")
        self.url = url  # credentials and TLS of every node
        self.seeds = list(nodes)
        self._timeout_s = timeout_s
        self._nodes: dict[tuple[str, int], AsyncRedis] = {}
        self._slots: list[AsyncRedis | None] | None = None  # slot -> its master; None: read the map first
        self._masters: list[tuple[str, int]] = []  # of the last map read: asked first for the next one
        self._refreshing: asyncio.Task | None = None

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:  # the budget applies to every node's connection
        self._timeout_s = value
        for node in self._nodes.values():
            node.timeout_s = value

    async def execute(self, *args: Any) -> Any:
        slots = self._slots
        if slots is None:
            slots = await self._refresh()
        key = _key_of(args)
        node = slots[key_slot(key if isinstance(key, bytes) else str(key).encode())] if key is not None else \
            next(n for n in slots if n is not None)  # fmt: skip
        if node is None:
            raise ClusterDownError(f"CLUSTERDOWN no node serves the slot of {key!r}")
        try:
            return await node.execute(*args)
        except MovedError as moved:  # the slot lives elsewhere now: follow once, remap it, re-read the map
            target = self._node(*moved.node_addr)
            slots[moved.slot_id] = target
            self._refresh_soon()
            return await target.execute(*args)
        except AskError as ask:  # a slot in migration: this key has left already (the map stays as it is)
            return await self._node(*ask.node_addr).execute_asking(*args)
        except redis.ConnectionError:
            self._slots = None  # a failover may have moved the slots: read the map before the next command
            raise

    def close(self) -> None:
        for node in self._nodes.values():
            node.close()

    def _node(self, host: str, port: int) -> AsyncRedis:
        node = self._nodes.get((host, port))
        if node is None:
            node = self._nodes[(host, port)] = AsyncRedis(self.url, timeout_s=self._timeout_s, host=host, port=port)
        return node

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done() or self._refreshing.get_loop() is not _loop():
            self._refreshing = _loop().create_task(self._read_map())
            self._refreshing.add_done_callback(_consume)

    async def _refresh(self) -> list[AsyncRedis | None]:
        """The node map, read once for all the commands that need it meanwhile."""
        self._refresh_soon()
        return await asyncio.shield(self._refreshing)  # type: ignore[arg-type]

    async def _read_map(self) -> list[AsyncRedis | None]:
        """`CLUSTER SLOTS` from the first node that answers: the known masters, then the seeds."""
        error: Exception | None = None
        for address in dict.fromkeys(self._masters + self.seeds):
            asked = self._node(*address)
            try:
                ranges = await asked.execute("CLUSTER", "SLOTS")
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as failed:
                error = failed
                continue
            slots: list[AsyncRedis | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
            for start, end, master, *_replicas in ranges:
                host = master[0].decode() if isinstance(master[0], bytes) else master[0]
                node = self._node(host or asked.host, int(master[1]))  # "": the node asked
                slots[start : end + 1] = [node] * (end - start + 1)
            self._slots = slots
            self._masters = [(n.host, n.port) for n in dict.fromkeys(n for n in slots if n is not None)]
            return slots
        raise redis.ConnectionError(f"no Redis Cluster node answers CLUSTER SLOTS (seeds {self.seeds}): {error}")


def async_redis_client(settings: Settings, *, timeout_s: float) -> AsyncRedis | AsyncRedisCluster:
    """The pipelined asyncio client of the configured topology (features.redis_client's rule)."""
    if is_cluster(settings):
        return AsyncRedisCluster(settings.redis_url, cluster_nodes(settings), timeout_s=timeout_s)
    return AsyncRedis(settings.redis_url, timeout_s=timeout_s)


def _key_of(args: tuple) -> Any:
    """The key a command's slot is computed from; None for a command without one."""
    if args[0] in _KEY_FIRST:  # the request path's commands as it spells them: no case folding per read
        return args[1]
    name = str(args[0]).upper() if not isinstance(args[0], bytes) else args[0].decode().upper()
    if name in ("EVAL", "EVALSHA", "FCALL", "FCALL_RO"):
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    return None if name in KEYLESS or len(args) < 2 else args[1]


def _loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def _consume(future: asyncio.Future) -> None:
    """Retrieve a background future's exception, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


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
