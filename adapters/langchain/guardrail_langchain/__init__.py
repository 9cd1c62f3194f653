"""guardrail-langchain: guard a LangChain stream with ``prompt | model | guard.as_runnable()``.

``GuardRunnable`` keeps streaming streaming (``stream``, ``astream``, ``astream_events``,
``invoke``, ``batch``), on ``str`` and chat message chunk streams alike. On halt the last chunk is
the halt message with ``response_metadata["finish_reason"] == "content_filter"``, and the model
upstream is stopped for real.
"""

from __future__ import annotations

from ._runnable import GuardRunnable, StreamHalted
from ._translate import CONTENT_FILTER, StreamTranslator

__all__ = ["CONTENT_FILTER", "GuardRunnable", "StreamHalted", "StreamTranslator"]
