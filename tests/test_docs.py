"""Every code block in README.md and docs/ runs as written; policies in them validate; the
generated policy reference is current. (docs/adapters.md has its own test next to the adapters.)
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

from guardrail import load_policy
from guardrail.guard import build_monitors
from guardrail.policy import policy_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = {"adapters.md", "benchmarks.md", "policy.md"}


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


PYTHON_DOCS = [p for p in DOCS if p.name not in SKIP and blocks(p, "python")]


@pytest.mark.parametrize("path", PYTHON_DOCS, ids=[p.name for p in PYTHON_DOCS])
def test_python_blocks_run_in_order(path: Path, tmp_path: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for n, code in enumerate(blocks(path, "python")):
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code, f"{path.name} block {n}", "exec"), namespace)
    finally:
        os.chdir(cwd)


POLICIES = [(p, code) for p in DOCS for code in blocks(p, "yaml") if "monitors:" in code]


@pytest.mark.parametrize("path,code", POLICIES,
                         ids=[f"{p.name}-{i}" for i, (p, _) in enumerate(POLICIES)])
def test_policies_in_docs_validate(path: Path, code: str, tmp_path: Path) -> None:
    file = tmp_path / "policy.yaml"
    file.write_text(code)
    build_monitors(load_policy(file))


def test_policy_reference_is_current() -> None:
    assert (ROOT / "docs" / "policy.md").read_text() == policy_markdown(), \
        "regenerate with: guardrail schema --markdown > docs/policy.md"
