"""Source wheels: members read from the archive; errors name the wheel, file and version."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
from guardrail_harmful_content.training.data import SourceError, fetch_package
from guardrail_harmful_content.training.data.sources import SourcePackage


def test_missing_member_error_names_the_wheel_and_file(tmp_path: Path) -> None:
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo/data.txt", "hello")
    pkg = SourcePackage("demo", "1.0", wheel)
    assert pkg.read_text("demo/data.txt") == "hello"
    with pytest.raises(SourceError, match=r"demo-1\.0-py3-none-any\.whl.*demo/absent\.csv"):
        pkg.read_text("demo/absent.csv")


def test_failed_download_names_package_version_and_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", refuse)
    with pytest.raises(SourceError, match=r"pyrit==9\.9\.9 into .*wheels.*No matching"):
        fetch_package("pyrit", cache=tmp_path, version="9.9.9")
