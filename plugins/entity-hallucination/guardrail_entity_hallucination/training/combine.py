"""The combined span head: one logistic model over an entity's span features (its tokens'
surprisal and entropy statistics, its length and kind) and, optionally, its states, with the
states penalised more than the features (``wd_states`` against ``wd_features``), so that the
probe's share of the score is whatever leave-one-source-out validation lets it earn.

It is an ``EntitySpanProbe`` like any span head (same file format, same monitor code): a
candidate without states keeps one ``mean`` block with zero weights. Candidates are compared by
``loso.evaluate_candidates``; ``COMBINED_CANDIDATES`` is the grid, fixed before any figure was
read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from guardrail.probes.heads import LinearProbe

from ..span_probe import ALL_FEATURES, SPAN_FEATURES, EntitySpanProbe, StateBlock
from ..token_prior import PRIORS
from .train_span import Block, SpanRows

if TYPE_CHECKING:
    from .kinds import KindSpanProbe

__all__ = ["COMBINED_CANDIDATES", "GRIDS", "LOGIT_CANDIDATES", "LOSO_GRID", "PASS4_GRID",
           "PASS5", "PASS5_GRID", "PASS6_GRID", "PASS6_PRIOR_CANDIDATES", "PASS7_CANDIDATES",
           "PASS7_GRID", "STATE_BLOCKS", "Candidate", "Design", "design", "fit_candidate",
           "fit_scorer", "source_weights"]

STATS = ("surprisal_max", "surprisal_mean", "surprisal_first", "entropy_max", "entropy_mean",
         "entropy_first", "log_tokens")
KIND = ("kind_NAME", "kind_NUMBER", "kind_DATE")
SURPRISAL = ("surprisal_max", "surprisal_mean")
ENTROPY = ("entropy_max", "entropy_mean")
# The shipped version-2 head's blocks.
STATE_BLOCKS: tuple[Block, ...] = (("mean", 15), ("mean", 18), ("prev", 15), ("prev", 18))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A combined head: the span features it reads, whether it reads states, the penalties."""

    name: str
    features: tuple[str, ...]
    states: bool = False
    wd_states: float = 0.0
    wd_features: float = 0.001
    balanced: bool = False  # each training source weighs the same in the loss
    # Added for the third LOSO pass (issue 23), before its figures were read:
    monotone: bool = False  # surprisal weights kept >= 0 (more surprising never scores lower)
    ensemble: bool = False  # one fit per training source with both labels, weights averaged
    # Seventh pass (``kinds``): features standardised within the entity's kind, or one
    # calibration per kind; fitted through ``fit_scorer``, not ``fit_candidate``.
    within_kind: tuple[str, ...] = ()
    per_kind: bool = False


