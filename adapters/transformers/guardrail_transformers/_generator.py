"""``LocalGenerator``: a local Hugging Face causal LM that streams its answer token by token, each
step carrying the generator's own hidden states and logits for the monitors."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any

from guardrail.errors import GuardrailError
from guardrail.messages import normalize_messages
from guardrail.monitor import Message, Needs
from guardrail.observer.context import span_start
from guardrail.observer.model import render_context
from guardrail.stream import StreamStep

from ._athread import iterate_in_thread
from ._decoding import Decoding
from ._sampling import Sampler
from ._steps import StopFilter

__all__ = ["DEFAULT_MODEL", "LocalGenerator", "Prompt", "default_generator", "stream_text"]

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MAX_NEW_TOKENS = 256

Prompt = str | Sequence[Message]
"""A user prompt, or a conversation in the OpenAI message shape."""


class LocalGenerator:
    """Generates with a local causal LM: the embedded SmolLM2-135M-Instruct (``"smollm2-135m"``)
    or any Hugging Face model directory with safetensors weights.

    ``LocalGenerator()`` loads SmolLM2 (converted once into the guardrail cache by the observer's
    loader); ``LocalGenerator("path/to/model")`` a local directory; ``LocalGenerator(model,
    tokenizer)`` takes an already loaded model and tokenizer, on whatever device it sits. Loading
    by name, ``device="cuda"`` (or ``"auto"``: a GPU when there is one) puts it on a GPU; the
    monitors get every step's states on the CPU. The object holds no per-answer state:
    one generator serves any number of answers, one at a time per thread.

    ``observer`` is a guardrail observer over the same weights: ``Guard.default(
    observer=gen.observer)`` builds a guard without loading the model a second time.
    """

    def __init__(self, model: str | Path | Any = DEFAULT_MODEL, tokenizer: Any = None, *,
                 name: str | None = None, window: int = 2048, device: str | None = None) -> None:
        from guardrail.observer.model import TorchObserver

        if isinstance(model, (str, Path)):
            observer = _load_observer(model, window, device)
            self.model, self.hf_tokenizer = observer.model, observer.hf_tokenizer
            self.name = name or observer.name
        else:
            if device is not None:
                raise GuardrailError("LocalGenerator(model, tokenizer, device=...): move a loaded "
                                     "model yourself (model.to(device)); device= applies when "
                                     "loading by name")
            if tokenizer is None:
                raise GuardrailError("LocalGenerator(model, tokenizer): a loaded model needs its "
                                     "tokenizer")
            self.model, self.hf_tokenizer = model.eval(), tokenizer
            self.name = name or str(getattr(model.config, "name_or_path", "") or "local-model")
            observer = TorchObserver(self.name, self.model, self.hf_tokenizer, window)
        self.observer = observer
        self.tokenizer = observer.tokenizer
        self.num_layers = observer.num_layers
        self.hidden_size = observer.hidden_size
        self.eos_ids = _eos_ids(self.model, self.hf_tokenizer)

    @classmethod
    def load(cls, model: str | Path = DEFAULT_MODEL, **kwargs: Any) -> LocalGenerator:
        """A generator for a model name (``"smollm2-135m"``) or a local model directory."""
        return cls(model, **kwargs)

    # -- what the model reads ------------------------------------------------------------------

    def hidden_index(self, layer: int) -> int:
        """Index into HF ``hidden_states`` of guardrail layer ``layer`` (the observer's numbering:
        the state after block ``layer``; negative counts from the end)."""
        return int(self.observer.hidden_index(layer))

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt or conversation through the chat template, ready for the
        answer (a model without a chat template reads the messages' text)."""
        return render_context(self.hf_tokenizer, as_messages(prompt))

    def decoding(self, prompt: Prompt, needs: Needs | None = None) -> Decoding:
        """Start an answer: read the prompt (one forward) and return its generation state. With
        ``needs.context`` that forward also pools the prompt's states over the span an observer
        pools (``context_start``); the first step carries them (``StreamStep.context``)."""
        needs = needs or Needs()
        ids = self.prompt_ids(prompt)
        start = self.context_start(prompt, len(ids)) if needs.context else None
        return Decoding(self, ids, needs, context_from=start)

    def context_start(self, prompt: Prompt, length: int | None = None) -> int:
        """Where the pooled context span starts in ``prompt_ids(prompt)`` (``length`` ids): the
        first token of the last user message's content (an earlier one's after a short
        follow-up), found as the observer finds it (``guardrail.observer.context.span_start``).
        The prompt is read whole, never cut to a window, so a prompt longer than an observer's
        context budget pools all of its span."""
        messages = as_messages(prompt)
        if length is None:
            length = len(self.prompt_ids(messages))
        return span_start(lambda m: render_context(self.hf_tokenizer, m), messages, length)

    # -- drivers -------------------------------------------------------------------------------

    def steps(self, prompt: Prompt, *, needs: Needs | None = None,
              max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None,
              stop: str | Sequence[str] | None = None) -> Iterator[StreamStep]:
        """The answer as stream steps, one token each (several when a held-back stop-sequence
        prefix turns out not to be one). With ``needs`` (e.g. ``guard.needs``) each step carries
        the hidden rows of ``needs.layers`` and, when asked for, the logits; without, text and
        token ids only. Generation ends at an end-of-turn token, ``max_new_tokens``, or a ``stop``
        string (not included); closing the iterator stops it before the next forward."""
        sampler = Sampler(temperature, top_p, seed)
        stops = StopFilter(stop)
        decoding = self.decoding(prompt, needs)
        for _ in range(max_new_tokens):
            token = decoding.propose(sampler)
            if token in self.eos_ids:
                break
            yield from stops.feed(decoding.take(token))
            if stops.done:
                return
        yield from stops.flush()

    def stream(self, prompt: Prompt, **params: Any) -> Iterator[StreamStep]:
        """``steps`` with OpenAI-style parameter names also accepted (``max_tokens``,
        ``max_completion_tokens``): what ``guardrail serve --local`` calls."""
        return self.steps(prompt, **_openai_params(params))

    async def astream(self, prompt: Prompt, **params: Any) -> AsyncGenerator[StreamStep, None]:
        """``stream`` for async code: each step is computed in a worker thread, so the event loop
        stays free; leaving the loop (or ``aclose``) stops generation."""
        async for step in iterate_in_thread(self.stream(prompt, **params)):
            yield step

    def generate(self, prompt: Prompt, **params: Any) -> str:
        """The whole answer's text (unguarded)."""
        return "".join(step.text for step in self.stream(prompt, **params))

    def __repr__(self) -> str:
        return f"LocalGenerator({self.name!r}, layers={self.num_layers}, hidden={self.hidden_size})"


