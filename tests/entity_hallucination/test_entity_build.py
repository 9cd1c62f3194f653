"""The build is deterministic for a seed, a tiny build is fast, the CLI works."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from guardrail_entity_hallucination.training.data import BuildConfig, build_dataset

FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "paired.jsonl", "manifest.json")


def test_same_seed_gives_identical_files_and_another_seed_does_not(
        tiny_build: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    build_dataset(again, BuildConfig(limit=3))
    build_dataset(other, BuildConfig(limit=3, seed=7))
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_build / name).read_bytes(), name
    assert (other / "train.jsonl").read_bytes() != (tiny_build / "train.jsonl").read_bytes()


def test_tiny_build_is_fast_and_every_split_has_both_labels(tmp_path: Path,
                                                            tiny_build: Path) -> None:
    started = time.perf_counter()
    manifest = build_dataset(tmp_path, BuildConfig(limit=2))
    assert time.perf_counter() - started < 30
    for name in ("train", "val", "test"):
        labels = manifest["counts"][name]["labels"]
        assert labels["0"] > 0 and labels["1"] > 0, (name, labels)
    assert manifest["counts"]["train"]["records"] < 200


def test_tiny_build_texts_are_the_full_builds_texts_for_those_countries(
        tiny_build: Path, full_build: Path) -> None:
    # A limit selects countries; it must not change what is written about them.
    def long_form(folder: Path) -> set[str]:
        lines = (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()
        return {line for line in lines if json.loads(line)["kind"] != "garak"}
    tiny = long_form(tiny_build)
    assert tiny and tiny <= long_form(full_build)


def test_cli_build_writes_the_files_and_prints_a_summary(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "guardrail_entity_hallucination.training.data", "build",
         "--out", str(tmp_path), "--limit", "2"],
        capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["splits"]["test"]["records"] > 0
    assert all((tmp_path / name).exists() for name in FILES)
