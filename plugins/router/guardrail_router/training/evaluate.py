"""The router's evaluation: token-level recall and route rate against R2R's uncertainty baselines,
and answer accuracy of small alone, routed and reference alone (R2R's accuracy-vs-cost view)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from guardrail.toolkit.calibrate import threshold_for_recall
from guardrail.toolkit.metrics import roc_auc

from ..baselines import entropy_from_logprobs
from ..head import RouterHead
from ..lm import ChatLM, sentence_end
from ..local import Scorer, entropy_scorer, routed_generate_batch, router_scorer
from .facts import Question, is_correct

__all__ = ["baseline_scores", "evaluate", "plot_accuracy", "render_markdown", "token_metrics"]

OPENAI_TOP_LOGPROBS = 20  # the most top_logprobs an OpenAI-compatible API returns


def baseline_scores(data: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per-token route scores of the baselines (higher = route): full-vocabulary entropy,
    ``1 - max probability``, and the entropy seen through 20 OpenAI-style top logprobs."""
    top = data["top_logits"][:, :OPENAI_TOP_LOGPROBS] - data["log_z"].unsqueeze(-1)
    return {
        "entropy": data["entropy"].tolist(),
        "max_prob": (1.0 - data["max_prob"]).tolist(),
        "entropy_top20_logprobs": [entropy_from_logprobs(row) for row in top.tolist()],
    }


def token_metrics(val_labels: list[int], val_scores: list[float], test_labels: list[int],
                  test_scores: list[float], target: float,
                  val_threshold: float | None = None) -> dict[str, Any]:
    """AUC, the validation threshold's recall and route rate on test, and the fewest routes that
    reach ``target`` recall on test itself (``at_target``)."""
    if val_threshold is None:
        val_threshold = threshold_for_recall(val_labels, val_scores, target).threshold
    routed = [s >= val_threshold for s in test_scores]
    positives = sum(test_labels)
    hits = sum(1 for r, y in zip(routed, test_labels, strict=True) if r and y == 1)
    best = threshold_for_recall(test_labels, test_scores, target)
    return {
        "test_auc": roc_auc(test_labels, test_scores),
        "val_threshold": val_threshold,
        "test_recall": hits / positives if positives else None,
        "test_route_rate": sum(routed) / len(routed),
        "at_target": {"recall": best.recall, "route_rate": best.positive_rate,
                      "threshold": best.threshold},
    }


def _accuracy(questions: Sequence[Question], answers: Sequence[str]) -> float:
    return sum(is_correct(q, a) for q, a in zip(questions, answers, strict=True)) / len(questions)


def _routed(lm: ChatLM, questions: Sequence[Question], scorer: Scorer, threshold: float,
            max_new_tokens: int, batch_size: int = 32) -> dict[str, Any]:
    texts: list[str] = []
    routed = tokens = 0
    for i in range(0, len(questions), batch_size):
        batch = questions[i : i + batch_size]
        outs = routed_generate_batch(
            lm, lm, [lm.prompt_ids(q.messages(False)) for q in batch],
            [lm.prompt_ids(q.messages(True)) for q in batch], scorer, threshold, max_new_tokens,
            stop_at_sentence=True)
        texts.extend(o.text for o in outs)
        routed += sum(sum(o.routed) for o in outs)
        tokens += sum(len(o.routed) for o in outs)
    return {"threshold": threshold, "accuracy": _accuracy(questions, texts),
            "routed_share": routed / tokens if tokens else 0.0, "examples": texts[:3]}


