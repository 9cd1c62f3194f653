"""What a monitor receives (docs/plugins.md): ``Features.generated`` tells observer rows (the state
after each token) from a generator's own steps (the step that produced each token)."""

from __future__ import annotations

from guardrail import Features, Guard, Monitor, Score, StepToken, StreamStep
from guardrail.testing import plugin_monitors


class Recorder(Monitor):
    def __init__(self) -> None:
        self.batches: list[tuple[bool, list[str]]] = []

    def update(self, state: None, features: Features) -> list[Score]:
        texts = [features.token_text(k) for k in range(len(features.tokens))]
        self.batches.append((features.generated, texts))
        return [Score(i, 0.0) for i in features.indices]


def _guard(recorder: Recorder) -> Guard:
    with plugin_monitors(recorder=lambda: recorder) as host:
        return Guard.from_policy({"monitors": [{"id": "r", "use": "recorder"}]}, host=host)


def test_text_streams_are_not_generated_and_generator_steps_are() -> None:
    recorder = Recorder()
    guard = _guard(recorder)
    guard.check("Paris is big.")
    assert recorder.batches and all(not generated for generated, _ in recorder.batches)
    recorder.batches.clear()
    session = guard.session()
    for i, piece in enumerate(["Par", "is", " is"]):
        session.feed(StreamStep(text=piece, tokens=[StepToken(i, piece)]))
    session.finish()
    assert [texts for _, texts in recorder.batches] == [["Par"], ["is"], [" is"]]
    assert all(generated for generated, _ in recorder.batches)
