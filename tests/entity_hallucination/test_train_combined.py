"""The default combined trainer writes the shipped recipe: run on a tiny build, a tiny random
model (19 blocks, so layers 15 and 18 exist) and tiny hand-written sets, it saves the candidate,
features, penalties and sources the shipped weights' JSON documents, never LOSO's own choice;
``choose=True`` is the path that writes the grid's choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from guardrail_entity_hallucination.monitor import EntityHallucinationMonitor
from guardrail_entity_hallucination.probe import DEFAULT_WEIGHTS
from guardrail_entity_hallucination.training.combine import COMBINED_CANDIDATES
from guardrail_entity_hallucination.training.train_combined import SHIPPED, train

from guardrail.observer.hf import load_model_dir
from guardrail.testing.tiny_models import build_tiny_model

BIOS = """# Tell me about Marie Curie.
Marie Curie was born in [[Warsaw|0]] in [[1867|0]] and won the Nobel Prize in [[1903|0]].

# Tell me about Marie Curie.
Marie Curie was born in [[Lisbon|1]] in [[1867|0]] and won the Nobel Prize in [[1911|0]].

# Tell me about Rome.
Rome is the capital of [[Italy|0]] and lies on the [[Tiber|0]].

# Tell me about Rome.
Rome is the capital of [[Spain|1]] and lies on the [[Danube|1]].
"""

GRID = [c for c in COMBINED_CANDIDATES if c.name in ("surprisal", "surprisal+margin, ensemble")]
LATER = """# Tell me about Oslo.
Oslo is the capital of [[Norway|0]] and has about [[700,000|0]] people.

# Tell me about Oslo.
Oslo is the capital of [[Sweden|1]] and has about [[700,000|0]] people.
"""


@pytest.fixture(scope="module")
def tiny_observer(tmp_path_factory: pytest.TempPathFactory) -> object:
    root = tmp_path_factory.mktemp("entity-combined-model")
    model = build_tiny_model(root / "tiny", num_layers=19, hidden_size=16, seed=3)
    return load_model_dir(model, name="tiny-19", window=1024)


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for both tests (the second reads the first's)."""
    return tmp_path_factory.mktemp("entity-combined-features")


def _sets(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bios.md").write_text(BIOS, encoding="utf-8")
    (folder / "train-v2.md").write_text(LATER, encoding="utf-8")
    return [folder / "bios.md", folder / "train-v2.md"]


def test_the_default_trainer_writes_the_shipped_recipe(tiny_build: Path, tiny_observer: object,
                                                       features: Path, tmp_path: Path) -> None:
    shipped = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text(encoding="utf-8"))
    out = tmp_path / "weights" / "entity_span_probe.safetensors"
    report = train(tiny_observer, tiny_build, features, _sets(tmp_path / "sets"), out)
    written = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    # the documented recipe: the shipped file's candidate, features, penalties and sources
    assert written["candidate"] == shipped["candidate"] == SHIPPED.candidate
    for key in ("features", "states", "wd_states", "wd_features"):
        assert written["training"][key] == shipped["training"][key], key
    used = set(written["training"]["sources"])
    assert used <= set(shipped["training"]["sources"])
    assert not used & set(SHIPPED.exclude)
    assert "handwritten:bios" in used and "templates:country" in used
    assert written["data"]["handwritten"] == sorted(
        f"{tag.split(':', 1)[1]}.md" for tag in used if tag.startswith("handwritten:"))
    # the threshold is the recipe's out-of-fold one, and the file loads into the monitor
    assert written["threshold"] == report["threshold"]
    monitor = EntityHallucinationMonitor(EntityHallucinationMonitor.Options(weights=str(out)))
    assert monitor.default_threshold == pytest.approx(report["threshold"])


def test_choose_writes_the_grids_choice_over_every_source(tiny_build: Path,
                                                          tiny_observer: object,
                                                          features: Path, tmp_path: Path) -> None:
    out = tmp_path / "chosen.safetensors"
    report = train(tiny_observer, tiny_build, features, _sets(tmp_path / "sets"), out,
                   choose=True, grid=GRID)
    written = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert written["candidate"] == report["chosen"]
    assert report["chosen"] in {c.name for c in GRID}
    assert set(report["table"]) == {c.name for c in GRID}
    assert "handwritten:train-v2" in written["training"]["sources"]
