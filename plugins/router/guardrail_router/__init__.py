"""guardrail router: marks the tokens where a small model would diverge from a large one and
routes them to the large model (after R2R, "Roads to Rome", Fu, Ge et al. 2025)."""

__all__: list[str] = []
