"""guardrail-guardrails-ai: guardrail's monitors as a Guardrails AI validator.

    from guardrails import Guard
    from guardrail_guardrails_ai import GuardrailMonitor

    guard = Guard().use(GuardrailMonitor(policy="policy.yaml", on_fail="exception"))

``GuardrailMonitor`` (registered as ``guardrail/monitor``) needs Guardrails AI
(``pip install 'guardrail-guardrails-ai[host]'``); it is imported on first use, so this package
imports without it. ``StreamJudge`` is the Guardrails-free core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._judge import Decision, Span, StreamJudge, judge_text

if TYPE_CHECKING:
    from ._validator import GuardrailMonitor

__all__ = ["Decision", "GuardrailMonitor", "Span", "StreamJudge", "judge_text"]


def __getattr__(name: str) -> Any:
    if name == "GuardrailMonitor":
        try:
            from ._validator import GuardrailMonitor
        except ImportError as exc:
            raise ImportError(
                f"GuardrailMonitor needs Guardrails AI ({exc}); "
                "pip install 'guardrail-guardrails-ai[host]'"
            ) from exc
        return GuardrailMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
