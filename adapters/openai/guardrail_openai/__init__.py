"""guardrail-openai: guard an OpenAI-compatible client's chat completions.

    from openai import OpenAI
    from guardrail import Guard

    client = Guard.from_yaml("policy.yaml").wrap(OpenAI())
    for chunk in client.chat.completions.create(model=..., messages=[...], stream=True):
        print(chunk.choices[0].delta.content or "", end="")

Streams stay streams (``GuardedStream`` / ``AsyncGuardedStream`` mirror openai's ``Stream``);
chunks stay ``ChatCompletionChunk``; text is held back as the policy says; a halt ends the stream
with the halt message and ``finish_reason="content_filter"`` and closes the upstream response.
"""

from __future__ import annotations

from ._chunks import REASONING_FIELDS, ChunkGuard, guard_completion, request_messages
from ._client import AsyncGuardedCompletions, GuardedClient, GuardedCompletions, wrap
from ._logprobs import LogprobFilter
from ._stream import AsyncGuardedStream, GuardedStream

__all__ = [
    "REASONING_FIELDS",
    "AsyncGuardedCompletions",
    "AsyncGuardedStream",
    "ChunkGuard",
    "GuardedClient",
    "GuardedCompletions",
    "GuardedStream",
    "LogprobFilter",
    "guard_completion",
    "request_messages",
    "wrap",
]
