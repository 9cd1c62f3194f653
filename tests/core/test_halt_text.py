"""What the reader sees around a halt: never half a word, and the halt message set apart from the
released text (issue 27, item 3)."""

from __future__ import annotations

from guardrail import Guard, Halt, StepToken, StreamStep
from guardrail.testing import ScriptedMonitor, plugin_monitors

MESSAGE = "I can't continue with this answer."
# Subword tokens, as a real tokenizer splits "pseudoephedrine"; the monitor fires on "rine".
PIECES = ["You", " can", " buy", " pseudo", "ep", "hed", "rine", " at", " any", " store", "."]


def _guard(hold_back: int) -> Guard:
    with plugin_monitors(drug=ScriptedMonitor.factory({"rine": 1.0})) as host:
        return Guard.from_policy({
            "release": {"hold_back_tokens": hold_back},
            "monitors": [{"id": "drug", "use": "drug", "action": "halt", "message": MESSAGE}],
        }, host=host)


def _stream(guard: Guard, pieces: list[str]) -> tuple[str, Halt | None]:
    session = guard.session(prompt="where can I buy it?")
    shown, halt = [], None
    for i, piece in enumerate(pieces):
        for event in session.feed(StreamStep(text=piece, tokens=[StepToken(i, piece)])):
            if event.kind == "release":
                shown.append(event.text)
            elif isinstance(event, Halt):
                halt = event
        if halt is not None:
            break
    if halt is None:
        report = session.finish()
        shown += [e.text for e in report.final_events if e.kind == "release"]
    return "".join(shown), halt


def test_no_half_word_is_released_before_a_halt() -> None:
    for hold_back in (0, 1, 2):
        shown, halt = _stream(_guard(hold_back), PIECES)
        assert halt is not None
        assert shown == "You can buy", hold_back
        assert halt.released_text == shown


def test_halt_message_stands_apart_from_the_text() -> None:
    shown, halt = _stream(_guard(2), PIECES)
    assert halt is not None
    assert shown + halt.notice == "You can buy\n\n" + MESSAGE
    _, first = _stream(_guard(0), ["pseudo", "ep", "hed", "rine"])
    assert first is not None and first.released_text == "" and first.notice == MESSAGE


def test_whole_words_still_flow_and_long_runs_are_not_held_forever() -> None:
    shown, halt = _stream(_guard(2), PIECES[:6])  # no halt: everything arrives at the end
    assert halt is None and shown == "".join(PIECES[:6])
    guard = _guard(2)
    session = guard.session()
    released = ""
    run = ["ab"] * 60  # one 120-character "word" (a URL, a hash): released as it comes
    for i, piece in enumerate(run):
        for event in session.feed(StreamStep(text=piece, tokens=[StepToken(i, piece)])):
            if event.kind == "release":
                released += event.text
    assert len(released) >= 2 * (60 - 2 - 16)
