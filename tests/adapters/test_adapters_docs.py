"""The code in docs/adapters.md runs as written, and each example stays under ten lines."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
PRELUDE, EXAMPLES = BLOCKS[0], BLOCKS[1:]


def _run(code: str) -> str:
    namespace: dict[str, object] = {"__name__": "docs_example"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(PRELUDE, "prelude", "exec"), namespace)
        exec(compile(code, str(DOC), "exec"), namespace)
    return out.getvalue()


def test_doc_has_the_examples() -> None:
    joined = "\n".join(EXAMPLES)
    for needle in ("as_runnable()", "openai.OpenAI(", "openai.AsyncOpenAI(", "UpstreamServer()"):
        assert needle in joined


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_example_is_short(code: str) -> None:
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) < 10, code


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_example_runs(code: str) -> None:
    printed = _run(code)
    if "ANSWER" in code:  # the guarded examples show the halt message and never the trigger
        assert "I can't help with that." in printed
        assert "bomb" not in printed
