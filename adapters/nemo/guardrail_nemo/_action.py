"""The output-rail action: our monitors judge the text NeMo hands an output rail.

NeMo decides when an output rail runs: while streaming, once per ``chunk_size`` stream deltas
over the last ``chunk_size + context_size`` deltas (``rails.output.streaming``), else once over
the whole answer. The action cannot change that cadence; it judges each window with a fresh
dry-run session (NeMo gives an action no stream identity to keep a session across windows) and
blocks when any verdict of the policy would halt. For per-token halting inside NeMo, wrap the
model instead (``GuardedChatModel``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from guardrail import Guard

__all__ = ["ACTION_NAME", "COLANG", "judge_window", "make_output_action", "register"]

ACTION_NAME = "guardrail_check_output"

# The Colang (1.0) subflow that runs the action as an output rail; list it under
# rails.output.flows as "guardrail check output".
COLANG = """\
define subflow guardrail check output
  $verdict = execute guardrail_check_output
  if $verdict.is_blocked
    bot refuse to respond
    stop

define bot refuse to respond
  "I can't continue with this answer."
"""


def judge_window(guard: Guard, text: str, prompt: str | None = None) -> dict[str, Any] | None:
    """The first verdict that would halt or route on ``text`` (as a dict), or None when none.

    A dry-run session turns every verdict into a flag whose ``action`` says what it would do,
    so a window is judged in full without cutting it short."""
    session = guard.session(prompt=prompt, dry_run=True)
    session.feed(text)
    report = session.finish()
    for flag in report.flags:
        if flag.action in ("halt", "route"):
            return {"monitor": flag.monitor, "score": flag.score, "span": list(flag.span),
                    "rule": flag.rule, "action": flag.action}
    return None


def make_output_action(guard: Guard) -> Callable[..., Awaitable[Any]]:
    """An async NeMo action returning ``RailOutcome``: BLOCK when the policy would halt the
    rail's text (``context["bot_message"]``), ALLOW otherwise."""
    from nemoguardrails.actions.rail_outcome import RailOutcome

    async def guardrail_check_output(context: Mapping[str, Any] | None = None,
                                     **kwargs: Any) -> Any:
        context = context or {}
        text = str(context.get("bot_message") or "")
        prompt = context.get("user_message")
        verdict = judge_window(guard, text, prompt if isinstance(prompt, str) else None)
        if verdict is None:
            return RailOutcome.allow()
        return RailOutcome.block(reason=f"guardrail monitor {verdict['monitor']} "
                                 f"({verdict['rule']} rule, score {verdict['score']:.3f})",
                                 metadata=verdict)

    return guardrail_check_output


def register(rails: Any, guard: Guard | None = None, *, policy: str | None = None) -> Any:
    """Register the action on an ``LLMRails`` (or the ``app`` a config's ``config.py`` ``init``
    receives) under ``guardrail_check_output``; returns ``rails``."""
    if guard is None:
        guard = Guard.from_yaml(policy) if policy else Guard.default()
    rails.register_action(make_output_action(guard), ACTION_NAME)
    return rails
