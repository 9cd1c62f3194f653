"""The toolkit: what trains, measures and demonstrates monitors, apart from the runtime.

The runtime (the rest of ``guardrail``: policy, guard, session, rules, stream, events, monitors,
plugins, observers, probe heads and their files) never imports this package; plugins import it
from their ``training/`` code only. Importing it imports nothing heavy; the modules that need
torch (``features``, ``losses``, ``train``, ``fake``) say so.

- ``records``: labelled JSON Lines records and replaying them through a guard;
- ``evaluate``, ``reports``: metrics of a policy on records, HTML pages and plots;
- ``features``, ``losses``, ``train``, ``calibrate``, ``metrics``: the probe training kit
  (docs/probes.md); ``fake``: a planted-direction observer to test it;
- ``sources``: data packages read from PyPI wheels;
- ``demo``: ``guardrail demo``'s replays;
- ``commands``: the ``replay`` and ``eval`` commands (a built-in plugin).
"""

from __future__ import annotations

__all__: list[str] = []
