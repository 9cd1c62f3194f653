"""The command line as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guardrail import cli, hookimpl
from guardrail.plugins import get_host

POLICY = """\
version: 1
release: {hold_back_tokens: 2}
monitors:
  - id: weapons
    use: keywords
    action: halt
    message: "Stopped."
    options: {words: [bomb]}
  - id: shout
    use: regex
    options: {patterns: ["[A-Z]{4,}"], ignore_case: false}
"""

RECORDS = [
    {"prompt": "hi", "response": "Hello there, how are you today?", "label": 0},
    {"prompt": "how to", "response": "First you get the parts, then the BOMB casing, then wire it.",
     "label": 1, "spans": [{"start": 32, "end": 60, "label": 1}]},
]


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guardrail.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


def test_check_accepts_a_good_policy_and_names_errors(policy: Path, tmp_path: Path) -> None:
    ok = run_cli("check", str(policy))
    assert ok.returncode == 0 and "ok (2 monitors: weapons, shout)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("action: halt", "action: stop"))
    out = run_cli("check", str(bad))
    assert out.returncode == 1
    assert "line 6: monitors[0].action: Input should be 'flag', 'halt', 'route' or 'redact'" \
        in out.stderr


@pytest.mark.slow
def test_check_lists_a_misspelt_monitor_beside_schema_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("action: halt", "action: stop").replace("use: regex",
                                                                         "use: regexp"))
    out = run_cli("check", str(bad))
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert lines[1] == ("  - line 6: monitors[0].action: Input should be 'flag', 'halt', "
                        "'route' or 'redact'")
    assert lines[2].startswith("  - line 10: monitors[1].use: unknown monitor 'regexp'; "
                               "installed: ")
    # the Python API reports the same two
    from guardrail import Guard, PolicyError

    with pytest.raises(PolicyError) as caught:
        Guard.from_yaml(bad)
    assert [(i.path, i.line) for i in caught.value.issues] == [("monitors[0].action", 6),
                                                               ("monitors[1].use", 10)]


@pytest.mark.slow
def test_schema_is_json() -> None:
    out = run_cli("schema")
    assert json.loads(out.stdout)["title"] == "guardrail policy"


def test_run_guards_stdin_and_halts(policy: Path) -> None:
    out = run_cli("run", "--policy", str(policy), "--chunk", "3",
                  stdin="Sure. Take a bomb and then more text follows here.")
    assert out.returncode == cli.EXIT_HALTED == 3  # scripts tell a halt from success and errors
    # "bomb" is token 4; with 2 tokens held back only "Sure" and "." reached the reader
    assert out.stdout == "Sure.\n[halted by weapons: Stopped.]\n"


@pytest.mark.slow
def test_run_json_prints_events_and_a_report(policy: Path) -> None:
    out = run_cli("run", "--policy", str(policy), "--json", "--monitor", "shout",
                  stdin="calm words then SHOUTING words")
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["kind"] for e in lines if e["kind"] != "release"] == ["flag", "report"]
    assert "".join(e["text"] for e in lines if e["kind"] == "release") == \
        "calm words then SHOUTING words"


@pytest.mark.slow
def test_run_exit_code_and_json_report_tell_a_halt(policy: Path) -> None:
    calm = run_cli("run", "--policy", str(policy), "--json", stdin="nothing to see here")
    assert calm.returncode == 0 and json.loads(calm.stdout.splitlines()[-1])["halted"] is False
    halted = run_cli("run", "--policy", str(policy), "--json", stdin="a bomb here, then more")
    assert halted.returncode == 3
    report = json.loads(halted.stdout.splitlines()[-1])
    assert report["kind"] == "report" and report["halted"] is True
    assert report["halt"]["monitor"] == "weapons"


@pytest.mark.slow
def test_run_groups_flags_on_adjacent_tokens(policy: Path) -> None:
    out = run_cli("run", "--policy", str(policy),
                  stdin="calm WORDS THEN SHOUTING words and LOUD again")
    assert out.returncode == 0
    flag_lines = [line for line in out.stderr.splitlines() if line.startswith("[flag")]
    assert flag_lines == [
        "[flag monitor='shout' x3 tokens=(1, 3) span=(5, 24) max_score=1.000]",
        "[flag monitor='shout' score=1.0 span=(35, 39) tokens=(6, 6) rule='threshold' "
        "action='flag']",
    ]
    assert out.stderr.splitlines()[-1] == \
        "[8 tokens read, 8 released, 4 flags (shout 4), halted: False]"


@pytest.mark.slow
def test_replay_prints_one_json_line_per_record(policy: Path, data: Path) -> None:
    out = run_cli("replay", "--policy", str(policy), "--data", str(data))
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    for key in ("index", "tokens", "halted", "halt_token", "flags", "routes", "leaked_tokens"):
        assert key in rows[0]
    assert rows[0]["halted"] is False and rows[0]["halt_token"] is None
    assert rows[1]["halted"] is True and rows[1]["halt_token"] == 8  # " BOMB"
    assert rows[1]["leaked_tokens"] == 0  # nothing from the harmful span reached the reader
    assert [f["monitor"] for f in rows[1]["flags"]] == []  # halted before "shout" could flag


@pytest.mark.slow
def test_replay_and_eval_write_reports(policy: Path, data: Path, tmp_path: Path) -> None:
    out = run_cli("replay", "--policy", str(policy), "--data", str(data),
                  "--report", str(tmp_path / "replay"))
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "replay" / "record-0001.html").read_text()
    assert "weapons" in page and "halt" in page.lower() and "BOMB" in page
    index = (tmp_path / "replay" / "index.html").read_text()
    assert "record-0000.html" in index and "record-0001.html" in index
    assert (tmp_path / "replay" / "record-0001.png").stat().st_size > 1000

    out = run_cli("eval", "--policy", str(policy), "--data", str(data),
                  "--report", str(tmp_path / "eval"))
    assert out.returncode == 0, out.stderr
    # both monitors separate the two records: a response-level ROC curve is drawn
    assert (tmp_path / "eval" / "roc-response.png").stat().st_size > 1000
    assert 'src="roc-response.png"' in (tmp_path / "eval" / "index.html").read_text()
    assert "weapons" in (tmp_path / "eval" / "record-0001.html").read_text()


@pytest.mark.slow
def test_replay_names_the_bad_line(policy: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + '{"prompt": "x", "response": 3}\n')
    out = run_cli("replay", "--policy", str(policy), "--data", str(bad))
    assert out.returncode == 1 and f"{bad}:2: field 'response' must be a string" in out.stderr


def test_train_dispatches_to_a_registered_trainer(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[list[str]] = []

    class TrainerPlugin:
        @hookimpl
        def guardrail_register_trainers(self, register: Any) -> None:
            def toy(argv: list[str]) -> int:
                calls.append(argv)
                return 0

            register("toy", toy, description="toy trainer")

    host = get_host()
    host.register(TrainerPlugin(), name="toy-trainer")
    try:
        assert cli.main(["train", "toy", "--epochs", "2"]) == 0
        assert calls == [["--epochs", "2"]]
        assert cli.main(["train", "nope"]) == 2
        assert "no trainer 'nope'" in capsys.readouterr().err
    finally:
        host.unregister("toy-trainer")


@pytest.mark.slow
def test_run_survives_invalid_utf8_on_stdin(policy: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "guardrail.cli", "run", "--policy", str(policy)],
                         input=b"caf\xe9 au lait \xff\xfe then a bomb here", capture_output=True,
                         timeout=120)
    assert out.returncode == 3  # it halted, after reading past the bad bytes
    assert out.stdout.decode().startswith("caf\ufffd au lait")
    assert b"[halted by weapons" in out.stdout