COMBINED_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("surprisal", SURPRISAL),
    Candidate("surprisal+entropy", SURPRISAL + ENTROPY),
    Candidate("stats", STATS),
    Candidate("stats+kind", STATS + KIND),
    *(Candidate(f"probe(wd {wd})+stats+kind", STATS + KIND, True, wd)
      for wd in (0.003, 0.03, 0.3, 3.0)),
    *(Candidate(f"probe(wd {wd})+stats", STATS, True, wd) for wd in (0.03, 0.3, 3.0)),
    # Added after the first LOSO pass: the entropy, first-token and length features cost the
    # hand-written biographies 0.12 (stats vs surprisal), so the probe also goes with surprisal
    # alone, and with surprisal and entropy.
    *(Candidate(f"probe(wd {wd})+surprisal", SURPRISAL, True, wd)
      for wd in (0.03, 0.3, 1.0, 3.0, 10.0)),
    *(Candidate(f"probe(wd {wd})+surprisal+entropy", SURPRISAL + ENTROPY, True, wd)
      for wd in (0.3, 3.0)),
    # Added after the second pass: the probe helps the template sources and costs the
    # biographies, so the loss also weighs each training source the same.
    Candidate("surprisal, balanced", SURPRISAL, balanced=True),
    *(Candidate(f"probe(wd {wd})+surprisal, balanced", SURPRISAL, True, wd, balanced=True)
      for wd in (0.3, 1.0, 3.0, 10.0)),
    # Third pass (issue 23: the own answers and a second hand-written set added as sources),
    # written before any of its figures: surprisal weights held non-negative, and an ensemble
    # across sources (the average of one fit per training source, still one linear head).
    Candidate("surprisal, monotone", SURPRISAL, monotone=True),
    Candidate("surprisal, ensemble", SURPRISAL, monotone=True, ensemble=True),
    *(Candidate(f"probe(wd {wd})+surprisal, monotone", SURPRISAL, True, wd, monotone=True)
      for wd in (1.0, 3.0, 10.0, 30.0)),
    *(Candidate(f"probe(wd {wd})+surprisal, ensemble", SURPRISAL, True, wd, monotone=True,
                ensemble=True) for wd in (1.0, 3.0, 10.0)),
    *(Candidate(f"probe(wd {wd})+surprisal+entropy, monotone", SURPRISAL + ENTROPY, True, wd,
                monotone=True) for wd in (3.0, 10.0)),
)
# Fourth pass (issue 23), written before any of its figures: cheap features of the logits the
# monitor already reads (``logit_stats``, ``span_probe.EXTRA_FEATURES``), each beside the
# surprisal, plain, monotone and as an ensemble across sources (the third pass's best form).
EXCESS = ("excess_max", "excess_mean")
MARGIN = ("margin_max", "margin_mean")
RANK = ("log_rank_max", "log_rank_mean")
FIRST_REST = ("surprisal_first", "surprisal_rest")
RELATIVE = ("surprisal_rel_max", "surprisal_rel_mean")
TOP = ("top_entity_first",)
_LOGIT_SETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("surprisal+excess", SURPRISAL + EXCESS),
    ("surprisal+margin", SURPRISAL + MARGIN),
    ("surprisal+rank", SURPRISAL + RANK),
    ("surprisal+first/rest", SURPRISAL + FIRST_REST),
    ("surprisal+relative", SURPRISAL + RELATIVE),
    ("relative", RELATIVE),
    ("surprisal+top-entity", SURPRISAL + TOP),
    ("surprisal+margin+rank+relative", SURPRISAL + MARGIN + RANK + RELATIVE),
    ("logit features", SURPRISAL + EXCESS + MARGIN + RANK + FIRST_REST + RELATIVE + TOP),
)
LOGIT_CANDIDATES: tuple[Candidate, ...] = tuple(
    c for name, features in _LOGIT_SETS for c in (
        Candidate(name, features),
        Candidate(f"{name}, monotone", features, monotone=True),
        Candidate(f"{name}, ensemble", features, monotone=True, ensemble=True)))
# Added after the fourth pass's table (never after a look at the held-out set): rank and margin
# ensembles came closest to surprisal on every source, so rank goes with the other features.
LOGIT_CANDIDATES += (
    *(Candidate(f"{name}, ensemble", features, monotone=True, ensemble=True)
      for name, features in (("surprisal+margin+rank", SURPRISAL + MARGIN + RANK),
                             ("surprisal+rank+top-entity", SURPRISAL + RANK + TOP),
                             ("surprisal+rank+excess", SURPRISAL + RANK + EXCESS))),
    Candidate("surprisal+rank, balanced", SURPRISAL + RANK, monotone=True, balanced=True))
COMBINED_CANDIDATES = COMBINED_CANDIDATES + LOGIT_CANDIDATES
# Fifth pass (issue 23), written before its figures: the observer's span max and span mean
# surprisal alone as heads (a monotone fit of one feature ranks entities as that feature does).
COMBINED_CANDIDATES += (
    Candidate("surprisal max, monotone", ("surprisal_max",), monotone=True),
    Candidate("surprisal mean, monotone", ("surprisal_mean",), monotone=True))
# Sixth pass (issue 23), written before its figures: the surprisal against a context-free
# prior of the token (``token_prior``; PMI-like, ``span_probe.PRIOR_FEATURES``), per prior each
# span form alone as a one-feature head, in place of the surprisal in the shipped recipe's
# form, beside it, and the prior beside the surprisal with its weight fitted (free sign).
PRIOR_FORMS = ("max", "mean", "first", "sum")
PASS6_PRIOR_CANDIDATES: tuple[Candidate, ...] = tuple(
    c for p in PRIORS for c in (
        *(Candidate(f"pmi-{p} {form}, monotone", (f"pmi_{p}_{form}",), monotone=True)
          for form in PRIOR_FORMS),
        Candidate(f"pmi-{p}, ensemble", (f"pmi_{p}_max", f"pmi_{p}_mean"), monotone=True,
                  ensemble=True),
        Candidate(f"surprisal+pmi-{p}, ensemble",
                  (*SURPRISAL, f"pmi_{p}_max", f"pmi_{p}_mean"), monotone=True, ensemble=True),
        Candidate(f"surprisal+prior-{p}, ensemble",
                  (*SURPRISAL, f"prior_{p}_max", f"prior_{p}_mean"), monotone=True,
                  ensemble=True)))
