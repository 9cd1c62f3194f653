"""Cross-fitting for ``--calibration crossfit``: out-of-fold prefix scores of every train+val record
(grouped K-fold), so calibration sees all of them instead of the validation split alone.

The trainer's recipe runs on a packed layout (each batch's token rows gathered from one float32
matrix instead of padded), the same loss of the same rows in seconds rather than minutes;
``count_k_grid`` is a numpy twin of ``calibrate_count_k`` (same grid, ranking and result).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from guardrail.toolkit.calibrate import StreamingResult
from guardrail.toolkit.features import CachedRecord

from ..head import DualHead
from ..pooling import prefix_mean

__all__ = [
    "CrossFit",
    "Packed",
    "average_states",
    "count_k_grid",
    "cross_fit",
    "fit_packed",
    "grouped_folds",
    "pack",
    "packed_loss",
    "packed_scores",
    "prefix_items",
]


def grouped_folds(groups: Sequence[str], labels: Sequence[int], n_folds: int, seed: int
                  ) -> list[int]:
    """The fold (0..n_folds-1) of every record: whole groups are dealt round-robin to the folds,
    shuffled with ``seed`` inside two strata (groups with a harmful record and groups without),
    so no group sits in two folds and every fold gets a similar label mix."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    harmful: dict[str, bool] = defaultdict(bool)
    for g, y in zip(groups, labels, strict=True):
        harmful[g] = harmful[g] or int(y) == 1
    rng = random.Random(seed)
    fold_of: dict[str, int] = {}
    start = 0
    for stratum in (True, False):
        members = sorted(g for g, h in harmful.items() if h is stratum)
        rng.shuffle(members)
        for i, g in enumerate(members):
            fold_of[g] = (start + i) % n_folds
        start = (start + len(members)) % n_folds
    return [fold_of[g] for g in groups]


