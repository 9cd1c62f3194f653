"""The trainer's first two stages: the data (a build's splits, subsampled) and the observer's
features of them, read once and cached."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrail.toolkit.features import CachedRecord, extract_features
from guardrail.toolkit.sources import cache_dir

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["label", "load_observer", "prepare_data", "read_features", "subsample", "work_dir"]


def work_dir(config: TrainConfig) -> Path:
    """Where the data, the subsampled splits and the feature cache go."""
    return (config.cache or cache_dir()) / "harmful-content"


def label(r: CachedRecord) -> int:
    return int(r.label or 0)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def subsample(records: Sequence[dict[str, Any]], n: int | None, seed: int
              ) -> list[dict[str, Any]]:
    """At most ``n`` records, the same share from every (kind, label) stratum (each stratum keeps
    at least one record), in their original order."""
    if n is None or n >= len(records):
        return list(records)
    strata: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        strata[(str(r.get("kind", "")), int(r.get("label") or 0))].append(i)
    rng = random.Random(seed)
    keep: list[int] = []
    for key in sorted(strata):
        members = strata[key]
        take = max(1, round(len(members) * n / len(records)))
        keep.extend(rng.sample(members, min(take, len(members))))
    return [records[i] for i in sorted(keep)]


def prepare_data(config: TrainConfig, work: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """The split files to read (train and val subsampled into ``work``) and the build manifest."""
    data = config.data
    if data is None:
        from .data import BuildConfig, build_dataset

        data = work / "data"
        build_dataset(data, BuildConfig())
    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    paths: dict[str, Path] = {}
    for split, limit in (("train", config.max_train), ("val", config.max_val)):
        source = data / f"{split}.jsonl"
        if not source.exists():
            raise FileNotFoundError(f"{source}: no {split} split (build one with python -m "
                                    "guardrail_harmful_content.training.data build --out DIR)")
        chosen = subsample(_read_jsonl(source), limit, config.seed)
        # The file's name keys the feature cache: a whole split is the same file for every seed.
        name = f"{split}-all" if limit is None else f"{split}-{limit}-seed{config.seed}"
        target = work / f"{name}.jsonl"
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in chosen)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        paths[split] = target
    paths["test"] = data / "test.jsonl"
    return paths, manifest


def load_observer(model: str | None) -> Any:
    """The embedded SmolLM2 observer, or the local HF causal LM in folder ``model``, reading
    with float32 products (``FLOAT32_PRODUCTS``): features the same on every CPU."""
    from guardrail.observer.hf import FLOAT32_PRODUCTS, load_model_dir, load_smollm2
    from guardrail.policy import ObserverSpec

    if model is None:
        return load_smollm2(ObserverSpec(options=FLOAT32_PRODUCTS))
    path = Path(model).expanduser()
    return load_model_dir(path, name=path.name, window=2048, options=FLOAT32_PRODUCTS)


def read_features(observer: Any, paths: dict[str, Path], work: Path, layers: Sequence[int],
                  config: TrainConfig, splits: Sequence[str] = ("train", "val")
                  ) -> dict[str, list[CachedRecord]]:
    """The observer's states of ``layers`` for each split (the prompt read as context, then the
    response), from the cache under ``work`` when it holds them."""
    n_layers = int(observer.num_layers)
    bad = [layer for layer in layers if not -n_layers <= layer < n_layers]
    if bad:
        raise ValueError(f"--layers {bad} out of range: observer {observer.name!r} has "
                         f"{n_layers} layers")
    return {split: extract_features(observer, paths[split], work / "features", layers,
                                    dtype="float16", chunk_size=config.chunk_size,
                                    progress=config.progress).records
            for split in splits}
