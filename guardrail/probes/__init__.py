"""Probe heads and their files: what a monitor loads at run time to read hidden states.

``heads`` holds the head base class, ``LinearProbe`` and the registry plugins add their heads to
(``register_head``); ``io`` saves and loads them (safetensors and JSON, never pickle); ``arrays``
converts an observer's states for numpy maths. Training them is the toolkit's job
(``guardrail.toolkit``, docs/probes.md). ``heads`` and ``io`` need torch (the ``observer`` extra)::

    from guardrail.probes.io import load_probe
"""

from __future__ import annotations

__all__: list[str] = []
