"""Scores and decisions of the harmful-content head on cached features (torch).

Shared by the trainer, the benchmark and the tests, so the numbers they report come from one
definition:

- ``stack_layers``: a feature view that reads one layer or a concatenation of layers, with the
  head's pooling (``pooling.stack_states``);
- ``prefix_scores``: the sequence head at every response token (SCM's streaming score: position
  ``i`` judges the response up to token ``i``), as float64 probabilities, with each record's
  prompt term added to its logits when given;
- ``prompt_terms``: a head's prompt term of each record's prompt or conversation, as the monitor
  computes it once per stream (docs/harmful-content.md, "Prompt term (runtime contract)");
- ``calibration_thresholds``: the count-k rule's threshold grid, fixed steps plus quantiles of the
  benign validation prefix scores (a sharp head puts most of them near 1);
- ``streaming_report`` / ``full_report`` / ``budget_curve``: the count-k rule, full detection
  (the head on the last token only) and full detection after a share of the tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from guardrail.toolkit.calibrate import streaming_metrics
from guardrail.toolkit.features import CachedRecord
from guardrail.toolkit.metrics import best_threshold, macro_f1, roc_auc

from ..head import DualHead
from ..pooling import stack_states

if TYPE_CHECKING:
    from .context import Context

__all__ = [
    "STACKED",
    "budget_curve",
    "calibration_thresholds",
    "full_report",
    "full_threshold",
    "prefix_scores",
    "prompt_terms",
    "stack_layers",
    "streaming_report",
]

STACKED = -10_000
"""The feature key under which ``stack_layers`` puts its (possibly concatenated) states."""

def stack_layers(records: Sequence[CachedRecord], layers: Sequence[int],
                 pooling: str = "none", halflife: float | Sequence[float] | None = None,
                 token_norm: str = "none") -> list[CachedRecord]:
    """Views of ``records`` whose only feature (key ``STACKED``) is ``layers`` concatenated (and
    pooled, each token normalised by ``token_norm``: see ``stack_states``)."""
    return [replace(r, hidden={STACKED: stack_states(r.hidden, layers, pooling, halflife,
                                                     token_norm)})
            for r in records]


def prefix_scores(head: DualHead, stacked: Sequence[CachedRecord],
                  terms: Sequence[float] | None = None) -> list[list[float]]:
    """Harm probability of every prefix of every record (records from ``stack_layers``), the
    sigmoid of the logit difference in float64: a sharp head's benign scores sit within 1e-6 of
    1, where float32 probabilities would tie. ``terms`` (``prompt_terms``): each record's prompt
    term, added to every one of its prefix logits before the sigmoid, as the monitor adds it."""
    if terms is not None and len(terms) != len(stacked):
        raise ValueError(f"prefix_scores: {len(terms)} prompt terms for {len(stacked)} records")
    was_training = head.training
    head.eval()
    out: list[list[float]] = []
    with torch.inference_mode():
        for i, record in enumerate(stacked):
            logits = head.prefix_logits(record.hidden[STACKED].float()).double()
            if terms is None:
                out.append(torch.sigmoid(logits[:, 1] - logits[:, 0]).tolist())
            else:
                out.append(torch.sigmoid(logits[:, 1] - logits[:, 0] + float(terms[i])).tolist())
    head.train(was_training)
    return out


def prompt_terms(head: DualHead, config: Mapping[str, Any], prompts: Sequence[Context],
                 observer: Any, cache: Path, progress: bool = False) -> list[float] | None:
    """Each record's term for a head whose weights carry ``prompt_weight`` (None for a head
    without one), as the monitor computes it once per stream: ``sum_j prompt_weight[j] .
    context[layers[j]]`` in float64 over the pooled context states of the record's prompt or
    conversation (``CachedRecord.conversation()``; read through ``observer`` by
    ``context.extract_prompt_states`` and cached in the file ``cache``, one per observer and
    layer set), clipped to the config's ``prompt_term`` ``[low, high]``; an empty or blank last
    user message (no request) gets its ``neutral`` term."""
    if head.prompt_size is None:
        return None
    from .context import asked_prompt, context_key, extract_prompt_states

    spec = config.get("prompt_term")
    if not isinstance(spec, Mapping):
        raise ValueError("the head carries 'prompt_weight', so its config needs 'prompt_term' "
                         f"(neutral, low, high), got {spec!r}")
    neutral, low, high = (float(spec[key]) for key in ("neutral", "low", "high"))
    layers = [int(x) for x in config["layers"]]
    asked = [p for p in prompts if asked_prompt(p).strip()]
    cache.parent.mkdir(parents=True, exist_ok=True)
    states = (extract_prompt_states(observer, asked, layers, cache, progress).by_prompt()
              if asked else {})
    weight = head.prompt_weight.detach().double().numpy()
    out = []
    for prompt in prompts:
        if not asked_prompt(prompt).strip():
            out.append(neutral)
            continue
        found = states[context_key(prompt)]
        term = math.fsum(float(w @ np.asarray(found[layer], dtype=np.float64))
                         for w, layer in zip(weight, layers, strict=True))
        out.append(min(max(term, low), high))
    return out


BENIGN_QUANTILES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.993, 0.995, 0.997, 0.998,
                    0.999, 0.9995, 0.9999)


def calibration_thresholds(scores: Sequence[Sequence[float]], labels: Sequence[int],
                           fixed: Sequence[float] = ()) -> tuple[float, ...]:
    """``fixed`` plus the ``BENIGN_QUANTILES`` of the benign records' prefix scores, sorted."""
    benign = sorted(v for s, y in zip(scores, labels, strict=True) if y == 0 for v in s)
    grid = set(fixed)
    if benign:
        for q in BENIGN_QUANTILES:
            grid.add(benign[min(len(benign) - 1, int(q * len(benign)))])
    return tuple(sorted(grid))


