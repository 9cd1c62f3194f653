"""The harm probe's prompt term, fitted (the eighth and ninth passes, docs/harmful-content.md):
each record's prompt states (``PoolRecord.prompt``: the context's pooled states,
``context_mean``, layer -> vector) are appended to every training row of the record, one ridge
fit reads both, and a prefix's logit is ``a * (w . pool(h) + b + s * w_p . p) + c``: the response
term plus a constant per record. ``s`` scales the prompt term about its mean over the training
rows (the mean folded into ``b``), the Platt scale is fitted on the scaled logit, and ``s = 1``
is the joint fit as it is.

A probe fitted on the whole pool (``fit_prompt_probe``) also carries the term's range
(``prompt_term_range``): its neutral value, for a stream without a prompt, and the clamp the
runtime clips the term to (docs/harmful-content.md, "Prompt term (runtime contract)"). The
out-of-source scores (``fit_loso_prompt``) are of the unclamped term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .linear_fit import FITS, Moments, platt, ridge_fit
from .pooled import (
    HalfLife,
    LinearProbe,
    PoolRecord,
    PromptTermRange,
    layer_columns,
    prompt_matrix,
    row_matrix,
)

__all__ = ["PROMPT_CLAMP_PERCENTILES", "check_prompt_fit", "fit_loso_prompt",
           "fit_prompt_probe", "prompt_term_range"]

# The clamp: the term's 1st and 99th percentiles over the records the head was fitted on
PROMPT_CLAMP_PERCENTILES = (1.0, 99.0)


def check_prompt_fit(fit: str, prompt_scale: float | None) -> None:
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if prompt_scale is None:
        return
    if not (math.isfinite(prompt_scale) and prompt_scale >= 0):
        raise ValueError(f"prompt_scale must be a number >= 0, got {prompt_scale!r}")
    if fit != "ridge":
        raise ValueError("a prompt term is fitted with fit='ridge' only (its scale is applied "
                         "before the Platt fit the logistic head does not have)")


def _joint_moments(x: np.ndarray, y: np.ndarray, w: np.ndarray, owner: np.ndarray,
                   prompts: np.ndarray, keep: np.ndarray) -> Moments:
    """The moments of the rows of the records ``keep`` (a mask over records) with each record's
    prompt columns appended to its rows, without building the wide rows: the prompt is constant
    over a record, so its blocks come from per-record sums."""
    rows = keep[owner]
    mr = Moments.of(x[rows], y[rows], w[rows])
    n = len(keep)
    ws = np.bincount(owner[rows], w[rows], n)[keep]
    wy = np.bincount(owner[rows], w[rows] * y[rows], n)[keep]
    sums = np.zeros((n, x.shape[1]))
    np.add.at(sums, owner[rows], x[rows].astype(np.float64) * w[rows][:, None])
    p = prompts[keep]
    srp = sums[keep].T @ p
    sxx = np.block([[mr.sxx, srp], [srp.T, (p * ws[:, None]).T @ p]])
    return Moments(mr.sw, np.concatenate([mr.sx, ws @ p]), mr.sy, sxx,
                   np.concatenate([mr.sxy, wy @ p]))


def _scaled_probe(layers: Sequence[int], coef: np.ndarray, b: float, xr: np.ndarray,
                  zp: np.ndarray, y: np.ndarray, w: np.ndarray, ridge: float,
                  halflife: HalfLife, scale: float, width: int) -> LinearProbe:
    """A joint fit's probe with its prompt term scaled by ``scale`` about its weighted mean over
    the training rows (``xr``: the rows' response term, ``zp``: their prompt term, both
    unscaled), Platt fitted on the scaled logit; ``coef``'s first ``width`` entries are the
    response's (several half-lives: more response than prompt columns)."""
    if scale == 1.0:  # the joint fit as it is (bit for bit)
        a, c = platt(xr + zp + b, y, w)
        return LinearProbe(tuple(layers), coef[:width], b, a, c, ridge, halflife,
                           prompt_w=coef[width:], prompt_scale=1.0)
    mean = float((w * zp).sum() / w.sum())
    a, c = platt(xr + (mean + scale * (zp - mean)) + b, y, w)
    return LinearProbe(tuple(layers), coef[:width], b + (1.0 - scale) * mean, a, c, ridge,
                       halflife, prompt_w=scale * coef[width:], prompt_scale=scale)


