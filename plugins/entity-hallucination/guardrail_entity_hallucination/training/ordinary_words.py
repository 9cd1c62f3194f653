"""Build the finder's list of ordinary lower-case words (``ordinary_words.txt``, package data):
a lone capitalised word at a sentence start is not taken for a name when it is on the list.

A word is on the list when either source says it is written in lower case:

- **the project's own texts** (training splits only: the harm data's ``train.jsonl``, prompts and
  responses, and the entity data's ``train.jsonl`` and ``own-train.jsonl``): written in lower case
  mid-sentence at least ``MIN_LOWER`` times and capitalised mid-sentence at most ``MAX_CAP_SHARE``
  times as often ("keep", "stir"; not "paris", "turkey", "new");
- **the observer's tokenizer** (SmolLM2's BPE vocabulary, whose token ids follow its merge order,
  so frequency in a far larger web corpus): the word after a space is one token in lower case and
  that token was merged before its capitalised form ("Ġkeep" before "ĠKeep"; "ĠParis" has no
  lower-case token, "Ġchina" comes after "ĠChina"); unless the project's texts capitalise it
  mid-sentence too often (the same share, and at least twice: "orange", "summer").

Only the training splits are read, so the harm data's test split measures the list out of sample
(``bench/entity_finder.py``). The output is sorted and carries its inputs' digests, so a rebuild
from the same data gives the same file (``--check``).

    python -m guardrail_entity_hallucination.training.ordinary_words [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..spans import _WORD, ORDINARY_FILE, sentence_start

__all__ = ["MAX_CAP_SHARE", "MIN_LOWER", "build", "count_cases", "tokenizer_words"]

MIN_LOWER = 3
MAX_CAP_SHARE = 0.1
OUT = Path(__file__).resolve().parent.parent / ORDINARY_FILE
# (data dir under the cache, file, fields): training splits only.
INPUTS = (("harmful-content/data", "train.jsonl", ("prompt", "response")),
          ("entity-data", "train.jsonl", ("prompt", "response")),
          ("entity-data", "own-train.jsonl", ("prompt", "response")))


def _plain(word: str) -> str:
    return word.rstrip("'\u2019-").replace("\u2019", "'")


def _listable(word: str) -> bool:
    """Letters, with inner apostrophes or hyphens ("don't", "well-known"); two or more."""
    return len(word) > 1 and word.replace("'", "").replace("-", "").isalpha()


def count_cases(texts: Iterable[str]) -> tuple[Counter[str], Counter[str]]:
    """Mid-sentence counts per lower-cased word: written in lower case, written title-case.
    Words at a sentence, line or list start (``spans.sentence_start``) are not counted."""
    lower: Counter[str] = Counter()
    capital: Counter[str] = Counter()
    for text in texts:
        for m in _WORD.finditer(text):
            word = _plain(m.group())
            if not word or not word[0].isalpha() or sentence_start(text, m.start()):
                continue
            if word.islower():
                lower[word] += 1
            elif word[0].isupper() and (len(word) == 1 or word[1:].islower()):
                capital[word.lower()] += 1
    return lower, capital


def tokenizer_words(tokenizer_json: Path) -> set[str]:
    """Lower-case words that a byte-level BPE vocabulary (``tokenizer.json``) holds as one token
    after a space, merged before their capitalised form (or with no capitalised form)."""
    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    out = set()
    for token, index in vocab.items():
        word = token[1:]
        if token[:1] != "\u0120" or not word.islower() or not _listable(word):
            continue
        if vocab.get("\u0120" + word[0].upper() + word[1:], sys.maxsize) > index:
            out.add(word)
    return out


def build(texts: Iterable[str], tokenizer: set[str]) -> list[str]:
    """The sorted list (the rule in the module docstring)."""
    lower, capital = count_cases(texts)
    words = {w for w, n in lower.items()
             if _listable(w) and n >= MIN_LOWER and capital[w] <= MAX_CAP_SHARE * n}
    words |= {w for w in tokenizer
              if not (capital[w] >= 2 and capital[w] > MAX_CAP_SHARE * lower[w])}
    return sorted(words)


def _texts(paths: Sequence[tuple[Path, tuple[str, ...]]]) -> list[str]:
    out: list[str] = []
    for path, fields in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                out.extend(str(record[f]) for f in fields if record.get(f))
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def render(words: Sequence[str], inputs: Sequence[tuple[str, Path]], tokenizer: Path) -> str:
    """The file: a ``#`` header naming the inputs (by digest) and the rule, then the words."""
    header = ["# Ordinary lower-case words: a lone capitalised word at a sentence start that is",
              "# on this list is not an entity (spans.find_entities). Built by",
              "# python -m guardrail_entity_hallucination.training.ordinary_words from:"]
    header += [f"#   {name} sha256:{_digest(path)}" for name, path in inputs]
    header += [f"#   SmolLM2 tokenizer.json sha256:{_digest(tokenizer)}",
               f"# rule: in lower case mid-sentence >= {MIN_LOWER} times and capitalised at most "
               f"{MAX_CAP_SHARE} as often,",
               f"# or a tokenizer word not capitalised that often here; {len(words)} words"]
    return "\n".join([*header, *words]) + "\n"


def main(argv: list[str] | None = None) -> int:
    from guardrail.observer.hf import smollm2_dir
    from guardrail.toolkit.sources import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help="the folder holding harmful-content/data and entity-data "
                             "(default: the guardrail cache)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json (default: the shipped SmolLM2's)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true",
                        help="rebuild and compare with --out; exit 1 when they differ")
    args = parser.parse_args(argv)
    root = args.cache or cache_dir()
    inputs = [(root / folder / name, fields) for folder, name, fields in INPUTS]
    missing = [str(p) for p, _ in inputs if not p.exists()]
    if missing:
        parser.error("missing training data (build it first): " + ", ".join(missing))
    tokenizer = args.tokenizer or smollm2_dir() / "tokenizer.json"
    words = build(_texts(inputs), tokenizer_words(tokenizer))
    text = render(words, [(f"{folder}/{name}", root / folder / name)
                          for folder, name, _ in INPUTS], tokenizer)
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'differs from a rebuild'}")
        return 0 if same else 1
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {len(words)} words")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
