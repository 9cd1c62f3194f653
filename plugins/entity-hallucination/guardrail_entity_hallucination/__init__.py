"""guardrail entity-hallucination monitor: token-level probes after Obeso et al. (2025).

This release holds the offline data builder (``guardrail_entity_hallucination.training.data``) and
bench-ready replay sets (``guardrail_entity_hallucination/replays``); the monitor comes later.
"""

__all__: list[str] = []
