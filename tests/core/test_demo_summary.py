"""The demo's summary line counts the replays that got what their label expects from the rows'
verdicts; nothing in it is written by hand."""

from __future__ import annotations

import pytest

from guardrail.toolkit.demo import summary_line


@pytest.mark.parametrize(("verdicts", "met", "judged"), [
    (["-", "pass ✓", "halt ✓", "halt ✗ missed", "flag ✓", "pass ✗ halted"], 3, 5),
    (["pass ✓", "halt ✓", "halt ✓", "flag ✓", "pass ✓"], 5, 5),
    (["halt ✗ missed", "flag (no entity-hallucination)", "-"], 0, 2),
])
def test_the_count_follows_the_verdicts(verdicts: list[str], met: int, judged: int) -> None:
    line = summary_line(verdicts)
    assert line is not None
    assert line.startswith(f"{met} of {judged} replays got what their label expects")
    # the pointer to the measured limits appears exactly when something was missed
    assert ("measured limits" in line) is (met < judged)


def test_no_judged_rows_no_line() -> None:
    assert summary_line(["-", "-"]) is None
