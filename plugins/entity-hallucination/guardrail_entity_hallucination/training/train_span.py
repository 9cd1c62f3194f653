"""Training the span head (``span_probe``) on cached features: one row per entity the monitor's
finder sees, labelled 1 when it overlaps a fabricated span (entities overlapping no labelled span
are negatives: the monitor scores them all), scored exactly as the monitor scores.

Each block of states (``mean`` of the members' states or ``prev``, the state before the entity,
on a layer) and the span features are standardised on the training rows; LBFGS from zero weights
on mean BCE + ``wd * ||w||^2`` makes the fit deterministic, and the standardisation is folded
into the weights. An ensemble averages the logits of members fitted alone, which is one linear
head; the shipped one is ``SHIPPED_MEMBERS`` (chosen on validation, docs/entity-hallucination.md).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from guardrail.probes.heads import LinearProbe
from guardrail.toolkit.features import CachedRecord

from ..span_probe import (
    ALL_FEATURES,
    POOLS,
    SPAN_FEATURES,
    EntitySpanProbe,
    StateBlock,
    prefix_surprisal,
    span_features,
    span_members,
)
from ..spans import find_entities
from .evaluation import span_auc, span_probe_scorer
from .logit_stats import record_extras

__all__ = ["DEFAULT_WEIGHT_DECAYS", "SHIPPED_MEMBERS", "SHIPPED_WEIGHT_DECAY", "Block",
           "SpanFit", "SpanRows", "ensemble_span_probes", "fit_span_blocks", "fit_span_ensemble",
           "fit_span_probe", "member_spec", "parse_member", "select_span_probe", "span_rows"]

DEFAULT_WEIGHT_DECAYS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)

Block = tuple[str, int]
"""A block of states a span head reads: (pool, layer), pool ``mean`` or ``prev``."""
Stats = tuple[np.ndarray, np.ndarray]  # column (mean, std)

# The shipped ensemble, chosen on validation (docs/entity-hallucination.md).
SHIPPED_MEMBERS = ("mean:18", "mean:15", "mean:18+prev:18", "mean:15+mean:18+prev:15")
SHIPPED_WEIGHT_DECAY = 0.003


def parse_member(spec: str) -> tuple[Block, ...]:
    """``"mean:15+mean:18+prev:15"`` -> ``(("mean", 15), ("mean", 18), ("prev", 15))``."""
    blocks: list[Block] = []
    for part in spec.split("+"):
        pool, _, layer = part.strip().partition(":")
        if pool not in POOLS or not layer.strip().lstrip("-").isdigit():
            raise ValueError(f"span head member {spec!r}: each block is POOL:LAYER with POOL in "
                             f"{list(POOLS)}, e.g. 'mean:15+prev:18'")
        blocks.append((pool, int(layer)))
    if not any(pool == "mean" for pool, _ in blocks):
        raise ValueError(f"span head member {spec!r} needs a 'mean' block")
    return tuple(blocks)


def member_spec(blocks: Sequence[Block]) -> str:
    return "+".join(f"{pool}:{layer}" for pool, layer in blocks)


@dataclasses.dataclass
class SpanRows:
    """One row per entity: mean member state per layer ``(n, H)``, raw span features ``(n, F)``
    (NaN: unknown) and labels ``(n,)``; ``prev``: per layer, the state of the token before the
    entity (NaN rows where the entity starts the response)."""

    states: dict[int, np.ndarray]
    features: np.ndarray
    labels: np.ndarray
    prev: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

    def block(self, pool: str, layer: int) -> np.ndarray:
        source = self.states if pool == "mean" else self.prev
        if layer not in source:
            raise KeyError(f"no {pool!r} rows of layer {layer} (span_rows(..., "
                           f"{'layers' if pool == 'mean' else 'prev_layers'}=...))")
        return source[layer]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def span_rows(records: Sequence[CachedRecord], layers: Sequence[int], *,
              prev_layers: Sequence[int] = (), progress: bool = True,
              desc: str = "span rows") -> SpanRows:
    """The training rows of ``records`` (see the module docstring): mean states on ``layers``,
    states of the token before the entity on ``prev_layers``."""
    states: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    prevs: dict[int, list[np.ndarray]] = {layer: [] for layer in prev_layers}
    features: list[list[float]] = []
    labels: list[int] = []
    for record in tqdm(records, desc=desc, unit="rec", disable=not progress):
        if record.surprisal is None or record.entropy is None:
            raise ValueError(f"record {record.index}: no surprisal/entropy cached (stats=True)")
        spans = find_entities(record.response, 0, final=True)
        members = span_members(record.offsets.tolist(), spans)
        surprisal = record.surprisal.tolist()
        entropy = record.entropy.tolist()
        extras = record_extras(record)
        hidden = {layer: record.hidden[layer] for layer in {*layers, *prev_layers}}
        for span, rows in zip(spans, members, strict=True):
            if not rows:
                continue
            for layer in layers:
                states[layer].append(hidden[layer][rows].float().mean(0).numpy())
            for layer in prev_layers:
                prevs[layer].append(hidden[layer][rows[0] - 1].float().numpy() if rows[0] > 0
                                    else np.full(hidden[layer].shape[-1], np.nan, np.float32))
            raw = span_features([surprisal[i] for i in rows], [entropy[i] for i in rows],
                                span.kind, {k: [v[i] for i in rows] for k, v in extras.items()},
                                prefix_surprisal(surprisal, rows[0]))
            features.append([raw[name] for name in ALL_FEATURES])
            gold = [g.label for g in record.spans if g.start < span.end and g.end > span.start]
            labels.append(int(max(gold, default=0) > 0))
    every = {*layers, *prev_layers}
    width = {layer: int(records[0].hidden[layer].shape[-1]) for layer in every} if records \
        else {layer: 0 for layer in every}

    def stack(rows_of: dict[int, list[np.ndarray]]) -> dict[int, np.ndarray]:
        return {layer: (np.stack(rows).astype(np.float32) if rows
                        else np.zeros((0, width[layer]), np.float32))
                for layer, rows in rows_of.items()}

    return SpanRows(
        stack(states),
        np.asarray(features, dtype=np.float64).reshape(len(features), len(ALL_FEATURES)),
        np.asarray(labels, dtype=np.int64), stack(prevs))


def _column_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each column over its finite values (std 1 where a column is constant or
    empty, so a feature training never varied cannot blow up at inference)."""
    mean = np.zeros(x.shape[1])
    std = np.ones(x.shape[1])
    for k in range(x.shape[1]):
        column = x[:, k]
        column = column[np.isfinite(column)]
        if column.size:
            mean[k] = float(column.mean())
            sd = float(column.std())
            std[k] = sd if sd > 1e-6 else 1.0
    return mean, std