def prompt_term_range(terms: np.ndarray, w: np.ndarray, owner: np.ndarray) -> PromptTermRange:
    """The range of a fitted term over its training records (``terms``: each record's term as
    the runtime adds it, ``LinearProbe.prompt_weights() . p``; ``w``, ``owner``: the fit's rows,
    ``row_matrix``). ``neutral``: the term's weighted mean over the training rows, the average
    prompt ``_scaled_probe`` pivots the scale about (times ``a * s``, the term's units);
    ``low``, ``high``: the 1st and 99th percentiles over the records with rows, unweighted (the
    prompts the head saw, each once)."""
    n = len(terms)
    record_weight = np.bincount(owner, w, n)
    fitted = np.bincount(owner, minlength=n) > 0
    neutral = float(record_weight @ terms / record_weight.sum())
    low, high = (float(v) for v in np.percentile(terms[fitted], PROMPT_CLAMP_PERCENTILES))
    return PromptTermRange(neutral, low, high)


def fit_prompt_probe(records: Sequence[PoolRecord], layers: Sequence[int], ridge: float,
                     halflife: HalfLife, upweight: Mapping[str, float] | None,
                     scale: float, turn_rows: Sequence[int] = ()) -> LinearProbe:
    """``fit_probe`` with a prompt term: one joint ridge fit on every record's rows with its
    prompt states appended, the term scaled by ``scale``, and its range over these records
    (``prompt_term_range``) on the probe."""
    x, y, w, owner = row_matrix(records, layers, halflife, upweight, turn_rows)
    prompts = prompt_matrix(records, layers)
    m = _joint_moments(x, y, w, owner, prompts, np.ones(len(records), dtype=bool))
    width = x.shape[1]
    (coef, b), = ridge_fit(m, np.arange(width + prompts.shape[1]), [ridge])
    probe = _scaled_probe(layers, coef, b, x.astype(np.float64) @ coef[:width],
                          prompts[owner] @ coef[width:], y, w, ridge, halflife, scale, width)
    weights = probe.prompt_weights()
    assert weights is not None  # a prompt term was fitted
    probe.prompt_range = prompt_term_range(prompts @ weights, w, owner)
    return probe


def fit_loso_prompt(records: Sequence[PoolRecord], all_layers: list[int],
                    layer_sets: Sequence[Sequence[int]], ridges: Sequence[float],
                    progress: Any, halflife: HalfLife, scale: float,
                    rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                    tags: list[str]) -> dict[tuple[tuple[int, ...], float], list[np.ndarray]]:
    """``fit_loso`` with a prompt term: the pool's joint moments minus the held-out source's
    (its records' rows with their prompt columns), a ridge fit on each layer set's response and
    prompt columns, the term scaled and Platt-fitted on the fold's training rows (not clamped)."""
    x, y, w, owner = rows
    prompts = prompt_matrix(records, all_layers)
    width = x.shape[1]
    layer_width = width // len(all_layers)
    prompt_width = prompts.shape[1] // len(all_layers)  # one state per layer, whatever the pools
    record_tag = np.asarray([r.tag for r in records])
    total = _joint_moments(x, y, w, owner, prompts, np.ones(len(records), dtype=bool))
    out: dict[tuple[tuple[int, ...], float], list[np.ndarray]] = {
        (tuple(s), lam): [np.zeros(0)] * len(records) for s in layer_sets for lam in ridges}
    for tag in tags:
        held = record_tag == tag
        fold = total - _joint_moments(x, y, w, owner, prompts, held)
        train = ~held[owner]
        xt = x[train]
        for layers in layer_sets:
            cols = layer_columns(layers, all_layers, layer_width)
            pcols = layer_columns(layers, all_layers, prompt_width)
            pt = prompts[owner[train]][:, pcols]
            for lam, (coef, b) in zip(ridges, ridge_fit(
                    fold, np.concatenate([cols, width + pcols]), ridges), strict=True):
                # the response term as fit_loso computes it without a prompt (float32 rows)
                full = np.zeros(width, dtype=np.float32)
                full[cols] = coef[:len(cols)]
                probe = _scaled_probe(layers, coef, b, (xt @ full).astype(np.float64),
                                      pt @ coef[len(cols):], y[train], w[train], lam, halflife,
                                      scale, len(cols))
                scores = out[(tuple(layers), lam)]
                for i in np.flatnonzero(held).tolist():
                    scores[i] = probe.prefix_scores(records[i])
        if progress is not None:
            progress(tag)
    return out
