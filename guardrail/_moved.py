"""The old import paths of the toolkit modules (``guardrail.probes.train`` is now
``guardrail.toolkit.train``): importing an old name gives the moved module itself. Kept only until
the harmful-content plugin and its benchmarks import the new paths; new code uses those."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

MOVED = {
    "guardrail.sources": "guardrail.toolkit.sources",
    "guardrail.records": "guardrail.toolkit.records",
    "guardrail.evaluate": "guardrail.toolkit.evaluate",
    "guardrail.probes.calibrate": "guardrail.toolkit.calibrate",
    "guardrail.probes.fake": "guardrail.toolkit.fake",
    "guardrail.probes.features": "guardrail.toolkit.features",
    "guardrail.probes.losses": "guardrail.toolkit.losses",
    "guardrail.probes.metrics": "guardrail.toolkit.metrics",
    "guardrail.probes.train": "guardrail.toolkit.train",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the alias's spec on the moved module: give it back its own.
        module.__spec__ = self._specs[module.__name__]


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
