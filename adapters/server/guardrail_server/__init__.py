"""guardrail-server: an OpenAI-compatible proxy with the guard in front.

    guardrail serve --policy policy.yaml --upstream http://127.0.0.1:8080/v1
    guardrail serve --local smollm2-135m        # a guardrail-transformers LocalGenerator

or from Python::

    from guardrail_server import create_app, running
    with running(create_app(guard, upstream="http://127.0.0.1:8080/v1")) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key=...)

``POST /v1/chat/completions`` (SSE or one JSON body), ``GET /v1/models``, ``GET /health``.
Chunks keep OpenAI's shape; guard events ride along in an extra ``guardrail`` field; a halt ends
the stream with the halt message, ``finish_reason: "content_filter"`` and ``data: [DONE]``, and
closes the upstream request.
"""

from __future__ import annotations

from ._app import create_app
from ._local import LocalModel
from ._serve import (
    API_KEY_ENV,
    CLIENT_KEYS_ENV,
    RunningServer,
    load_local_model,
    running,
    serve_cli,
)
from ._stream import ReportHook
from ._upstream import UpstreamError

__all__ = [
    "API_KEY_ENV",
    "CLIENT_KEYS_ENV",
    "LocalModel",
    "ReportHook",
    "RunningServer",
    "UpstreamError",
    "create_app",
    "load_local_model",
    "running",
    "serve_cli",
]
