"""guardrail: streaming guardrail middleware for LLM output.

A pluggy-based core: monitors (plugins) score a stream token by token, rules turn scores into
verdicts, and a policy maps verdicts to actions (flag, redact, halt, route). Adapters drive the
sans-I/O session from LangChain, OpenAI-compatible clients, local generation and a proxy server.
"""

from __future__ import annotations

from .errors import (
    GuardrailError,
    GuardrailViolation,
    MonitorNotFound,
    ObserverError,
    PolicyError,
    PolicyIssue,
)
from .events import (
    CONTENT_FILTER,
    Error,
    Event,
    Flag,
    Halt,
    Release,
    Route,
    event_to_dict,
    halt_of,
    released_text,
)
from .guard import Guard, default_policy
from .hookspecs import (
    RegisterAdapter,
    RegisterMonitor,
    RegisterObserver,
    RegisterTrainer,
    hookimpl,
)
from .messages import MessageError, normalize_messages
from .monitor import Features, Message, Monitor, MonitorContext, Needs, NoOptions, Score
from .plugins import PluginHost, get_host
from .policy import MonitorSpec, ObserverSpec, Policy, load_policy, policy_json_schema
from .prepared import Prepared
from .rules import Verdict
from .session import GuardSession, Report
from .stream import StepToken, StreamStep, Tokenizer, TokenLogprob, TokenSpan, WordTokenizer

__version__ = "0.1.0"


__all__ = [
    "CONTENT_FILTER",
    "Error",
    "Event",
    "Features",
    "Flag",
    "Guard",
    "GuardSession",
    "GuardrailError",
    "GuardrailViolation",
    "Halt",
    "Message",
    "MessageError",
    "Monitor",
    "MonitorContext",
    "MonitorNotFound",
    "MonitorSpec",
    "Needs",
    "NoOptions",
    "ObserverError",
    "ObserverSpec",
    "PluginHost",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "Prepared",
    "RegisterAdapter",
    "RegisterMonitor",
    "RegisterObserver",
    "RegisterTrainer",
    "Release",
    "Report",
    "Route",
    "Score",
    "StepToken",
    "StreamStep",
    "TokenLogprob",
    "TokenSpan",
    "Tokenizer",
    "Verdict",
    "WordTokenizer",
    "__version__",
    "default_policy",
    "event_to_dict",
    "get_host",
    "halt_of",
    "hookimpl",
    "load_policy",
    "normalize_messages",
    "policy_json_schema",
    "released_text",
]
