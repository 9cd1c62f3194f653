"""Probes released with the paper (Obeso et al. 2025, ``obalcells/hallucination-probes``) as
entity monitors.

A release folder holds ``probe_config.json`` (``layer_idx``, ``hidden_size``) and the value head's
weights (``probe_head.safetensors``, or ``probe_head.bin`` read with torch's weights-only loader);
``guardrail.probes.io.load_paper_probe`` reads and checks them. The probes were trained on the
generating model's own states (Llama, Qwen, Gemma, Mistral), so use them with an adapter that
passes that model's hidden states::

    monitors:
      - id: facts
        use: entity-hallucination
        options: {probe_dir: ./llama-3.1-8b_linear, mode: generator}
        rule: {kind: span_max}
        threshold: 0.5

Only ``*_linear`` probes score as in the paper: a LoRA adapter beside the head is not applied
(the loader warns).
"""

from __future__ import annotations

from pathlib import Path

from guardrail.probes.heads import LinearProbe
from guardrail.probes.io import ProbeFileError, load_paper_probe

from .probe import EntityProbe

__all__ = ["load_paper_entity_probe"]


def load_paper_entity_probe(directory: str | Path, threshold: float = 0.5) -> EntityProbe:
    """An ``EntityProbe`` from a folder in the paper's release format; ``threshold`` defaults to
    the paper's 0.5 (the release carries no calibrated one)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ProbeFileError(f"probe_dir {directory} is not a folder (expected probe_config.json "
                             "and probe_head.safetensors or probe_head.bin)")
    loaded = load_paper_probe(directory)
    head = loaded.head
    if not isinstance(head, LinearProbe) or loaded.layer is None:
        raise ProbeFileError(f"{directory}: expected a linear value head and a layer index")
    return EntityProbe(head, loaded.layer, threshold, config=dict(loaded.config))
