"""The span head: one score per entity the monitor finds (from its tokens' mean states on one or
more layers, the state before it, and its surprisal/entropy statistics), every member token
getting that score. Scoring the entity as a whole costs no latency, since the monitor waits until
an entity is decided anyway, and it ranks fabricated entities better than a token probe's max.
The state standardisation is folded into the weights so the monitor keeps a dot product per token,
never a state. Logit, features and file format (``span_states`` version 2):
docs/entity-hallucination.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from guardrail.probes.heads import LinearProbe
from guardrail.probes.io import LoadedProbe, ProbeFileError, save_probe

from .spans import EntitySpan
from .token_prior import PRIORS

__all__ = ["ALL_FEATURES", "EXTRA_FEATURES", "FEATURE_NEEDS", "KINDS", "POOLS",
           "PRIOR_EXTRAS", "PRIOR_FEATURES", "SPAN_FEATURES", "SPAN_STATES_VERSION",
           "TOKEN_EXTRAS", "EntitySpanProbe",
           "StateBlock", "prefix_surprisal", "save_span_probe", "span_features",
           "span_from_loaded", "span_members"]

KINDS = ("NAME", "NUMBER", "DATE")
SPAN_FEATURES = ("surprisal_max", "surprisal_mean", "surprisal_first", "entropy_max",
                 "entropy_mean", "entropy_first", "log_tokens",
                 *(f"kind_{k}" for k in KINDS))
STATS = ("surprisal", "entropy")
# Logit features added in issue 23 (``logit_stats``): per token, besides surprisal and entropy,
# the log-probability margin to the model's first choice, the token's rank, and whether the first
# choice was another entity; per span, the text's own surprisal level before it (``prefix``).
# Sixth pass (issue 23): per token, a context-free prior surprisal of the token, one per prior
# of ``token_prior`` (looked up by token id, no forward).
PRIOR_EXTRAS = tuple(f"prior_{p}" for p in PRIORS)
TOKEN_EXTRAS = ("margin", "rank", "top_entity", *PRIOR_EXTRAS)
EXTRA_FEATURES = ("excess_max", "excess_mean", "excess_first", "surprisal_rest",
                  "margin_max", "margin_mean", "margin_first", "log_rank_max", "log_rank_mean",
                  "log_rank_first", "top_entity_first", "surprisal_rel_max",
                  "surprisal_rel_mean")
# Per span and prior: ``pmi = surprisal - prior`` (max, mean, the first token's, the sum) and
# the prior itself (max, mean).
PRIOR_FEATURES = tuple(
    name for p in PRIORS for name in (f"pmi_{p}_max", f"pmi_{p}_mean", f"pmi_{p}_first",
                                      f"pmi_{p}_sum", f"prior_{p}_max", f"prior_{p}_mean"))
ALL_FEATURES = SPAN_FEATURES + EXTRA_FEATURES + PRIOR_FEATURES
# What each extra feature reads besides the members' surprisal and entropy.
FEATURE_NEEDS: dict[str, str] = {
    **{f"margin_{a}": "margin" for a in ("max", "mean", "first")},
    **{f"log_rank_{a}": "rank" for a in ("max", "mean", "first")},
    "top_entity_first": "top_entity", "surprisal_rel_max": "prefix",
    "surprisal_rel_mean": "prefix",
    **{name: f"prior_{name.split('_')[1]}" for name in PRIOR_FEATURES}}
POOLS = ("mean", "prev")
SPAN_STATES_VERSION = 2


@dataclass(frozen=True)
class StateBlock:
    """One block of states a span head reads: ``pool`` ``"mean"`` (the mean of the entity's
    member states) or ``"prev"`` (the state of the token before the entity) on ``layer``;
    ``fill`` is a ``prev`` block's dot product when there is no such token."""

    pool: str
    layer: int
    fill: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"pool": self.pool, "layer": self.layer,
                **({"fill": self.fill} if self.pool == "prev" else {})}


