"""Online features in Feast's own Redis layout: the request path's read, the consumer's write, and Feast's read.

Feast 0.67 keeps one Redis hash per entity and project: key = serialized entity key (v3) +
project name; fields = murmur3-32 of "<view>:<feature>" and `_ts:<view>`; values = serialized
`feast.types.Value` protobufs (../shared/STACK.md). `FeastLayout` encodes and decodes exactly
that, so:
- `OnlineFeatureReader.user()` answers with one HMGET (Feast's Python read costs milliseconds);
- the consumer writes rows after its partitions' commits, each only over an older row (`write_rows`;
  Feast's push converts through Arrow at ~0.3 ms per row);
and tests prove both equal what `get_online_features` returns for rows pushed through Feast.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import DoubleList, Int64List, StringList, ValueType
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.timestamp_pb2 import Timestamp

from adloop.settings import Settings
from features.store import AD_VIEW, JOIN_KEYS, USER_VIEW, open_store

ENTITY_KEY_VERSION = 3
CHANGES_KEEP_MS = 3_600_000  # how long the changed-ads index remembers a write


@dataclass(frozen=True)
class ViewLayout:
    name: str
    join_key: str
    features: tuple[str, ...]
    kinds: tuple[str, ...]  # Feast type names, e.g. "Int64", "Array(String)"
    fields: tuple[bytes, ...]  # murmur3 hash of "<view>:<feature>", the Redis hash field
    ts_field: bytes
    key_prefix: bytes  # the serialized entity key up to the entity value's length (one join key)


class FeastLayout:
    """Encoder/decoder of Feast's Redis layout for this project's feature views (built once)."""

    def __init__(self, project: str, views: dict[str, ViewLayout]) -> None:
        self.project = project.encode()
        self.views = views
        self._columns = {
            name: tuple(zip(v.features, v.fields, (VALUE_ENCODERS[k] for k in v.kinds), strict=True))
            for name, v in views.items()
        }  # per view: (feature, hash field, value encoder)

    @classmethod
    def from_settings(cls, settings: Settings) -> FeastLayout:
        store = open_store(settings)
        views = {}
        for name, join_key in JOIN_KEYS.items():
            view = store.get_feature_view(name)
            features = tuple(f.name for f in view.features)
            views[name] = ViewLayout(
                name=name,
                join_key=join_key,
                features=features,
                kinds=tuple(str(f.dtype) for f in view.features),
                fields=tuple(_mmh3(f"{name}:{f}") for f in features),
                ts_field=f"_ts:{name}".encode(),
                key_prefix=_entity_key_prefix(join_key),
            )
        return cls(store.project, views)

    def key(self, view: str, entity_id: str) -> bytes:
        """The Redis key of an entity: Feast's serialized entity key (v3, one string join key) + project."""
        value = entity_id.encode()
        return self.views[view].key_prefix + _U32.pack(len(value)) + value + self.project

    def changes_key(self, view: str) -> bytes:
        """A sorted set beside Feast's hashes (not Feast's): entity id -> wall-clock ms of its last row write,
        so that a reader can re-read only the rows written since it last looked (`write_rows` keeps it)."""
        return b"adloop:changed:" + view.encode() + b":" + self.project

    def encode(self, view: str, ts_ms: int, features: dict[str, Any]) -> dict[bytes, bytes]:
        """The hash fields of one row, as Feast's online write stores them."""
        flat = self.encode_flat(view, ts_ms, features)
        return dict(zip(flat[::2], flat[1::2], strict=True))

    def encode_flat(self, view: str, ts_ms: int, features: dict[str, Any]) -> list[bytes]:
        """`encode` as [field, value, field, value, ...] (the arguments of HSET), timestamp first."""
        layout = self.views[view]
        flat = [layout.ts_field, encode_timestamp(ts_ms)]
        for name, field, encoder in self._columns[view]:
            value = features.get(name)
            flat += (field, b"" if value is None else encoder(value))
        return flat

    def decode(self, view: str, values: Sequence[bytes | None]) -> dict[str, Any]:
        """HMGET answers (in `fields` order) -> {feature: value}; {} when the entity is unknown."""
        if all(v is None for v in values):
            return {}
        return {name: _decode_value(raw) for name, raw in zip(self.views[view].features, values, strict=True)}


