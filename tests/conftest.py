"""Shared fixtures. Core tests build their own plugin hosts so installed plugins don't matter.

The fast lane (``make check``) deselects ``real_model`` and ``slow`` tests. Besides explicit
marks, ``pytest_collection_modifyitems`` marks ``real_model`` every test whose code (the test,
the module's helpers it calls, its fixtures) loads the real SmolLM2, so a new one can't slip
into the fast lane unmarked, and ``slow`` the plugins' data-build and trainer tests.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from typing import Any

import pytest

from guardrail.plugins import PluginHost

# Data builds and trainers of the monitor plugins: seconds of CPU each, research code rather
# than the runtime, so outside the fast lane.
SLOW_MODULES = (
    "harmful_content/test_harm_build.py",
    "harmful_content/test_harm_own_answers.py",
    "harmful_content/test_harm_planted.py",
    "harmful_content/test_harm_train.py",
    "entity_hallucination/test_entity_build.py",
    "entity_hallucination/test_train.py",
)

# Code (not prose: docstrings and comments are dropped first) that loads the real SmolLM2.
REAL_MODEL = re.compile(r"""LocalGenerator\(\)|LocalGenerator\.load\(|default_generator\(|
                            Guard\.default\(|Guard\(default_policy\(|['"]smollm2-135m['"]""", re.X)


@pytest.fixture
def host() -> PluginHost:
    """A plugin host with the built-ins only (no entry-point plugins)."""
    return PluginHost(autoload=False)


def _code(obj: Any) -> tuple[str, set[str]]:
    """``obj``'s source without docstrings and comments, and the names it uses."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError, SyntaxError):
        return "", set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0].value, "value", None), str):
            body[0] = ast.Pass()
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return ast.unparse(tree), names


def _loads_real_model(item: pytest.Function) -> bool:
    code, names = _code(item.function)
    parts = [code]
    for name in names:  # the module's own helpers the test calls
        helper = getattr(item.module, name, None)
        if inspect.isfunction(helper) and helper.__module__ == item.module.__name__:
            parts.append(_code(helper)[0])
    for defs in item._fixtureinfo.name2fixturedefs.values():
        parts += [_code(d.func)[0] for d in defs]
    return any(REAL_MODEL.search(part) for part in parts)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.as_posix().endswith(SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
        if isinstance(item, pytest.Function) and item.get_closest_marker("real_model") is None \
                and _loads_real_model(item):
            item.add_marker(pytest.mark.real_model)
