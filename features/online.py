"""Online features in Feast's own Redis layout: the request path's read, the consumer's write, and Feast's read.

Feast 0.67 keeps one Redis hash per entity and project: key = serialized entity key (v3) +
project name; fields = murmur3-32 of "<view>:<feature>" and `_ts:<view>`; values = serialized
`feast.types.Value` protobufs (../shared/STACK.md). `FeastLayout` encodes and decodes exactly
that, so:
- `OnlineFeatureReader.user()` answers with one HMGET (Feast's Python read costs milliseconds);
- the consumer writes rows inside its own atomic MULTI with the partition offsets (Feast's push
  converts through Arrow at ~0.3 ms per row, and cannot share a transaction);
and tests prove both equal what `get_online_features` returns for rows pushed through Feast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import DoubleList, Int64List, StringList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.timestamp_pb2 import Timestamp

from adloop.settings import Settings
from features.store import AD_VIEW, JOIN_KEYS, USER_VIEW, open_store

ENTITY_KEY_VERSION = 3


@dataclass(frozen=True)
class ViewLayout:
    name: str
    join_key: str
    features: tuple[str, ...]
    kinds: tuple[str, ...]  # Feast type names, e.g. "Int64", "Array(String)"
    fields: tuple[bytes, ...]  # murmur3 hash of "<view>:<feature>", the Redis hash field
    ts_field: bytes


class FeastLayout:
    """Encoder/decoder of Feast's Redis layout for this project's feature views (built once)."""

    def __init__(self, project: str, views: dict[str, ViewLayout]) -> None:
        self.project = project.encode()
        self.views = views

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
            )
        return cls(store.project, views)

    def key(self, view: str, entity_id: str) -> bytes:
        entity = EntityKey(join_keys=[self.views[view].join_key], entity_values=[ValueProto(string_val=entity_id)])
        return serialize_entity_key(entity, entity_key_serialization_version=ENTITY_KEY_VERSION) + self.project

    def encode(self, view: str, ts_ms: int, features: dict[str, Any]) -> dict[bytes, bytes]:
        """The hash fields of one row, as Feast's online write stores them."""
        layout = self.views[view]
        stamp = Timestamp(seconds=ts_ms // 1000, nanos=(ts_ms % 1000) * 1_000_000)
        mapping = {layout.ts_field: stamp.SerializeToString()}
        for name, kind, field in zip(layout.features, layout.kinds, layout.fields, strict=True):
            mapping[field] = _encode_value(kind, features.get(name)).SerializeToString()
        return mapping

    def decode(self, view: str, values: Sequence[bytes | None]) -> dict[str, Any]:
        """HMGET answers (in `fields` order) -> {feature: value}; {} when the entity is unknown."""
        if all(v is None for v in values):
            return {}
        return {name: _decode_value(raw) for name, raw in zip(self.views[view].features, values, strict=True)}


class OnlineFeatureReader:
    """The request path's read: one HMGET per user; ads pipelined in one round trip."""

    def __init__(self, client: Any, layout: FeastLayout) -> None:
        self.client = client
        self.layout = layout
        self._user_fields = list(layout.views[USER_VIEW].fields)
        self._ad_fields = list(layout.views[AD_VIEW].fields)

    def user(self, user_id: str) -> dict[str, Any]:
        values = self.client.hmget(self.layout.key(USER_VIEW, user_id), self._user_fields)
        return self.layout.decode(USER_VIEW, values)

    def ads(self, ad_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        pipe = self.client.pipeline(transaction=False)
        for ad_id in ad_ids:
            pipe.hmget(self.layout.key(AD_VIEW, ad_id), self._ad_fields)
        rows = {ad: self.layout.decode(AD_VIEW, values) for ad, values in zip(ad_ids, pipe.execute(), strict=True)}
        return {ad: row for ad, row in rows.items() if row}


def write_rows(pipe: Any, layout: FeastLayout, view: str, rows: Sequence[tuple[str, int, dict[str, Any]]]) -> None:
    """Queue HSETs of (entity id, event ms, features) rows on a redis-py pipeline (the caller executes it)."""
    for entity_id, ts_ms, features in rows:
        pipe.hset(layout.key(view, entity_id), mapping=layout.encode(view, ts_ms, features))


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
    if raw is None:
        return None
    value = ValueProto.FromString(raw)
    which = value.WhichOneof("val")
    if which in (None, "null_val"):
        return None
    decoded = getattr(value, which)
    return list(decoded.val) if which.endswith("_list_val") else decoded
