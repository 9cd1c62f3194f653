"""Units stay small, read from the source: no function of the core, a plugin or an adapter runs
past 60 lines (the trainers included: they stay small staged pipelines), and no file of a
plugin's ``training/`` package past 400."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400


def _packages() -> list[Path]:
    """The core package, and each plugin's and adapter's package (and plugin module)."""
    found = [ROOT / "guardrail"]
    for path in sorted([*ROOT.glob("plugins/*/guardrail_*"), *ROOT.glob("adapters/*/guardrail_*")]):
        if (path / "__init__.py").is_file() or path.suffix == ".py":
            found.append(path)
    return found


def _training_packages() -> list[Path]:
    return sorted(p for p in ROOT.glob("plugins/*/guardrail_*/training") if p.is_dir())


FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def _size(node: FunctionNode) -> int:
    return (node.end_lineno or node.lineno) - node.lineno + 1


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, FunctionNode]]:
    """Every function in ``tree`` with its qualified name (``Class.method``, ``outer.inner``)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, FunctionNode | ast.ClassDef):
            name = f"{prefix}{node.name}"
            if isinstance(node, FunctionNode):
                yield name, node
            yield from _functions(node, f"{name}.")
        else:
            yield from _functions(node, prefix)


def _oversized_functions(package: Path) -> list[str]:
    """``file:line name (N lines)`` for each function over the limit."""
    found = []
    for file in sorted(package.rglob("*.py")) if package.is_dir() else [package]:
        where = file.relative_to(ROOT).as_posix()
        for name, node in _functions(ast.parse(file.read_text(encoding="utf-8"))):
            size = _size(node)
            if size > MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.lineno} {name} ({size} lines)")
    return found


def _oversized_files(package: Path) -> list[str]:
    found = []
    for file in sorted(package.rglob("*.py")):
        lines = len(file.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            found.append(f"{file.relative_to(ROOT)} ({lines} lines)")
    return found


def test_the_core_every_plugin_and_every_adapter_are_checked() -> None:
    checked = {p.relative_to(ROOT).as_posix() for p in _packages()}
    assert {"guardrail", "plugins/harmful-content/guardrail_harmful_content",
            "plugins/router/guardrail_router", "adapters/server/guardrail_server",
            "adapters/openai/guardrail_openai"} <= checked


def test_every_plugin_with_a_trainer_is_checked() -> None:
    plugins = {p.parent.parent.name for p in _training_packages()}
    assert {"entity-hallucination", "router", "harmful-content"} <= plugins


def test_a_long_method_is_found_by_its_qualified_name() -> None:
    body = "\n".join(f"        x = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"class A:\n    def f(self):\n{body}\n    def g(self):\n        pass\n")
    sizes = {name: _size(node) for name, node in _functions(tree)}
    assert sizes == {"A.f": MAX_FUNCTION_LINES + 1, "A.g": 2}


@pytest.mark.parametrize("package", [pytest.param(p, id=p.relative_to(ROOT).as_posix())
                                     for p in _packages()])
def test_functions_stay_small(package: Path) -> None:
    oversized = _oversized_functions(package)
    assert not oversized, (f"over {MAX_FUNCTION_LINES} lines; split into well-named steps:\n"
                           + "\n".join(oversized))


@pytest.mark.parametrize("package", [pytest.param(p, id=p.parent.parent.name)
                                     for p in _training_packages()])
def test_trainer_files_stay_small(package: Path) -> None:
    oversized = _oversized_files(package)
    assert not oversized, (f"over {MAX_FILE_LINES} lines a file; split into stages:\n"
                           + "\n".join(oversized))
