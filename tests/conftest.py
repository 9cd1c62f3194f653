"""Shared fixtures. Core tests build their own plugin hosts so installed plugins don't matter.

The fast lane (``make check``) deselects ``real_model`` and ``slow`` tests. Besides explicit
marks, ``pytest_collection_modifyitems`` marks ``real_model`` every test whose code (the test,
the module's helpers it calls, its fixtures, a code or docs-page parameter) loads the real
SmolLM2, so a new one can't slip into the fast lane unmarked, and ``slow`` the plugins'
data-build and trainer tests, the tests that read a full data build, and the Ray tests.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from guardrail.plugins import PluginHost

# No timed unit tests (speed belongs in bench/): hypothesis's per-example deadline is off for
# every property test, so a busy machine can't fail one.
settings.register_profile("guardrail", deadline=None)
settings.load_profile("guardrail")

# Each httpx or openai client loads a CA bundle into its TLS context (about 35 ms of CPU, some
# 300 clients a run), though the tests speak plain HTTP over loopback and verify no certificate:
# with an empty CA directory as the only source (SSL_CERT_DIR, which both honour, and no
# SSL_CERT_FILE) that is free. Subprocesses inherit it.
_NO_CA = tempfile.TemporaryDirectory(prefix="guardrail-tests-no-ca-")
os.environ.pop("SSL_CERT_FILE", None)
os.environ["SSL_CERT_DIR"] = _NO_CA.name

# Data builds and trainers of the monitor plugins: seconds of CPU each, research code rather
# than the runtime, so outside the fast lane.
SLOW_MODULES = (
    "harmful_content/test_harm_build.py",
    "harmful_content/test_harm_own_answers.py",
    "harmful_content/test_harm_planted.py",
    "harmful_content/test_harm_train.py",
    "entity_hallucination/test_entity_build.py",
    "entity_hallucination/test_train.py",
    "entity_hallucination/test_train_combined.py",
)
# Fixtures that build a plugin's full data set (seconds per xdist worker).
SLOW_FIXTURES = frozenset({"full_build", "full_records"})

# Code (not prose: docstrings and comments are dropped first) that loads the real SmolLM2.
REAL_MODEL = re.compile(r"""LocalGenerator\(\)|LocalGenerator\.load\(|default_generator\(|
                            Guard\.default\(|Guard\(default_policy\(|['"]smollm2-135m['"]|
                            embedding_table\(None\)""", re.X)


@pytest.fixture
def host() -> PluginHost:
    """A plugin host with the built-ins only (no entry-point plugins)."""
    return PluginHost(autoload=False)


FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


@functools.cache
def _functions(filename: str) -> tuple[list[str], dict[int, FunctionNode]]:
    """A source file's lines and its functions by first line (decorators included), parsed
    once: collection asks for hundreds of functions from about a hundred files. Most files can't
    load the model or run code anywhere (read without comments and whitespace, as ``_code``
    reads a function): those are not parsed and give no functions."""
    text = Path(filename).read_text(encoding="utf-8")
    lines = text.splitlines()
    index: dict[int, FunctionNode] = {}
    code = re.sub(r"\s+", "", "".join(re.sub(r"#.*", "", line) for line in lines))
    if not REAL_MODEL.search(code) and "exec(" not in code:
        return lines, index
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, FunctionNode):
            index[min([node.lineno, *(d.lineno for d in node.decorator_list)])] = node
    return lines, index


# Where code that could load the model lives; fixtures of pytest and its plugins (tmp_path,
# the asyncio loop) are not read, which spares parsing their large modules in every worker.
PROJECT = tuple(str(Path(__file__).resolve().parents[1] / part) + "/"
                for part in ("tests", "guardrail", "plugins", "adapters", "examples"))


@functools.cache
def _code(obj: Any) -> tuple[str, set[str]]:
    """``obj``'s source without docstrings, comments and whitespace, and the names it uses."""
    code = getattr(inspect.unwrap(obj), "__code__", None)
    if code is None or not code.co_filename.startswith(PROJECT):
        return "", set()
    try:
        lines, index = _functions(code.co_filename)
    except (OSError, SyntaxError, UnicodeDecodeError):
        return "", set()
    node = index.get(code.co_firstlineno)
    if node is None:
        return "", set()
    docstrings: set[int] = set()
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0].value, "value", None), str):
            docstrings.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    kept = (re.sub(r"#.*", "", lines[n - 1])
            for n in range(code.co_firstlineno, (node.end_lineno or node.lineno) + 1)
            if n not in docstrings)
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    return re.sub(r"\s+", "", "".join(kept)), names


def _loads_real_model(item: pytest.Function) -> bool:
    code, names = _code(item.function)
    parts = [code]
    for name in names:  # the module's own helpers the test calls
        helper = getattr(item.module, name, None)
        if inspect.isfunction(helper) and helper.__module__ == item.module.__name__:
            parts.append(_code(helper)[0])
    for defs in item._fixtureinfo.name2fixturedefs.values():
        parts += [_code(d.func)[0] for d in defs]
    callspec = getattr(item, "callspec", None)
    runs_code = any("exec(" in part for part in parts)  # a docs example or page, run as code
    for value in (callspec.params.values() if callspec and runs_code else ()):
        if isinstance(value, str):  # a docs example's code
            parts.append(value)
        elif isinstance(value, Path) and value.suffix == ".md":  # a docs page run block by block
            parts.append(_python_blocks(value))
    return any(REAL_MODEL.search(part) for part in parts)


@functools.cache
def _python_blocks(page: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.as_posix().endswith(SLOW_MODULES) or item.get_closest_marker("ray") \
                or SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if isinstance(item, pytest.Function) and item.get_closest_marker("real_model") is None \
                and _loads_real_model(item):
            item.add_marker(pytest.mark.real_model)