@dataclasses.dataclass
class SpanFit:
    """A fitted span head with its validation span AUC (None when undefined)."""

    probe: EntitySpanProbe
    weight_decay: float
    val_span_auc: float | None
    train_loss: float


def fit_span_probe(rows: SpanRows, layer: int, weight_decay: float = 0.03, *,
                   max_iter: int = 300) -> tuple[EntitySpanProbe, float]:
    """Fit the span head on ``rows`` (the mean state of layer ``layer``); return it (threshold
    0.5) and its final training loss."""
    return fit_span_blocks(rows, [("mean", layer)], weight_decay, max_iter=max_iter)


def _state_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std over the finite rows of ``x`` (std 1 where a column is constant)."""
    known = x[np.isfinite(x).all(axis=1)]
    if not len(known):
        return np.zeros(x.shape[1]), np.ones(x.shape[1])
    mean, std = known.mean(0), known.std(0)
    return mean, np.where(std > 1e-6, std, 1.0)


def fit_span_blocks(rows: SpanRows, blocks: Sequence[Block], weight_decay: float = 0.03, *,
                    max_iter: int = 300) -> tuple[EntitySpanProbe, float]:
    """Fit a span head on ``rows`` reading ``blocks`` (each standardised on its own, unknown
    ``prev`` rows 0) and the span features; return it (threshold 0.5, the state
    standardisation folded in) and its final training loss."""
    if len(rows) == 0 or len(set(rows.labels.tolist())) < 2:
        raise ValueError("the span head needs training entities of both labels")
    if not blocks or not any(pool == "mean" for pool, _ in blocks):
        raise ValueError("a span head needs a 'mean' block")
    z, stats, feature_stats = _standardised(rows, blocks)
    y = torch.tensor(rows.labels, dtype=torch.float32)
    w, b, final = _fit_logistic(z, y, weight_decay, max_iter)
    return _folded_probe(w, b, blocks, stats, feature_stats), final


def _standardised(rows: SpanRows, blocks: Sequence[Block]
                  ) -> tuple[torch.Tensor, list[Stats], Stats]:
    """The design matrix: each block standardised on its own, then the standardised span
    features (non-finite values 0); with each block's and the features' (mean, std)."""
    parts, stats = [], []
    for pool, layer in blocks:
        x = rows.block(pool, layer).astype(np.float64)
        mean, std = _state_stats(x)
        parts.append(np.nan_to_num((x - mean) / std, nan=0.0, posinf=0.0, neginf=0.0))
        stats.append((mean, std))
    base = rows.features[:, :len(SPAN_FEATURES)]  # the version-2 heads read these alone
    feature_mean, feature_std = _column_stats(base)
    z_features = np.nan_to_num((base - feature_mean) / feature_std, nan=0.0,
                               posinf=0.0, neginf=0.0)
    z = torch.tensor(np.concatenate([*parts, z_features], axis=1), dtype=torch.float32)
    return z, stats, (feature_mean, feature_std)


def _fit_logistic(z: torch.Tensor, y: torch.Tensor, weight_decay: float, max_iter: int
                  ) -> tuple[np.ndarray, float, float]:
    """LBFGS on mean BCE + ``weight_decay`` * ||w||^2: the weights, bias and final loss."""
    weight = torch.zeros(z.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter,
                                  line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y) \
            + weight_decay * (weight ** 2).sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        final = float(objective())
    return weight.detach().double().numpy(), float(bias.detach()[0]), final


def _folded_probe(w: np.ndarray, b: float, blocks: Sequence[Block], stats: Sequence[Stats],
                  feature_stats: Stats) -> EntitySpanProbe:
    """The span head with the blocks' standardisation folded into its weights and bias."""
    hidden_size = len(stats[0][0])
    folded, state_blocks = [], []
    for k, ((pool, layer), (mean, std)) in enumerate(zip(blocks, stats, strict=True)):
        w_block = w[k * hidden_size:(k + 1) * hidden_size] / std  # fold the standardisation
        offset = float(np.dot(w_block, mean))
        b -= offset
        folded.append(w_block)
        # an unknown "prev" state adds what a standardised 0 added in training: nothing
        state_blocks.append(StateBlock(pool, layer, offset if pool == "prev" else 0.0))
    n_states = hidden_size * len(blocks)
    head = LinearProbe(n_states + len(SPAN_FEATURES), seed=0)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor(np.concatenate([*folded, w[n_states:]]),
                                              dtype=torch.float32)[None])
        head.linear.bias.fill_(b)
    head.eval()
    feature_mean, feature_std = feature_stats
    return EntitySpanProbe(head, max(layer for _, layer in blocks), 0.5, SPAN_FEATURES,
                           torch.tensor(feature_mean, dtype=torch.float32),
                           torch.tensor(feature_std, dtype=torch.float32),
                           blocks=tuple(state_blocks))


