"""Signed URLs: the billing notice, click and conversion links carry an HMAC over their parameters.

The server verifies the signature before anything is logged or charged, so a forged or edited link
changes nothing. Every serving process (workers and replicas) must share the secret: set
`ADLOOP_URL_SIGNING_SECRET`; without it one is generated once into the stack folder, which the
workers of one machine share.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from pathlib import Path

from adloop.settings import Settings

SIGNATURE_PARAM = "sig"


def secret_of(settings: Settings) -> bytes:
    """The signing secret: the setting, else the machine's generated one (created on first use)."""
    if settings.url_signing_secret is not None:
        return settings.url_signing_secret.get_secret_value().encode()
    path = Path(settings.stack_dir) / "url-signing-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{secrets.token_hex(4)}")
        tmp.write_text(secrets.token_urlsafe(32))
        tmp.chmod(0o600)
        tmp.replace(path) if not path.exists() else tmp.unlink()  # the first writer wins
    return path.read_text().strip().encode()


def sign(params: Mapping[str, str], secret: bytes) -> str:
    """Signature of `params` (names sorted, so the order in a URL does not matter)."""
    message = "&".join(f"{name}={params[name]}" for name in sorted(params) if name != SIGNATURE_PARAM)
    digest = hmac.new(secret, message.encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def verify(params: Mapping[str, str], secret: bytes) -> bool:
    """Whether `params` carry a valid `sig` over the others (constant-time comparison)."""
    given = params.get(SIGNATURE_PARAM)
    # As bytes: compare_digest refuses non-ASCII text (a forged `sig` may be anything).
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), sign(params, secret).encode())
