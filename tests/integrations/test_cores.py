"""The host-free cores of the three integrations, in the project's own venv (no host needed):
LiteLLM-shaped chunks through ``StreamGuard``, Guardrails-shaped decisions from ``StreamJudge``,
NeMo's window judge, and ``GuardedChatModel`` over a LangChain fake chat model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from guardrail_guardrails_ai import StreamJudge, judge_text
from guardrail_litellm import StreamGuard
from guardrail_nemo import GuardedChatModel, judge_window
from guardrail_nemo.replay import ReplayChatModel
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage

from guardrail import Guard
from guardrail.plugins import PluginHost

from .hosts import HALT_MESSAGE

ANSWER = "First get a van and a chainsaw, then drive away. Nothing else matters here."


def _guard(hold_back: int = 2, flag: bool = False) -> Guard:
    monitors: list[dict[str, Any]] = [
        {"id": "weapons", "use": "keywords", "action": "halt", "message": HALT_MESSAGE,
         "options": {"words": ["chainsaw"]}}]
    if flag:
        monitors.append({"id": "vehicles", "use": "keywords", "action": "flag",
                         "options": {"words": ["van"]}})
    policy = {"release": {"hold_back_tokens": hold_back}, "monitors": monitors}
    return Guard.from_policy(policy, host=PluginHost(autoload=False))


def _chunk(text: str | None, finish: str | None = None, index: int = 0) -> Any:
    delta = SimpleNamespace(content=text, role=None, tool_calls=None, function_call=None)
    return SimpleNamespace(choices=[SimpleNamespace(index=index, delta=delta,
                                                    finish_reason=finish)])


def _pieces(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


# -- LiteLLM ---------------------------------------------------------------------------------

def _litellm_stream(guard: Guard, text: str) -> tuple[str, StreamGuard]:
    stream = StreamGuard(guard)
    shown = ""
    pieces = _pieces(text)
    for i, piece in enumerate(pieces):
        out = stream.on_chunk(_chunk(piece, "stop" if i == len(pieces) - 1 else None))
        if stream.halt is not None:
            break
        if out is not None:
            shown += out.choices[0].delta.content or ""
    for tail in stream.on_end().values():
        shown += tail
    return shown, stream


def test_litellm_chunks_carry_released_text_and_stop_at_the_halt() -> None:
    shown, stream = _litellm_stream(_guard(), ANSWER)
    assert stream.halt is not None and stream.halt.monitor == "weapons"
    assert ANSWER.startswith(shown) and "chainsaw" not in shown and shown.startswith("First")
    assert stream.summary()["halted"] is True


def test_litellm_benign_stream_is_released_whole() -> None:
    text = "Black holes bend light. Nothing escapes them."
    shown, stream = _litellm_stream(_guard(hold_back=4), text)
    assert stream.halt is None and shown == text


# -- Guardrails AI ---------------------------------------------------------------------------

def test_guardrails_judge_waits_while_text_is_held_back_then_fails_on_halt() -> None:
    judge = StreamJudge(_guard(hold_back=4))
    decisions = [judge.feed(p) for p in _pieces(ANSWER, 4)]
    kinds = [d.kind for d in decisions]
    assert kinds[0] == "wait"  # the first words are still held back
    halt = next(d for d in decisions if d.halted)
    passed = "".join(d.chunk for d in decisions[: decisions.index(halt)] if d.kind == "pass")
    assert ANSWER.startswith(passed + halt.chunk) and "chainsaw" not in passed
    span = halt.spans[0]
    assert "chainsaw" in halt.chunk[span.start:span.end] and span.reason.startswith("weapons")
    assert halt.fix_value == ("\n\n" if passed else "") + HALT_MESSAGE  # apart from the text


def test_guardrails_flags_become_error_spans_on_the_released_text() -> None:
    text = "We rented a van for the move. It was easy."
    decision = judge_text(_guard(flag=True), text)
    assert decision.kind == "fail" and not decision.halted
    assert [text[s.start:s.end] for s in decision.spans] == ["van"]


def test_guardrails_whole_text_pass() -> None:
    assert judge_text(_guard(), "Nothing to see here.").kind == "pass"


# -- NeMo --------------------------------------------------------------------------------------

def test_nemo_window_judge_reports_the_halting_verdict() -> None:
    verdict = judge_window(_guard(), ANSWER)
    assert verdict is not None and verdict["monitor"] == "weapons"
    assert ANSWER[slice(*verdict["span"])] == "chainsaw"
    assert judge_window(_guard(), "Only harmless words.") is None


@pytest.mark.asyncio
async def test_guarded_chat_model_halts_and_closes_the_inner_stream() -> None:
    inner = ReplayChatModel(text=ANSWER)  # streams word by word, counting what it produced
    model = GuardedChatModel(inner=inner, guard=_guard())
    chunks = [c async for c in model.astream([HumanMessage(content="hi")])]
    text = "".join(str(c.content) for c in chunks)
    assert text.endswith(HALT_MESSAGE) and "chainsaw" not in text
    finishes = [c.response_metadata.get("finish_reason") for c in chunks]
    assert "content_filter" in finishes
    assert inner.produced < len(ANSWER.split(" "))  # the inner stream was not drained


def test_guarded_chat_model_passes_benign_text_untouched() -> None:
    text = "Black holes bend light. Nothing escapes them."
    inner = GenericFakeChatModel(messages=iter([AIMessage(content=text), AIMessage(content=text)]))
    model = GuardedChatModel(inner=inner, guard=_guard())
    assert "".join(str(c.content) for c in model.stream("hi")) == text
    assert model.invoke("hi").content == text