@dataclass
class Packed:
    """Records' stacked states in one matrix: record ``i`` is rows ``starts[i]:starts[i] +
    lengths[i]`` of ``x`` (states and their prefix mean side by side, float32); ``tokens`` are
    the token labels (FineHarm style) of every row; ``labels`` the response labels."""

    x: torch.Tensor
    tokens: torch.Tensor
    starts: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def pack(records: Sequence[CachedRecord], layer: int, pooling: str = "prefix_mean") -> Packed:
    """``records`` (one cached layer read) as a ``Packed``."""
    lengths = np.array([len(r) for r in records], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    width = int(records[0].hidden[layer].shape[-1]) * (2 if pooling == "prefix_mean" else 1)
    x = torch.empty(int(lengths.sum()), width, dtype=torch.float32)
    tokens = torch.empty(int(lengths.sum()), dtype=torch.long)
    for r, s, n in zip(records, starts, lengths, strict=True):
        h = r.hidden[layer].float()
        x[s:s + n] = torch.cat([h, prefix_mean(h)], dim=-1) if pooling == "prefix_mean" else h
        tokens[s:s + n] = torch.tensor(r.token_labels(0), dtype=torch.long)
    return Packed(x, tokens, starts, lengths, np.array([int(r.label or 0) for r in records]))


Item = tuple[int, int, float]  # (record, tokens, sequence target): int 0/1, or a soft float


def prefix_items(packed: Packed, rows: Sequence[int], per_record: int, seed: int,
                 soft_targets: Sequence[float | None] | None = None) -> list[Item]:
    """Training items ``(record, tokens, target)``: each of ``rows`` whole, then ``per_record``
    prefixes of each (seeded cuts, labelled as ``prefixes.prefix_view`` labels them: harmful once
    the prefix holds a token of a harmful span). Same cuts as ``prefixes.prefix_views``.

    ``soft_targets[i]`` (a probability, or None for a hard label) replaces record ``i``'s 0/1
    target on its whole view and on every prefix of it, except a harmful record's prefix that
    holds no harmful token yet: that one stays 0, as a hard-labelled one would."""
    def target(i: int, harmful: bool) -> float:
        soft = soft_targets[i] if soft_targets is not None else None
        if soft is None or (int(packed.labels[i]) == 1 and not harmful):
            return int(harmful)
        return float(soft)

    items: list[Item] = [(int(i), int(packed.lengths[i]), target(int(i), packed.labels[i] == 1))
                         for i in rows]
    rng = random.Random(seed)
    for i in rows:
        n_all = int(packed.lengths[i])
        if n_all < 2:
            continue
        s = int(packed.starts[i])
        for _ in range(per_record):
            n = rng.randint(1, n_all - 1)
            harmful = int(packed.labels[i]) == 1 and bool(packed.tokens[s:s + n].any())
            items.append((int(i), n, target(int(i), harmful)))
    return items


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout as ``nn.Dropout`` in training (each entry kept with probability
    ``1 - p``); for p a multiple of 0.01 the mask comes from uint8 draws, about twice as fast
    as ``torch.bernoulli`` on CPU, which dominated the fit."""
    if p <= 0:
        return x
    cut = round(p * 100)
    if abs(cut - p * 100) > 1e-9:
        return F.dropout(x, p, training=True)
    keep = torch.randint(0, 100, x.shape, dtype=torch.uint8) >= cut
    return x * keep / (1.0 - p)


def packed_loss(head: DualHead, packed: Packed, chosen: Sequence[Item],
                weights: torch.Tensor, dropout: float,
                loss_weights: tuple[float, float, float] = (0.6, 0.4, 1.0)) -> torch.Tensor:
    """SCM's loss of one batch of items, their token rows packed: ``alpha`` x token CE (mean
    over the tokens) + ``beta`` x sequence CE (the sequence head on each item's last token) +
    ``gamma`` x logic loss; each item's terms weighted by ``weights`` (all 1: SCM's loss, as
    ``losses.scm_loss`` computes it on a padded batch)."""
    alpha, beta, gamma = loss_weights
    lens = torch.tensor([n for _, n, _ in chosen])
    rows = torch.cat([torch.arange(int(packed.starts[i]), int(packed.starts[i]) + n)
                      for i, n, _ in chosen])
    x = packed.x[rows]
    w_rows = torch.repeat_interleave(weights, lens)
    token_logits = head.token_head(_dropout(x, dropout))
    ce = F.cross_entropy(token_logits, packed.tokens[rows], reduction="none")
    token = (ce * w_rows).sum() / w_rows.sum()
    seq_logits = head.sequence_head(x[torch.cumsum(lens, 0) - 1])
    targets = [label for _, _, label in chosen]
    if all(isinstance(t, int) for t in targets):  # hard labels: SCM's loss, bit for bit
        seq_ce = F.cross_entropy(seq_logits, torch.tensor(targets), reduction="none")
    else:  # soft targets: cross-entropy against (1 - p, p)
        p = torch.tensor(targets, dtype=torch.float32)
        seq_ce = F.cross_entropy(seq_logits, torch.stack([1.0 - p, p], dim=1), reduction="none")
    sequence = (seq_ce * weights).sum() / weights.sum()
    p_seq = torch.softmax(seq_logits, dim=-1)[:, 1]
    p_tok = torch.softmax(token_logits, dim=-1)[:, 1]
    owner = torch.repeat_interleave(torch.arange(len(chosen)), lens)
    g = torch.zeros(len(chosen)).scatter_reduce(0, owner, p_tok, reduce="amax",
                                                include_self=True)
    logic_each = -torch.log(torch.clamp(1.0 - p_seq + p_seq * g, min=1e-8))
    logic = (logic_each * weights).sum() / weights.sum()
    return alpha * token + beta * sequence + gamma * logic


def fit_packed(packed: Packed, items: Sequence[Item], *, seed: int, epochs: int,
               batch_size: int = 16, lr: float = 2e-3, weight_decay: float = 0.01,
               grad_clip: float = 1.0, dropout: float = 0.1,
               loss_weights: tuple[float, float, float] = (0.6, 0.4, 1.0),
               item_weights: Sequence[float] | None = None, sequence_hidden: int = 0,
               on_epoch: Callable[[int, DualHead], None] | None = None) -> DualHead:
    """Train a ``DualHead`` on ``items`` (see ``prefix_items``) with SCM's loss for ``epochs``
    epochs (no selection: ``on_epoch(epoch, head)`` sees the head after each one).
    ``item_weights`` weighs each item's terms of the loss (default: all 1, SCM's loss);
    ``sequence_hidden`` > 0 gives the head an MLP sequence head (see ``DualHead``)."""
    torch.manual_seed(seed)
    order_rng = random.Random(seed)
    head = DualHead(packed.x.shape[1], dropout=dropout, seed=seed,
                    sequence_hidden=sequence_hidden)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    weights = torch.tensor(list(item_weights) if item_weights is not None
                           else [1.0] * len(items), dtype=torch.float32)
    for epoch in range(epochs):
        head.train()
        order = list(range(len(items)))
        order_rng.shuffle(order)
        for b in range(0, len(order), batch_size):
            chosen = order[b:b + batch_size]
            loss = packed_loss(head, packed, [items[j] for j in chosen], weights[chosen],
                               dropout, loss_weights)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
        if on_epoch is not None:
            head.eval()
            on_epoch(epoch + 1, head)
    head.eval()
    return head


def packed_scores(head: DualHead, packed: Packed, rows: Sequence[int]) -> list[np.ndarray]:
    """Prefix scores (float64 sigmoids of the sequence head's logit difference, as
    ``scoring.prefix_scores``) of records ``rows``."""
    out = []
    with torch.inference_mode():
        for i in rows:
            s, n = int(packed.starts[i]), int(packed.lengths[i])
            logits = head.sequence_head(packed.x[s:s + n]).double()
            out.append(torch.sigmoid(logits[:, 1] - logits[:, 0]).numpy())
    return out


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        r = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        return np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)


def count_k_grid(scores: Sequence[np.ndarray], labels: Sequence[int],
                 thresholds: Sequence[float], ks: Sequence[int],
                 max_false_halt_rate: float | None = None) -> StreamingResult:
    """``calibrate_count_k`` in numpy: every ``(threshold, k)`` at once, the same choice."""
    y = np.asarray(labels, dtype=np.int64)
    lengths = np.array([len(s) for s in scores], dtype=np.float64)
    ks_arr = np.asarray(sorted(set(int(k) for k in ks)), dtype=np.int64)
    max_k = int(ks_arr.max())
    pos, neg = y == 1, y == 0
    best: tuple[tuple[float, ...], StreamingResult] | None = None
    fewest: tuple[tuple[float, ...], StreamingResult] | None = None
    for t in sorted(set(thresholds), reverse=True):
        # halt[i, j]: index of record i's (ks[j])-th flagged token, -1 when it never gets there
        kth = np.full((len(scores), max_k), -1, dtype=np.int64)
        for i, s in enumerate(scores):
            flagged = np.flatnonzero(s >= t)[:max_k]
            kth[i, :len(flagged)] = flagged
        halt = kth[:, ks_arr - 1]
        halted = halt >= 0
        tp = (halted & pos[:, None]).sum(0).astype(float)
        fp = (halted & neg[:, None]).sum(0).astype(float)
        fn = pos.sum() - tp
        tn = neg.sum() - fp
        macro = (_f1(tp, fp, fn) + _f1(tn, fn, fp)) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
            rec = np.where(pos.sum() > 0, tp / max(int(pos.sum()), 1), 0.0)
        shares = np.where(halted & pos[:, None], (halt + 1) / lengths[:, None], 0.0)
        n_seen = (halted & pos[:, None]).sum(0)
        seen = np.where(n_seen > 0, shares.sum(0) / np.maximum(n_seen, 1), np.nan)
        fhr = fp / neg.sum() if neg.sum() else np.zeros_like(fp)
        for j, k in enumerate(ks_arr):
            fs = float(seen[j]) if n_seen[j] > 0 else None
            result = StreamingResult(threshold=float(t), k=int(k), macro_f1=float(macro[j]),
                                     precision=float(prec[j]), recall=float(rec[j]),
                                     fraction_seen=fs,
                                     false_halt_rate=float(fhr[j]) if neg.sum() else None,
                                     records=len(y))
            rank = (-result.macro_f1, fs if fs is not None else 1.0, float(fhr[j]), int(k),
                    -float(t))
            allowed = max_false_halt_rate is None or float(fhr[j]) <= max_false_halt_rate
            if allowed and (best is None or rank < best[0]):
                best = (rank, result)
            few = (float(fhr[j]), *rank)
            if fewest is None or few < fewest[0]:
                fewest = (few, result)
    if best is not None:
        return best[1]
    assert fewest is not None
    return StreamingResult(**{**fewest[1].as_dict(), "constraint_met": False})


def average_states(states: Sequence[dict[str, torch.Tensor]], width: int, dropout: float,
                   seed: int, sequence_hidden: int = 0) -> DualHead:
    """The seed ensemble of heads saved as ``states`` (``DualHead.ensemble``: its logits are
    the mean of theirs)."""
    heads = []
    for state in states:
        head = DualHead(width, dropout=dropout, seed=seed, sequence_hidden=sequence_hidden)
        head.load_state_dict(state)
        heads.append(head)
    return DualHead.ensemble(heads)


@dataclass
class CrossFit:
    """Out-of-fold prefix scores of every record after each epoch (``oof[epoch][record]``,
    epochs from 1), with the folds they came from."""

    folds: list[int]
    oof: dict[int, list[np.ndarray]]

    def fold_rows(self, fold: int) -> list[int]:
        return [i for i, f in enumerate(self.folds) if f == fold]


def cross_fit(packed: Packed, folds: Sequence[int], *, seeds: Sequence[int], epochs: int,
              prefixes: int, batch_size: int = 16, lr: float = 2e-3,
              record_weights: Sequence[float] | None = None, sequence_hidden: int = 0,
              soft_targets: Sequence[float | None] | None = None,
              on_fit: Callable[[], None] | None = None) -> CrossFit:
    """For each fold, train one head per seed on the other folds' records (and ``prefixes``
    prefix views of each), average the seeds' heads after every epoch and score the held-out
    fold. ``soft_targets``: see ``prefix_items``. ``on_fit`` is called after each epoch of each
    fit (progress bars)."""
    n_folds = max(folds) + 1
    oof: dict[int, list[np.ndarray]] = {e: [np.empty(0)] * len(packed)
                                        for e in range(1, epochs + 1)}
    for fold in range(n_folds):
        rows = [i for i, f in enumerate(folds) if f != fold]
        held = [i for i, f in enumerate(folds) if f == fold]
        snaps: dict[int, list[dict[str, torch.Tensor]]] = {e: [] for e in range(1, epochs + 1)}
        for seed in seeds:
            items = prefix_items(packed, rows, prefixes, seed, soft_targets)
            weights = ([float(record_weights[i]) for i, _, _ in items]
                       if record_weights is not None else None)

            def keep(epoch: int, head: DualHead,
                     snaps: dict[int, list[dict[str, torch.Tensor]]] = snaps) -> None:
                snaps[epoch].append({k: v.detach().clone() for k, v in head.state_dict().items()})
                if on_fit is not None:
                    on_fit()

            fit_packed(packed, items, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                       item_weights=weights, sequence_hidden=sequence_hidden, on_epoch=keep)
        for epoch, states in snaps.items():
            head = average_states(states, int(packed.x.shape[1]), 0.1, seeds[0],
                                  sequence_hidden)
            for i, scores in zip(held, packed_scores(head, packed, held), strict=True):
                oof[epoch][i] = scores
    return CrossFit(list(folds), oof)
