"""The ``harmful-content`` monitor: SCM's per-token harm probability of the response so far,
in numpy on the observer's states (derived in docs/harmful-content.md, "How the monitor scores").
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from guardrail.errors import ObserverError
from guardrail.monitor import Features, Monitor, MonitorContext, Needs, Score
from guardrail.probes.arrays import float32_rows
from guardrail.probes.io import LoadedProbe, ProbeFileError, check_observer, load_probe

from .evidence import ScoreTransform, check_spec
from .head import DualHead
from .pooling import POOLINGS, TOKEN_NORMS, halflives_of, normalise_tokens, stack_states

__all__ = ["DEFAULT_WEIGHTS", "HALT_MESSAGE", "PROMPT_FEATURES", "PROMPT_TERM_KEYS",
           "HarmfulContentMonitor"]

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "harmful_content.safetensors"
HALT_MESSAGE = "I can't continue with this answer: it was stopped as harmful content."
# What a head's prompt term may read (config key ``prompt_feature``): ``context_mean``, the
# context's pooled states (``Features.context``, docs/harmful-content.md, "Prompt term").
PROMPT_FEATURES = ("context_mean",)
# What the config's ``prompt_term`` holds beside a prompt weight: the term of a stream without a
# prompt, and the clamp the term is clipped to (the range the head saw in training)
PROMPT_TERM_KEYS = ("neutral", "low", "high")


def _shipped_config() -> dict[str, Any]:
    """The JSON config of the shipped weights ({} when they are not there)."""
    try:
        data = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _rule_of(config: dict[str, Any]) -> tuple[float | None, int | None]:
    try:
        return float(config["threshold"]), int(config["rule"]["k"])
    except (KeyError, TypeError, ValueError):
        return None, None


_SHIPPED_THRESHOLD, _SHIPPED_K = _rule_of(_shipped_config())


class _Pool:
    """One pooled block of a stream: each token's projection by the block's part of the head's
    first layer (a float for a linear head, ``m`` floats for an MLP) and their running (decayed)
    sum and count."""

    __slots__ = ("count", "projections", "total")

    def __init__(self, total: float | np.ndarray) -> None:
        self.projections: list[Any] = []
        self.total = total
        self.count = 0.0


class _PrefixMean:
    """Per-stream state of a ``prefix_mean`` (or ``prefix_ema``) head: one ``_Pool`` per pooled
    block (one, or one per half-life); the stream's score transform, if the head names one
    (``evidence.py``); and the head's prompt term, once the first update read it (or its neutral
    value, set by ``start`` for a stream without a prompt)."""

    __slots__ = ("pools", "prompt", "transform")

    def __init__(self, total: float | np.ndarray, pools: int = 1,
                 transform: dict[str, Any] | None = None) -> None:
        self.pools = [_Pool(total if isinstance(total, float) else total.copy())
                      for _ in range(pools)]
        self.transform = None if transform is None else ScoreTransform(transform)
        self.prompt: float | None = None


def _project(rows: Sequence[np.ndarray], blocks: Sequence[np.ndarray]) -> np.ndarray:
    """The layers' rows times their blocks of the head's first layer, summed: ``(n,)`` for a
    linear head's vectors, ``(n, m)`` for an MLP's matrices."""
    out = rows[0] @ blocks[0]
    for row, block in zip(rows[1:], blocks[1:], strict=True):
        out = out + row @ block
    return out


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """``nn.GELU(approximate="tanh")``."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _layers(probe: LoadedProbe, config: Path) -> tuple[int, ...]:
    """The observer layers the head reads, from the weights' ``config`` file."""
    layers = probe.config.get("layers", [probe.layer])
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers):
        raise ProbeFileError(f"{config}: key 'layers' must be a non-empty list of layer "
                             f"numbers, got {layers!r}")
    return tuple(layers)


def _pooling(probe: LoadedProbe, config: Path) -> str:
    pooling = probe.config.get("pooling", "none")
    if pooling not in POOLINGS:
        raise ProbeFileError(f"{config}: key 'pooling' must be one of {list(POOLINGS)}, got "
                             f"{pooling!r}")
    return str(pooling)


def _ema_decays(probe: LoadedProbe, config: Path) -> tuple[float, ...]:
    """A ``prefix_ema`` head's per-token decay of each pooled block, from its half-life (or
    half-lives: a list, one block per half-life)."""
    try:
        halflives = halflives_of(probe.config.get("halflife"))
    except ValueError as exc:
        raise ProbeFileError(f"{config}: key 'halflife': {exc}") from None
    return tuple(float(2.0 ** (-1.0 / h)) for h in halflives)


