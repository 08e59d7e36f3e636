"""Click tracking and attribution: signed click tokens, and the touches conversions are attributed to.

A served creative carries `GET /c/{token}`. The token is compact and signed (`serving.signing`, the
secret every replica shares): base64url of a JSON array of the impression's identity and policy
(request id, ad, campaign, arm, model version, propensity, user, slot, impression time in ms), then
`.` and the HMAC. A token that does not verify changes nothing.

A click's event id is derived from its impression (request id + ad id): a repeated click of the same
impression has the same id, so the feature consumer and the outcomes lander count it once, and the
tracker's Redis record (`SET NX`) makes sure it is charged once.

Touches live in Redis, not in the consumer's features: attribution needs the exact impression (request
id, ad, arm, model version), which the feature rows do not keep, and must see a click the moment its
redirect is answered. A touch is one JSON value with an expiry of the attribution window:
`adloop:touch:click:<click id>` (a postback naming the click), `adloop:touch:user:click:<user>` (the
user's last click) and, with `ADLOOP_ATTRIBUTION_MODEL=impression`, `adloop:touch:user:impression:<user>`
(the user's last impression, written by a background thread in batches).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from outcomes.touch_keys import click_touch_key, user_touch_key
from serving import signing

log = logging.getLogger(__name__)
TOUCH_FIELDS = ("request_id", "ad_id", "campaign_id", "arm", "model_version", "propensity", "user_id", "slot_id",
                "ts_ms")  # fmt: skip
ARMS = ("targeted", "control")


@dataclass(frozen=True)
class Touch:
    """An impression (or its click) a conversion may be attributed to."""

    request_id: str
    ad_id: str
    campaign_id: str
    arm: str
    model_version: str
    propensity: float
    user_id: str
    slot_id: str
    ts_ms: int  # the impression's time (epoch ms); a click's touch is stored with the click's time

    @property
    def click_id(self) -> str:
        return click_id(self.request_id, self.ad_id)


class InvalidToken(ValueError):
    """A click token that is malformed or whose signature does not verify."""


def click_id(request_id: str, ad_id: str) -> str:
    """The event id of the click on an impression: the same for every click of it."""
    return "clk-" + hashlib.blake2b(f"{request_id}\x1f{ad_id}".encode(), digest_size=12).hexdigest()


def conversion_id(idempotency_key: str) -> str:
    """The event id of a conversion: the same for every retry of one postback."""
    return "cnv-" + hashlib.blake2b(idempotency_key.encode(), digest_size=12).hexdigest()


def encode_token(touch: Touch, secret: bytes) -> str:
    values = list(asdict(touch).values())
    values[3] = ARMS.index(touch.arm)  # 0 / 1: a few bytes less per URL
    payload = base64.urlsafe_b64encode(orjson.dumps(values)).rstrip(b"=").decode()
    return f"{payload}.{signing.sign({'t': payload}, secret)}"


def decode_token(token: str, secret: bytes) -> Touch:
    """The touch of a verified token; raises `InvalidToken` otherwise."""
    payload, _, sig = token.partition(".")
    if not payload or not signing.verify({"t": payload, signing.SIGNATURE_PARAM: sig}, secret):
        raise InvalidToken("signature does not verify")
    try:
        values = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        values[3] = ARMS[values[3]]
        touch = Touch(*values)
    except Exception as error:  # signed by us, so only a bug gets here; still never a 500
        raise InvalidToken(f"malformed payload: {error}") from error
    return touch


class TouchStore:
    """Touches in Redis (a client with its own timeouts, not the request path's budget)."""

    def __init__(self, client: Any, *, window_s: float):
        self.client = client
        self.ttl = max(1, int(window_s))
        self._impressions: deque[Touch] = deque(maxlen=100_000)
        self._wake = threading.Event()

    def record_click(self, touch: Touch) -> bool:
        """Remember a click (its touch with the click's time); False if this impression was clicked already.

        Two single-key commands, not one script: the click's key is found by click id alone (a postback
        may name only the click) and the user's by user id alone, so on Redis Cluster they lie in two
        slots, and one hash tag for every touch would put all clicks and conversion lookups on one node.
        The claim (`SET NX`) alone decides that a click counts and is charged once, on every replica; a
        crash between the two leaves the user's last click one click older (the click itself stays
        attributable by its id)."""
        value = orjson.dumps(asdict(touch))
        if not self.client.set(click_touch_key(touch.click_id), value, nx=True, ex=self.ttl):
            return False
        try:
            self.client.set(user_touch_key("click", touch.user_id), value, ex=self.ttl)
        except Exception as error:  # claimed: it counts and is charged; only the user's pointer is missed
            log.warning("click %s counted, but the user's last click was not updated (%s)", touch.click_id, error)
        return True

    def last(self, *, user_id: str | None, click: str | None, model: str) -> Touch | None:
        """The touch a conversion goes to: the named click, else the user's last click (or impression)."""
        key = click_touch_key(click) if click else user_touch_key(model, user_id)
        raw = self.client.get(key)
        return None if raw is None else Touch(**orjson.loads(raw))

    def remember_impressions(self, touches: list[Touch]) -> None:
        """Queue the impressions served (last-impression attribution); written by `run` (no I/O here)."""
        self._impressions.extend(touches)
        if len(self._impressions) >= 500:
            self._wake.set()

    def run(self, stop: threading.Event, every_s: float = 0.5) -> None:
        """Write the queued impressions as each user's last one, a pipeline per round."""
        while not stop.is_set():
            self._wake.wait(every_s)
            self._wake.clear()
            batch = [self._impressions.popleft() for _ in range(len(self._impressions))]
            if not batch:
                continue
            try:
                pipe = self.client.pipeline(transaction=False)
                for touch in batch:
                    pipe.set(user_touch_key("impression", touch.user_id), orjson.dumps(asdict(touch)), ex=self.ttl)
                pipe.execute()
            except Exception as error:
                log.warning("writing %d impression touches failed (%s); they are not attributable", len(batch), error)
