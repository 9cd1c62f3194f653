"""A feature cache: an observer's hidden states over a labelled data file, computed once.

``extract_features(observer, data, cache_dir, layers=[15])`` reads JSON Lines records
(``guardrail.toolkit.records``: ``prompt``, ``response``, optional ``label``, ``spans`` and
``messages``), lets the observer read each prompt as a user message (a record's conversation
where it has one), then the response in chunks (as a live stream would), and stores per record
the requested layers' states, the tokens' ids and char offsets, and (when asked) the top-k logits
and each token's surprisal and entropy, as safetensors shards under a directory keyed by the
observer, the layers, the options and the data file's hash. A second call
with the same inputs reloads the cache; ``load_features(dir)`` reloads it without an observer.

Token labels come from char spans at use time: ``token_labels`` (a token inside a span takes the
span's label), ``token_span_ids`` (which span, for span-max losses) and ``token_weights``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..monitor import Needs
from ..stream import TokenSpan
from .records import Record, SpanLabel, conversation_of, read_records

__all__ = [
    "CachedRecord",
    "FeatureSet",
    "extract_features",
    "load_features",
    "split_by_prompt",
    "token_labels",
    "token_span_ids",
    "token_weights",
]

CACHE_VERSION = 1
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _overlaps(start: int, end: int, span: SpanLabel) -> bool:
    if start == end:  # a zero-width piece of a multi-byte character belongs to char ``start``
        return span.start <= start < span.end
    return start < span.end and end > span.start


def token_labels(offsets: Iterable[Sequence[int]], spans: Sequence[SpanLabel],
                 default: int = 0) -> list[int]:
    """Each token's label: the highest label of the spans it overlaps, else ``default`` (use
    ``-100`` to leave tokens outside every span out of a loss)."""
    out = []
    for start, end in offsets:
        inside = [s.label for s in spans if _overlaps(int(start), int(end), s)]
        out.append(max(inside) if inside else default)
    return out


def token_span_ids(offsets: Iterable[Sequence[int]], spans: Sequence[SpanLabel]) -> list[int]:
    """Each token's span: the index (into ``spans``) of the first span it overlaps, or ``-1``."""
    out = []
    for start, end in offsets:
        out.append(next((k for k, s in enumerate(spans) if _overlaps(int(start), int(end), s)),
                        -1))
    return out


def token_weights(offsets: Iterable[Sequence[int]], spans: Sequence[SpanLabel],
                  inside: float = 10.0, outside: float = 1.0) -> list[float]:
    """Loss weights: ``inside`` for tokens in a span (the paper's entity weight 10), else
    ``outside``."""
    return [inside if i >= 0 else outside for i in token_span_ids(offsets, spans)]


@dataclass
class CachedRecord:
    """One record with its cached features. ``offsets`` is ``(n, 2)`` char offsets into
    ``response``; ``hidden`` maps a layer to ``(n, H)``; ``top_logits``/``top_ids`` are ``(n, k)``
    (row ``i`` predicts token ``i + 1``); ``surprisal``/``entropy`` are ``(n,)``: of the
    distribution token ``i`` was read from (``nan`` for the first token)."""

    index: int
    prompt: str
    response: str
    label: int | None
    spans: tuple[SpanLabel, ...]
    offsets: torch.Tensor
    ids: torch.Tensor
    hidden: dict[int, torch.Tensor]
    top_logits: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    surprisal: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # the conversation the observer read before the response (the record's ``messages``);
    # None: the prompt as one user message
    messages: tuple[dict[str, str], ...] | None = None
    # Labels derived from spans, computed once (training reads them every epoch).
    _derived: dict[Any, list[int]] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def conversation(self) -> list[dict[str, str]]:
        """What the observer read before the response (``Record.conversation``)."""
        return conversation_of(self.prompt, self.messages)

    def token_labels(self, default: int = 0) -> list[int]:
        key = ("labels", default)
        if key not in self._derived:
            self._derived[key] = token_labels(self.offsets.tolist(), self.spans, default)
        return list(self._derived[key])

    def token_span_ids(self) -> list[int]:
        if "span_ids" not in self._derived:
            self._derived["span_ids"] = token_span_ids(self.offsets.tolist(), self.spans)
        return list(self._derived["span_ids"])

    def token_weights(self, inside: float = 10.0, outside: float = 1.0) -> list[float]:
        return token_weights(self.offsets.tolist(), self.spans, inside, outside)


@dataclass
class FeatureSet:
    """Cached records plus what produced them (``meta``: observer, layers, hidden size, ...)."""

    records: list[CachedRecord]
    meta: dict[str, Any]
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> CachedRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[CachedRecord]:
        return iter(self.records)

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.meta["layers"]]