def _token_norm(probe: LoadedProbe, config: Path) -> str:
    """What is done to each token's states before the head reads them (``pooling.TOKEN_NORMS``;
    absent: ``none``)."""
    token_norm = probe.config.get("token_norm", "none")
    if token_norm not in TOKEN_NORMS:
        raise ProbeFileError(f"{config}: key 'token_norm' must be one of {list(TOKEN_NORMS)}, "
                             f"got {token_norm!r}")
    return str(token_norm)


def _score_transform(probe: LoadedProbe, config: Path) -> dict[str, Any] | None:
    """The transform of the prefix scores the head's rule reads (``score_transform``), if any."""
    spec = probe.config.get("score_transform")
    if spec is None:
        return None
    try:
        return check_spec(spec)
    except ValueError as exc:
        raise ProbeFileError(f"{config}: {exc}") from None


def _prompt_weight(head: DualHead, probe: LoadedProbe, config: Path,
                   layers: Sequence[int]) -> np.ndarray | None:
    """The head's prompt term weights, float64 ``(len(layers), hidden)``, when it carries them
    (``prompt_weight``, named by the config's ``prompt_feature``); None: no prompt term."""
    feature = probe.config.get("prompt_feature")
    if head.prompt_size is None:
        if feature is not None:
            raise ProbeFileError(f"{config}: key 'prompt_feature' is set, but {probe.path} "
                                 "carries no 'prompt_weight' tensor (head.prompt_size)")
        return None
    if feature not in PROMPT_FEATURES:
        raise ProbeFileError(f"{config}: {probe.path} carries a 'prompt_weight' tensor, so key "
                             f"'prompt_feature' must be one of {list(PROMPT_FEATURES)}, got "
                             f"{feature!r}")
    weight = head.prompt_weight.detach().double().numpy()
    if weight.shape[0] != len(layers):
        raise ProbeFileError(f"{probe.path}: tensor 'prompt_weight' has {weight.shape[0]} rows, "
                             f"one per layer of key 'layers' ({list(layers)}) needed")
    return weight


def _prompt_range(probe: LoadedProbe, config: Path, weighted: bool
                  ) -> tuple[float, float, float] | None:
    """``(neutral, low, high)`` of the config's ``prompt_term``, required beside a prompt weight
    (``weighted``) and refused without one."""
    spec = probe.config.get("prompt_term")
    if not weighted:
        if spec is not None:
            raise ProbeFileError(f"{config}: key 'prompt_term' is set, but {probe.path} carries "
                                 "no 'prompt_weight' tensor (head.prompt_size)")
        return None
    if not isinstance(spec, dict):
        raise ProbeFileError(
            f"{config}: {probe.path} carries a 'prompt_weight' tensor, so key 'prompt_term' must "
            'be {"neutral": n, "low": l, "high": h} (the term of a stream without a prompt and '
            f"the range it is clipped to, written by the trainer), got {spec!r}")
    values = []
    for key in PROMPT_TERM_KEYS:
        value = spec.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(
                value):
            raise ProbeFileError(f"{config}: key 'prompt_term.{key}' must be a finite number, "
                                 f"got {value!r}")
        values.append(float(value))
    neutral, low, high = values
    if not low <= neutral <= high:
        raise ProbeFileError(f"{config}: key 'prompt_term' must hold low <= neutral <= high, got "
                             f"{spec!r}")
    return neutral, low, high


def _first_layer(head: DualHead) -> tuple[tuple[np.ndarray, np.ndarray, float] | None,
                                          np.ndarray]:
    """The sequence half's first layer as float32 numpy columns, and an MLP's rest (bias, output
    difference row and bias; None for a linear head).

    softmax(z)[1] = sigmoid(z[1] - z[0]). A linear head's first (and only) layer is then the
    difference row, ``(H,)`` (the hot path: one dot product per layer, the running mean in
    Python floats); an MLP's is Linear(H, m), ``(H, m)``, then GELU and the output difference
    row. The monitor cuts the columns per layer (and, for a pooled head, per layer again for the
    mean half)."""
    linears = head.sequence_layers()
    if len(linears) != 2:
        weight = linears[0].weight.detach().double()
        return None, (weight[1] - weight[0]).float().numpy()
    first, out = linears
    w_out = out.weight.detach().double()
    b_out = out.bias.detach().double()
    mlp = (first.bias.detach().double().numpy(), (w_out[1] - w_out[0]).numpy(),
           float(b_out[1] - b_out[0]))
    return mlp, first.weight.detach().float().T.contiguous().numpy()


