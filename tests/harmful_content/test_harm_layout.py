"""The plugin's layering: the shipped head loads bit-identical through the monitor, and the runtime
(plugin, monitor, head, pooling) runs a guard without importing ``training``."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from guardrail_harmful_content.monitor import HarmfulContentMonitor

# sha256 over the shipped head's tensors (name, shape, dtype, bytes; sorted by name). Retraining
# the shipped weights changes it on purpose; a refactor of the loading path must not.
SHIPPED_HEAD_SHA256 = "a8ca26b9154ef8e57bffb9feb129f69e1be36c2ecd6162c8544834ec6bfec0f4"


def test_the_shipped_head_loads_bit_identical() -> None:
    monitor = HarmfulContentMonitor()
    digest = hashlib.sha256()
    for name, tensor in sorted(monitor.probe.head.state_dict().items()):
        t = tensor.detach().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.numpy().tobytes())
    assert digest.hexdigest() == SHIPPED_HEAD_SHA256


RUNTIME_ONLY = """
import sys
from guardrail import Guard
from guardrail.toolkit.fake import PlantedObserver
from guardrail_harmful_content.monitor import HarmfulContentMonitor
from guardrail.monitor import Features, MonitorContext
from guardrail.stream import TokenSpan
import numpy as np
monitor = HarmfulContentMonitor()
observer = PlantedObserver(hidden_size=576, num_layers=30)
state = monitor.start(MonitorContext("harm", observer=observer))
hidden = {layer: np.ones((2, 576), dtype=np.float32) for layer in monitor.layers}
tokens = [TokenSpan(0, 1, 0), TokenSpan(1, 2, 1)]
print(len(monitor.update(state, Features(tokens, 0, "ab", hidden=hidden))))
Guard.default()
loaded = sorted(m for m in sys.modules if m.startswith(("guardrail_harmful_content",
                                                       "guardrail.probes", "guardrail.toolkit")))
print(" ".join(loaded))
"""


@pytest.mark.slow  # a fresh interpreter importing torch and the guard: seconds
def test_the_runtime_never_imports_training() -> None:
    out = subprocess.run([sys.executable, "-c", RUNTIME_ONLY], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0] == "2"
    loaded = out[1].split()
    assert "guardrail_harmful_content.monitor" in loaded
    assert not [m for m in loaded if ".training" in m or ".data" in m], loaded
    # what scoring used to pull in: the feature cache, calibration and training (by either path)
    heavy = {f"guardrail.{package}.{module}" for package in ("probes", "toolkit")
             for module in ("features", "calibrate", "train", "losses")}
    assert not heavy & set(loaded), loaded


RUNTIME = ("__init__", "plugin", "monitor", "head", "pooling")


def test_no_runtime_module_imports_training_at_module_level() -> None:
    """Only the trainer's entry point (inside ``plugin._train``) reaches into ``training``."""
    import ast
    from importlib.resources import files

    package = files("guardrail_harmful_content")
    for name in RUNTIME:
        tree = ast.parse(package.joinpath(f"{name}.py").read_text(encoding="utf-8"))
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
            elif isinstance(node, ast.Import):
                target = " ".join(a.name for a in node.names)
            else:
                continue
            assert "training" not in target and "data" not in target.split("."), (name, target)
