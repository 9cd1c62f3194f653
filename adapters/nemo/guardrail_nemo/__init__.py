"""guardrail-nemo: guardrail's monitors inside NeMo Guardrails.

Two ways in, which can be combined:

- an output-rail action, ``guardrail_check_output`` (``register(rails)`` or, in a config
  directory's ``config.py``, ``def init(app): register(app)``), run by the Colang subflow
  ``COLANG`` over NeMo's stream windows;
- ``GuardedChatModel(inner=model, guard=guard)`` passed as ``LLMRails(config, llm=...)``, which
  keeps our per-token halting and hold-back in front of NeMo's windows.

The action needs NeMo Guardrails (``pip install 'guardrail-nemo[host]'``) only when it is built;
this package imports without it.
"""

from __future__ import annotations

from ._action import ACTION_NAME, COLANG, judge_window, make_output_action, register
from ._model import GuardedChatModel

__all__ = [
    "ACTION_NAME",
    "COLANG",
    "GuardedChatModel",
    "judge_window",
    "make_output_action",
    "register",
]