class OnlineFeatureReader:
    """The request path's read: one HMGET per user; ads pipelined in one round trip.

    `async_client` (serving.redis_async.AsyncRedis) lets `user_async` wait for Redis without blocking
    an event loop; without one it reads synchronously."""

    def __init__(self, client: Any, layout: FeastLayout, async_client: Any | None = None) -> None:
        self.client = client
        self.async_client = async_client
        self.layout = layout
        self._user_fields = list(layout.views[USER_VIEW].fields)
        self._ad_fields = list(layout.views[AD_VIEW].fields)

    def user(self, user_id: str) -> dict[str, Any]:
        values = self.client.hmget(self.layout.key(USER_VIEW, user_id), self._user_fields)
        return self.layout.decode(USER_VIEW, values)

    async def user_async(self, user_id: str) -> dict[str, Any]:
        if self.async_client is None:
            return self.user(user_id)
        values = await self.async_client.execute("HMGET", self.layout.key(USER_VIEW, user_id), *self._user_fields)
        return self.layout.decode(USER_VIEW, values)

    def changed_ads(self, since_ms: int) -> dict[str, int]:
        """Ads whose online row was written at or after `since_ms`, up to an hour back, with the wall-clock ms of
        their last write (the writer's)."""
        stamped = self.client.zrangebyscore(self.layout.changes_key(AD_VIEW), since_ms, "+inf", withscores=True)
        return {a.decode(): int(ms) for a, ms in stamped}

    def ads(self, ad_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        pipe = self.client.pipeline(transaction=False)
        for ad_id in ad_ids:
            pipe.hmget(self.layout.key(AD_VIEW, ad_id), self._ad_fields)
        rows = {ad: self.layout.decode(AD_VIEW, values) for ad, values in zip(ad_ids, pipe.execute(), strict=True)}
        return {ad: row for ad, row in rows.items() if row}


ROW_TTL_S = 30 * 86400  # an entity without a new row this long is dropped from Redis (the views look back 7 days)

# Write a row unless the stored one is newer (its `_ts:<view>`, a protobuf Timestamp, decoded here):
# rows are written after the consumer's commit, by whichever consumer owns the partition, so a late
# or repeated write must never replace a newer row. Equal times overwrite (the same events again, or
# an ad's counts summed again with more partitions' increments).
_WRITE_IF_NEWER = """
local function varint(s, i)
  local value, scale = 0, 1
  while true do
    local byte = string.byte(s, i)
    value = value + (byte % 128) * scale
    i = i + 1
    if byte < 128 then return value, i end
    scale = scale * 128
  end
end
local old = redis.call('HGET', KEYS[1], ARGV[3])
if old then
  local seconds, nanos, i = 0, 0, 1
  while i <= #old do
    local tag, value = string.byte(old, i), 0
    value, i = varint(old, i + 1)
    if tag == 8 then seconds = value elseif tag == 16 then nanos = value end
  end
  if seconds * 1000 + math.floor(nanos / 1000000) > tonumber(ARGV[1]) then return 0 end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
_WRITE_IF_NEWER_SHA = hashlib.sha1(_WRITE_IF_NEWER.encode()).hexdigest()


def write_rows(client: Any, layout: FeastLayout, view: str, rows: Sequence[tuple[str, int, dict[str, Any]]]) -> int:
    """Write (entity id, event ms, features) rows, each only over an older row of its entity (one script per
    row, pipelined; standalone or cluster: each row is one key). Ad rows are also stamped in the view's
    changed-ads index (`changes_key`), trimmed to the last hour. Returns how many rows were written."""
    if not rows:
        return 0
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        for entity_id, ts_ms, features in rows:
            # execute_command: redis-py's cluster pipeline refuses `evalsha()` but routes EVALSHA by its key
            pipe.execute_command("EVALSHA", _WRITE_IF_NEWER_SHA, 1, layout.key(view, entity_id), ts_ms, ROW_TTL_S,
                                 *layout.encode_flat(view, ts_ms, features))  # fmt: skip
        if view == AD_VIEW:
            now_ms = int(time.time() * 1000)
            key = layout.changes_key(view)
            pipe.zadd(key, {entity_id: now_ms for entity_id, _, _ in rows})
            pipe.zremrangebyscore(key, "-inf", now_ms - CHANGES_KEEP_MS)
        try:
            replies = pipe.execute()
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            client.script_load(_WRITE_IF_NEWER)  # a restarted (or new) Redis: load it, write again (idempotent)
            continue
        return sum(replies[: len(rows)])
    raise AssertionError("unreachable")


def features_via_feast(settings: Settings, view: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Every feature of `view` for each id, through `get_online_features` (values None where unknown)."""
    store = open_store(settings)
    refs = [f"{view}:{f.name}" for f in store.get_feature_view(view).features]
    key = JOIN_KEYS[view]
    rows = store.get_online_features(features=refs, entity_rows=[{key: i} for i in ids]).to_dict()
    return {entity: {name: values[n] for name, values in rows.items() if name != key} for n, entity in enumerate(ids)}


def user_features_via_feast(settings: Settings, user_id: str) -> dict[str, Any]:
    return features_via_feast(settings, USER_VIEW, [user_id])[user_id]


# --- Value protobufs ------------------------------------------------------------------------------
# The consumer encodes ~40 values per row: protobuf message objects cost ~1 us each, so values are
# written straight in protobuf's wire format (tests prove the bytes equal `SerializeToString()` of
# the messages below). A `feast.types.Value` holds one field of its `val` oneof: a set oneof field
# is written even when it is 0 or empty; `Value()` (None) is empty bytes. Int64List and DoubleList
# are packed (proto3), StringList is not.

_U32 = struct.Struct("<I")
_DOUBLE = struct.Struct("<d")
_MASK64 = (1 << 64) - 1
_SMALL_VARINTS = tuple(bytes([n]) for n in range(128))


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _SMALL_VARINTS[n]
    n &= _MASK64  # negative int64: ten bytes of two's complement, as protobuf writes them
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


def _encode_int64(value: int) -> bytes:
    return _INT64_CACHE[value] if 0 <= value < _INT64_CACHED else b"\x20" + _varint(value)


_INT64_CACHED = 4096  # counts are small: most int64 values are one dict lookup
_INT64_CACHE = tuple(b"\x20" + _varint(n) for n in range(_INT64_CACHED))


def _encode_float64(value: float) -> bytes:
    return b"\x29" + _DOUBLE.pack(value)


def _encode_string(value: str) -> bytes:
    return _field(b"\x12", value.encode())


def _encode_string_list(values: Sequence[str]) -> bytes:
    return _field(b"\x62", b"".join([_field(b"\x0a", v.encode()) for v in values]))


def _encode_int64_list(values: Sequence[int]) -> bytes:
    if not values:
        return b"\x72\x00"
    return _field(b"\x72", _field(b"\x0a", b"".join([_varint(v) for v in values])))


def _encode_float64_list(values: Sequence[float]) -> bytes:
    if not values:
        return b"\x7a\x00"
    return _field(b"\x7a", _field(b"\x0a", struct.pack(f"<{len(values)}d", *values)))


VALUE_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "Int64": _encode_int64, "Float64": _encode_float64, "String": _encode_string,
    "Array(String)": _encode_string_list, "Array(Int64)": _encode_int64_list,
    "Array(Float64)": _encode_float64_list,
}  # fmt: skip