def split_by_prompt(records: Sequence[CachedRecord], fractions: Sequence[float] = (0.8, 0.2),
                    seed: int = 0, key: str | None = None) -> list[list[CachedRecord]]:
    """Split records so that all records sharing a prompt (or ``extra[key]``, e.g. a topic or
    template id) land in the same part. Parts follow ``fractions`` by group count."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {sum(fractions)}")

    def group_of(r: CachedRecord) -> str:
        return str(r.extra.get(key)) if key is not None else r.prompt

    groups = sorted({group_of(r) for r in records},
                    key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    bounds, acc = [], 0.0
    for f in fractions:
        acc += f
        bounds.append(round(acc * len(groups)))
    part_of = {g: next(p for p, b in enumerate(bounds) if i < b) for i, g in enumerate(groups)}
    parts: list[list[CachedRecord]] = [[] for _ in fractions]
    for r in records:
        parts[part_of[group_of(r)]].append(r)
    return parts


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _as_tensor(x: Any) -> torch.Tensor:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _stats(logits: torch.Tensor, previous: torch.Tensor | None, ids: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Surprisal and entropy of each token under the distribution it was read from (the previous
    row's prediction), and this chunk's last log-distribution for the next chunk."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # row j predicts token j + 1
    if previous is None:
        before, first = logp[:-1], 1
    else:
        before, first = torch.cat([previous[None], logp[:-1]]), 0
    n = ids.shape[0]
    surprisal = torch.full((n,), math.nan)
    entropy = torch.full((n,), math.nan)
    if before.shape[0] > 0:
        surprisal[first:] = -before.gather(1, ids[first:, None]).squeeze(1)
        entropy[first:] = -(before.exp() * before).sum(-1)
    return surprisal, entropy, logp[-1]


def _observe(observer: Any, record: Record, needs: Needs, layers: Sequence[int], top_k: int,
             stats: bool, chunk_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Run the observer over one record; the tensors to store for it."""
    state = observer.start(record.conversation(), needs)
    tokens: list[TokenSpan] = list(observer.tokenizer.tokenize(record.response))
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    tops, top_ids, surprisal, entropy = [], [], [], []
    previous: torch.Tensor | None = None
    for i in range(0, len(tokens), chunk_size):
        chunk = tokens[i : i + chunk_size]
        batch = observer.extend(state, chunk, needs)
        for layer in layers:
            hidden[layer].append(_as_tensor(batch.hidden[layer]).to(dtype))
        if top_k or stats:
            if batch.logits is not None:
                logits = _as_tensor(batch.logits).float()
                if top_k:
                    top = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
                    tops.append(top.values)
                    top_ids.append(top.indices.to(torch.int64))
                if stats:
                    ids = torch.tensor([t.id for t in chunk], dtype=torch.int64)
                    s, e, previous = _stats(logits, previous, ids)
                    surprisal.append(s)
                    entropy.append(e)
            elif top_k and batch.top_logits is not None:
                tops.append(_as_tensor(batch.top_logits).float())
    n = len(tokens)
    out = {
        "offsets": torch.tensor([[t.start, t.end] for t in tokens], dtype=torch.int64)
        .reshape(n, 2),
        "ids": torch.tensor([t.id if t.id is not None else -1 for t in tokens],
                            dtype=torch.int64),
    }
    for layer in layers:
        parts = hidden[layer]
        out[f"hidden.{layer}"] = (torch.cat(parts) if parts
                                  else torch.zeros(0, observer.hidden_size, dtype=dtype))
    if top_k:
        out["top_logits"] = torch.cat(tops) if tops else torch.zeros(0, top_k)
        if top_ids or not tops:
            out["top_ids"] = torch.cat(top_ids) if top_ids else torch.zeros(0, top_k,
                                                                            dtype=torch.int64)
    if stats:
        out["surprisal"] = torch.cat(surprisal) if surprisal else torch.zeros(0)
        out["entropy"] = torch.cat(entropy) if entropy else torch.zeros(0)
    return out


