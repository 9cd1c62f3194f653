"""Entry point of the ``guardrail`` plugin group for the router distribution."""