def _aggregate(out: dict[str, float], name: str, values: Sequence[float]) -> None:
    known = [float(v) for v in values if math.isfinite(v)]
    out[f"{name}_max"] = max(known) if known else math.nan
    out[f"{name}_mean"] = math.fsum(known) / len(known) if known else math.nan
    out[f"{name}_first"] = float(values[0]) if len(values) else math.nan


def span_features(surprisal: Sequence[float], entropy: Sequence[float], kind: str,
                  extras: Mapping[str, Sequence[float]] | None = None,
                  prefix: float = math.nan) -> dict[str, float]:
    """The raw span features of one span from its member tokens' surprisal and entropy (NaN:
    unknown, skipped; all unknown gives NaN, which standardises to 0). ``extras``: the members'
    ``TOKEN_EXTRAS`` where known; ``prefix``: the mean surprisal of the response's tokens before
    the span (``prefix_surprisal``). Features whose inputs are missing are NaN."""
    out: dict[str, float] = {}
    for name, values in (("surprisal", surprisal), ("entropy", entropy)):
        _aggregate(out, name, values)
    out["log_tokens"] = math.log(max(1, len(surprisal)))
    for k in KINDS:
        out[f"kind_{k}"] = float(kind == k)
    # Extra features (issue 23): surprisal beyond what the distribution's spread predicts, the
    # rest of the span after its first token, and the span against the text's own level.
    _aggregate(out, "excess", [s - e for s, e in zip(surprisal, entropy, strict=True)])
    rest = [float(v) for v in surprisal[1:] if math.isfinite(v)]
    out["surprisal_rest"] = math.fsum(rest) / len(rest) if rest else math.nan
    extras = extras or {}
    margin = extras.get("margin")
    _aggregate(out, "margin", margin if margin is not None else [math.nan])
    rank = extras.get("rank")
    _aggregate(out, "log_rank", [math.log1p(v) if math.isfinite(v) else math.nan
                                 for v in rank] if rank is not None else [math.nan])
    top = extras.get("top_entity")
    out["top_entity_first"] = float(top[0]) if top is not None and len(top) else math.nan
    out["surprisal_rel_max"] = out["surprisal_max"] - prefix
    out["surprisal_rel_mean"] = out["surprisal_mean"] - prefix
    for p in PRIORS:
        _prior_features(out, p, surprisal, extras.get(f"prior_{p}"))
    return out


def _prior_features(out: dict[str, float], name: str, surprisal: Sequence[float],
                    prior: Sequence[float] | None) -> None:
    """``pmi_<name>_*`` and ``prior_<name>_*`` of a span. Only tokens with a known surprisal
    count, in both (so ``surprisal_mean - prior_mean == pmi_mean``); no prior: all NaN."""
    if prior is None:  # the monitor's path: no head it loads reads a prior
        out.update({f"{kind}_{name}_{a}": math.nan for kind, aggs in (
            ("pmi", ("max", "mean", "first", "sum")), ("prior", ("max", "mean"))) for a in aggs})
        return
    pmi = [float(s) - float(q) for s, q in zip(surprisal, prior, strict=True)]
    _aggregate(out, f"pmi_{name}", pmi)
    known = [v for v in pmi if math.isfinite(v)]
    out[f"pmi_{name}_sum"] = math.fsum(known) if known else math.nan
    counted = [float(q) if math.isfinite(float(s)) else math.nan
               for s, q in zip(surprisal, prior, strict=True)]
    _aggregate(out, f"prior_{name}", counted)
    del out[f"prior_{name}_first"]


def prefix_surprisal(surprisal: Sequence[float], start: int) -> float:
    """The mean of the known surprisal values of tokens ``[1, start)`` (NaN when none): the
    text's own surprisal level before a span that starts at token ``start``. The first token
    never counts: observer streams have no distribution for it, generator streams do."""
    known = [float(v) for v in surprisal[1:start] if math.isfinite(v)]
    return math.fsum(known) / len(known) if known else math.nan


