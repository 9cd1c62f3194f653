"""guardrail-langchain: guard a LangChain stream with ``prompt | model | guard.as_runnable()``
(streams pick up the prompt from the model as it starts) or ``prompt | guard.wrap_model(model)``
(every mode, ``invoke`` included, hands the model's input to the guard).

``GuardRunnable`` keeps streaming streaming (``stream``, ``astream``, ``astream_events``,
``invoke``, ``batch``), on ``str`` and chat message chunk streams alike. On halt the last chunk is
the halt message with ``response_metadata["finish_reason"] == "content_filter"``, and the model
upstream is stopped for real.
"""

from __future__ import annotations

from ._runnable import GuardRunnable, StreamHalted
from ._translate import CONTENT_FILTER, StreamTranslator
from ._wrapped import GuardedModel, wrap_model

__all__ = ["CONTENT_FILTER", "GuardRunnable", "GuardedModel", "StreamHalted", "StreamTranslator",
           "wrap_model"]
