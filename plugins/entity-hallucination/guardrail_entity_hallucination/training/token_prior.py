"""Building the token priors (``token_prior``) the sixth entity pass reads, and attaching them
to cached records.

``python -m guardrail_entity_hallucination.training.token_prior [--texts FILE] [--out PATH]``:
SmolLM2-135M-Instruct in float32 (the converted model the observer loads) reads

- the chat template's assistant start after an empty user message, once (``start``);
- a seeded sample of a JSON Lines file's records (default: the harm data's training split,
  text from none of the entity LOSO sources), each prompt as the user message and the
  response read whole up to ``max_tokens``; at every response position it adds the full
  next-token distribution, so ``marginal`` is ``-log`` of the mean probability and
  ``meanlog`` the mean surprisal of every vocabulary id over those positions;

and ``merge`` is ``log(1 + id)``. The file's metadata names the texts by digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..token_prior import PRIORS

__all__ = ["attach_priors", "build_priors", "load_token_priors", "main", "prior_values",
           "sample_texts"]

DEFAULT_LIMIT = 1000
DEFAULT_MAX_TOKENS = 256
SEED = 0


def load_token_priors(path: Path) -> dict[str, np.ndarray]:
    """The priors of a file written by ``training.token_prior``, checking names and shapes."""
    from safetensors.numpy import load_file

    if not path.exists():
        raise FileNotFoundError(f"token prior file {path} does not exist")
    loaded = load_file(str(path))
    unknown = sorted(set(loaded) - set(PRIORS))
    if unknown:
        raise ValueError(f"{path}: priors {unknown} are unknown; known: {list(PRIORS)}")
    sizes = {name: v.shape for name, v in loaded.items()}
    if len({s for s in sizes.values()}) > 1 or any(len(s) != 1 for s in sizes.values()):
        raise ValueError(f"{path}: every prior is one vector over the vocabulary; got {sizes}")
    return {name: np.asarray(v, dtype=np.float32) for name, v in loaded.items()}


def prior_values(vector: np.ndarray, ids: Sequence[int]) -> list[float]:
    """The prior surprisal of each token id (NaN for an unknown id, -1, or one outside the
    vector)."""
    size = len(vector)
    return [float(vector[i]) if 0 <= i < size else math.nan for i in ids]


def attach_priors(records: Sequence[Any], priors: dict[str, np.ndarray]) -> None:
    """Put each record's tokens' prior surprisal in ``extra["token_stats"]["prior_<name>"]``
    (what ``logit_stats.record_extras`` hands the span features), looked up by token id."""
    for record in records:
        ids = [int(i) for i in record.ids.tolist()]
        stats = record.extra.setdefault("token_stats", {})
        for name, vector in priors.items():
            stats[f"prior_{name}"] = prior_values(vector, ids)


def sample_texts(path: Path, limit: int, seed: int = SEED) -> list[tuple[str, str]]:
    """``limit`` (prompt, response) pairs of a JSON Lines file, a seeded draw in file order."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(limit, len(rows))))
    out = []
    for n in keep:
        prompt, response = rows[n].get("prompt"), rows[n].get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"{path}: record {n} needs string fields 'prompt' and 'response'")
        out.append((prompt, response))
    return out


def build_priors(model_dir: Path, texts: Sequence[tuple[str, str]],
                 max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = True
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The four priors (``token_prior.PRIORS``) as float32 vectors over the model's vocabulary,
    and metadata (positions read)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardrail.observer.model import render_context

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model.eval()

    def log_probs(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(torch.tensor([ids], dtype=torch.long)).logits[0].double()
        return torch.log_softmax(logits, dim=-1)

    start_ids = render_context(tokenizer, [{"role": "user", "content": ""}])
    start = -log_probs(start_ids)[-1]
    vocab = int(start.shape[0])
    total_p = torch.zeros(vocab, dtype=torch.float64)
    total_logp = torch.zeros(vocab, dtype=torch.float64)
    positions = 0
    for prompt, response in tqdm(texts, desc="token prior", disable=not progress):
        context = render_context(tokenizer, [{"role": "user", "content": prompt}])
        answer = tokenizer(response, add_special_tokens=False)["input_ids"][:max_tokens]
        if not answer:
            continue
        # rows len(context) - 1 .. end - 1: the distributions the response's tokens come from
        rows = log_probs(context + answer[:-1])[len(context) - 1:]
        total_p += rows.exp().sum(0)
        total_logp += rows.sum(0)
        positions += int(rows.shape[0])
    if not positions:
        raise ValueError("no response token to estimate the marginal prior from")
    priors = {
        "start": start.float().numpy(),
        "marginal": (-(total_p / positions).log()).float().numpy(),
        "meanlog": (-(total_logp / positions)).float().numpy(),
        "merge": np.log1p(np.arange(vocab, dtype=np.float64)).astype(np.float32),
    }
    assert tuple(priors) == PRIORS
    meta = {"start_context": json.dumps(start_ids), "texts": str(len(texts)),
            "positions": str(positions), "max_tokens": str(max_tokens)}
    return priors, meta


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch
    from safetensors.numpy import save_file

    from guardrail.observer.hf import smollm2_dir
    from guardrail.toolkit.sources import cache_dir

    parser = argparse.ArgumentParser(
        prog="python -m guardrail_entity_hallucination.training.token_prior")
    parser.add_argument("--texts", type=Path, default=None,
                        help="JSON Lines with prompt and response (default: the harm data's "
                        "training split)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: <cache>/entity-features/token-prior.safetensors")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    texts_path = args.texts or cache_dir() / "harmful-content" / "data" / "train.jsonl"
    out = args.out or cache_dir() / "entity-features" / "token-prior.safetensors"
    texts = sample_texts(texts_path, args.limit)
    priors, meta = build_priors(smollm2_dir(), texts, args.max_tokens)
    meta.update({"texts_file": texts_path.name,
                 "texts_sha256": hashlib.sha256(texts_path.read_bytes()).hexdigest(),
                 "seed": str(SEED), "limit": str(args.limit),
                 "model": "SmolLM2-135M-Instruct, float32"})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(priors, str(out), metadata=meta)
    finite = {k: bool(np.isfinite(v).all()) for k, v in priors.items()}
    print(json.dumps({"out": str(out), **meta, "finite": finite,
                      "median": {k: round(float(np.median(v)), 3) for k, v in priors.items()}},
                     indent=1))
    return 0 if all(finite.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