def span_members(offsets: Sequence[Sequence[int]], spans: Sequence[EntitySpan]
                 ) -> list[list[int]]:
    """The token indices of each span, as the monitor assigns them: walking the tokens in order,
    a token belongs to the first span it overlaps that no earlier token closed (a token that
    overlaps two spans counts for the first only)."""
    members: list[list[int]] = [[] for _ in spans]
    k = 0
    i = 0
    n = len(offsets)
    while i < n:
        start, end = int(offsets[i][0]), int(offsets[i][1])
        while k < len(spans) and spans[k].end <= start:
            k += 1
        if k >= len(spans):
            break
        span = spans[k]
        if span.start >= end:
            i += 1
            continue
        while i < n and int(offsets[i][0]) < span.end:
            members[k].append(i)
            i += 1
        k += 1
    return members


def _sigmoid(x: float) -> float:
    return 0.5 + 0.5 * math.tanh(0.5 * x)


@dataclass
class EntitySpanProbe:
    """A span head: folded state weights and span-feature weights in one ``LinearProbe``
    (``hidden_size + len(features)`` inputs), the layer it reads and the threshold."""

    head: LinearProbe
    layer: int
    threshold: float
    features: tuple[str, ...] = SPAN_FEATURES
    mean: torch.Tensor = field(default_factory=lambda: torch.zeros(len(SPAN_FEATURES)))
    std: torch.Tensor = field(default_factory=lambda: torch.ones(len(SPAN_FEATURES)))
    config: dict[str, Any] = field(default_factory=dict)
    blocks: tuple[StateBlock, ...] = ()  # empty: one "mean" block on ``layer`` (version 1)
    unit: ClassVar[str] = "span"

    @property
    def state_blocks(self) -> tuple[StateBlock, ...]:
        return self.blocks or (StateBlock("mean", self.layer),)

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer the head reads, ascending."""
        return tuple(sorted({b.layer for b in self.state_blocks}))

    @property
    def reads_prev(self) -> bool:
        return any(b.pool == "prev" for b in self.state_blocks)

    @property
    def version(self) -> int:
        """1: one mean block on ``layer`` (the original format); else ``SPAN_STATES_VERSION``."""
        return 1 if self.state_blocks == (StateBlock("mean", self.layer),) \
            else SPAN_STATES_VERSION

    @property
    def hidden_size(self) -> int:
        """The width of one block of states (the observer's hidden size)."""
        return (self.head.hidden_size - len(self.features)) // len(self.state_blocks)

    @property
    def reads_stats(self) -> bool:
        """Whether any feature reads the logits (surprisal, entropy or a ``TOKEN_EXTRAS``)."""
        return any(name != "log_tokens" and not name.startswith("kind_")
                   for name in self.features)

    @property
    def token_needs(self) -> frozenset[str]:
        """The ``TOKEN_EXTRAS`` (and ``"prefix"``) its features read beyond surprisal and
        entropy."""
        return frozenset(FEATURE_NEEDS[n] for n in self.features if n in FEATURE_NEEDS)

    @cached_property
    def _weights(self) -> tuple[np.ndarray, list[float], float, list[float], list[float]]:
        width = self.hidden_size * len(self.state_blocks)
        return (*self.head.numpy_parts(width), self.mean.tolist(), self.std.tolist())

    @cached_property
    def _layer_weights(self) -> dict[int, np.ndarray]:
        """Per layer, a ``(H, 2)`` float32 matrix: column 0 sums the weights of the layer's
        ``mean`` blocks, column 1 those of its ``prev`` blocks."""
        w_states, h = self._weights[0], self.hidden_size
        out = {layer: np.zeros((h, 2), dtype=np.float32) for layer in self.layers}
        for k, block in enumerate(self.state_blocks):
            out[block.layer][:, POOLS.index(block.pool)] += w_states[k * h:(k + 1) * h]
        return out

    @property
    def prev_fill(self) -> float:
        """The ``prev`` part of the logit when no token precedes the entity."""
        return math.fsum(b.fill for b in self.state_blocks if b.pool == "prev")

    def dots(self, hidden: np.ndarray) -> list[float]:
        """Each state's share of a span logit, ``w . h`` for float32 rows ``(n, H)``, for a head
        with one ``mean`` block (version 1); ``token_dots`` reads any head."""
        if self.version != 1:
            raise ValueError("this span head reads several blocks of states: use token_dots")
        return [float(v) for v in (hidden @ self._weights[0]).tolist()]

    def token_dots(self, hidden: Mapping[int, np.ndarray]) -> tuple[list[float], list[float]]:
        """Each token's ``mean`` part and ``prev`` part of a span logit from its float32 states
        ``hidden[layer] (n, H)`` on every layer the head reads: what the monitor keeps per
        token. The ``prev`` part is 0 for a head without ``prev`` blocks."""
        total: np.ndarray | None = None
        for layer, weights in self._layer_weights.items():
            if layer not in hidden:
                raise KeyError(f"the span head reads layer {layer}; the states have layers "
                               f"{sorted(hidden)}")
            part = hidden[layer] @ weights
            total = part if total is None else total + part
        assert total is not None
        return ([float(v) for v in total[:, 0].tolist()],
                [float(v) for v in total[:, 1].tolist()])

    def logit(self, dots: Sequence[float], surprisal: Sequence[float],
              entropy: Sequence[float], kind: str, prev: float | None = None,
              extras: Mapping[str, Sequence[float]] | None = None,
              prefix: float = math.nan) -> float:
        """The span's logit from its members' dot products (``dots``, the ``mean`` part), their
        surprisal and entropy (as many values as ``dots``) and the ``prev`` part of the token
        before the entity (None: no such token, the blocks' ``fill``); ``extras`` and
        ``prefix`` as in ``span_features``, for heads that read them."""
        if not dots:
            raise ValueError("a span needs at least one token with a state")
        _, w_features, bias, mean, std = self._weights
        value = math.fsum(dots) / len(dots) + bias
        if self.reads_prev:
            value += self.prev_fill if prev is None else prev
        raw = span_features(surprisal, entropy, kind, extras, prefix)
        for k, name in enumerate(self.features):
            z = (raw[name] - mean[k]) / std[k]
            if math.isfinite(z):  # NaN (unknown): the training mean, 0
                value += w_features[k] * z
        return value

    def score(self, dots: Sequence[float], surprisal: Sequence[float],
              entropy: Sequence[float], kind: str, prev: float | None = None,
              extras: Mapping[str, Sequence[float]] | None = None,
              prefix: float = math.nan) -> float:
        """The span's sigmoid score (see ``logit``)."""
        return _sigmoid(self.logit(dots, surprisal, entropy, kind, prev, extras, prefix))


def save_span_probe(probe: EntitySpanProbe, weights: Path, config: Mapping[str, Any]) -> Path:
    """Write the span head as ``weights`` (.safetensors) with its .json beside it."""
    document = {
        "unit": "span", "layer": probe.layer, "threshold": probe.threshold,
        "rule": {"kind": "span_max"}, "hidden_size": probe.hidden_size,
        "span_features": {"names": list(probe.features), "mean": probe.mean.tolist(),
                          "std": probe.std.tolist()},
        **({"span_states": {"version": SPAN_STATES_VERSION, "width": probe.hidden_size,
                            "blocks": [b.to_json() for b in probe.state_blocks]}}
           if probe.version != 1 else {}),
        **config,
    }
    return save_probe(weights.parent, probe.head, document, name=weights.stem)


def span_from_loaded(loaded: LoadedProbe) -> EntitySpanProbe:
    """An ``EntitySpanProbe`` from a loaded ``"unit": "span"`` file, checking its keys."""
    where = loaded.path.with_suffix(".json")
    config = loaded.config
    if not isinstance(loaded.head, LinearProbe):
        raise ProbeFileError(f"{where}: key 'head': a span head is a linear head, this is a "
                             f"{loaded.head.kind!r} head")
    if loaded.layer is None:
        raise ProbeFileError(f"{where}: key 'layer' is missing")
    block = config.get("span_features")
    if not isinstance(block, dict) or not isinstance(block.get("names"), list):
        raise ProbeFileError(f"{where}: key 'span_features.names' is missing (a span head lists "
                             f"its features; known: {list(SPAN_FEATURES)})")
    names = tuple(str(n) for n in block["names"])
    unknown = [n for n in names if n not in ALL_FEATURES]
    if unknown:
        raise ProbeFileError(f"{where}: key 'span_features.names' has {unknown}; known: "
                             f"{list(ALL_FEATURES)}")
    stats = {}
    for key in ("mean", "std"):
        values = block.get(key)
        if not isinstance(values, list) or len(values) != len(names) or not all(
                isinstance(v, (int, float)) for v in values):
            raise ProbeFileError(f"{where}: key 'span_features.{key}' needs one number per name "
                                 f"in 'span_features.names' ({len(names)})")
        stats[key] = torch.tensor(values, dtype=torch.float32)
    blocks = _blocks_from_config(config, where)
    states = loaded.head.hidden_size - len(names)
    if states <= 0:
        raise ProbeFileError(f"{where}: key 'head.hidden_size' ({loaded.head.hidden_size}) "
                             f"leaves no room for states beside {len(names)} span features")
    count = len(blocks) if blocks else 1
    width = states // count
    if blocks and (states % count or width != int(config["span_states"]["width"])):
        raise ProbeFileError(f"{where}: key 'span_states.width' says "
                             f"{config['span_states']['width']}, but the head reads {states} "
                             f"state inputs for {count} blocks")
    declared = config.get("hidden_size")
    if declared is not None and int(declared) != width:
        raise ProbeFileError(f"{where}: key 'hidden_size' says {declared}, but the head reads "
                             f"{loaded.head.hidden_size} inputs for {len(names)} span features "
                             f"and {count} block(s) of states, i.e. states of width {width}")
    threshold = loaded.threshold if loaded.threshold is not None else 0.5
    return EntitySpanProbe(loaded.head, loaded.layer, threshold, names, stats["mean"],
                           stats["std"].clamp(min=1e-6), dict(config), blocks)


def _blocks_from_config(config: Mapping[str, Any], where: Path) -> tuple[StateBlock, ...]:
    """The ``span_states`` blocks of a span head's JSON (empty when the key is absent: a
    version-1 head), each error naming its key."""
    if "span_states" not in config:
        return ()
    block = config["span_states"]
    if not isinstance(block, dict):
        raise ProbeFileError(f"{where}: key 'span_states' must be an object")
    if block.get("version") != SPAN_STATES_VERSION:
        raise ProbeFileError(f"{where}: key 'span_states.version' is {block.get('version')!r}; "
                             f"this guardrail reads version {SPAN_STATES_VERSION}")
    width = block.get("width")
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        raise ProbeFileError(f"{where}: key 'span_states.width' needs a positive integer (the "
                             "observer's hidden size)")
    items = block.get("blocks")
    if not isinstance(items, list) or not items:
        raise ProbeFileError(f"{where}: key 'span_states.blocks' needs a non-empty list")
    out = []
    for k, item in enumerate(items):
        key = f"span_states.blocks[{k}]"
        if not isinstance(item, dict):
            raise ProbeFileError(f"{where}: key '{key}' must be an object")
        pool, layer, fill = item.get("pool"), item.get("layer"), item.get("fill", 0.0)
        if pool not in POOLS:
            raise ProbeFileError(f"{where}: key '{key}.pool' is {pool!r}; known: {list(POOLS)}")
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ProbeFileError(f"{where}: key '{key}.layer' needs an integer")
        if not isinstance(fill, (int, float)) or isinstance(fill, bool) or \
                not math.isfinite(fill) or (pool == "prev" and "fill" not in item):
            raise ProbeFileError(f"{where}: key '{key}.fill' needs a finite number (a 'prev' "
                                 "block's dot product when no token precedes the entity)")
        out.append(StateBlock(str(pool), int(layer), float(fill)))
    if not any(b.pool == "mean" for b in out):
        raise ProbeFileError(f"{where}: key 'span_states.blocks' needs a 'mean' block")
    return tuple(out)
