"""The HTTP side towards an OpenAI-compatible upstream: requests, SSE parsing, clear errors.

Every failure becomes an ``UpstreamError`` with an HTTP status for the client and a message that
names what went wrong but never the caller's credentials (the Authorization value is scrubbed from
anything the upstream echoes, and URLs lose their user-info).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

__all__ = ["Upstream", "UpstreamError", "public_url", "scrub", "url_secrets"]

REDACTED = "[REDACTED]"
# Upstream response headers the client needs to back off properly (429, 503).
FORWARDED_HEADERS = ("retry-after", "retry-after-ms")


class UpstreamError(Exception):
    """The upstream failed; ``status`` is what the proxy answers, ``code`` a stable error code."""

    def __init__(self, message: str, *, status: int = 502, code: str = "upstream_error",
                 kind: str = "upstream_error", headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})  # for the client, e.g. Retry-After
        self.status = status
        self.code = code
        self.kind = kind

    def payload(self) -> dict[str, Any]:
        """The OpenAI-shaped error body."""
        return {"error": {"message": self.message, "type": self.kind, "code": self.code,
                          "param": None}}


def public_url(url: str) -> str:
    """The URL without user-info (``http://user:key@host`` would leak a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def url_secrets(url: str) -> tuple[str, ...]:
    """The credentials in ``url``'s user-info, in every form an error body may echo them: as
    written, percent-decoded, ``user:password`` and its Basic auth encoding."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return ()
    out: list[str] = []
    for user, password in {(parts.username or "", parts.password or ""),
                           (unquote(parts.username or ""), unquote(parts.password or ""))}:
        pair = f"{user}:{password}"
        out += [pair, base64.b64encode(pair.encode()).decode(), password, user]
    return tuple(dict.fromkeys(s for s in out if s))


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every secret (and a Bearer or Basic credential alone) replaced by
    ``[REDACTED]``."""
    for secret in secrets:
        if not secret:
            continue
        scheme = secret.lower().startswith(("bearer ", "basic "))
        token = secret.split(" ", 1)[1] if scheme else secret
        # Longest first: a password inside ``user:password`` must not break the longer match.
        for value in sorted({secret, token}, key=len, reverse=True):
            if len(value) >= 4:
                text = text.replace(value, REDACTED)
    return text


class Upstream:
    """An OpenAI-compatible base URL (``.../v1``) reached through one shared ``httpx`` client."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 connect_timeout: float = 10.0) -> None:
        parts = urlsplit(base_url)
        self._url_secrets = url_secrets(base_url)
        # Credentials leave the URL (httpx logs request URLs) and go as Basic auth, as httpx
        # would have sent them.
        auth = (httpx.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
                if self._url_secrets else None)
        self.base_url = public_url(base_url.rstrip("/"))
        self.public_url = self.base_url
        self._api_key = api_key
        # Streams read one chunk at a time: the read timeout bounds a stalled upstream, not
        # the whole answer.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            auth=auth,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def _headers(self, authorization: str | None) -> dict[str, str]:
        auth = authorization or (f"Bearer {self._api_key}" if self._api_key else None)
        return {"Authorization": auth} if auth else {}

    def _secrets(self, authorization: str | None) -> tuple[str, ...]:
        found = (authorization, self._api_key, *self._url_secrets)
        return tuple(sorted((s for s in found if s), key=len, reverse=True))

    def secrets(self, authorization: str | None) -> tuple[str, ...]:
        """What must never reach a client or a log: the caller's Authorization value, the
        proxy's own key and the credentials in the upstream URL."""
        return self._secrets(authorization)

    # -- requests --------------------------------------------------------------------------

    async def open_stream(self, body: Mapping[str, Any], authorization: str | None
                          ) -> httpx.Response:
        """POST a streamed chat completion; returns the open response (status 200), or raises
        ``UpstreamError`` with the upstream's own status and message."""
        request = self.client.build_request(
            "POST", f"{self.base_url}/chat/completions", json=dict(body),
            headers={**self._headers(authorization), "Accept": "text/event-stream"})
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, authorization) from None
        if response.status_code != 200:
            try:
                raw = await response.aread()
            except httpx.HTTPError:
                raw = b""
            finally:
                await response.aclose()
            raise self._status_error(response.status_code, raw, authorization, response.headers)
        return response

    async def complete(self, body: Mapping[str, Any], authorization: str | None
                       ) -> dict[str, Any]:
        """POST a non-streamed chat completion; returns its JSON object."""
        return await self._json("POST", "/chat/completions", authorization, body)

    async def models(self, authorization: str | None) -> dict[str, Any]:
        return await self._json("GET", "/models", authorization, None)

    async def _json(self, method: str, path: str, authorization: str | None,
                    body: Mapping[str, Any] | None) -> dict[str, Any]:
        try:
            response = await self.client.request(
                method, f"{self.base_url}{path}", headers=self._headers(authorization),
                json=dict(body) if body is not None else None)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, authorization) from None
        if response.status_code != 200:
            raise self._status_error(response.status_code, response.content, authorization,
                                     response.headers)
        try:
            data = response.json()
        except ValueError:
            raise UpstreamError(f"upstream {self.public_url}{path} answered with a body that is "
                                "not JSON", code="upstream_malformed") from None
        if not isinstance(data, dict):
            raise UpstreamError(f"upstream {self.public_url}{path} answered with JSON that is "
                                "not an object", code="upstream_malformed")
        return data

    # -- streamed chunks -------------------------------------------------------------------

    async def chunks(self, response: httpx.Response, authorization: str | None
                     ) -> AsyncIterator[dict[str, Any]]:
        """The JSON chunks of an SSE stream up to ``data: [DONE]``.

        Raises ``UpstreamError`` when the connection drops, a ``data:`` payload is not a JSON
        object, the upstream sends an error event, or the stream ends before ``[DONE]``."""
        data_lines: list[str] = []
        try:
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    continue  # an SSE comment (keep-alive)
                if line:
                    field, _, value = line.partition(":")
                    if field == "data":
                        data_lines.append(value[1:] if value.startswith(" ") else value)
                    continue
                if not data_lines:
                    continue
                data, data_lines = "\n".join(data_lines), []
                if data.strip() == "[DONE]":
                    return
                yield self._decode(data, authorization)
        except httpx.TimeoutException:
            raise UpstreamError(f"upstream {self.public_url} stopped sending mid-stream "
                                "(read timeout)", status=504, code="upstream_timeout") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"upstream {self.public_url} dropped the connection mid-stream "
                f"({type(exc).__name__})", code="upstream_disconnected") from None
        if data_lines and data_lines[-1].strip() == "[DONE]":
            return
        raise UpstreamError(f"upstream {self.public_url} ended the stream without "
                            "'data: [DONE]'", code="upstream_incomplete")

    def _decode(self, data: str, authorization: str | None) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise UpstreamError(f"upstream {self.public_url} sent malformed SSE: a data field "
                                "that is not JSON", code="upstream_malformed") from None
        if not isinstance(chunk, dict):
            raise UpstreamError(f"upstream {self.public_url} sent malformed SSE: a data field "
                                "that is not a JSON object", code="upstream_malformed")
        if chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise UpstreamError(scrub(f"upstream {self.public_url} reported an error "
                                      f"mid-stream: {message}", self._secrets(authorization)),
                                code="upstream_error")
        if not isinstance(chunk.get("choices", []), list):
            raise UpstreamError(f"upstream {self.public_url} sent malformed SSE: 'choices' is "
                                "not a list", code="upstream_malformed")
        return chunk

    # -- errors ----------------------------------------------------------------------------

    def _transport_error(self, exc: httpx.HTTPError, authorization: str | None
                         ) -> UpstreamError:
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamError(f"upstream {self.public_url} timed out ({type(exc).__name__})",
                                 status=504, code="upstream_timeout")
        if isinstance(exc, httpx.ConnectError):
            return UpstreamError(f"upstream {self.public_url} is unreachable "
                                 f"({type(exc).__name__})", code="upstream_unreachable")
        return UpstreamError(f"upstream {self.public_url} failed ({type(exc).__name__})",
                             code="upstream_disconnected")

    def _status_error(self, status: int, raw: bytes, authorization: str | None,
                      headers: Mapping[str, str]) -> UpstreamError:
        detail = ""
        try:
            body = json.loads(raw)
            error = body.get("error") if isinstance(body, dict) else None
            message = error.get("message") if isinstance(error, dict) else error
            detail = str(message or "")
        except ValueError:
            detail = raw[:200].decode("utf-8", "replace").strip()
        detail = scrub(detail, self._secrets(authorization))
        text = f"upstream {self.public_url} answered HTTP {status}"
        # The client's own mistakes (4xx) keep their status; upstream failures become 502.
        return UpstreamError(f"{text}: {detail}" if detail else text,
                             status=status if 400 <= status < 500 else 502,
                             code=f"upstream_http_{status}",
                             headers={k: headers[k] for k in FORWARDED_HEADERS if k in headers})