def encode_value(kind: str, value: Any) -> bytes:
    """The serialized `feast.types.Value` of a feature of Feast type `kind` (None -> empty Value)."""
    return b"" if value is None else VALUE_ENCODERS[kind](value)


def encode_timestamp(ts_ms: int) -> bytes:
    """A serialized protobuf Timestamp (seconds, nanos; zero fields omitted), Feast's `_ts:<view>` value."""
    seconds, millis = divmod(ts_ms, 1000)
    out = b"\x08" + _varint(seconds) if seconds else b""
    return out + b"\x10" + _varint(millis * 1_000_000) if millis else out


def _entity_key_prefix(join_key: str) -> bytes:
    """Feast's v3 serialized entity key of one string join key, up to the value's length field."""
    name = join_key.encode()
    return _U32.pack(1) + _U32.pack(ValueType.STRING) + _U32.pack(len(name)) + name + _U32.pack(ValueType.STRING)


def reference_key(join_key: str, entity_id: str, project: bytes) -> bytes:
    """Feast's own serialization of an entity key (the reference `FeastLayout.key` is tested against)."""
    entity = EntityKey(join_keys=[join_key], entity_values=[ValueProto(string_val=entity_id)])
    return serialize_entity_key(entity, entity_key_serialization_version=ENTITY_KEY_VERSION) + project


