"""The ONNX Runtime observer backend.

One step of a Llama-family decoder is exported with ``torch.onnx.export``: inputs are the new
token ids, their positions, an attention mask and the KV cache of every block it runs; outputs are
the requested hidden layers, optionally the logits, and the new tokens' keys and values. The
step runs only the blocks up to the deepest requested layer (all of them when logits are needed),
so a monitor that reads layer 15 of 30 pays for 16 blocks. The KV cache lives in numpy arrays
that the same window bookkeeping as the torch backend keeps bounded.

Exports are cached next to the converted model, one file per (depth, layers, logits) signature.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ObserverError
from ..monitor import Message, Needs
from ..stream import TokenSpan
from . import ObservedBatch
from .context import pool_rows
from .llama_step import LlamaStep, check_llama
from .model import GROW, BaseObserver, _round_up, _token_id
from .window import StreamState

Signature = tuple[int, tuple[int, ...], bool]

__all__ = ["NumpyKV", "OnnxObserver", "export_step"]

_OPSET = 17
# Bumped when the exported step's graph changes (v2: the cache is read in place; v3: the mask
# made once for all blocks), so an export cached by an older version is not reused.
_GRAPH_VERSION = "v3"


def export_step(model: Any, path: Path, depth: int, hidden_indices: list[int],
                logits: bool) -> None:
    """Export one step to ``path`` (written to a temporary file, then renamed)."""
    check_llama(model)
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    step = LlamaStep(model, depth, hidden_indices, logits).eval()
    n, past = 3, 5
    ids = torch.zeros(1, n, dtype=torch.long)
    pos = torch.arange(past, past + n)[None]
    mask = torch.ones(1, 1, n, past + n, dtype=torch.bool)
    kv = [torch.zeros(1, kv_heads, past, head_dim) for _ in range(2 * depth)]
    kv_names = [f"past_{kind}_{i}" for i in range(depth) for kind in ("key", "value")]
    new_names = [f"new_{kind}_{i}" for i in range(depth) for kind in ("key", "value")]
    out_names = [f"hidden_{i}" for i in hidden_indices] + (["logits"] if logits else [])
    dynamic: dict[str, dict[int, str]] = {
        "input_ids": {1: "n"}, "position_ids": {1: "n"}, "mask": {2: "n", 3: "total"},
    }
    dynamic.update({name: {2: "past"} for name in kv_names})
    dynamic.update({name: {2: "n"} for name in new_names})
    dynamic.update({name: {0: "n"} for name in out_names})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            torch.onnx.export(
                step, (ids, pos, mask, *kv), tmp, input_names=["input_ids", "position_ids",
                                                               "mask", *kv_names],
                output_names=[*out_names, *new_names], dynamic_axes=dynamic,
                opset_version=_OPSET, dynamo=False,
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NumpyKV:
    """The KV cache of one stream as numpy buffers ``(1, kv_heads, capacity, head_dim)``.

    A read passes the whole buffers to ONNX Runtime (contiguous, so nothing is copied on the way
    in) with a mask that hides the positions not filled yet, then writes the new keys and values
    in place. Buffers grow in steps of ``GROW`` positions, never past the window unless one read
    is longer.
    """

    def __init__(self, depth: int, kv_heads: int, head_dim: int,
                 window: int | None = None) -> None:
        self.buffers = [np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
                        for _ in range(2 * depth)]
        self._length = 0
        self.window = window

    @property
    def arrays(self) -> list[np.ndarray]:
        return [b[:, :, : self._length] for b in self.buffers]

    tensors = arrays  # the name the prefix cache reads

    def length(self) -> int:
        return self._length

    def capacity(self) -> int:
        return int(self.buffers[0].shape[2]) if self.buffers else 0

    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.buffers)

    def reserve(self, total: int) -> None:
        if total <= self.capacity():
            return
        size = _round_up(total, GROW)
        if self.window is not None:
            size = min(size, max(self.window, total))
        grown = []
        for b in self.buffers:
            new = np.zeros((*b.shape[:2], size, b.shape[3]), dtype=b.dtype)
            new[:, :, : self._length] = b[:, :, : self._length]
            grown.append(new)
        self.buffers = grown

    def append(self, new: Sequence[np.ndarray]) -> None:
        n = int(new[0].shape[2])
        self.reserve(self._length + n)
        end = self._length + n
        for b, a in zip(self.buffers, new, strict=True):
            b[:, :, self._length : end] = a
        self._length = end

    def drop(self, start: int, count: int) -> None:
        end = self._length
        for b in self.buffers:  # numpy copes with the overlap
            b[:, :, start : end - count] = b[:, :, start + count : end]
        self._length -= count

    def crop(self, length: int) -> None:
        self._length = min(self._length, length)


class OnnxObserver(BaseObserver):
    """The observer on ONNX Runtime (same interface and results as ``TorchObserver``)."""

    def __init__(self, name: str, model: Any, hf_tokenizer: Any, window: int, export_dir: Path,
                 threads: int | None = None, quantize: str | None = None) -> None:
        super().__init__(name, hf_tokenizer, model.config, window)
        check_llama(model)
        self.model = model.eval()
        self.backend = "onnx"
        self.export_dir = export_dir
        self.threads = threads
        if quantize not in (None, "int8"):
            raise ObserverError(f"observer.options.quantize must be 'int8' or absent, "
                                f"got {quantize!r}")
        self.quantize = quantize
        cfg = model.config
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._sessions: dict[Signature, Any] = {}
        self._fingerprint = _fingerprint(model)

    @classmethod
    def from_torch(cls, name: str, model: Any, hf_tokenizer: Any, window: int, model_dir: Path,
                   options: dict[str, Any]) -> OnnxObserver:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ObserverError(
                f"observer.backend 'onnx' needs onnxruntime and onnx ({exc}); "
                "pip install 'guardrail[onnx]'"
            ) from exc
        export_dir = Path(options.get("onnx_dir") or _export_dir(model_dir))
        return cls(name, model, hf_tokenizer, window, export_dir, options.get("threads"),
                   options.get("quantize"))

    # -- the graph for a set of needs ------------------------------------------------------

    def _session(self, signature: Signature) -> Any:
        session = self._sessions.get(signature)
        if session is not None:
            return session
        import onnxruntime as ort

        depth, indices, logits = signature
        tag = f"d{depth}-h{'_'.join(map(str, indices)) or 'none'}-{'logits' if logits else 'no'}"
        path = self.export_dir / f"step-{self._fingerprint}-{tag}.onnx"
        if not path.exists():
            t0 = time.perf_counter()
            print(f"[guardrail] exporting {self.name} to ONNX ({tag}) ...", file=sys.stderr)
            export_step(self.model, path, depth, list(indices), logits)
            print(f"[guardrail] exported {path} in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
        if self.quantize == "int8":
            path = _quantized(path)
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._sessions[signature] = session
        return session

    # -- Observer protocol -----------------------------------------------------------------

    def start(self, messages: Sequence[Message], needs: Needs) -> StreamState:
        """Read the context with the stream's own graph (its rows of the requested layers come
        out anyway: they are pooled when ``needs.context``)."""
        signature = self.signature(needs)
        ids, pool_from = self.context_span(messages, needs)
        kv = NumpyKV(signature[0], self.kv_heads, self.head_dim, self.window)
        state = StreamState(kv, self.window, context_len=len(ids), rotary=self.rotary,
                            context_ids=tuple(ids), pool_from=pool_from)
        # a pooled span is read, never restored: restore no further than its start
        reused = self.prefix.restore(kv, signature[0],
                                     ids if pool_from is None else ids[:pool_from])
        if len(ids) > reused:
            outs = self._run(state, signature, ids[reused:], range(reused, len(ids)))
            if pool_from is not None:
                by_index = dict(zip(signature[1], outs, strict=False))
                state.context = pool_rows({layer: by_index[self.hidden_index(layer)]
                                           for layer in needs.layers}, pool_from - reused)
            self.prefix.store(kv, signature[0], ids)
        return state

    def extend(self, state: StreamState, tokens: Sequence[TokenSpan],
               needs: Needs) -> ObservedBatch:
        batch = self._extend(state, tokens, needs)
        batch.context = state.take_context()  # the stream's first batch hands them over
        return batch

    def _extend(self, state: StreamState, tokens: Sequence[TokenSpan],
                needs: Needs) -> ObservedBatch:
        ids = [_token_id(t) for t in tokens]
        signature = self.signature(needs)
        if signature[0] > len(state.kv.buffers) // 2:
            raise ObserverError("extend() needs deeper layers than the needs given to start()")
        if not ids:
            return ObservedBatch(hidden={layer: torch.zeros(0, self.hidden_size)
                                         for layer in needs.layers})
        parts, tops = [], []
        n_hidden = len(signature[1])
        for chunk in self.chunks(state, ids):
            state.make_room(len(chunk))
            outs = self._run(state, signature, chunk, state.positions(len(chunk)))
            state.seen += len(chunk)
            if signature[2]:
                if needs.top_k:  # per chunk: the vocabulary-wide rows go unless asked for
                    full = torch.from_numpy(outs[n_hidden])
                    tops.append(torch.topk(full, min(needs.top_k, full.shape[-1]),
                                           dim=-1).values)
                if not needs.logits:
                    outs = outs[:n_hidden]
            parts.append(outs)
        by_index = {i: torch.from_numpy(np.concatenate([p[k] for p in parts]))
                    for k, i in enumerate(signature[1])}
        hidden = {layer: by_index[self.hidden_index(layer)] for layer in needs.layers}
        logits = top = None
        if signature[2] and needs.logits:
            logits = torch.from_numpy(np.concatenate([p[n_hidden] for p in parts]))
        if tops:
            top = tops[0] if len(tops) == 1 else torch.cat(tops)
        return ObservedBatch(hidden=hidden, logits=logits, top_logits=top)

    def truncate(self, state: StreamState, n_tokens: int) -> None:
        state.truncate(n_tokens)

    def _run(self, state: StreamState, signature: Signature,
             ids: list[int], positions: range) -> list[np.ndarray]:
        session = self._session(signature)
        kv: NumpyKV = state.kv
        past = kv.length()
        n = len(ids)
        kv.reserve(past + n)  # the new tokens' room, so the append after the run copies nothing
        size = kv.capacity()
        mask = np.zeros((1, 1, n, size + n), dtype=bool)
        mask[0, 0, :, :past] = True  # slots past the filled part are hidden
        mask[0, 0, :, size:] = np.tril(np.ones((n, n), dtype=bool))
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
                 "position_ids": np.asarray([list(positions)], dtype=np.int64), "mask": mask}
        for i in range(signature[0]):
            feeds[f"past_key_{i}"] = kv.buffers[2 * i]
            feeds[f"past_value_{i}"] = kv.buffers[2 * i + 1]
        outs = session.run(None, feeds)
        n_out = len(signature[1]) + (1 if signature[2] else 0)
        kv.append(outs[n_out:])
        return list(outs[:n_out])


def _quantized(path: Path) -> Path:
    """Dynamic int8 quantization of the exported step's weights (cached beside it)."""
    target = path.with_name(path.stem + "-int8.onnx")
    if not target.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".onnx", dir=path.parent)
        os.close(fd)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint per call
        try:
            quantize_dynamic(path, tmp, weight_type=QuantType.QInt8)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            root.setLevel(level)
    return target


def _export_dir(model_dir: Path) -> Path:
    """Next to the model when it is writable (the converted SmolLM2 lives in the cache)."""
    target = Path(model_dir) / "onnx"
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / ".write-test"
        probe.touch()
        probe.unlink()
        return target
    except OSError:
        from .hf import cache_dir

        return cache_dir() / "onnx" / Path(model_dir).name


def _fingerprint(model: Any) -> str:
    """A short hash of the config and a few weights, so a changed model gets a new export."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    digest.update(_GRAPH_VERSION.encode())
    for _, tensor in list(model.state_dict().items())[:3]:
        digest.update(tensor.detach().float().flatten()[:64].numpy().tobytes())
    return digest.hexdigest()[:12]
