"""The layering, read from the source: the core imports no plugin or adapter, distributions
import each other one way, no module-level import circle, and no distribution reaches for another
one's private names. Within the core and each plugin, the runtime never imports the training
side (``guardrail.toolkit``, a plugin's ``training/``). Plugin entry points stay light (every
``guardrail`` start loads them)."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = "guardrail"


def _distributions() -> dict[str, Path]:
    """Each distribution's directory, by the top-level names it installs."""
    owners: dict[str, Path] = {CORE: ROOT}
    for group in ("plugins", "adapters", "examples"):
        for dist in sorted((ROOT / group).glob("*/pyproject.toml")):
            for top in dist.parent.iterdir():
                if top.name.startswith("guardrail_") and (
                        (top / "__init__.py").exists() or top.suffix == ".py"):
                    owners[top.name.removesuffix(".py")] = dist.parent
    return owners


OWNERS = _distributions()


def _sources() -> Iterator[tuple[str, Path]]:
    """(top-level name, file) for every Python file the distributions install."""
    for top, dist in OWNERS.items():
        path = dist / top if (dist / top).is_dir() else dist / f"{top}.py"
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            yield top, file


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    module: str  # absolute
    names: tuple[str, ...]  # for ``from module import names``
    module_level: bool  # runs on import (not in a function, not under TYPE_CHECKING)

    def __str__(self) -> str:
        what = f"from {self.module} import {', '.join(self.names)}" if self.names \
            else f"import {self.module}"
        return f"{self.file.relative_to(ROOT)}:{self.line}: {what}"


def _module_name(file: Path) -> str:
    top = next(t for t, d in OWNERS.items() if file.is_relative_to(d / t)
               or file == d / f"{t}.py")
    rel = file.relative_to(OWNERS[top]).with_suffix("").parts
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


@functools.cache
def _tree(file: Path) -> ast.Module:
    """``file`` parsed, once: the tests below read the same files many times over."""
    return ast.parse(file.read_text(encoding="utf-8"))


def _callee(func: ast.expr) -> str:
    """The called name's last part (``import_module`` of ``importlib.import_module``)."""
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else ast.unparse(func)


@functools.cache
def _imports(file: Path) -> list[Import]:
    tree = _tree(file)
    package = _module_name(file) if file.name == "__init__.py" \
        else _module_name(file).rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(file, node.lineno, a.name, (), module_level) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            found.append(Import(file, node.lineno, module, tuple(a.name for a in node.names),
                                module_level))
        elif isinstance(node, ast.Call) and _callee(node.func).endswith("import_module") \
                and node.args and isinstance(node.args[0], ast.Constant):
            found.append(Import(file, node.lineno, str(node.args[0].value), (), False))
        for child in ast.iter_child_nodes(node):
            lazy = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            visit(child, module_level and not lazy)

    visit(tree, True)
    return found


@functools.cache
def _all_imports() -> list[Import]:
    return [imp for _, file in _sources() for imp in _imports(file)]


