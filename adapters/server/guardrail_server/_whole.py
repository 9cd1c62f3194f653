"""Guard a whole (non-streamed) chat completion, as a stream reader would have seen it.

Each choice's content is fed to a session a word at a time, so a halt leaves exactly the text a
streaming client would have received before the halt message: ``content`` becomes that released
text plus the halt message, tool calls are dropped and ``finish_reason`` is ``content_filter``.
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
        if isinstance(message, dict):  # reasoning text is not judged, so never passed on
            for name in REASONING_FIELDS:
                message.pop(name, None)
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(content, str) or not content:
            continue
        index = choice.get("index", 0)
        session = guard.session(list(messages), metadata={**metadata, "choice": index})
        events: list[Event] = []
        for match in _WORD.finditer(content):
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
            message.pop("tool_calls", None)
            message.pop("function_call", None)
            choice["finish_reason"] = "content_filter"
            choice["logprobs"] = None
        else:
            message["content"] = report.released_text
            _filter_logprobs(choice, content, events)
    if details:
        out["guardrail"] = {"events": details}
    return out, reports


def _filter_logprobs(choice: dict[str, Any], content: str, events: list[Event]) -> None:
    """Keep the logprob entries of tokens the reader sees verbatim (none of a redacted one)."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return
    entries = logprobs.get("content")
    released = LogprobFilter()
    released.add(content, entries if isinstance(entries, list) else None)
    released.see(events)
    logprobs["content"] = released.take() or None
