"""``observer.options.threads``: the guard sets the CPU threads of a forward on purpose."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from guardrail.errors import ObserverError
from guardrail.observer.hf import load_model_dir, resolve_threads


@pytest.fixture
def keep_torch_threads() -> Any:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("keep_torch_threads")
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_set_torch_intra_op_threads(tiny_llama: Path, threads: int) -> None:
    torch.set_num_threads(3)
    load_model_dir(tiny_llama, name="tiny", window=64, options={"threads": threads})
    assert torch.get_num_threads() == threads


def test_threads_reach_onnx_runtime(tiny_llama: Path) -> None:
    pytest.importorskip("onnxruntime")
    observer = load_model_dir(tiny_llama, name="tiny", window=64, backend="onnx",
                              options={"threads": 1})
    assert observer.threads == 1


@pytest.mark.parametrize("bad", [0, -2, "two", 1.5, True])
def test_bad_threads_name_the_field(tiny_llama: Path, bad: Any) -> None:
    with pytest.raises(ObserverError, match=r"observer\.options\.threads"):
        load_model_dir(tiny_llama, name="tiny", window=64, options={"threads": bad})


def test_auto_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the process was started with a choice: keep it
    assert resolve_threads("m", "auto") == resolve_threads("m", None) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("os.getloadavg", lambda: (1.0, 1.0, 1.0))
    assert resolve_threads("m", "auto") == 2  # seven idle cores: two threads
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert resolve_threads("m", "auto") == 1  # an idle 2-core machine: load arriving later stalls 2
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("os.getloadavg", lambda: (7.5, 7.0, 7.0))
    assert resolve_threads("m", "auto") == 1  # under two idle cores: one thread
