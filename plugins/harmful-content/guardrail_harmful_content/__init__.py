"""guardrail harmful-content monitor: a streaming content monitor after SCM (Li, Sheng et al. 2025).

The runtime is ``plugin``, ``monitor``, ``head`` and ``pooling``; ``training`` holds the data
builder, the trainers, selection and evaluation, and is never imported at run time.
"""

__all__: list[str] = []
