"""Probe toolkit: heads, losses, a training loop over cached features, metrics, calibration and
weights I/O for monitors that read hidden states.

Importing this package imports nothing heavy. ``metrics`` and ``calibrate`` are pure Python (the
core's ``guardrail eval`` uses them); ``heads``, ``losses``, ``features``, ``train`` and ``io``
need torch (the ``observer`` extra) and are imported explicitly::

    from guardrail.probes.heads import LinearProbe
    from guardrail.probes.train import train_head
"""

from __future__ import annotations

__all__: list[str] = []
