"""Win notices (OpenRTB `burl`, and later click and conversion links): signed, and counted once.

A notice URL carries the serving decision in its query (request, imp, ad, user, model, arm,
propensity) and a `sig` over those parameters (`serving.signing`). The exchange adds the clearing
price through a macro (`${AUCTION_PRICE}`) after we signed, so the price is outside the signature:
it is what the exchange says it charged, bounded by the route's schema.

Idempotence: the event id is a hash of request id, imp id and ad id, so every retry of one notice
is the same event (the consumer and the outcomes store drop duplicates by event id); pacing, which
lives in serving, is charged only by the first delivery: `NoticeLedger.first` claims the id in
Redis (SET NX, shared by workers and replicas) and, while Redis is unreachable, in a bounded
in-process memory.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from serving import signing

log = logging.getLogger(__name__)

UNSIGNED = ("price",)  # filled in by the exchange after signing
LEDGER_TTL_S = 7 * 86400  # exchanges retry notices for hours at most; a week leaves room
LOCAL_IDS = 100_000  # ids remembered in process while Redis is down (oldest forgotten first)


def notice_event_id(request_id: str, imp_id: str, ad_id: str) -> str:
    """The impression's event id: the same for every delivery of one notice."""
    digest = hashlib.sha256("\x1f".join(("notice", request_id, imp_id, ad_id)).encode()).hexdigest()
    return digest[:32]


def signed_query(params: Mapping[str, str], secret: bytes) -> dict[str, str]:
    """`params` plus their `sig`."""
    return {**params, signing.SIGNATURE_PARAM: signing.sign(params, secret)}


def verify_notice(query: Mapping[str, str], secret: bytes) -> bool:
    """Whether the signed parameters of a notice's query are intact."""
    signed = {k: v for k, v in query.items() if k not in UNSIGNED}
    return signing.verify(signed, secret)


class NoticeLedger:
    """Which notices were already counted (SET NX in Redis; an in-process memory when Redis fails)."""

    def __init__(self, client: Any, *, prefix: str = "adloop:notice:") -> None:
        self.client = client
        self.prefix = prefix
        self._local: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, event_id: str) -> bool:
        """True for the first delivery of `event_id`, False for a retry."""
        try:
            claimed = bool(self.client.set(self.prefix + event_id, 1, nx=True, ex=LEDGER_TTL_S))
        except (redis.RedisError, RedisClusterException, OSError) as error:  # the last: no cluster node answers
            log.warning("notice ledger: Redis unavailable (%s); deduplicating in process", type(error).__name__)
            claimed = None
        with self._lock:
            seen = event_id in self._local
            self._local[event_id] = None
            self._local.move_to_end(event_id)
            while len(self._local) > LOCAL_IDS:
                self._local.popitem(last=False)
        return (not seen) if claimed is None else (claimed and not seen)
