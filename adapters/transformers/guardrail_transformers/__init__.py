"""guardrail adapter for local Hugging Face generation.

The generator's own hidden states and logits go to the monitors with every token (no observer
forward); a halt stops generation before the next forward pass; a ``route`` action hands the
token to a larger local model sharing the tokenizer.

Example::

    from guardrail import Guard
    from guardrail_transformers import LocalGenerator, guarded_generate

    gen = LocalGenerator()                            # the embedded SmolLM2-135M-Instruct
    guard = Guard.default(observer=gen.observer)      # shares the weights
    out = guarded_generate(guard, "Tell me about Marie Curie.", generator=gen)
    print(out.text, out.report.flags)
"""

from __future__ import annotations

from ._decoding import Decoding
from ._detokenize import IncrementalDecoder
from ._generator import DEFAULT_MODEL, LocalGenerator, Prompt, default_generator, stream_text
from ._guarded import (
    GuardedOutput,
    GuardedStream,
    aguarded_generate,
    guarded_generate,
    guarded_stream,
)
from ._routing import routed_generator
from ._sampling import Sampler

__all__ = [
    "DEFAULT_MODEL",
    "Decoding",
    "GuardedOutput",
    "GuardedStream",
    "IncrementalDecoder",
    "LocalGenerator",
    "Prompt",
    "Sampler",
    "aguarded_generate",
    "default_generator",
    "guarded_generate",
    "guarded_stream",
    "routed_generator",
    "stream_text",
]
