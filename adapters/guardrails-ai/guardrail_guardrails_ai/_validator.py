"""``GuardrailMonitor``: a guardrail policy as a Guardrails AI validator (imports guardrails; reach
it through ``guardrail_guardrails_ai.GuardrailMonitor`` so the package imports without it).

    from guardrails import Guard
    from guardrail_guardrails_ai import GuardrailMonitor

    guard = Guard().use(GuardrailMonitor(policy="policy.yaml", on_fail="exception"))
    for outcome in guard(my_llm, messages=[...], stream=True):
        print(outcome.validated_output, end="")

Registered as ``guardrail/monitor`` for strings. Streaming replaces Guardrails' sentence
chunking: every chunk feeds our session (per-token monitors, one state per stream, no re-scan),
and the validator answers as soon as our policy decides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guardrails.types.on_fail import OnFailAction
from guardrails.validator_base import (
    ErrorSpan,
    FailResult,
    PassResult,
    ValidationResult,
    Validator,
    register_validator,
)

from guardrail import Guard, GuardrailError

from ._judge import Decision, Span, StreamJudge, judge_text

__all__ = ["GuardrailMonitor"]

NAME = "guardrail/monitor"


@register_validator(name=NAME, data_type="string")
class GuardrailMonitor(Validator):
    """Runs a guardrail policy over a string or a stream of chunks.

    ``policy``: a policy YAML path (default: the built-in default policy); ``guard``: a ready
    ``guardrail.Guard`` instead. A halt is a ``FailResult`` whose ``fix_value`` is the halt
    message and whose error span covers the retracted text from the token that fired; flags are
    ``FailResult``s with one error span per flag (``on_fail="noop"`` keeps the stream going and
    marks it not passed, which is how Guardrails reports flags). Like Guardrails' own streaming
    state, one validator instance follows one stream at a time.
    """

    def __init__(self, policy: str | None = None, prompt: str | None = None,
                 on_fail: Any = None, guard: Guard | None = None, **kwargs: Any) -> None:
        super().__init__(on_fail=on_fail, policy=policy, prompt=prompt, **kwargs)
        if guard is None:
            if policy is not None and not Path(policy).expanduser().is_file():
                raise GuardrailError(f"GuardrailMonitor(policy=...): no policy file at {policy!r}")
            guard = Guard.from_yaml(Path(policy).expanduser()) if policy else Guard.default()
        self.guard = guard
        self.prompt = prompt
        self._judge: StreamJudge | None = None

    def validate(self, value: Any, metadata: dict[str, Any]) -> ValidationResult:
        """A whole string (``guard.validate(text)``, non-streamed calls)."""
        return _result(judge_text(self.guard, str(value), metadata.get("prompt", self.prompt)))

    def validate_stream(self, chunk: Any, metadata: dict[str, Any], **kwargs: Any
                        ) -> ValidationResult | None:
        """One streamed chunk: ``None`` while our policy holds text back, else a result for the
        text it released (or retracted). ``remainder=True`` (end of stream, passed by the fix
        path) judges the held-back tail."""
        if self._judge is None:
            self._judge = StreamJudge(self.guard, metadata.get("prompt", self.prompt))
        judge = self._judge
        decision = judge.feed(str(chunk or ""))
        if kwargs.get("remainder") and not decision.halted:
            tail = judge.finish()
            decision = _merge(decision, tail)
        if kwargs.get("remainder") or (decision.halted and self._stream_ends_on_fail()):
            self._judge = None  # this stream is over: the next chunk starts a new one
        if decision.kind == "wait":
            return None
        return _result(decision)


    def _stream_ends_on_fail(self) -> bool:
        """Whether a failed result ends the stream here. ``exception`` raises out of it; ``noop``
        never tells a validator that a stream ended (its path passes no ``remainder``), so the
        rest of a halted stream is judged as a new one. ``fix`` keeps the halted stream until its
        ``remainder`` call, so nothing after the halt is released."""
        return self.on_fail_descriptor in (OnFailAction.EXCEPTION, OnFailAction.NOOP)


def _merge(first: Decision, second: Decision) -> Decision:
    """Two consecutive decisions over adjacent text as one (the chunk plus the stream's tail)."""
    if first.kind == "wait":
        return second
    if second.kind == "wait" or (not second.chunk and second.kind == "pass"):
        return first
    shift = len(first.chunk)
    spans = first.spans + tuple(Span(s.start + shift, s.end + shift, s.reason)
                                for s in second.spans)
    failed = "fail" in (first.kind, second.kind)
    fix = None
    if failed:
        fix = (first.fix_value if first.fix_value is not None else first.chunk) + (
            second.fix_value if second.fix_value is not None else second.chunk)
    return Decision("fail" if failed else "pass", chunk=first.chunk + second.chunk, spans=spans,
                    message="; ".join(m for m in (first.message, second.message) if m),
                    fix_value=fix, halted=second.halted)


def _result(decision: Decision) -> ValidationResult:
    if decision.kind == "pass":
        return PassResult(validated_chunk=decision.chunk)
    return FailResult(
        error_message=decision.message,
        fix_value=decision.fix_value,
        error_spans=[ErrorSpan(start=s.start, end=s.end, reason=s.reason)
                     for s in decision.spans],
        validated_chunk=decision.chunk,
    )
