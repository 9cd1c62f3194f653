"""Every shell command in README.md and docs/ is right as written.

Quick commands run for real (from the repository root, into a scratch folder). Long ones
(training, benchmarks, servers, installs) are checked without running them: `make` targets exist,
local paths given to pip exist, each `guardrail ...` line parses with the real CLI parser, and
every option of a `python -m ...` line appears in that command's own --help.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from guardrail.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Commands of other projects: shown to users, not ours to check.
EXTERNAL = {"litellm"}
# Commands fast enough to run here: a prefix of the line -> a rewrite of output paths into tmp.
RUN = ("guardrail eval", "python -m guardrail_harmful_content.training.data build --out /tmp/tiny",
       "python -m guardrail_entity_hallucination.training.data build --out /tmp/tiny")


def commands() -> list[tuple[str, str]]:
    """(file name, command) for every command line of every shell block."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                if line and not line.startswith("#"):
                    for part in line.split("&&"):
                        out.append((path.name, part.strip()))
    return out


COMMANDS = commands()


def _words(command: str) -> list[str]:
    words = [w for w in shlex.split(command) if w not in ("[", "]")]
    words = [w.strip("[]") for w in words]
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # leading VAR=value
        words = words[1:]
    return words


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def test_the_docs_have_shell_commands() -> None:
    assert len(COMMANDS) >= 10
    assert ("README.md", "make demo") in COMMANDS


def _marks(command: str) -> list[pytest.MarkDecorator]:
    """A command run for real, or a `python -m` one whose --help is read, starts a process (a
    data build takes seconds): slow. A `guardrail` one run without --policy loads the default
    policy's SmolLM2 as well."""
    real = command.startswith(RUN[0]) and "--policy" not in command and "-p " not in command
    if real:
        return [pytest.mark.real_model, pytest.mark.slow]
    started = command.startswith(RUN) or _words(command)[:2] == ["python", "-m"]
    return [pytest.mark.slow] if started else []


@pytest.mark.parametrize("where,command", [
    pytest.param(w, c, marks=_marks(c), id=f"{w}:{c[:50]}") for w, c in COMMANDS])
def test_shell_command_is_right(where: str, command: str, tmp_path: Path) -> None:
    words = _words(command)
    tool = words[0]
    if tool in EXTERNAL or words[:3] == ["python", "-m", "venv"] or command.startswith(". "):
        return
    if tool == "make":
        assert set(words[1:]) <= _make_targets(), f"{where}: no such make target in {command!r}"
        return
    if tool == "pip":
        for n, word in enumerate(words):
            local = words[n - 1] == "-e" or word.startswith((".", "adapters/", "plugins/"))
            if local:
                path = word.split("[")[0]
                assert (ROOT / path).exists(), f"{where}: {command!r}: no {path} in the repo"
        return
    run = next((prefix for prefix in RUN if command.startswith(prefix)), None)
    if run is not None:
        _run_for_real(where, command, tmp_path)
    elif tool == "guardrail":
        try:
            build_parser().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{command}` does not parse with guardrail's CLI")
    elif words[:2] == ["python", "-m"]:
        _options_in_help(where, words)
    else:
        pytest.fail(f"{where}: no check for {command!r}; add it to EXTERNAL, RUN or a rule")


def _run_for_real(where: str, command: str, tmp_path: Path) -> None:
    command = command.replace("/tmp/tiny", str(tmp_path / "tiny"))
    command = re.sub(r"--report (\S+)", lambda m: f"--report {tmp_path / m.group(1)}", command)
    words = _words(command)
    if words[0] == "python":
        words[0] = sys.executable
    elif words[0] == "guardrail":
        words = [sys.executable, "-m", "guardrail.cli", *words[1:]]
    run = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    assert run.returncode == 0, f"{where}: `{command}` failed:\n{run.stderr[-2000:]}"
    made = list(tmp_path.rglob("*"))
    assert made, f"{where}: `{command}` wrote nothing"


def _options_in_help(where: str, words: list[str]) -> None:
    # python -m module [subcommand] --options...
    prefix = words[:4] if len(words) > 3 and not words[3].startswith("-") else words[:3]
    help_run = subprocess.run([sys.executable, *prefix[1:], "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=False)
    assert help_run.returncode == 0, f"{where}: `{' '.join(prefix)} --help` failed:\n" \
                                     f"{help_run.stderr[-1500:]}"
    for option in (w.split("=")[0] for w in words if w.startswith("--")):
        assert option in help_run.stdout, f"{where}: {option} is not an option of " \
                                          f"`{' '.join(prefix)}`"
