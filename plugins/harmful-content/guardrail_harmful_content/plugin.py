"""Entry point of the ``guardrail`` plugin group for the harmful-content distribution.

The monitor and its trainer are registered here once they exist; for now the module only makes
the distribution visible to ``guardrail plugins`` without registering anything.
"""