MONOTONE = ("surprisal_max", "surprisal_mean", "surprisal_first", "surprisal_rest",
            "surprisal_rel_max", "surprisal_rel_mean", "margin_max", "margin_mean",
            "log_rank_max", "log_rank_mean",
            *(f"pmi_{p}_{form}" for p in PRIORS for form in PRIOR_FORMS))
_FIRST_PASSES = {"probe(wd 1.0)+surprisal", "probe(wd 10.0)+surprisal"}
_NOT_RUN = {"probe(wd 30.0)+surprisal, monotone", "probe(wd 1.0)+surprisal, ensemble",
            "probe(wd 3.0)+surprisal+entropy, monotone"}
# The grid of the third and fourth passes: every candidate without states (cheap), the winner
# of the second pass and the one best on the hand-written biographies there, and the new
# candidates but three. A probe fit takes 5-20 s on a shared core, so the full grid (about 30
# probe candidates x 16 folds) no longer fits.
PASS4_GRID: tuple[Candidate, ...] = tuple(
    c for c in COMBINED_CANDIDATES[:-2]
    if c.name not in _NOT_RUN and (not c.states or c.name in _FIRST_PASSES
                                   or c.monotone or c.ensemble))
# The fifth pass's grid, what `train_combined --choose` and `bench.entity_eval --loso` run now
# (docs/entity-hallucination.md, "Fifth pass"): the shipped recipe, the surprisal heads the
# fourth pass's table put near the top, and surprisal span max and span mean alone.
PASS5 = ("probe(wd 1.0)+surprisal", "surprisal, ensemble", "surprisal, monotone",
         "surprisal+margin, ensemble", "surprisal+excess, ensemble", "surprisal max, monotone",
         "surprisal mean, monotone")
PASS5_GRID: tuple[Candidate, ...] = tuple(
    next(c for c in COMBINED_CANDIDATES if c.name == name) for name in PASS5)
LOSO_GRID = PASS5_GRID
COMBINED_CANDIDATES += PASS6_PRIOR_CANDIDATES  # after the earlier grids, which slice it
# The sixth pass's grid (docs/entity-hallucination.md, "Sixth pass"; `bench.entity_eval --loso
# --grid pass6`): the shipped recipe, the baseline as a head, and the prior candidates.
PASS6_GRID: tuple[Candidate, ...] = (
    *(next(c for c in COMBINED_CANDIDATES if c.name == name)
      for name in ("surprisal, ensemble", "surprisal max, monotone")),
    *PASS6_PRIOR_CANDIDATES)
# Seventh pass (docs/entity-hallucination.md, "Seventh pass"; `--grid pass7`), written before
# its figures: surprisal and the sixth pass's best two priors' pmi standardised within the
# entity's kind, and the shipped recipe calibrated once per kind.
_PMI = {p: (f"pmi_{p}_max", f"pmi_{p}_mean") for p in ("meanlog", "merge")}
PASS7_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("surprisal in kind max, monotone", ("surprisal_max",), monotone=True,
              within_kind=("surprisal_max",)),
    Candidate("surprisal in kind, ensemble", SURPRISAL, monotone=True, ensemble=True,
              within_kind=SURPRISAL),
    Candidate("surprisal, ensemble per kind", SURPRISAL, monotone=True, ensemble=True,
              per_kind=True),
    *(c for p, pmi in _PMI.items() for c in (
        Candidate(f"pmi-{p} in kind, ensemble", pmi, monotone=True, ensemble=True,
                  within_kind=pmi),
        Candidate(f"surprisal+pmi-{p} in kind, ensemble", SURPRISAL + pmi, monotone=True,
                  ensemble=True, within_kind=pmi),
        Candidate(f"surprisal in kind+pmi-{p} in kind, ensemble", SURPRISAL + pmi,
                  monotone=True, ensemble=True, within_kind=SURPRISAL + pmi))))
COMBINED_CANDIDATES += PASS7_CANDIDATES
PASS7_GRID: tuple[Candidate, ...] = (*PASS6_GRID[:2], *PASS7_CANDIDATES)
GRIDS: dict[str, tuple[Candidate, ...]] = {"pass5": PASS5_GRID, "pass6": PASS6_GRID,
                                           "pass7": PASS7_GRID}


