"""Small replay sets for demos and benchmarks: responses with fabricated entities, faithful ones.

Both come from the test split of a full build (held-out countries and templates), long-form texts
only, one text per topic before any topic repeats, so the sets stay varied.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .build import BuildConfig, build_dataset

__all__ = ["REPLAY_SIZE", "default_replay_dir", "pick_replays", "write_replays"]

REPLAY_SIZE = 20


def default_replay_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "replays"


def pick_replays(records: Sequence[dict[str, Any]], want: Callable[[dict[str, Any]], bool],
                 n: int = REPLAY_SIZE) -> list[dict[str, Any]]:
    """Up to ``n`` long-form records satisfying ``want``, spread over topics, in file order."""
    pool = [r for r in records if r.get("kind") in ("country", "city") and want(r)]
    chosen: list[dict[str, Any]] = []
    seen: set[str] = set()
    for repeat in (False, True):
        for r in pool:
            if len(chosen) >= n:
                return chosen
            if r in chosen or (not repeat and r["topic"] in seen):
                continue
            chosen.append(r)
            seen.add(r["topic"])
    return chosen


def _fabricated(r: dict[str, Any]) -> bool:
    return any(s["label"] == 1 for s in r["spans"])


def write_replays(out: Path, cache: Path | None = None) -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        build_dataset(Path(tmp), BuildConfig(cache=cache))
        lines = (Path(tmp) / "test.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, want in (("fabricated", _fabricated), ("faithful", lambda r: not _fabricated(r))):
        chosen = [{**r, "monitors": ["entity-hallucination"]}  # whose labels (guardrail eval)
                  for r in pick_replays(records, want)]
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                                for r in chosen), encoding="utf-8")
        written.append(path)
    return written