def reference_timestamp(ts_ms: int) -> bytes:
    return Timestamp(seconds=ts_ms // 1000, nanos=(ts_ms % 1000) * 1_000_000).SerializeToString()


def reference_value(kind: str, value: Any) -> bytes:
    """The protobuf library's serialization of a value (the reference `encode_value` is tested against)."""
    return _encode_value(kind, value).SerializeToString()


_LISTS = {"Array(String)": ("string_list_val", StringList), "Array(Int64)": ("int64_list_val", Int64List),
          "Array(Float64)": ("double_list_val", DoubleList)}  # fmt: skip
_SCALARS = {"Int64": "int64_val", "Float64": "double_val", "String": "string_val"}


def _encode_value(kind: str, value: Any) -> ValueProto:
    if value is None:
        return ValueProto()
    if kind in _LISTS:
        attribute, list_type = _LISTS[kind]
        return ValueProto(**{attribute: list_type(val=value)})
    return ValueProto(**{_SCALARS[kind]: value})


def _decode_value(raw: bytes | None) -> Any:
    """A serialized `feast.types.Value` as plain Python. Scalars, most of a row, are read straight from the
    wire format (a parse of the message costs ~1.5 us each); anything else goes through protobuf."""
    if not raw:
        return None
    tag = raw[0]
    if tag == 0x20:  # int64_val: a varint
        if len(raw) == 2 and raw[1] < 0x80:
            return raw[1]
        number = _varint_value(raw)
        if number is not None:
            return number
    elif tag == 0x29 and len(raw) == 9:  # double_val: 8 bytes little-endian
        return _DOUBLE.unpack_from(raw, 1)[0]
    return reference_decode(raw)


def _varint_value(raw: bytes) -> int | None:
    """The int64 varint after the tag byte, if it ends exactly at the end of `raw` (else None: let protobuf parse)."""
    number = shift = 0
    for i in range(1, len(raw)):
        byte = raw[i]
        number |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if i != len(raw) - 1:
                return None
            number &= _MASK64
            return number - (1 << 64) if number >> 63 else number
    return None


def reference_decode(raw: bytes | None) -> Any:
    """The protobuf library's parse of a value (the reference `_decode_value` is tested against)."""
    if raw is None:
        return None
    value = ValueProto.FromString(raw)
    which = value.WhichOneof("val")
    if which in (None, "null_val"):
        return None
    decoded = getattr(value, which)
    return list(decoded.val) if which.endswith("_list_val") else decoded
