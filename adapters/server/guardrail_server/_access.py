"""Who may use the proxy and how much they may send: client keys, the body limit, the bind check.

Client keys are the proxy's own (``--api-key`` / ``GUARDRAIL_API_KEYS``): a caller shows one as
``Authorization: Bearer KEY``, it is compared with every configured key in constant time, and it
is never forwarded upstream. A request body is read a piece at a time and refused with 413 as soon
as it passes the limit, so a huge body never sits in memory.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from starlette.requests import Request

__all__ = ["CLIENT_KEYS_ENV", "DEFAULT_MAX_BODY_BYTES", "BodyTooLarge", "ClientKeys",
           "is_loopback", "keys_from_env", "read_body"]

CLIENT_KEYS_ENV = "GUARDRAIL_API_KEYS"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class ClientKeys:
    """The keys a caller may show; empty means every caller is let in."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = [k.encode() for k in dict.fromkeys(k.strip() for k in keys) if k]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """True when ``authorization`` is ``Bearer KEY`` for a configured key (or none is)."""
        if not self._keys:
            return True
        scheme, _, shown = (authorization or "").partition(" ")
        given = shown.strip().encode() if scheme.lower() == "bearer" else b""
        # Every key is compared, so the time taken does not say which one nearly matched.
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        return bool(given) and any(matches)


def keys_from_env(value: str | None) -> list[str]:
    """Keys from ``GUARDRAIL_API_KEYS``: separated by commas or whitespace."""
    return [k for k in (value or "").replace(",", " ").split() if k]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BodyTooLarge(Exception):
    """The request body passed the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the proxy's limit of {limit} bytes")
        self.limit = limit


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or ``BodyTooLarge`` once more than ``limit`` bytes are declared or
    have arrived (the rest is never read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(part)
    return b"".join(parts)