def ensemble_span_probes(probes: Sequence[EntitySpanProbe]) -> EntitySpanProbe:
    """One span head whose logit is the mean of ``probes``' logits: the union of their blocks
    (``mean`` blocks by layer, then ``prev`` blocks by layer) with each member's weights, fills,
    span-feature weights and bias divided by the number of members. The members must share
    their span features' names, mean and std (fitted on the same rows)."""
    if not probes:
        raise ValueError("an ensemble needs at least one span head")
    first = probes[0]
    width = first.hidden_size
    for p in probes[1:]:
        if p.features != first.features or p.hidden_size != width or not (
                torch.equal(p.mean, first.mean) and torch.equal(p.std, first.std)):
            raise ValueError("ensemble members must share span features and state width")
    keys = sorted({(b.pool, b.layer) for p in probes for b in p.state_blocks},
                  key=lambda key: (POOLS.index(key[0]), key[1]))
    n = len(probes)
    weights = {key: np.zeros(width) for key in keys}
    fills = dict.fromkeys(keys, 0.0)
    w_features = np.zeros(len(first.features))
    bias = 0.0
    for p in probes:
        row = p.head.linear.weight.detach().double()[0].numpy()
        for k, block in enumerate(p.state_blocks):
            weights[(block.pool, block.layer)] += row[k * width:(k + 1) * width] / n
            fills[(block.pool, block.layer)] += block.fill / n
        w_features += row[len(p.state_blocks) * width:] / n
        bias += float(p.head.linear.bias.detach()[0]) / n
    head = LinearProbe(width * len(keys) + len(first.features), seed=0)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor(
            np.concatenate([*(weights[key] for key in keys), w_features]),
            dtype=torch.float32)[None])
        head.linear.bias.fill_(bias)
    head.eval()
    blocks = tuple(StateBlock(pool, layer, fills[(pool, layer)]) for pool, layer in keys)
    return EntitySpanProbe(head, max(layer for _, layer in keys), first.threshold,
                           first.features, first.mean.clone(), first.std.clone(),
                           blocks=blocks)