@dataclasses.dataclass
class Design:
    """Standardised inputs: state blocks ``(n, B*H)`` (empty without states), features
    ``(n, F)`` in ``SPAN_FEATURES`` order (unknown: 0), labels, and the statistics used."""

    states: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    state_stats: list[tuple[np.ndarray, np.ndarray]]
    feature_mean: np.ndarray
    feature_std: np.ndarray


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    known = x[np.isfinite(x).all(axis=1)] if x.ndim == 2 else x
    if not len(known):
        return np.zeros(x.shape[1]), np.ones(x.shape[1])
    mean, std = known.mean(0), known.std(0)
    return mean, np.where(std > 1e-6, std, 1.0)


def _column_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    for k in range(x.shape[1]):
        column = x[:, k][np.isfinite(x[:, k])]
        if column.size:
            mean[k] = column.mean()
            std[k] = column.std() if column.std() > 1e-6 else 1.0
    return mean, std


def design(rows: SpanRows, states: bool, like: Design | None = None) -> Design:
    """The standardised design of ``rows``; with ``like``, standardised with its statistics
    (held-out rows scored by a model fitted on ``like``)."""
    parts, stats = [], []
    if states:
        for k, (pool, layer) in enumerate(STATE_BLOCKS):
            x = rows.block(pool, layer).astype(np.float64)
            mean, std = like.state_stats[k] if like is not None else _stats(x)
            parts.append(np.nan_to_num((x - mean) / std, nan=0.0, posinf=0.0, neginf=0.0))
            stats.append((mean, std))
    fm, fs = (like.feature_mean, like.feature_std) if like is not None else \
        _column_stats(rows.features)
    z = np.nan_to_num((rows.features - fm) / fs, nan=0.0, posinf=0.0, neginf=0.0)
    x_states = np.concatenate(parts, axis=1) if parts else np.zeros((len(rows), 0))
    return Design(x_states, z, rows.labels.astype(np.float64), stats, fm, fs)


def source_weights(sources: Sequence[str]) -> np.ndarray:
    """Row weights under which every source weighs the same (mean 1)."""
    tags = np.asarray(sources)
    out = np.zeros(len(tags))
    kinds = sorted(set(sources))
    for tag in kinds:
        mask = tags == tag
        out[mask] = len(tags) / (len(kinds) * mask.sum())
    return out


def _fit(d: Design, candidate: Candidate, max_iter: int = 300,
         weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """LBFGS on the (row-weighted) mean BCE + wd_states |w_s|^2 + wd_features |w_f|^2 from
    zero weights (deterministic); features the candidate does not read are held at 0."""
    names = ALL_FEATURES[:d.features.shape[1]]  # rows built without the extras: the base
    mask = torch.tensor([name in candidate.features for name in names], dtype=torch.float32)
    # Monotone features are read through softplus(raw), so their weight never goes below 0.
    positive = torch.tensor([candidate.monotone and name in MONOTONE for name in names])
    xs = torch.tensor(d.states, dtype=torch.float32)
    xf = torch.tensor(d.features, dtype=torch.float32)
    y = torch.tensor(d.labels, dtype=torch.float32)
    row_w = torch.ones(len(y)) if weights is None else torch.tensor(weights, dtype=torch.float32)
    ws = torch.zeros(xs.shape[1], requires_grad=True)
    wf = torch.zeros(xf.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)

    def feature_weights() -> torch.Tensor:
        return torch.where(positive, torch.nn.functional.softplus(wf), wf) * mask

    params = [ws, wf, b] if xs.shape[1] else [wf, b]
    optimizer = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        w = feature_weights()
        logit = xf @ w + b
        if xs.shape[1]:
            logit = logit + xs @ ws
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, y, weight=row_w) \
            + candidate.wd_states * (ws ** 2).sum() + candidate.wd_features * (w ** 2).sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (ws.detach().double().numpy(), feature_weights().double().numpy(),
                float(b.detach()[0]))


