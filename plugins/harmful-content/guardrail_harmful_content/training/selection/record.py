"""Stage 5: the figures of a rule per source and pooled, the markdown table, and the chosen
probe written as the plugin's weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from guardrail.toolkit.metrics import macro_f1, roc_auc

from ...evidence import transform
from ..context import FEATURE
from ..pooled import PoolRecord, PromptTermRange, as_halflife, fit_probe, to_dual_head
from .rule import halts

__all__ = ["candidate_name", "in_split", "per_source", "render", "save_chosen",
           "source_metrics", "write_prompt_term"]


def source_metrics(labels: np.ndarray, halt: np.ndarray, lengths: np.ndarray
                   ) -> dict[str, Any]:
    """macro-F1, recall, false-halt rate and mean share read (halted harmful answers) of one
    record set at one rule."""
    predicted = (halt >= 0).astype(int)
    out: dict[str, Any] = {"records": len(labels), "harmful": int(labels.sum())}
    benign = labels == 0
    out["false_halt_rate"] = float(predicted[benign].mean()) if benign.any() else None
    harmful = labels == 1
    if harmful.any():
        m = macro_f1(labels.tolist(), predicted.tolist())
        out["macro_f1"] = m["macro_f1"] if benign.any() else None
        out["recall"] = m["recall_1"]
        caught = harmful & (halt >= 0)
        out["fraction_seen"] = (float(((halt[caught] + 1) / lengths[caught]).mean())
                                if caught.any() else None)
    return out


def per_source(labels: np.ndarray, tags: np.ndarray, lengths: np.ndarray, halt: np.ndarray,
               scores: Sequence[np.ndarray]) -> dict[str, Any]:
    """Figures of every source tag and of the pool at one rule (``halt``: ``(records,)``)."""
    out: dict[str, Any] = {}
    for tag in sorted(set(tags)):
        sel = tags == tag
        out[tag] = source_metrics(labels[sel], halt[sel], lengths[sel])
        if 0 < labels[sel].sum() < sel.sum():
            out[tag]["auc"] = roc_auc(labels[sel].tolist(),
                                      [float(scores[int(i)].max()) for i in np.flatnonzero(sel)])
    out["pool"] = source_metrics(labels, halt, lengths)
    out["pool"]["auc"] = roc_auc(labels.tolist(), [float(s.max()) for s in scores])
    return out


def in_split(records: Sequence[PoolRecord], chosen: Mapping[str, Any]) -> dict[str, Any]:
    """The build's own split, for comparison only (never for choosing): the chosen probe fitted
    on the pool's train and val records, scored on its test records at the chosen rule."""
    train = [r for r in records if r.split in ("train", "val")]
    test = [r for r in records if r.split == "test"]
    if not train or not test:
        return {}
    probe = fit_probe(train, chosen["layers"], chosen["ridge"],
                      as_halflife(chosen.get("halflife")),
                      chosen.get("fit", "ridge"), chosen.get("upweight"),
                      chosen.get("prompt_scale"), tuple(chosen.get("turn_rows") or ()))
    scores = [probe.prefix_scores(r) for r in test]
    spec = chosen.get("score_transform")
    table = halts([transform(s, spec) for s in scores] if spec else scores,
                  (chosen["threshold"],), (chosen["k"],))[:, 0, 0]
    return per_source(np.asarray([r.label for r in test]), np.asarray([r.tag for r in test]),
                      np.asarray([len(r) for r in test]), table, scores)