def fit_span_ensemble(rows: SpanRows, members: Sequence[Sequence[Block]],
                      weight_decay: float = SHIPPED_WEIGHT_DECAY, *, max_iter: int = 300
                      ) -> tuple[EntitySpanProbe, list[EntitySpanProbe], list[float]]:
    """Fit each member alone (``fit_span_blocks``) and average them (``ensemble_span_probes``);
    return the ensemble, the members and their training losses."""
    fitted = [fit_span_blocks(rows, blocks, weight_decay, max_iter=max_iter)
              for blocks in members]
    heads = [probe for probe, _ in fitted]
    return ensemble_span_probes(heads), heads, [loss for _, loss in fitted]


def val_span_auc(probe: EntitySpanProbe, val: Sequence[CachedRecord]) -> float | None:
    """Span-max AUC over the labelled spans of ``val``, scored as the monitor scores."""
    return span_auc(val, span_probe_scorer(probe))


def select_span_probe(train: Sequence[CachedRecord], val: Sequence[CachedRecord],
                      layers: Sequence[int],
                      weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, *,
                      members: Sequence[Sequence[Block]] | None = None,
                      progress: bool = True) -> tuple[SpanFit, list[dict[str, Any]]]:
    """Fit a span head for each layer and weight decay (or, with ``members``, the ensemble of
    those members for each weight decay, ``layers`` unused); return the best by validation span
    AUC and the table of every candidate."""
    if members is not None:
        return _select_ensemble(train, val, members, weight_decays, progress=progress)
    rows = span_rows(train, layers, progress=progress, desc="span rows (train)")
    if progress:
        print(f"span head: {len(rows)} training entities ({int(rows.labels.sum())} fabricated)",
              file=sys.stderr)
    table: list[dict[str, Any]] = []
    best: SpanFit | None = None
    grid = [(layer, wd) for layer in layers for wd in weight_decays]
    for layer, wd in tqdm(grid, desc="span head fits", unit="fit", disable=not progress):
        probe, loss = fit_span_probe(rows, layer, wd)
        auc = val_span_auc(probe, val)
        table.append({"layer": layer, "weight_decay": wd, "val_span_auc": auc,
                      "train_loss": round(loss, 5)})
        if progress:
            print(f"layer {layer}, wd {wd}: val span AUC {auc}", file=sys.stderr)
        if best is None or (auc or 0.0) > (best.val_span_auc or 0.0):
            best = SpanFit(probe, wd, auc, loss)
    if best is None:
        raise ValueError("no candidate layer or weight decay")
    best.probe.config = {"training_entities": len(rows),
                         "training_fabricated": int(rows.labels.sum())}
    return best, table


def _select_ensemble(train: Sequence[CachedRecord], val: Sequence[CachedRecord],
                     members: Sequence[Sequence[Block]], weight_decays: Sequence[float], *,
                     progress: bool) -> tuple[SpanFit, list[dict[str, Any]]]:
    if not members:
        raise ValueError("no ensemble members")
    mean_layers = sorted({layer for m in members for pool, layer in m if pool == "mean"})
    prev_layers = sorted({layer for m in members for pool, layer in m if pool == "prev"})
    rows = span_rows(train, mean_layers, prev_layers=prev_layers, progress=progress,
                     desc="span rows (train)")
    if progress:
        print(f"span head: {len(rows)} training entities ({int(rows.labels.sum())} fabricated)",
              file=sys.stderr)
    specs = [member_spec(m) for m in members]
    table: list[dict[str, Any]] = []
    best: SpanFit | None = None
    for wd in tqdm(weight_decays, desc="span ensemble fits", unit="wd", disable=not progress):
        probe, heads, losses = fit_span_ensemble(rows, members, wd)
        auc = val_span_auc(probe, val)
        member_aucs = [val_span_auc(h, val) for h in heads]
        table.append({"members": specs, "weight_decay": wd, "val_span_auc": auc,
                      "member_val_span_auc": member_aucs,
                      "member_train_loss": [round(v, 5) for v in losses]})
        if progress:
            print(f"ensemble {specs}, wd {wd}: val span AUC {auc} (members {member_aucs})",
                  file=sys.stderr)
        if best is None or (auc or 0.0) > (best.val_span_auc or 0.0):
            best = SpanFit(probe, wd, auc, float(np.mean(losses)))
    if best is None:
        raise ValueError("no weight decay")
    best.probe.config = {"training_entities": len(rows),
                         "training_fabricated": int(rows.labels.sum()),
                         "members": specs}
    return best, table
