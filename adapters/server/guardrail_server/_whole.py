"""Guard a whole (non-streamed) chat completion, as a stream reader would have seen it.

Each choice's content (and refusal text) is fed to a session a word at a time, so a halt leaves
exactly the text a streaming client would have received before the halt message: ``content``
becomes that released text plus the halt message, tool calls and refusal are dropped and
``finish_reason`` is ``content_filter``.
Logprob entries are kept only for tokens shown verbatim (see ``guardrail_openai.LogprobFilter``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

from guardrail_openai import REASONING_FIELDS, LogprobFilter

from guardrail import Event, Guard, Release, Report, event_to_dict

__all__ = ["guard_whole"]

_WORD = re.compile(r"\s*\S+|\s+$")


def guard_whole(guard: Guard, completion: Mapping[str, Any],
                messages: Sequence[Mapping[str, Any]], metadata: Mapping[str, Any]
                ) -> tuple[dict[str, Any], list[Report]]:
    """The guarded completion (with a ``guardrail`` field listing the events) and the reports."""
    out = copy.deepcopy(dict(completion))
    details: list[dict[str, Any]] = []
    reports: list[Report] = []
    for choice in out.get("choices") or []:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        for name in REASONING_FIELDS:  # reasoning text is not judged, so never passed on
            message.pop(name, None)
        # Refusal text reaches the reader like content, so it is judged the same way.
        for name in ("content", "refusal"):
            text = message.get(name)
            if not isinstance(text, str) or not text or choice.get("finish_reason") == \
                    "content_filter":
                continue
            index = choice.get("index", 0)
            session = guard.session(list(messages), metadata={**metadata, "choice": index})
            events: list[Event] = []
            for match in _WORD.finditer(text):
                events += session.feed(match.group(0))
                if session.halted is not None:
                    break
            report = session.finish()
            reports.append(report)
            events += report.final_events
            details += [{"choice": index, **event_to_dict(e)} for e in events
                        if not isinstance(e, Release)]
            if report.halt is not None:
                message["content"] = report.halt.released_text + report.halt.notice
                for dropped in ("refusal", "tool_calls", "function_call"):
                    message.pop(dropped, None)
                choice["finish_reason"] = "content_filter"
                choice["logprobs"] = None
            else:
                message[name] = report.released_text
                _filter_logprobs(choice, name, text, events)
    if details:
        out["guardrail"] = {"events": details}
    return out, reports


def _filter_logprobs(choice: dict[str, Any], name: str, text: str, events: list[Event]) -> None:
    """Keep the logprob entries (of field ``name``) of tokens the reader sees verbatim."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return
    entries = logprobs.get(name)
    released = LogprobFilter()
    released.add(text, entries if isinstance(entries, list) else None)
    released.see(events)
    logprobs[name] = released.take() or None
