"""guardrail entity-hallucination monitor: token-level and span probes after Obeso et al. (2025).

The runtime (``monitor``, ``probe``, ``span_probe``, ``spans``) and its trainer, data builder and
evaluation (``training``); bench-ready replay sets in ``replays/``.
"""

__all__: list[str] = []