def evaluate(lm: ChatLM, head: RouterHead, questions: Sequence[Question],
             splits: dict[str, list[int]], reference_texts: Sequence[str],
             data: dict[str, dict[str, torch.Tensor]], router_threshold: float, *,
             target_recall: float = 0.95, max_new_tokens: int = 24,
             shares: Sequence[float] = (0.15, 0.3), progress: bool = True) -> dict[str, Any]:
    """Token-level and answer-level results on the test split (thresholds from validation)."""
    from .train import score_tokens

    val, test = data["val"], data["test"]
    val_labels, test_labels = val["labels"].tolist(), test["labels"].tolist()
    token_level = {"router": token_metrics(val_labels, score_tokens(head, val).tolist(),
                                           test_labels, score_tokens(head, test).tolist(),
                                           target_recall, router_threshold)}
    val_base, test_base = baseline_scores(val), baseline_scores(test)
    for name in val_base:
        token_level[name] = token_metrics(val_labels, val_base[name], test_labels,
                                          test_base[name], target_recall)
    test_questions = [questions[i] for i in splits["test"]]
    small_texts: list[str] = []
    for i in range(0, len(test_questions), 32):
        batch = test_questions[i : i + 32]
        outs = lm.greedy([lm.prompt_ids(q.messages(False)) for q in batch], max_new_tokens,
                         stop=lambda ids: sentence_end(lm.token_text(ids[-1])))
        small_texts.extend(lm.decode(o) for o in outs)
    test_references = [reference_texts[i] for i in splits["test"]]
    router_val = score_tokens(head, val)
    entropy_val = val["entropy"]
    runs: list[tuple[str, Scorer, float]] = [
        ("router", router_scorer(head), router_threshold),
        ("entropy", entropy_scorer(), token_level["entropy"]["val_threshold"]),
    ]
    for share in shares:  # thresholds that route about `share` of the validation tokens
        runs.append(("router", router_scorer(head), float(torch.quantile(router_val, 1 - share))))
        runs.append(("entropy", entropy_scorer(), float(torch.quantile(entropy_val, 1 - share))))
    curve: dict[str, list[dict[str, Any]]] = {"router": [], "entropy": []}
    for name, scorer, threshold in tqdm(runs, desc="routed answers", disable=not progress):
        curve[name].append(_routed(lm, test_questions, scorer, threshold, max_new_tokens))
    return {
        "target_recall": target_recall,
        "token_level": token_level,
        "accuracy": {
            "questions": len(test_questions),
            "small": _accuracy(test_questions, small_texts),
            "reference": _accuracy(test_questions, test_references),
            "router_at_val_threshold": curve["router"][0],
            "entropy_at_val_threshold": curve["entropy"][0],
            "curve": {k: sorted(({kk: vv for kk, vv in p.items() if kk != "examples"}
                                 for p in v), key=lambda p: p["routed_share"])
                      for k, v in curve.items()},
        },
    }


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    """Answer accuracy against the share of tokens routed, router vs entropy baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = results["accuracy"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("router", "o-"), ("entropy", "s--")):
        points = acc["curve"][name]
        ax.plot([0.0] + [p["routed_share"] for p in points],
                [acc["small"]] + [p["accuracy"] for p in points], marker, label=name)
    ax.axhline(acc["small"], color="grey", linestyle=":", label="small alone")
    ax.axhline(acc["reference"], color="black", linestyle=":", label="reference alone")
    ax.set_xlabel("share of tokens routed to the reference")
    ax.set_ylabel("answer accuracy (test questions)")
    ax.set_title("SmolLM2-135M routed to SmolLM2 + facts")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_markdown(results: dict[str, Any]) -> str:
    """The evaluation as Markdown tables (for docs/benchmarks.md through a bench module)."""
    target = results["target_recall"]
    lines = ["## Router (R2R) on the offline SmolLM2 pair", "",
             f"Test split, {results['accuracy']['questions']} questions held out by country. "
             f"Route rate: share of tokens routed; 'at recall >= {target}': the fewest routes "
             "that reach the target on test; 'val threshold': chosen on validation.", "",
             "| scorer | test AUC | route rate at recall >= target | val threshold: recall "
             "| val threshold: route rate |", "|---|---|---|---|---|"]
    for name, m in results["token_level"].items():
        recall = "n/a" if m["test_recall"] is None else f"{m['test_recall']:.2f}"
        lines.append(f"| {name} | {m['test_auc']:.3f} | {m['at_target']['route_rate']:.3f} | "
                     f"{recall} | {m['test_route_rate']:.3f} |")
    acc = results["accuracy"]
    lines += ["", "| answers | accuracy | tokens routed |", "|---|---|---|",
              f"| small alone | {acc['small']:.2f} | 0 |"]
    for name in ("router", "entropy"):
        for p in acc["curve"][name]:
            lines.append(f"| routed by {name} (threshold {p['threshold']:.3g}) | "
                         f"{p['accuracy']:.2f} | {p['routed_share']:.2f} |")
    lines.append(f"| reference alone | {acc['reference']:.2f} | 1 |")
    return "\n".join(lines) + "\n"
