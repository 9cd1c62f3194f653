"""The validation strategies of ``guardrail train entity-hallucination``: how the candidates of a
head are fitted on the training split and one is chosen on validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from guardrail.toolkit.features import CachedRecord

from ..probe import TOKEN_WEIGHTS, AnyEntityProbe, load_entity_probe
from .evaluation import TokenScorer, entity_tokens_only, probe_scorer, span_auc
from .train_span import Block, select_span_probe
from .train_token import select_probe

__all__ = ["HeadSearch", "Search", "SpanSearch", "TokenSearch"]

Records = list[CachedRecord]


@dataclasses.dataclass
class Search:
    """A head chosen on validation, how it was trained, the candidates' table and (span head) the
    shipped token probe's figures on the same records."""

    probe: AnyEntityProbe
    training: dict[str, Any]
    table: list[dict[str, Any]]
    comparison: dict[str, Any] | None = None


class HeadSearch(Protocol):
    """The validation strategy: which candidates are fitted on ``train`` and how one is chosen on
    ``val``."""

    def layers_read(self) -> set[int]:
        """Layers the candidates read beyond the ``--layers`` ones."""
        ...

    def run(self, train: Records, val: Records) -> Search: ...


@dataclasses.dataclass(frozen=True)
class TokenSearch:
    """The paper's token probe on each layer, then with surprisal/entropy on the best one."""

    layers: Sequence[int]
    extras: bool = True
    epochs: int = 15
    lr: float = 2e-3
    seed: int = 42

    def layers_read(self) -> set[int]:
        return set()

    def run(self, train: Records, val: Records) -> Search:
        best, table = select_probe(train, val, self.layers, try_extras=self.extras,
                                   epochs=self.epochs, lr=self.lr, seed=self.seed)
        training = {"loss": "token BCE (entity weight 10) annealed into span-max BCE",
                    "epochs": self.epochs, "lr": self.lr, "batch_size": 8, "seed": self.seed,
                    "best_epoch_history": best.history, "layer_selection": table}
        return Search(best.probe, training, table)


SPAN_METHOD = ("logistic regression per entity found by spans.find_entities: mean of its tokens' "
               "states + surprisal/entropy max, mean, first + log token count + kind one-hot, "
               "standardised (states folded into the weights); LBFGS on mean BCE + wd * "
               "||w||^2")
ENSEMBLE_METHOD = ("; an ensemble: each member (blocks of mean states and states of the token "
                   "before the entity, on the named layers) fitted alone, their logits averaged "
                   "into one linear head")


@dataclasses.dataclass(frozen=True)
class SpanSearch:
    """The span head: the ensemble of ``members`` (or, ``members=None``, one block per layer),
    the weight decay chosen on validation span AUC."""

    layers: Sequence[int]
    decays: Sequence[float]
    members: Sequence[tuple[Block, ...]] | None = None

    def layers_read(self) -> set[int]:
        return {layer for m in self.members or [] for _, layer in m}

    def run(self, train: Records, val: Records) -> Search:
        members = list(self.members) if self.members is not None else None
        fit, table = select_span_probe(train, val, list(self.layers), list(self.decays),
                                       members=members)
        training = {"method": SPAN_METHOD + (ENSEMBLE_METHOD if members is not None else ""),
                    "weight_decay": fit.weight_decay, "weight_decays": list(self.decays),
                    "train_loss": fit.train_loss, **fit.probe.config, "layer_selection": table}
        return Search(fit.probe, training, table, _token_comparison(val, fit.val_span_auc))


def _token_comparison(val: Sequence[CachedRecord], span_head_auc: float | None
                      ) -> dict[str, Any] | None:
    """Validation span AUC of the shipped token probe on the span head's validation records,
    with every token scored and with only the tokens of the monitor's entities scored (as the
    monitor scores it); None when it is missing or its layer is not cached."""
    if not TOKEN_WEIGHTS.exists() or not val:
        return None
    token = load_entity_probe(TOKEN_WEIGHTS)
    if token.layer not in val[0].hidden:
        return None

    def auc(scorer: TokenScorer) -> float | None:
        value = span_auc(val, scorer)
        return None if value is None else round(value, 4)

    every = auc(probe_scorer(token))
    entities = auc(entity_tokens_only(probe_scorer(token)))
    best = max((v for v in (every, entities) if v is not None), default=None)
    head = None if span_head_auc is None else round(span_head_auc, 4)
    return {"records": len(val), "span_head": head,
            "token_probe_all_tokens": every, "token_probe_entity_tokens": entities,
            "span_head_wins": span_head_auc is not None and best is not None
            and span_head_auc > best}
