"""Entry point of the ``guardrail`` plugin group for the entity-hallucination distribution.

The monitor is registered here once it exists; for now the module only makes the distribution
visible to ``guardrail plugins`` without registering anything.
"""
