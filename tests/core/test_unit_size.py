"""The trainers stay small staged pipelines: no function of a plugin's ``training/`` package runs
past 60 lines and no file past 400, read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400


def _training_packages() -> list[Path]:
    return sorted(p for p in ROOT.glob("plugins/*/guardrail_*/training") if p.is_dir())


def _oversized(package: Path) -> list[str]:
    """``file:line name (N lines)`` for each function over the limit, ``file (N lines)`` for
    each file over it."""
    found = []
    for file in sorted(package.rglob("*.py")):
        text = file.read_text(encoding="utf-8")
        where = file.relative_to(ROOT)
        lines = len(text.splitlines())
        if lines > MAX_FILE_LINES:
            found.append(f"{where} ({lines} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    found.append(f"{where}:{node.lineno} {node.name} ({size} lines)")
    return found


def _params() -> list[object]:
    params: list[object] = []
    for package in _training_packages():
        params.append(pytest.param(package, id=package.parent.parent.name))
    return params


def test_every_plugin_with_a_trainer_is_checked() -> None:
    plugins = {p.parent.parent.name for p in _training_packages()}
    assert {"entity-hallucination", "router", "harmful-content"} <= plugins


@pytest.mark.parametrize("package", _params())
def test_trainer_functions_and_files_stay_small(package: Path) -> None:
    oversized = _oversized(package)
    assert not oversized, (f"over {MAX_FUNCTION_LINES} lines a function or {MAX_FILE_LINES} a "
                           "file; split into stages:\n" + "\n".join(oversized))