def _owner(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in OWNERS else None


def test_the_core_imports_no_plugin_or_adapter() -> None:
    """Lazy imports (inside functions, ``importlib``) count too: the core reaches plugins and
    adapters through hooks only."""
    core = [imp for imp in _all_imports() if imp.file.is_relative_to(ROOT / CORE)]
    assert len(core) > 100  # the walk reads the core
    wrong = [str(imp) for imp in core if imp.module.split(".")[0].startswith("guardrail_")]
    assert wrong == []


def test_distributions_import_each_other_one_way() -> None:
    edges: dict[Path, set[Path]] = {}
    for imp in _all_imports():
        target = _owner(imp.module)
        source = next(OWNERS[t] for t in OWNERS if imp.file.is_relative_to(OWNERS[t] / t)
                      or imp.file == OWNERS[t] / f"{t}.py")
        if target is not None and OWNERS[target] != source:
            edges.setdefault(source, set()).add(OWNERS[target])
    assert _cycles(edges) == []


def test_no_module_level_import_circle() -> None:
    modules = {_module_name(file) for _, file in _sources()}
    edges: dict[str, set[str]] = {}
    for imp in _all_imports():
        if not imp.module_level:
            continue
        source = _module_name(imp.file)
        for name in imp.names or ("",):
            target = f"{imp.module}.{name}" if f"{imp.module}.{name}" in modules else imp.module
            if target in modules and target != source:
                edges.setdefault(source, set()).add(target)
    assert _cycles(edges) == []


def _cycles(edges: dict[Any, set[Any]]) -> list[list[str]]:
    """The strongly connected components larger than one node (Tarjan)."""
    index: dict[object, int] = {}
    low: dict[object, int] = {}
    stack: list[object] = []
    out: list[list[str]] = []

    def visit(v: object) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(str(w))
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_distribution_imports_a_private_name_of_another() -> None:
    """``from guardrail.cli import _policy``, ``from guardrail_server._serve import x`` and
    ``guardrail.x._y`` are private to their distribution: the plugin SDK is what ``__all__``
    lists."""
    wrong = []
    for top, file in _sources():
        if top == CORE:
            continue
        for imp in _imports(file):
            owner = _owner(imp.module)
            if owner is None or OWNERS[owner] == OWNERS[top]:
                continue
            private = [p for p in imp.module.split(".")[1:] if p.startswith("_")]
            private += [n for n in imp.names if n.startswith("_")]
            if private:
                wrong.append(str(imp))
        wrong += [f"{file.relative_to(ROOT)}:{line}: {dotted}"
                  for line, dotted in _private_attributes(file, top)]
    assert wrong == []


def _module_file(module: str) -> Path | None:
    owner = _owner(module)
    if owner is None:
        return None
    base = OWNERS[owner].joinpath(*module.split("."))
    for file in (base.with_suffix(".py"), base / "__init__.py"):
        if file.exists():
            return file
    return None


@functools.cache
def _declared(file: Path) -> set[str] | None:
    """The names a module's literal ``__all__`` lists (None: it declares none)."""
    for node in _tree(file).body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            value = ast.literal_eval(node.value) if node.value is not None else []
            return {str(n) for n in value}
    return None


def test_what_a_distribution_imports_from_another_is_declared() -> None:
    """The plugin SDK is declared: each name imported from another distribution's module is in
    that module's ``__all__`` (or is a submodule of it)."""
    wrong = []
    checked = 0
    for top, file in _sources():
        for imp in _imports(file):
            owner = _owner(imp.module)
            if owner is None or OWNERS[owner] == OWNERS[top] or not imp.names:
                continue
            target = _module_file(imp.module)
            if target is None:  # a typo the import itself finds
                continue
            declared = _declared(target)
            for name in imp.names:
                checked += 1
                if _module_file(f"{imp.module}.{name}") is not None:
                    continue
                if declared is None or name not in declared:
                    wrong.append(f"{imp}: {name!r} not in {target.relative_to(ROOT)}'s __all__")
    assert checked > 200  # the walk reads the plugins and adapters
    assert wrong == []


def _private_attributes(file: Path, top: str) -> list[tuple[int, str]]:
    """``pkg.mod._name`` attribute chains rooted at another distribution's package."""
    found = []
    for node in ast.walk(_tree(file)):
        if not isinstance(node, ast.Attribute):
            continue
        dotted = ast.unparse(node)
        parts = dotted.split(".")
        owner = _owner(parts[0])
        if owner is None or OWNERS[owner] == OWNERS[top]:
            continue
        if any(p.startswith("_") and not p.startswith("__") for p in parts[1:]):
            found.append((node.lineno, dotted))
    return found


def test_loading_plugins_and_building_the_cli_imports_no_heavy_stack() -> None:
    """Every ``guardrail`` command loads the entry-point plugins, builds the parser with their
    commands and lists the registered monitors; the model, client and server stacks wait until
    a policy or command uses them."""
    code = ("import sys\n"
            "from guardrail.cli import build_parser\n"
            "from guardrail.plugins import get_host\n"
            "build_parser(); get_host().adapters(); get_host().monitors()\n"
            "names = [p['name'] for p in get_host().plugins()]\n"
            "heavy = ['torch', 'openai', 'langchain_core', 'starlette', 'uvicorn', 'httpx']\n"
            "print(names, [m for m in heavy if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    names, heavy = out.stdout.strip().rsplit("] [", 1)
    assert heavy == "]"
    for plugin in ("openai", "langchain", "server", "transformers"):
        assert f"'{plugin}'" in names  # the adapters' entry points were among those loaded


# -- runtime and training apart ------------------------------------------------------------------

TOOLKIT = ROOT / CORE / "toolkit"
TESTING = ROOT / CORE / "testing"


def _is(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _toolkit_import(imp: Import) -> bool:
    """``imp`` reaches the core toolkit: by its path or a name imported from ``guardrail``
    (``from guardrail import toolkit``)."""
    targets = [imp.module, *(f"{imp.module}.{n}" for n in imp.names)]
    return any(_is(t, f"{CORE}.toolkit") for t in targets)


def _core_files(under: Path) -> list[Path]:
    return sorted(under.rglob("*.py"))


def _core_runtime() -> list[Path]:
    return [f for f in _core_files(ROOT / CORE) if not f.is_relative_to(TOOLKIT)
            and not f.is_relative_to(TESTING)]


def test_the_core_runtime_never_imports_the_toolkit() -> None:
    """Lazy imports count: the runtime reaches the toolkit's commands through the command hook
    (``guardrail.toolkit.commands`` is a built-in plugin), never by importing it."""
    runtime = _core_runtime()
    assert ROOT / CORE / "session.py" in runtime and ROOT / CORE / "cli.py" in runtime
    assert all(not f.is_relative_to(TOOLKIT) for f in runtime)
    wrong = [str(imp) for f in runtime for imp in _imports(f) if _toolkit_import(imp)]
    assert wrong == []


def test_neither_runtime_nor_toolkit_imports_the_test_helpers() -> None:
    files = [*_core_runtime(), *_core_files(TOOLKIT)]
    assert ROOT / CORE / "toolkit" / "records.py" in files
    wrong = [str(imp) for f in files for imp in _imports(f)
             if any(_is(t, f"{CORE}.testing")
                    for t in (imp.module, *(f"{imp.module}.{n}" for n in imp.names)))]
    assert wrong == []


PLUGINS = sorted(d for d in (ROOT / "plugins").glob("*") if (d / "pyproject.toml").exists())


def _package(dist: Path) -> Path:
    packages = [p for p in dist.glob("guardrail_*") if (p / "__init__.py").exists()]
    assert len(packages) == 1, packages
    return packages[0]


# Runtime modules besides the entry point, the monitor and the head: drivers a user runs without
# the monitor (the router's local and HTTP routing).
DRIVERS = {"guardrail_router": ("local", "remote")}


def _registered(plugin: Path, package: str) -> list[str]:
    """Modules the entry point registers by ``"module:attribute"`` (loaded when a policy uses
    them)."""
    return [node.value.split(":")[0] for node in ast.walk(ast.parse(plugin.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.startswith(f"{package}.") and ":" in node.value]


def _runtime_of(package: Path) -> dict[Path, list[Import]]:
    """The plugin's runtime: its entry point, the modules that registers, its monitor and head
    and drivers, and every module of the plugin those import, at module level or lazily (the
    entry point's trainer function aside). Each with its imports."""
    name = package.name
    roots = [package / "plugin.py", package / "__init__.py"]
    roots += [f for m in _registered(package / "plugin.py", name)
              if (f := _module_file(m)) is not None]
    roots += [package / f"{m}.py" for m in ("monitor", "head", *DRIVERS.get(name, ()))]
    seen: dict[Path, list[Import]] = {}
    queue = [f for f in roots if f.exists()]
    while queue:
        file = queue.pop()
        if file in seen:
            continue
        imports = [imp for imp in _imports(file) if not (
            file.name == "plugin.py" and file.parent == package and not imp.module_level)]
        seen[file] = imports
        for imp in imports:
            for target in (imp.module, *(f"{imp.module}.{n}" for n in imp.names)):
                if not _is(target, name):
                    continue
                parts = target.split(".")
                for k in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
                    found = _module_file(".".join(parts[:k]))
                    if found is not None and found not in seen:
                        queue.append(found)
    return seen


@pytest.mark.parametrize("dist", PLUGINS, ids=[d.name for d in PLUGINS])
def test_a_plugins_runtime_never_imports_its_training(dist: Path) -> None:
    """What a guard loads of a plugin (its runtime, ``_runtime_of``) holds no module of the
    plugin's ``training/`` and imports nothing of the core toolkit, at module level or lazily;
    only the entry point's trainer function (``guardrail train NAME``) imports ``training``."""
    package = _package(dist)
    training = package / "training"
    if not (training / "__init__.py").exists():
        pytest.skip(f"{dist.name} has no training/ package yet (its runtime and training "
                    "code are still side by side)")
    runtime = _runtime_of(package)
    assert package / "plugin.py" in runtime and package / "monitor.py" in runtime
    wrong = [str(f.relative_to(ROOT)) for f in runtime if f.is_relative_to(training)]
    wrong += [str(imp) for imports in runtime.values() for imp in imports
              if _toolkit_import(imp)]
    assert wrong == []
