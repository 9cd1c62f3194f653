"""The ``router`` monitor: the probability that each token of a small model's stream is one the
reference model would have written differently in a way that matters (R2R's router).

Each token ``i`` is scored from the small model's step that produced it: the last-layer state and
top-k logit values *before* token ``i`` and the embedding of token ``i``.

- Observer streams (text from an API, read by the observer): row ``r`` of the observer's output is
  the state after token ``r``, which predicts token ``r + 1``; the monitor keeps the last row of
  each chunk for the next one. The first response token has no earlier row here (the observer
  reads the prompt without handing out its last state) and is not scored; nor is the first token
  after a reroute (the kept row belonged to text that was cut).
- Generator streams (an adapter that owns the small model): ``features.hidden[-1]`` and
  ``features.logits`` row ``i`` are the step that produced token ``i``, so no shift is needed.

The trained weights ship in ``guardrail_router/weights`` (``guardrail train router`` rebuilds
them); the frozen token embedding is taken from the observer model when the monitor loads.

Per step the head runs in numpy (``_NumpyRouter``), not as the torch module: at one row per
token the dispatch of a dozen torch ops costs more than their arithmetic. The top-k logit values
come from a group-maximum bound and one filter pass (``top_values``, the same values as
``torch.topk``). Scores equal the torch head's up to float32 rounding (1e-6).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from guardrail.monitor import Features, Monitor, MonitorContext, Needs, Score
from guardrail.probes.arrays import float32_rows
from guardrail.probes.io import LoadedProbe, ProbeFileError, check_observer, load_probe

from .head import RouterHead

__all__ = ["DEFAULT_WEIGHTS", "RouterMonitor", "embedding_table", "top_values"]

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "router.safetensors"
LAYER = -1  # R2R reads the last layer


def _shipped_threshold(key: str = "threshold") -> float | None:
    """A threshold saved with the shipped weights: ``threshold`` routes (recall >= 0.95 on
    validation), ``flag_threshold`` flags (best F1 on validation)."""
    try:
        config = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text(encoding="utf-8"))
        return float(config[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def embedding_table(observer: Any) -> torch.Tensor:
    """The observer model's input embedding table; without a torch observer, the embedded
    SmolLM2's table read straight from its cached safetensors."""
    model = getattr(observer, "model", None)
    if model is not None and hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings().weight.detach().float()
    from safetensors import safe_open

    from guardrail.observer.hf import smollm2_dir

    directory = smollm2_dir()
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                if key.endswith("embed_tokens.weight"):
                    return f.get_tensor(key).float()
    raise ProbeFileError(f"no embed_tokens.weight in {directory}: the router needs the small "
                         "model's token embedding table")


_SHIPPED = _shipped_threshold()
_SHIPPED_FLAG = _shipped_threshold("flag_threshold")
_SQRT_HALF = 0.7071067811865476
_GROUP = 128  # top_values: elements per group whose maximum is taken in the first pass




def _erfc(x: np.ndarray) -> np.ndarray:
    """The complementary error function (float64), fractional error below 1.2e-7 everywhere
    (Chebyshev fit, Numerical Recipes' ``erfcc``)."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    tail = t * np.exp(poly - z * z)
    return np.where(x >= 0, tail, 2.0 - tail)


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, ``x * (1 + erf(x / sqrt 2)) / 2 = x - x * erfc(x / sqrt 2) / 2``, in
    float64; within 3e-7 of the exact value, as close as torch's float32 kernel (1e-6)."""
    x64 = x.astype(np.float64)
    return (x64 - 0.5 * x64 * _erfc(x64 * _SQRT_HALF)).astype(np.float32)