def _safe_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    try:
        return roc_auc(labels, scores)
    except ValueError:  # one class only
        return None


def streaming_report(scores: Sequence[Sequence[float]], labels: Sequence[int],
                     threshold: float, k: int) -> dict[str, Any]:
    """The count-k rule at ``(threshold, k)``: macro-F1, precision, recall, ``fraction_seen``,
    ``false_halt_rate`` and ``auc`` (of each response's maximum prefix score), as
    ``guardrail eval`` defines them."""
    result = streaming_metrics(scores, labels, threshold, k)
    return {
        "auc": _safe_auc(labels, [max(s, default=0.0) for s in scores]),
        "macro_f1": result.macro_f1, "precision": result.precision, "recall": result.recall,
        "fraction_seen": result.fraction_seen, "false_halt_rate": result.false_halt_rate,
        "threshold": threshold, "k": k, "records": len(labels),
    }


def _decisions(labels: Sequence[int], final: Sequence[float], threshold: float
               ) -> dict[str, Any]:
    predictions = [int(s >= threshold) for s in final]
    m = macro_f1(labels, predictions)
    benign = [p for y, p in zip(labels, predictions, strict=True) if y == 0]
    return {"macro_f1": m["macro_f1"], "precision": m["precision_1"], "recall": m["recall_1"],
            "false_halt_rate": sum(benign) / len(benign) if benign else None}


def full_threshold(scores: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """Full detection's threshold: the best macro-F1 of the last-token score."""
    return best_threshold(labels, [s[-1] if s else 0.0 for s in scores])[0]


def full_report(scores: Sequence[Sequence[float]], labels: Sequence[int],
                threshold: float) -> dict[str, Any]:
    """Full detection: the sequence head on the whole response (its last token) only."""
    final = [s[-1] if s else 0.0 for s in scores]
    return {"auc": _safe_auc(labels, final), **_decisions(labels, final, threshold),
            "threshold": threshold, "fraction_seen": 1.0, "records": len(labels)}


def budget_curve(scores: Sequence[Sequence[float]], labels: Sequence[int], threshold: float,
                 shares: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
                 ) -> list[dict[str, Any]]:
    """Full detection after reading only a share of each response: the head on token
    ``ceil(share * n) - 1``. One point per share."""
    out = []
    for share in shares:
        final = [s[max(0, math.ceil(share * len(s)) - 1)] if s else 0.0 for s in scores]
        out.append({"share": share, **_decisions(labels, final, threshold)})
    return out

