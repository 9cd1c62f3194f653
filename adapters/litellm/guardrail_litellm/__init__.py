"""guardrail-litellm: guardrail's monitors as a LiteLLM proxy guardrail.

In LiteLLM's ``config.yaml``::

    guardrails:
      - guardrail_name: guardrail-stream
        litellm_params: {guardrail: guardrail_litellm.GuardrailLiteLLM, mode: post_call,
                         default_on: true, policy: policy.yaml}

``GuardrailLiteLLM`` needs LiteLLM (``pip install 'guardrail-litellm[host]'``); it is imported on
first use, so this package imports without LiteLLM. ``StreamGuard`` is the LiteLLM-free core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._stream import StreamGuard, guard_text, request_messages

if TYPE_CHECKING:
    from ._guardrail import GuardrailLiteLLM

__all__ = ["GuardrailLiteLLM", "StreamGuard", "guard_text", "request_messages"]


def __getattr__(name: str) -> Any:
    if name == "GuardrailLiteLLM":
        try:
            from ._guardrail import GuardrailLiteLLM
        except ImportError as exc:
            raise ImportError(
                f"GuardrailLiteLLM needs LiteLLM ({exc}); "
                "pip install 'guardrail-litellm[host]'"
            ) from exc
        return GuardrailLiteLLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