def candidate_name(candidate: Mapping[str, Any]) -> str:
    """``fit L2 half-life layers``, e.g. ``logistic 100 hl12 6,9,12,15`` (``prompt x0.75``
    after it for a prompt term at that scale)."""
    hl = candidate.get("halflife")
    pools = ("mean" if hl is None else "hl" + "+".join(
        f"{h:g}" for h in (hl if isinstance(hl, (list, tuple)) else [hl])))
    if candidate.get("token_norm", "none") != "none":
        pools = f"{candidate['token_norm']} {pools}"
    up = "".join(f" {p}x{w:g}" for p, w in (candidate.get("upweight") or {}).items())
    if candidate.get("prompt_scale") is not None:
        up += f" prompt x{candidate['prompt_scale']:g}"
    spec = candidate.get("score_transform")
    rule = ("" if not spec else f" ema{spec['halflife']:g}" if spec["kind"] == "ema"
            else f" {spec['kind']}")
    return (f"{candidate.get('fit', 'ridge')} {candidate['ridge']:g} "
            f"{pools} "
            f"{','.join(str(x) for x in candidate['layers'])}{up}{rule}")


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def render(per: Mapping[str, Any], other: Mapping[str, Any] | None = None,
           names: tuple[str, str] = ("pooled probe", "shipped recipe")) -> str:
    """A markdown table of per-source figures (``per_source`` of a report), with a second
    head's figures beside them when ``other`` is given."""
    heads = [names[0]] + ([names[1]] if other is not None else [])
    cols = " | ".join(f"{h}: AUC | {h}: macro-F1 | {h}: false halts | {h}: read"
                      for h in heads)
    lines = [f"| source | records (harmful) | {cols} |",
             "|---|---|" + "---|" * (4 * len(heads))]
    for tag in sorted(per, key=lambda t: (t == "pool", t)):
        row = [tag, f"{per[tag]['records']} ({per[tag]['harmful']})"]
        for fig in [per[tag]] + ([other.get(tag) or {}] if other is not None else []):
            row += [_f(fig.get("auc")), _f(fig.get("macro_f1")), _f(fig.get("false_halt_rate")),
                    _f(fig.get("fraction_seen"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


_METHOD = ("linear probe on the pooled prefix of the layers' states (mean, or exponentially "
           "weighted mean with 'halflife'): ridge on standardised rows, Platt-scaled, or L2 "
           "logistic regression ('fit'; pooled.py); a one-unit MLP in the file carries its bias "
           "(pooled.to_dual_head)")


def save_chosen(records: Sequence[PoolRecord], report: Mapping[str, Any], out: Path) -> Path:
    """Fit the chosen probe on every record of the pool and save it as the plugin's weights
    (with its prompt term and the term's range over these records, ``write_prompt_term``, when
    it has one)."""
    from guardrail.probes.io import save_probe

    from ..train import NAME

    chosen = report["chosen"]
    probe = fit_probe(records, chosen["layers"], chosen["ridge"],
                      as_halflife(chosen.get("halflife")),
                      chosen.get("fit", "ridge"), chosen.get("upweight"),
                      chosen.get("prompt_scale"), tuple(chosen.get("turn_rows") or ()))
    hidden_size = int(next(iter(records[0].hidden.values())).shape[1])
    head = to_dual_head(probe, hidden_size)
    config = {
        "base_model": "smollm2-135m",
        "layer": chosen["layers"][0],
        "layers": chosen["layers"],
        "pooling": "prefix_mean" if probe.halflife is None else "prefix_ema",
        **({} if probe.halflife is None else {"halflife": (
            list(probe.halflife) if isinstance(probe.halflife, tuple) else probe.halflife)}),
        # each token's states normalised before the head reads them (pooling.TOKEN_NORMS)
        **({"token_norm": chosen["token_norm"]}
           if chosen.get("token_norm", "none") != "none" else {}),
        "dims": {"hidden_size": hidden_size, "input_size": head.hidden_size,
                 "observer_layers": 30},
        "threshold": chosen["threshold"],
        "rule": {"kind": "count", "k": chosen["k"]},
        # the count rule reads the prefix scores after this transform (evidence.py)
        **({"score_transform": chosen["score_transform"]}
           if chosen.get("score_transform") else {}),
        "full_detection_threshold": chosen["full_detection_threshold"],
        "method": {"head": _METHOD, "fit": probe.fit, "ridge": chosen["ridge"],
                   "upweight": chosen.get("upweight") or {},
                   "platt": {"a": probe.a, "c": probe.c},
                   **({} if probe.prompt_scale is None else {"prompt_scale": probe.prompt_scale}),
                   **({"turn_rows": list(chosen["turn_rows"])} if chosen.get("turn_rows") else {}),
                   "selection": "leave-one-source-out (select.py)"},
        "calibration": {"objective": "mean macro-F1 over held-out harmful sources",
                        "split": "leave-one-source-out", **report["caps"]},
        "metrics": {"in_split_test": report.get("in_split") or None},
        "loso": {"chosen": chosen, "per_source": report["loso"],
                 "nested": report["loso_nested"], "pool": report["pool"]},
    }
    prompt = probe.prompt_weights()
    if prompt is None:
        return save_probe(out, head, config, name=NAME)
    assert probe.prompt_range is not None  # fit_probe sets it with the term
    config["prompt_feature"] = FEATURE
    weights = save_probe(out, head, config, name=NAME)
    write_prompt_term(weights, prompt.reshape(len(probe.layers), hidden_size),
                      probe.prompt_range)
    return weights


def write_prompt_term(weights: Path, prompt_weight: np.ndarray,
                      term_range: PromptTermRange) -> None:
    """Add the prompt term to weights ``save_probe`` wrote, as the runtime reads it
    (docs/harmful-content.md, "Prompt term (runtime contract)"): the head's tensor
    ``prompt_weight``, float32 ``(layers, hidden)``, row ``j`` for the config's ``layers[j]``, on
    the raw pooled context states (the fit's column standardisation and Platt slope folded in,
    its constants in the head's bias: ``LinearProbe.prompt_weights``), with ``prompt_size``
    under ``head`` and the tensor listed under ``tensors``: the file
    ``DualHead.set_prompt_weight`` then ``save_probe`` write. The caller sets the config's
    ``prompt_feature``. The monitor adds ``sum_j prompt_weight[j] . context[layers[j]]``, clipped
    to ``[low, high]``, to every prefix logit of a stream, or ``neutral`` to a stream without a
    prompt: ``term_range`` is written as the config's ``prompt_term`` (``{"neutral", "low",
    "high"}``, ``prompt_fit.prompt_term_range`` of the records the head was fitted on)."""
    import json

    from safetensors.numpy import load_file, save_file

    from guardrail.probes.io import FORMAT

    weight = np.ascontiguousarray(prompt_weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"prompt_weight must be (layers, hidden), got shape {weight.shape}")
    tensors = load_file(str(weights))
    tensors["prompt_weight"] = weight
    save_file(tensors, str(weights), metadata={"format": "pt", "guardrail": FORMAT})
    config_path = weights.with_suffix(".json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["head"]["prompt_size"] = list(weight.shape)
    config["tensors"]["prompt_weight"] = list(weight.shape)
    config["prompt_term"] = {k: float(v) for k, v in term_range._asdict().items()}
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