def _cache_key(observer: Any, data_hash: str, options: Mapping[str, Any]) -> str:
    blob = json.dumps({"observer": observer.name, "hidden_size": observer.hidden_size,
                       "num_layers": observer.num_layers, "data": data_hash, **options},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_target(observer: Any, data: Path, cache_dir: str | Path, data_hash: str,
                  options: dict[str, Any]) -> Path:
    """The cache folder of ``data`` read by ``observer`` with ``options``."""
    key = _cache_key(observer, data_hash, options)
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", observer.name)
    return Path(cache_dir) / f"{safe_name}-{data.stem}-{key}"


def _manifest_row(index: int, shard: int, record: Record, tensors: dict[str, torch.Tensor]
                  ) -> dict[str, Any]:
    """A cached record's manifest entry: where its tensors are and the record itself."""
    row = {
        "index": index, "shard": shard, "tokens": int(tensors["ids"].shape[0]),
        "prompt": record.prompt, "response": record.response, "label": record.label,
        "spans": [[s.start, s.end, s.label] for s in record.spans], "extra": record.extra,
    }
    if record.messages is not None:  # what the observer read before the response
        row["messages"] = record.conversation()
    return row


def extract_features(
    observer: Any,
    data: str | Path,
    cache_dir: str | Path,
    layers: Sequence[int],
    *,
    top_k: int = 0,
    stats: bool = False,
    dtype: str = "float16",
    chunk_size: int = 32,
    shard_size: int = 256,
    limit: int | None = None,
    progress: bool = True,
    refresh: bool = False,
) -> FeatureSet:
    """Run ``observer`` over the records of ``data`` (JSON Lines) and cache the features.

    ``layers``: hidden-state layers to keep (as in ``Needs.layers``). ``top_k``: keep the top-k
    logit values and ids per token. ``stats``: keep each token's surprisal and entropy (needs the
    observer's full logits). ``dtype`` of stored states: ``float16`` (half the disk) or
    ``float32``. Returns the cached set; an existing cache for the same inputs is reused unless
    ``refresh``."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not layers:
        raise ValueError("extract_features needs at least one layer")
    data = Path(data)
    records = list(read_records(data))
    if limit is not None:
        records = records[:limit]
    layers = sorted(set(int(x) for x in layers))
    options = {"layers": layers, "top_k": top_k, "stats": stats, "dtype": dtype, "limit": limit}
    data_hash = _file_hash(data)
    target = _cache_target(observer, data, cache_dir, data_hash, options)
    if (target / "manifest.json").exists() and not refresh:
        return load_features(target)
    needs = Needs(layers=frozenset(layers), logits=bool(top_k or stats))
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest: dict[str, Any] = {
        "version": CACHE_VERSION, "observer": observer.name, "hidden_size": observer.hidden_size,
        "num_layers": observer.num_layers, "data": {"path": str(data), "sha256": data_hash},
        **options, "records": [],
    }
    shard: dict[str, torch.Tensor] = {}
    bar = tqdm(records, desc=f"features {data.name}", unit="rec", disable=not progress)
    for i, record in enumerate(bar):
        tensors = _observe(observer, record, needs, layers, top_k, stats, chunk_size,
                           _DTYPES[dtype])
        shard.update({f"{i}/{name}": t.contiguous() for name, t in tensors.items()})
        shard_no = i // shard_size
        manifest["records"].append(_manifest_row(i, shard_no, record, tensors))
        if (i + 1) % shard_size == 0 or i + 1 == len(records):
            save_file(shard, str(tmp / f"shard-{shard_no:05d}.safetensors"))
            shard = {}
    (tmp / "manifest.json").write_text(json.dumps(manifest) + "\n", encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return load_features(target)


def load_features(path: str | Path, layers: Sequence[int] | None = None) -> FeatureSet:
    """Reload a cache directory written by ``extract_features`` (no observer needed); with
    ``layers``, load only those layers' states."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{path}: not a feature cache (no manifest.json)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("version") != CACHE_VERSION:
        raise ValueError(f"{manifest_path}: cache version {manifest.get('version')!r}, this "
                         f"guardrail reads version {CACHE_VERSION}; re-extract with refresh=True")
    wanted = list(manifest["layers"]) if layers is None else [int(x) for x in layers]
    missing = sorted(set(wanted) - set(manifest["layers"]))
    if missing:
        raise KeyError(f"{path}: layers {missing} are not cached (cached: {manifest['layers']})")
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for entry in manifest["records"]:
        by_shard.setdefault(int(entry["shard"]), []).append(entry)
    records: list[CachedRecord] = []
    for shard_no, entries in sorted(by_shard.items()):
        with safe_open(str(path / f"shard-{shard_no:05d}.safetensors"), framework="pt") as fh:
            names = set(fh.keys())

            def get(i: int, name: str, _fh: Any = fh, _names: set[str] = names
                    ) -> torch.Tensor | None:
                key = f"{i}/{name}"
                return _fh.get_tensor(key) if key in _names else None

            for e in entries:
                i = int(e["index"])
                offsets, ids = get(i, "offsets"), get(i, "ids")
                assert offsets is not None and ids is not None
                hidden = {}
                for layer in wanted:
                    state = get(i, f"hidden.{layer}")
                    assert state is not None
                    hidden[layer] = state
                records.append(CachedRecord(
                    index=i, prompt=e["prompt"], response=e["response"], label=e["label"],
                    spans=tuple(SpanLabel(*s) for s in e["spans"]), offsets=offsets, ids=ids,
                    hidden=hidden, top_logits=get(i, "top_logits"), top_ids=get(i, "top_ids"),
                    surprisal=get(i, "surprisal"), entropy=get(i, "entropy"),
                    extra=dict(e.get("extra") or {}),
                    messages=(None if e.get("messages") is None
                              else tuple(dict(m) for m in e["messages"])),
                ))
    meta = {k: v for k, v in manifest.items() if k != "records"}
    meta["layers"] = wanted
    return FeatureSet(records, meta, path)
