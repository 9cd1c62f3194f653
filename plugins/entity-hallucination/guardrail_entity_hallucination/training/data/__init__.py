"""Offline data for the entity-hallucination monitor.

``python -m guardrail_entity_hallucination.training.data build --out DIR`` writes train/val/test
JSON Lines (labelled records with entity spans, docs/entity-hallucination.md "Record format"),
``paired.jsonl`` and ``manifest.json``.
"""

from .build import BuildConfig, build_dataset
from .sources import PINNED, SourceError, cache_dir, fetch_package

__all__ = ["PINNED", "BuildConfig", "SourceError", "build_dataset", "cache_dir", "fetch_package"]
