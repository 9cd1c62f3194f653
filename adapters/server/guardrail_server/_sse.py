"""Server-sent events out: encoding, and a response that notices a client hang-up at once.

Starlette's ``StreamingResponse`` only watches for a disconnect under some ASGI versions (under
others a hang-up surfaces on the next write, which may be long in coming while text is held
back). ``SSEResponse`` always watches: on ``http.disconnect`` it cancels the stream, whose
``finally`` closes the upstream request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["DONE", "SSEResponse", "sse_data"]

DONE = b"data: [DONE]\n\n"


def sse_data(payload: Any) -> bytes:
    """One ``data:`` event. ASCII escapes keep lone surrogates from breaking the encoding."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class SSEResponse(Response):
    """Streams ``body`` as ``text/event-stream``; ``on_disconnect`` runs if the client leaves
    before the end."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncGenerator[bytes, None],
                 on_disconnect: Callable[[], None] | None = None) -> None:
        self.body_iterator = body
        self.on_disconnect = on_disconnect
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        if self.on_disconnect is not None:
                            self.on_disconnect()
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watch)
            try:
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                # The stream's own cleanup (closing the upstream) must run even when cancelled.
                with anyio.CancelScope(shield=True):
                    await self.body_iterator.aclose()
            group.cancel_scope.cancel()
