"""guardrail harmful-content monitor: a streaming content monitor after SCM (Li, Sheng et al. 2025).

This release holds the offline training data builder (``guardrail_harmful_content.data``) and
bench-ready replay sets (``guardrail_harmful_content/replays``); the monitor itself comes later.
"""

__all__: list[str] = []