class HarmfulContentMonitor(Monitor):
    """Per-token harm probability of the response so far (see the module docstring)."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weights: str | None = Field(
            None, description="head .safetensors (its .json beside it); default: the shipped one")
        threshold: float | None = Field(
            None, ge=0.0, le=1.0,
            description="default threshold (default: the one calibrated with the weights); a "
                        "policy's threshold: field still wins")

    score_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)  # probabilities
    default_threshold: float = (_SHIPPED_THRESHOLD if _SHIPPED_THRESHOLD is not None
                                          else 0.5)
    default_spec: ClassVar[dict[str, Any]] = {
        "id": "harm",
        "threshold": default_threshold,
        "rule": {"kind": "count", "k": _SHIPPED_K or 1},
        "action": "halt",
        "message": HALT_MESSAGE,
    }

    def __init__(self, options: Options | None = None) -> None:
        options = options or self.Options()
        self.weights = (Path(options.weights).expanduser() if options.weights
                        else DEFAULT_WEIGHTS)
        if options.weights is None and not DEFAULT_WEIGHTS.exists():
            raise ProbeFileError(f"harmful-content weights not found: {DEFAULT_WEIGHTS} (train "
                                 "them: guardrail train harmful-content)")
        self.probe: LoadedProbe = load_probe(self.weights)
        head = self.probe.head
        if not isinstance(head, DualHead):
            raise ProbeFileError(f"{self.weights}: a {head.kind!r} head, the "
                                 "harmful-content monitor needs a 'dual' (SCM) head")
        config = self.weights.with_suffix(".json")
        self.layers: tuple[int, ...] = _layers(self.probe, config)
        self.pooling: str = _pooling(self.probe, config)
        # per-token decay of each pooled block: 1.0 is the plain prefix mean
        self._decays: tuple[float, ...] = (
            () if self.pooling == "none" else _ema_decays(self.probe, config)
            if self.pooling == "prefix_ema" else (1.0,))
        # each token's states normalised (per layer) before anything reads them
        self.token_norm = _token_norm(self.probe, config)
        # the count rule reads the transformed scores when the head's rule family names one
        self._transform = _score_transform(self.probe, config)
        # a constant per stream added to every prefix logit: the context's pooled states read
        self._prompt = _prompt_weight(head, self.probe, config, self.layers)
        # its neutral value (a stream without a prompt) and clamp
        self._prompt_range = _prompt_range(self.probe, config, self._prompt is not None)
        self._mlp, w1 = _first_layer(head)
        n = len(self.layers)
        parts = n * (1 + len(self._decays))
        width = w1.shape[0] // parts
        cuts = [w1[i * width:(i + 1) * width] for i in range(parts)]
        self._proj = cuts[:n]
        # each pooled block's columns, layer by layer (stack_states' order)
        self._pool_proj = [cuts[n * (1 + k):n * (2 + k)] for k in range(len(self._decays))]
        threshold = options.threshold
        if threshold is None:
            threshold = self.probe.threshold
        if threshold is not None:
            # Per instance: the weights' own calibration or the option.
            self.default_threshold = float(threshold)
        # A policy entry without a rule gets the count rule calibrated with these weights; the
        # threshold rule would halt on the first prefix that reaches the threshold, which
        # calibration never allowed for.
        k = self.k
        self.default_rule = {"kind": "count", "k": k} if k else None
        self._checked: set[int] = set()
        self._lock = threading.Lock()

    @property
    def k(self) -> int | None:
        """The count rule's ``k`` calibrated with these weights."""
        _, k = _rule_of(self.probe.config)
        return k

    def needs(self) -> Needs:
        return Needs(layers=frozenset(self.layers), context=self._prompt is not None)

    def start(self, context: MonitorContext) -> _PrefixMean | None:
        observer = context.observer
        if observer is not None and id(observer) not in self._checked:
            with self._lock:  # once per observer: the dims must fit the head
                check_observer(self.probe, observer)
                width = (int(observer.hidden_size) * len(self.layers)
                         * (1 + len(self._decays)))
                if width != self.probe.head.hidden_size:
                    raise ProbeFileError(
                        f"{self.weights}: the head reads {self.probe.head.hidden_size} values "
                        f"per token, observer {observer.name!r} gives {width} for layers "
                        f"{list(self.layers)}")
                if self._prompt is not None and self._prompt.shape[1] != observer.hidden_size:
                    raise ProbeFileError(
                        f"{self.weights}: tensor 'prompt_weight' reads {self._prompt.shape[1]} "
                        f"values per layer, observer {observer.name!r} has hidden size "
                        f"{observer.hidden_size}")
                self._checked.add(id(observer))
        if self.pooling == "none" and self._transform is None and self._prompt is None:
            return None
        state = _PrefixMean(0.0 if self._mlp is None else np.zeros(self._proj[0].shape[1]),
                            len(self._decays), self._transform)
        if self._prompt_range is not None and not context.prompt.strip():
            # No user message, or an empty one: the context's pooled states are not a request
            # (with no conversation at all, one BOS token); the average training prompt's term.
            state.prompt = self._prompt_range[0]
        return state

    def _prompt_term(self, state: _PrefixMean | None, features: Features) -> float:
        """The stream's prompt term, read from its first update's ``Features.context``:
        ``sum_j prompt_weight[j] . context[layers[j]]`` in float64, clipped to the config's
        ``prompt_term`` range (its ``neutral`` set by ``start`` for a stream without a prompt;
        0.0 without a prompt weight)."""
        if self._prompt is None or self._prompt_range is None or state is None:
            return 0.0
        if state.prompt is None:
            context = features.context or {}
            if any(layer not in context for layer in self.layers):
                raise ObserverError(
                    f"{self.weights}: the head adds a prompt term, which reads the context's "
                    f"pooled states of layers {list(self.layers)} (Features.context) on a "
                    f"stream's first update; this stream's came with "
                    f"{sorted(context) if features.context else 'none'} (steps fed with "
                    "tokens carry it only on a first step with StreamStep.context, as "
                    "guardrail-transformers' generator sets it; else read the stream with an "
                    "observer)")
            term = math.fsum(float(w @ np.asarray(context[layer], dtype=np.float64))
                             for w, layer in zip(self._prompt, self.layers, strict=True))
            _, low, high = self._prompt_range
            state.prompt = min(max(term, low), high)
        return state.prompt

    def update(self, state: _PrefixMean | None, features: Features) -> Sequence[Score]:
        prompt = self._prompt_term(state, features)  # read before an empty first update returns
        if not features.tokens:
            return []
        stream = None if state is None else state.transform
        if self.pooling == "none":
            state = None  # the state only carries the transform
        hidden = features.hidden
        if any(layer not in hidden for layer in self.layers):
            stack_states(hidden, self.layers)  # raises, naming the layers
        rows = [float32_rows(hidden[layer]) for layer in self.layers]
        if self.token_norm != "none":
            rows = [normalise_tokens(row, self.token_norm) for row in rows]
        pools = [] if state is None else list(zip(state.pools, self._decays, self._pool_proj,
                                                  strict=True))
        if self._mlp is None:
            values: list[float] = _project(rows, self._proj).tolist()
            for pool, d, proj in pools:
                total, count = float(pool.total), pool.count
                for j, p in enumerate(_project(rows, proj).tolist()):
                    pool.projections.append(p)
                    total = d * total + p
                    count = d * count + 1.0
                    values[j] += total / count
                pool.total, pool.count = total, count
        else:
            z = _project(rows, self._proj).astype(np.float64)
            for pool, d, proj in pools:
                projected = _project(rows, proj)
                if d == 1.0:
                    seen = len(pool.projections)
                    running = pool.total + np.cumsum(projected, axis=0, dtype=np.float64)
                    z = z + running / np.arange(seen + 1, seen + len(projected) + 1)[:, None]
                    pool.total = running[-1]
                    pool.count += len(projected)
                else:
                    acc, count = np.asarray(pool.total, dtype=np.float64), pool.count
                    for j, p in enumerate(projected):
                        acc = d * acc + p
                        count = d * count + 1.0
                        z[j] += acc / count
                    pool.total, pool.count = acc, count
                pool.projections.extend(projected)
            bias, w_out, b_out = self._mlp
            values = (_gelu_tanh(z + bias) @ w_out + b_out).tolist()
        if self._prompt is not None:  # the logit's constant: before the sigmoid and transform
            values = [v + prompt for v in values]
        # the sigmoid, as tanh: no overflow
        probs = [0.5 + 0.5 * math.tanh(0.5 * v) for v in values]
        if stream is not None:
            probs = [stream.update(p) for p in probs]
        return [Score(i, p) for i, p in zip(features.indices, probs, strict=True)]

    def truncate(self, state: _PrefixMean | None, n_tokens: int) -> None:
        if state is not None and state.transform is not None:
            state.transform.truncate(n_tokens)
        for pool, d in zip([] if state is None else state.pools, self._decays, strict=True):
            if n_tokens >= len(pool.projections):
                continue
            del pool.projections[n_tokens:]
            n = len(pool.projections)
            if d == 1.0 and self._mlp is None:
                pool.total = math.fsum(pool.projections)
            elif d == 1.0:
                pool.total = (np.sum(pool.projections, axis=0) if pool.projections
                              else np.zeros_like(pool.total))
            else:
                weights = d ** np.arange(n - 1, -1, -1, dtype=np.float64)
                kept = np.asarray(pool.projections, dtype=np.float64)
                pool.total = (float(weights @ kept) if self._mlp is None
                              else (weights @ kept if n else np.zeros_like(pool.total)))
            pool.count = float(n) if d == 1.0 else float(np.sum(d ** np.arange(n)))