def top_values(logits: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest values of each row of ``logits (n, vocab)``, descending: the values of
    ``torch.topk(logits, k)``.

    The row is cut into groups of 128 elements (a group is a column of the row seen as a
    ``(128, vocab / 128)`` matrix, so one vectorised pass gives every group's maximum). Each
    element of the top k is at least the k-th largest group maximum (the k largest maxima are k
    distinct elements): a second pass keeps the elements at or above that bound (a few hundred),
    and only those are sorted. Rows with NaN, and vocabularies of fewer than k groups, go to
    ``torch.topk``."""
    out = np.empty((logits.shape[0], k), dtype=np.float32)
    for r in range(logits.shape[0]):
        row = np.ascontiguousarray(logits[r], dtype=np.float32)
        groups = row.shape[0] // _GROUP
        candidates = None
        if groups >= k:
            matrix = row[: groups * _GROUP].reshape(_GROUP, groups)
            maxima = matrix.max(axis=0)
            tail = row[groups * _GROUP:]
            if len(tail):
                maxima = np.append(maxima, tail.max())
            if not np.isnan(maxima).any():
                bound = np.partition(maxima, len(maxima) - k)[len(maxima) - k]
                candidates = row[row >= bound]
                candidates.sort()
        if candidates is None or len(candidates) < k:
            out[r] = torch.topk(torch.from_numpy(row), k).values.numpy()
        else:
            out[r] = candidates[: -k - 1: -1]
    return out


class _NumpyRouter:
    """A ``RouterHead`` in eval mode as numpy arrays, with ``logit_proj`` folded into the input
    layer (``W_top (P t + b) = (W_top P) t + W_top b``)."""

    def __init__(self, head: RouterHead) -> None:
        def arr(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().cpu().float().numpy())

        h, e = head.hidden_size, head.embed_dim
        weight = head.input.weight.detach().double()
        w_top = weight[:, h + e:]  # reads logit_proj's output
        proj = head.logit_proj
        self.w_in = arr(weight[:, : h + e]).T  # (H + E, W)
        self.w_top = arr(w_top @ proj.weight.detach().double()).T  # (k, W)
        self.b_in = arr(head.input.bias.detach().double() + w_top @ proj.bias.detach().double())
        table: torch.Tensor = head.embedding  # type: ignore[assignment]
        self.embedding = table.detach().cpu().float().numpy()
        self.blocks = [(arr(b.norm.weight), arr(b.norm.bias), float(b.norm.eps),
                        arr(b.up.weight).T, arr(b.up.bias), arr(b.down.weight).T,
                        arr(b.down.bias)) for b in cast(Any, head.blocks)]
        self.norm = (arr(head.norm.weight), arr(head.norm.bias), float(head.norm.eps))
        self.w_out = arr(head.out.weight)[0]
        self.b_out = float(head.out.bias.detach()[0])

    @staticmethod
    def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float
                    ) -> np.ndarray:
        width = x.shape[-1]
        centred = x - x.sum(axis=-1, keepdims=True) / width
        var = (centred * centred).sum(axis=-1, keepdims=True) / width
        return centred / np.sqrt(var + eps) * weight + bias

    def score(self, hidden: np.ndarray, token_ids: np.ndarray, top: np.ndarray) -> list[float]:
        """Probabilities for ``hidden (n, H)``, ``token_ids (n,)``, ``top (n, k)`` (the sigmoid
        taken as a tanh: no overflow)."""
        x = np.concatenate([hidden, self.embedding[token_ids]], axis=1)
        x = x @ self.w_in + top @ self.w_top + self.b_in
        for norm_w, norm_b, eps, up_w, up_b, down_w, down_b in self.blocks:
            u = self._layer_norm(x, norm_w, norm_b, eps) @ up_w + up_b
            u = _gelu(u)
            x = x + (u @ down_w + down_b)
        logit = self._layer_norm(x, *self.norm) @ self.w_out
        return [0.5 + 0.5 * math.tanh(0.5 * (v + self.b_out)) for v in logit.tolist()]


@dataclass
class _State:
    """The small model's last step not yet used: state and top-k logits of the latest token,
    and the index the next token should have (a smaller one means the stream was cut back)."""

    hidden: np.ndarray | None = None
    top_logits: np.ndarray | None = None
    next_index: int = 0


class RouterMonitor(Monitor):
    """Scores tokens with a trained ``RouterHead`` (see the module docstring)."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weights: str | None = Field(None, description="router .safetensors (default: shipped)")

    score_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)  # probabilities
    # A policy entry without a threshold routes at the routing threshold (recall >= 0.95) and
    # flags, redacts or halts at the flag threshold (best F1: fewer, surer verdicts), in any
    # policy; the default policy has no model to route to and flags.
    default_threshold: float = _SHIPPED if _SHIPPED is not None else 0.5
    default_thresholds: Mapping[str, float] = (
        {} if _SHIPPED_FLAG is None else
        {"flag": _SHIPPED_FLAG, "redact": _SHIPPED_FLAG, "halt": _SHIPPED_FLAG})
    default_spec: ClassVar[dict[str, Any]] = {"id": "router", "action": "flag"}

    def __init__(self, options: Options | None = None) -> None:
        options = options or self.Options()
        self.weights = Path(options.weights).expanduser() if options.weights else DEFAULT_WEIGHTS
        if not self.weights.with_suffix(".json").exists():
            raise ValueError(f"router weights config not found: {self.weights.with_suffix('.json')}"
                             " (train them: guardrail train router)")
        config = json.loads(self.weights.with_suffix(".json").read_text(encoding="utf-8"))
        self.top_k = int(config.get("head", {}).get("top_k", 100))
        if options.weights:  # other weights bring their own thresholds
            route, flag = config.get("threshold"), config.get("flag_threshold")
            if route is not None:
                self.default_threshold = float(route)
            flag = route if flag is None else flag
            self.default_thresholds = ({} if flag is None else
                                       {a: float(flag) for a in ("flag", "redact", "halt")})
        self._loaded: LoadedProbe | None = None
        self._numpy: _NumpyRouter | None = None
        self._lock = threading.Lock()

    def needs(self) -> Needs:
        return Needs(layers=frozenset({LAYER}), top_k=self.top_k)

    def _probe(self, observer: Any) -> LoadedProbe:
        # The head is a loaded resource shared by every stream, not per-stream state.
        with self._lock:
            if self._loaded is None:
                loaded = load_probe(self.weights, embedding=embedding_table(observer))
                if observer is not None:
                    check_observer(loaded, observer)
                if not isinstance(loaded.head, RouterHead):
                    raise ProbeFileError(f"{self.weights}: a {loaded.head.kind!r} head, the "
                                         "router monitor needs a 'router' head")
                self._numpy = _NumpyRouter(loaded.head)
                self._loaded = loaded
            return self._loaded

    def start(self, context: MonitorContext) -> _State:
        self._probe(context.observer)
        return _State()

    def update(self, state: _State, features: Features) -> list[Score]:
        if not features.tokens:
            return []
        head = self._numpy
        assert head is not None, "start() loads the router"
        hidden = features.hidden.get(LAYER)
        if hidden is None:
            raise ValueError(f"the router needs hidden layer {LAYER} (the last); the features "
                             f"have layers {sorted(features.hidden)}")
        rows = float32_rows(hidden)
        ids = np.array([-1 if t.id is None else t.id for t in features.tokens], dtype=np.int64)
        if features.first_index != state.next_index:  # rerouted: the kept row is stale
            state.hidden = state.top_logits = None
        state.next_index = features.first_index + len(features.tokens)
        if features.top_logits is not None:  # observer: row r predicts token r + 1
            top = float32_rows(features.top_logits)[:, : self.top_k]
            prev_hidden = _prepend(state.hidden, rows[:-1])
            prev_top = _prepend(state.top_logits, top[:-1])
            state.hidden, state.top_logits = rows[-1:].copy(), top[-1:].copy()
            first = len(features.tokens) - len(prev_hidden)  # 1 with no earlier row, else 0
            ids = ids[first:]
        elif features.logits is not None:  # generator: row i is the step that produced token i
            prev_hidden, first = rows, 0
            prev_top = top_values(float32_rows(features.logits), self.top_k)
        else:
            raise ValueError("the router needs top-k logits (observer) or logits (generator)")
        if prev_top.shape[-1] != self.top_k:
            raise ValueError(f"router expects {self.top_k} top logits, got {prev_top.shape[-1]}")
        known = np.flatnonzero(ids >= 0)
        if not len(known):
            return []
        if len(known) < len(ids):
            prev_hidden, prev_top, ids = prev_hidden[known], prev_top[known], ids[known]
        scores = head.score(prev_hidden, ids, prev_top)
        base = features.first_index + first
        return [Score(base + i, s) for i, s in zip(known.tolist(), scores, strict=True)]


def _prepend(previous: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    return rows if previous is None else np.concatenate([previous, rows])