def as_messages(prompt: Prompt) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(normalize_messages(prompt))


def _openai_params(params: dict[str, Any]) -> dict[str, Any]:
    params = dict(params)
    for alias in ("max_completion_tokens", "max_tokens"):
        value = params.pop(alias, None)
        if value is not None:
            params.setdefault("max_new_tokens", int(value))
    for key in ("temperature", "top_p"):
        if params.get(key) is None:
            params.pop(key, None)
    return params


def _load_observer(model: str | Path, window: int, device: str | None) -> Any:
    """The observer loader (SmolLM2 from its cached conversion, or a local directory): it checks
    the files and gives clear errors; the generator reuses its model and tokenizer."""
    from guardrail.observer.hf import SMOLLM2_NAME, load_model_dir, smollm2_dir

    # float32 products: the generator's own forward (the states it hands a guard) is the HF
    # model's, so the observer over the same weights reads the same floats
    options: dict[str, Any] = {"matmul": "float32"}
    if device is not None:
        options["device"] = device
    if str(model) == SMOLLM2_NAME:
        return load_model_dir(smollm2_dir(), name=SMOLLM2_NAME, window=window, options=options)
    path = Path(model).expanduser()
    if not path.exists():
        raise GuardrailError(f"LocalGenerator: {str(model)!r} is neither {SMOLLM2_NAME!r} nor an "
                             "existing model directory")
    return load_model_dir(path, name=path.name or str(path), window=window, options=options)


def _eos_ids(model: Any, hf_tokenizer: Any) -> frozenset[int]:
    """Ids that end an answer: the tokenizer's EOS, the chat end-of-turn, and the generation
    config's EOS ids."""
    ids: set[int] = set()
    candidates: list[Any] = [hf_tokenizer.eos_token_id,
                             hf_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    generation = getattr(model, "generation_config", None)
    configured = getattr(generation, "eos_token_id", None)
    candidates += configured if isinstance(configured, list) else [configured]
    unk = getattr(hf_tokenizer, "unk_token_id", None)
    for value in candidates:
        if isinstance(value, int) and value >= 0 and value != unk:
            ids.add(value)
    return frozenset(ids)


_DEFAULT: LocalGenerator | None = None


def default_generator() -> LocalGenerator:
    """The embedded SmolLM2 generator, loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = LocalGenerator()
    return _DEFAULT


def stream_text(prompt: Prompt, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                **params: Any) -> Iterator[str]:
    """The embedded SmolLM2's answer as text deltas, unguarded (``guardrail demo`` feeds them to
    a session like any upstream's text). Greedy unless ``temperature`` is given."""
    for step in default_generator().stream(prompt, max_new_tokens=max_new_tokens, **params):
        if step.text:
            yield step.text
