"""Data and features for training: build the offline data, subsample it for a CPU budget, and
cache the observer's states over each split (prompt read as context, then the response).

Subsampling is seeded and recorded: ``subsample`` keeps at most ``n`` records of a split, drawn by
a seeded shuffle, and writes them to ``<split>.sub.jsonl`` so the feature cache (keyed by the
file's hash) is reused by later runs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from guardrail.toolkit.features import FeatureSet, extract_features

__all__ = ["CANDIDATE_LAYERS", "DEFAULT_LIMITS", "SPLITS", "build_data", "split_features",
           "subsample"]

SPLITS = ("train", "val", "test", "paired")
# Middle to late blocks of SmolLM2-135M (30 blocks); the trainer picks one on validation.
CANDIDATE_LAYERS = (12, 15, 18, 21, 24)
# Records kept per split so that feature extraction fits ~10 minutes on two busy CPU cores.
DEFAULT_LIMITS: Mapping[str, int | None] = {"train": 900, "val": 300, "test": None,
                                            "paired": None}


def build_data(out: Path, seed: int = 1234, limit: int | None = None) -> Path:
    """Build the offline data set into ``out`` (skipped when ``out/manifest.json`` exists)."""
    if (out / "manifest.json").exists():
        return out
    from .data.build import BuildConfig, build_dataset

    build_dataset(out, BuildConfig(seed=seed, limit=limit))
    return out


def subsample(data_dir: Path, split: str, n: int | None, seed: int = 0, tag: str = "sub"
              ) -> Path:
    """Write at most ``n`` records of ``<split>.jsonl`` (seeded shuffle, file order kept) to
    ``<split>.<tag>.jsonl``; ``n=None`` keeps all. Returns the written path."""
    source = data_dir / f"{split}.jsonl"
    if not source.exists():
        raise FileNotFoundError(f"{source}: no {split} split (build the data first)")
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n is not None and n < len(lines):
        keep = sorted(random.Random(f"{seed}:{split}").sample(range(len(lines)), n))
        lines = [lines[i] for i in keep]
    target = data_dir / f"{split}.{tag}.jsonl"
    text = "\n".join(lines) + "\n"
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")
    return target


def split_features(observer: Any, data_dir: Path, cache_dir: Path, splits: Sequence[str],
                   limits: Mapping[str, int | None], layers: Sequence[int], seed: int = 0,
                   progress: bool = True, tag: str = "sub") -> dict[str, FeatureSet]:
    """Subsample each split and cache the observer's states (the given layers, plus each token's
    surprisal and entropy for the baselines and the probe's extra features)."""
    out = {}
    for split in splits:
        path = subsample(data_dir, split, limits.get(split), seed, tag=tag)
        out[split] = extract_features(observer, path, cache_dir, layers, stats=True,
                                      chunk_size=64, progress=progress)
    return out


def split_sizes(features: Mapping[str, FeatureSet], data_dir: Path) -> dict[str, Any]:
    """Records used per split and records available (from the build's manifest)."""
    manifest_path = data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() \
        else {}
    counts = manifest.get("counts", {})
    return {name: {"used": len(fs), "available": counts.get(name, {}).get("records")}
            for name, fs in features.items()}