def _fit_ensemble(d: Design, candidate: Candidate, sources: Sequence[str]
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """The average of one fit per source with both labels (the pooled standardisation kept):
    each source votes alike, whatever its size, and the average is still one linear head."""
    tags = np.asarray(sources)
    fits = []
    for tag in sorted(set(sources)):
        keep = tags == tag
        if len(set(d.labels[keep].tolist())) < 2:
            continue
        part = Design(d.states[keep], d.features[keep], d.labels[keep], d.state_stats,
                      d.feature_mean, d.feature_std)
        fits.append(_fit(part, candidate))
    if not fits:
        raise ValueError("an ensemble needs a training source with entities of both labels")
    return (np.mean([f[0] for f in fits], axis=0), np.mean([f[1] for f in fits], axis=0),
            float(np.mean([f[2] for f in fits])))


def fit_candidate(rows: SpanRows, candidate: Candidate, hidden_size: int,
                  sources: Sequence[str] | None = None
                  ) -> tuple[EntitySpanProbe, Design, tuple[np.ndarray, np.ndarray, float]]:
    """Fit ``candidate`` on ``rows`` (``sources``: each row's source, for a balanced
    candidate); return it as a span head (threshold 0.5, standardisation folded in), its
    training design and its raw weights (for scoring held-out designs)."""
    if len(rows) == 0 or len(set(rows.labels.tolist())) < 2:
        raise ValueError("the combined head needs training entities of both labels")
    if candidate.within_kind or candidate.per_kind:
        raise ValueError(f"candidate {candidate.name!r} reads the entity's kind: fit_scorer")
    d = design(rows, candidate.states)
    if (candidate.balanced or candidate.ensemble) and sources is None:
        raise ValueError(f"candidate {candidate.name!r} weighs sources: pass each row's source")
    if candidate.ensemble and sources is not None:
        ws, wf, b = _fit_ensemble(d, candidate, sources)
    else:
        ws, wf, b = _fit(d, candidate, weights=source_weights(sources)
                         if candidate.balanced and sources is not None else None)
    blocks = STATE_BLOCKS if candidate.states else (("mean", 15),)
    folded, state_blocks, bias = [], [], b
    for k, (pool, layer) in enumerate(blocks):
        if candidate.states:
            mean, std = d.state_stats[k]
            w_block = ws[k * hidden_size:(k + 1) * hidden_size] / std
            offset = float(np.dot(w_block, mean))
            bias -= offset
        else:
            w_block, offset = np.zeros(hidden_size), 0.0
        folded.append(w_block)
        state_blocks.append(StateBlock(pool, layer, offset if pool == "prev" else 0.0))
    # The head lists the base features (as every head before) and the extras it reads, so a
    # head without extras needs nothing from the monitor it did not need before.
    names = ALL_FEATURES[:d.features.shape[1]]
    keep = [k for k, name in enumerate(names)
            if name in SPAN_FEATURES or name in candidate.features]
    head = LinearProbe(hidden_size * len(blocks) + len(keep), seed=0)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor(np.concatenate([*folded, wf[keep]]),
                                              dtype=torch.float32)[None])
        head.linear.bias.fill_(bias)
    head.eval()
    probe = EntitySpanProbe(head, max(layer for _, layer in blocks), 0.5,
                            tuple(names[k] for k in keep),
                            torch.tensor(d.feature_mean[keep], dtype=torch.float32),
                            torch.tensor(d.feature_std[keep], dtype=torch.float32),
                            blocks=tuple(state_blocks) if candidate.states else ())
    return probe, d, (ws, wf, b)


def fit_scorer(rows: SpanRows, candidate: Candidate, hidden_size: int,
               sources: Sequence[str] | None = None
               ) -> tuple[EntitySpanProbe | KindSpanProbe, Callable[[SpanRows], np.ndarray]]:
    """``candidate`` fitted on ``rows`` as the monitor runs it (a span head, or one per kind
    for a seventh-pass candidate) and the logits it gives other rows (out-of-fold scores)."""
    if candidate.within_kind or candidate.per_kind:
        from .kinds import fit_kind_candidate

        kind_probe = fit_kind_candidate(rows, candidate, hidden_size, sources)
        return kind_probe, kind_probe.row_logits
    probe, d, weights = fit_candidate(rows, candidate, hidden_size, sources)
    return probe, lambda held: design_logits(design(held, candidate.states, like=d), weights)


def design_logits(d: Design, weights: tuple[np.ndarray, np.ndarray, float]) -> np.ndarray:
    """Logits of a held-out design under raw weights from ``fit_candidate``."""
    ws, wf, b = weights
    out = d.features @ wf + b
    if ws.size:
        out = out + d.states @ ws
    return np.asarray(out)


def rows_subset(rows: SpanRows, keep: Sequence[int] | np.ndarray) -> SpanRows:
    idx = np.asarray(keep, dtype=np.int64)
    return SpanRows({k: v[idx] for k, v in rows.states.items()}, rows.features[idx],
                    rows.labels[idx], {k: v[idx] for k, v in rows.prev.items()})
