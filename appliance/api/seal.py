"""Opaque tokens for thinking that clients carry between turns: Anthropic's thinking-block
`signature` and the Responses API's reasoning `encrypted_content`.

Both are keyed with a secret made at start (per process): a token made by this process reads
back; one from before a restart, or from another server, does not, and the front-ends then
fall back to what the client sent in clear (see docs/api.md). Nothing is encrypted: the
content is the model's own reasoning, which the client has seen; the MAC proves it is ours.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Optional

_PREFIX = "lmx1."


class Seal:
    """Signs and seals text with a key of its own."""

    def __init__(self, key: Optional[bytes] = None) -> None:
        self.key = key or secrets.token_bytes(32)

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self.key, data, hashlib.sha256).digest()

    def sign(self, text: str) -> str:
        """A signature of `text` (base64 of its HMAC-SHA256)."""
        return base64.b64encode(self._mac(text.encode())).decode()

    def verify(self, text: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(text), signature)

    def seal(self, text: str) -> str:
        """`text` and its MAC in one opaque string that `open` reads back."""
        data = text.encode()
        mac = base64.urlsafe_b64encode(self._mac(data)).decode().rstrip("=")
        body = base64.urlsafe_b64encode(data).decode().rstrip("=")
        return f"{_PREFIX}{body}.{mac}"

    def open(self, token: str) -> Optional[str]:
        """The text sealed in `token`, or None when this process did not seal it."""
        if not token.startswith(_PREFIX):
            return None
        body, _, mac = token[len(_PREFIX) :].rpartition(".")
        try:
            data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            got = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
        except ValueError:
            return None
        if not hmac.compare_digest(self._mac(data), got):
            return None
        try:
            return data.decode()
        except UnicodeDecodeError:
            return None
