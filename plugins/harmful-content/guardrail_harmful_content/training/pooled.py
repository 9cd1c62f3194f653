"""A linear probe on the pooled states of a prefix, fitted and judged out of source.

The score of a prefix ending at token ``i`` is ``sigmoid(a * (w . pool(h_0..h_i) + b) + c)``:
``h`` the observer's states of one or more layers side by side, ``w, b`` a ridge fit on
standardised prefix means (strong L2, so no single template word carries the verdict), ``a, c``
a one-feature logistic (Platt) fit of the ridge output on the same training rows. The pooling is
causal, so the running score after each token is what the streaming rule reads. ``pool`` is the
mean of the response's states so far (``halflife`` None), or their exponentially weighted mean,
weight ``2 ** (-(i - j) / halflife)`` on token ``j`` (``pool_states``): a long benign opening
then does not dilute the harm that follows it, so a rule can halt soon after an answer turns.
``halflife`` may be a tuple of half-lives: one weighted mean per half-life, side by side within
each layer's block of columns (``HalfLife``). Each token's states may be normalised before
pooling (``selection.features.normalise_records``; the monitor applies the same).

Training rows: each record's prefix means at a few cut points (absolute and relative). A harmful
record's prefix counts as harmful once it has reached the record's first harmful token (from the
spans), so a benign opening is not taught as harm. Rows are weighted so that every (source tag,
label) cell weighs the same: no source (the model's own answers, one template family) dominates
what harm looks like; ``upweight`` scales the cells of the tags with a prefix (the hand-written
sets: text nobody here generated).

The fit is ``ridge`` (the default: closed form on weighted moments, so a fold subtracts its
source's moments from the pool's) or ``logistic``: an L2 logistic regression on the same
standardised, weighted rows (``fit_logistic``; ``a, c`` are then 1 and 0, it is calibrated by its
own loss). Both give one affine map, so the shipped form is the same.

``fit_loso`` fits one head per held-out source tag and scores that source's records with it:
the out-of-source prefix scores the selection (``select.py``) chooses layers, regularisation and
the rule on.

A prompt term (``prompt_scale``, the eighth and ninth passes in docs/harmful-content.md): each
record's prompt states appended to its rows, a constant per record added to every prefix logit
(``prompt_fit.py``, which also fits it). The fits themselves are in ``linear_fit.py``.
``to_dual_head`` turns a fitted probe into the plugin's ``DualHead`` format (a ``prefix_mean``
head whose token half is zero and whose bias rides on a one-unit sequence MLP; see there), so the
monitor loads it by the same path as every other head.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from ..head import DualHead
from ..pooling import halflives_of
from .linear_fit import FITS, Moments, fit_logistic, platt, ridge_fit

__all__ = ["CUT_FRACTIONS", "CUT_TOKENS", "FITS", "HalfLife", "LinearProbe", "PoolRecord",
           "PromptTermRange", "as_halflife", "cell_weight", "cut_positions", "decay_of",
           "fit_logistic", "fit_loso", "fit_probe", "layer_columns", "pool_states",
           "prompt_matrix", "row_matrix", "to_dual_head"]

HalfLife = float | tuple[float, ...] | None
"""A pooled probe's pooling: None, the prefix mean; a number, one weighted mean; a tuple of two or
more, one weighted mean per half-life side by side (each layer's block ``len * H`` columns, the
half-lives in order)."""

CUT_TOKENS = (3, 7, 15, 31, 63)
CUT_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
# GELU(x) = x * Phi(x) equals x to float64 precision for x >= 9; the one-unit MLP's pre-activation
# is shifted by this much (see to_dual_head).
_GELU_SHIFT = 60.0


@dataclass
class PoolRecord:
    """One record's cached states and what the selection needs to know about it."""

    tag: str
    label: int
    hidden: dict[int, np.ndarray]  # layer -> (n, H), float16 or float32
    first_harm: int | None = None  # first token inside a harmful span (label 1 only)
    split: str = ""
    kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # layer -> (H,) the context's pooled states (context_mean, training/context.py); only a head
    # with a prompt term reads them
    prompt: dict[int, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(next(iter(self.hidden.values())).shape[0])


def as_halflife(value: Any) -> HalfLife:
    """A report's or config's ``halflife`` (None, a number, or a list) as ``HalfLife``."""
    if value is None:
        return None
    values = halflives_of(value)
    return values[0] if len(values) == 1 else values


def _pools(halflife: HalfLife) -> tuple[float | None, ...]:
    """The pools of one layer's block, in column order."""
    return (None,) if halflife is None else halflives_of(halflife)


def decay_of(halflife: float | None) -> float:
    """The per-token decay of an exponentially weighted mean (1.0: the plain mean)."""
    if halflife is None:
        return 1.0
    if not halflife > 0:
        raise ValueError(f"halflife must be > 0 tokens, got {halflife!r}")
    return float(2.0 ** (-1.0 / halflife))


def pool_states(states: np.ndarray, halflife: float | None = None) -> np.ndarray:
    """``(n, ...)`` -> float64 ``(n, ...)``: row ``i`` the mean of rows ``0..i``, weighted
    ``2 ** (-(i - j) / halflife)`` on row ``j`` (equal weights when ``halflife`` is None); the
    weights sum to one at every row, so the first rows are a plain mean of the few seen."""
    x = np.asarray(states, dtype=np.float64)
    d = decay_of(halflife)
    if d == 1.0:
        counts = np.arange(1, x.shape[0] + 1, dtype=np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
        return np.cumsum(x, axis=0) / counts
    out = np.empty_like(x)
    total = np.zeros(x.shape[1:])
    weight = 0.0
    for i in range(x.shape[0]):
        total = d * total + x[i]
        weight = d * weight + 1.0
        out[i] = total / weight
    return out


def cut_positions(n: int, first_harm: int | None = None,
                  turn_rows: Sequence[int] = ()) -> list[int]:
    """The token indices whose prefix means become training rows for a record of ``n`` tokens;
    with ``first_harm`` (a harmful record's first harmful token) also ``first_harm + d`` for each
    ``d`` in ``turn_rows``, so the rows just after a turn are taught, not only the fixed cuts."""
    points = {p for p in CUT_TOKENS if p < n}
    points |= {max(0, math.ceil(f * n) - 1) for f in CUT_FRACTIONS}
    if first_harm is not None:
        points |= {first_harm + d for d in turn_rows}
    return sorted(p for p in points if 0 <= p < n)


def _prefix_label(record: PoolRecord, p: int) -> int:
    if record.label != 1:
        return 0
    first = record.first_harm if record.first_harm is not None else 0
    return int(p >= first)


def cell_weight(tag: str, upweight: Mapping[str, float] | None) -> float:
    """The total weight of a (tag, label) cell: the factor of the first ``upweight`` prefix
    ``tag`` starts with, else 1."""
    for prefix, factor in (upweight or {}).items():
        if tag.startswith(prefix):
            return float(factor)
    return 1.0


def row_matrix(records: Sequence[PoolRecord], layers: Sequence[int],
               halflife: HalfLife = None, upweight: Mapping[str, float] | None = None,
               turn_rows: Sequence[int] = ()
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training rows of ``records``: ``X (R, H*len(layers))`` float32 pooled prefixes, ``y (R,)``,
    ``weights (R,)`` (each (tag, label) cell sums to one, or to its ``upweight`` factor for a
    tag with that prefix; each record's rows share its weight equally), ``owner (R,)`` the
    record index of each row. ``turn_rows``: offsets after a harmful record's first harmful
    token that become rows too (``cut_positions``)."""
    cell_size: dict[tuple[str, int], int] = defaultdict(int)
    for r in records:
        cell_size[(r.tag, r.label)] += 1
    xs: list[np.ndarray] = []
    ys: list[int] = []
    ws: list[float] = []
    owner: list[int] = []
    for i, r in enumerate(records):
        cuts = cut_positions(len(r), r.first_harm if r.label == 1 else None, turn_rows)
        if not cuts:
            continue
        parts = []
        for layer in layers:
            states = np.asarray(r.hidden[layer], dtype=np.float32)
            for hl in _pools(halflife):
                if hl is None:
                    pooled = np.cumsum(states, axis=0)[cuts] / (
                        np.asarray(cuts, dtype=np.float32)[:, None] + 1.0)
                else:
                    pooled = pool_states(states[:cuts[-1] + 1], hl)[cuts].astype(np.float32)
                parts.append(pooled)
        xs.append(np.concatenate(parts, axis=1))
        ys.extend(_prefix_label(r, p) for p in cuts)
        ws.extend([cell_weight(r.tag, upweight) / (len(cuts) * cell_size[(r.tag, r.label)])]
                  * len(cuts))
        owner.extend([i] * len(cuts))
    return (np.concatenate(xs).astype(np.float32), np.asarray(ys, dtype=np.float64),
            np.asarray(ws, dtype=np.float64), np.asarray(owner, dtype=np.int64))


class PromptTermRange(NamedTuple):
    """What the prompt term may add (``prompt_fit.prompt_term_range``; the weights' config key
    ``prompt_term``): ``neutral`` for a stream without a prompt, clipped to ``[low, high]``."""

    neutral: float
    low: float
    high: float

    def clip(self, term: float) -> float:
        return min(max(term, self.low), self.high)


@dataclass
class LinearProbe:
    """``logit = a * (w . x + b + w_p . p) + c`` over the layers' pooled prefixes side by side
    (``x``) and, for a head with a prompt term, the record's prompt states (``p``, the same
    layers side by side; ``w_p`` already scaled, see the module docstring; clipped to
    ``prompt_range`` when the fit set one, as the monitor clips it)."""

    layers: tuple[int, ...]
    w: np.ndarray  # (H * len(layers),) float64, on raw (unstandardised) states
    b: float
    a: float
    c: float
    ridge: float  # the L2 strength of either fit
    halflife: HalfLife = None  # None: the prefix mean (pool_states)
    fit: str = "ridge"  # or "logistic"
    prompt_w: np.ndarray | None = None  # (H * len(layers),) on raw prompt states; None: no term
    prompt_scale: float | None = None  # the scale the prompt term was fitted with
    prompt_range: PromptTermRange | None = None  # set by fit_probe; None: the term as it is

    def logit_weights(self) -> tuple[np.ndarray, float]:
        """The probe as one affine map: ``logit = w' . x + b'`` (plus ``prompt_logit``)."""
        return self.a * self.w, self.a * self.b + self.c

    def prompt_weights(self) -> np.ndarray | None:
        """``w_p'`` with ``logit = w' . x + b' + w_p' . p``: raw prompt states, Platt scale
        folded in (None without a prompt term)."""
        return None if self.prompt_w is None else self.a * self.prompt_w

    def prompt_logit(self, record: PoolRecord) -> float:
        """The constant the prompt term adds to every prefix logit of ``record`` (0 without)."""
        wp = self.prompt_weights()
        if wp is None:
            return 0.0
        term = float(prompt_matrix([record], self.layers)[0] @ wp)
        return term if self.prompt_range is None else self.prompt_range.clip(term)

    def prefix_scores(self, record: PoolRecord) -> np.ndarray:
        """The harm probability after every token of ``record`` (float64)."""
        w, b = self.logit_weights()
        pools = _pools(self.halflife)
        width = w.shape[0] // (len(self.layers) * len(pools))
        z = np.zeros(len(record), dtype=np.float64)
        for k, hl in enumerate(pools):  # the pooling is linear: pool each pool's projection
            zk = np.zeros(len(record), dtype=np.float64)
            for j, layer in enumerate(self.layers):
                s = (j * len(pools) + k) * width
                zk += np.asarray(record.hidden[layer], dtype=np.float32) @ w[s:s + width]
            z += pool_states(zk, hl)
        z = z + b + self.prompt_logit(record)
        return 0.5 + 0.5 * np.tanh(0.5 * z)


def prompt_matrix(records: Sequence[PoolRecord], layers: Sequence[int]) -> np.ndarray:
    """``(len(records), H * len(layers))`` float64: each record's prompt states of ``layers``
    side by side; a record without them is named."""
    rows = []
    for i, r in enumerate(records):
        missing = [layer for layer in layers if layer not in r.prompt]
        if missing:
            raise ValueError(f"record {i} ({r.tag}): no prompt states for layer(s) {missing}: "
                             "a prompt term needs every record's (select.py --prompt-features)")
        rows.append(np.concatenate([np.asarray(r.prompt[layer], dtype=np.float64).ravel()
                                    for layer in layers]))
    return np.stack(rows)


def layer_columns(layers: Sequence[int], all_layers: Sequence[int], width: int) -> np.ndarray:
    return np.concatenate([np.arange(all_layers.index(layer) * width,
                                     (all_layers.index(layer) + 1) * width) for layer in layers])


def fit_probe(records: Sequence[PoolRecord], layers: Sequence[int], ridge: float,
              halflife: HalfLife = None, fit: str = "ridge",
              upweight: Mapping[str, float] | None = None,
              prompt_scale: float | None = None, turn_rows: Sequence[int] = ()) -> LinearProbe:
    """One probe on all of ``records`` (``fit``: ``ridge`` or ``logistic``, L2 ``ridge``;
    ``upweight``, ``turn_rows``: see ``row_matrix``; ``prompt_scale``: with a prompt term, each
    record's ``prompt`` states appended to its rows, the term scaled by this and its range set,
    ``prompt_fit.fit_prompt_probe``; None: none)."""
    from .prompt_fit import check_prompt_fit, fit_prompt_probe  # it builds on this module

    check_prompt_fit(fit, prompt_scale)
    if prompt_scale is not None:
        return fit_prompt_probe(records, layers, ridge, halflife, upweight, prompt_scale,
                                turn_rows)
    x, y, w, _ = row_matrix(records, layers, halflife, upweight, turn_rows)
    if fit == "logistic":
        coef, b, _ = fit_logistic(x, y, w, ridge)
        return LinearProbe(tuple(layers), coef, b, 1.0, 0.0, ridge, halflife, fit)
    m = Moments.of(x, y, w)
    (coef, b), = ridge_fit(m, np.arange(x.shape[1]), [ridge])
    a, c = platt(x.astype(np.float64) @ coef + b, y, w)
    return LinearProbe(tuple(layers), coef, b, a, c, ridge, halflife)


def fit_loso(records: Sequence[PoolRecord], all_layers: Sequence[int],
             layer_sets: Sequence[Sequence[int]], ridges: Sequence[float],
             progress: Any = None, halflife: HalfLife = None, fit: str = "ridge",
             upweight: Mapping[str, float] | None = None, prompt_scale: float | None = None,
             turn_rows: Sequence[int] = ()
             ) -> dict[tuple[tuple[int, ...], float], list[np.ndarray]]:
    """Out-of-source prefix scores: for every layer set and L2 strength, every record scored
    by the probe (pooling ``halflife``, ``fit`` ridge or logistic, a prompt term scaled by
    ``prompt_scale`` and ``turn_rows`` as ``fit_probe``'s, not clamped) fitted on the records
    of all the other source tags."""
    from .prompt_fit import check_prompt_fit, fit_loso_prompt  # it builds on this module

    all_layers = list(all_layers)
    check_prompt_fit(fit, prompt_scale)
    x, y, w, owner = row_matrix(records, all_layers, halflife, upweight, turn_rows)
    width = x.shape[1] // len(all_layers)
    tags = sorted({r.tag for r in records})
    row_tag = np.asarray([records[i].tag for i in owner])
    if prompt_scale is not None:
        return fit_loso_prompt(records, all_layers, layer_sets, ridges, progress, halflife,
                               prompt_scale, (x, y, w, owner), tags)
    total = Moments.of(x, y, w) if fit == "ridge" else None
    out: dict[tuple[tuple[int, ...], float], list[np.ndarray]] = {
        (tuple(s), lam): [np.zeros(0)] * len(records) for s in layer_sets for lam in ridges}
    starts: dict[tuple[tuple[int, ...], float], np.ndarray] = {}
    for tag in tags:
        held = row_tag == tag
        train = ~held
        members = [i for i, r in enumerate(records) if r.tag == tag]
        xt = x[train]
        # Re-weight the training rows as row_matrix would without the held-out tag: the cell
        # weights do not depend on other cells, so the pool's moments minus the tag's are exact
        # (and the logistic fit's training rows keep their weights).
        fold = None if total is None else total - Moments.of(x[held], y[held], w[held])
        for layers in layer_sets:
            cols = layer_columns(layers, all_layers, width)
            if fold is None:
                for lam in ridges:
                    coef, b, starts[(tuple(layers), lam)] = fit_logistic(
                        xt[:, cols], y[train], w[train], lam,
                        init=starts.get((tuple(layers), lam)))
                    probe = LinearProbe(tuple(layers), coef, b, 1.0, 0.0, lam, halflife, fit)
                    scores = out[(tuple(layers), lam)]
                    for i in members:
                        scores[i] = probe.prefix_scores(records[i])
                continue
            for lam, (coef, b) in zip(ridges, ridge_fit(fold, cols, ridges), strict=True):
                full = np.zeros(x.shape[1], dtype=np.float32)
                full[cols] = coef
                a, c = platt((xt @ full).astype(np.float64) + b, y[train], w[train])
                probe = LinearProbe(tuple(layers), coef, b, a, c, lam, halflife)
                scores = out[(tuple(layers), lam)]
                for i in members:
                    scores[i] = probe.prefix_scores(records[i])
        if progress is not None:
            progress(tag)
    return out


def to_dual_head(probe: LinearProbe, hidden_size: int) -> DualHead:
    """The probe as a ``prefix_mean`` (``prefix_ema`` with a halflife) ``DualHead`` over
    ``probe.layers``: the input is the layers' token states then their pooled prefixes, one block
    of every layer per half-life (``scoring.stack_states``); the token half gets
    zero weight. ``DualHead``'s linear sequence head has no bias, so the probe's affine map rides
    on a one-unit MLP: ``Linear(D, 1)`` computes ``w' . x + b' + S`` with ``S`` large enough that
    GELU is the identity there (to float64 precision), and the output row ``(0, 1)`` with bias
    ``(0, -S)`` gives the logit difference ``w' . x + b'``. The monitor and ``prefix_scores``
    compute it exactly as any MLP head."""
    w, b = probe.logit_weights()
    n = len(probe.layers)
    pools = len(_pools(probe.halflife))
    width = n * hidden_size
    if w.shape[0] != width * pools:
        raise ValueError(f"probe has {w.shape[0]} weights, {n} layers of {hidden_size} "
                         f"({pools} pools) need {width * pools}")
    # the probe's columns are layer by layer (each layer's pools side by side), the head's
    # pooled input pool by pool (each pool's layers side by side)
    w = w.reshape(n, pools, hidden_size).transpose(1, 0, 2).reshape(-1)
    head = DualHead((1 + pools) * width, dropout=0.0, seed=0, sequence_hidden=1)
    first, last = head.sequence_layers()
    with torch.no_grad():
        for p in head.token_head.parameters():
            p.zero_()
        first.weight.zero_()
        first.weight[0, width:] = torch.as_tensor(w, dtype=torch.float32)
        first.bias.fill_(b + _GELU_SHIFT)
        last.weight.copy_(torch.tensor([[0.0], [1.0]]))
        last.bias.copy_(torch.tensor([0.0, -_GELU_SHIFT]))
    return head
