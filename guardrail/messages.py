"""One normaliser for chat messages: every shape the OpenAI and LangChain APIs allow becomes the
core's plain ``{"role": str, "content": str}`` form.

Every driver (sessions, the observer's chat-template rendering, the adapters and the proxy) goes
through ``normalize_messages``, so a content-parts message reads exactly like the same text sent as
a string. What becomes of each shape:

- ``content``: a string stays; ``None`` (or missing) is ``""``; a list of content parts joins its
  text parts (``text``, ``input_text``, ``output_text``; a bare string part too) and refusal parts
  with newlines; images, audio, files and any other part type are skipped.
- tool calls (OpenAI ``tool_calls`` and the legacy ``function_call``, LangChain ``tool_calls``) are
  rendered as text after the message's own text, one ``name(arguments)`` line per call: chat
  templates disagree on tool calls (a small observer's template often has none), while every
  template takes text, and the monitors then read what the model was shown.
- roles: ``developer`` reads as ``system`` and ``function`` as ``tool``; LangChain message types
  map to OpenAI roles (``human`` -> ``user``, ``ai`` -> ``assistant``, ``chat`` -> its role);
  LangChain ``remove`` messages are dropped. Other role strings are kept.
- LangChain ``BaseMessage`` objects are read by duck typing (``.type`` and ``.content``), so the
  core never imports LangChain; so are pydantic models (``model_dump``), e.g. an OpenAI response's
  message put back into the conversation. LangChain's ``(role, content)`` pairs and bare strings
  (a user message) are read too.

Anything else is a ``MessageError`` naming the message's index and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import GuardrailError

__all__ = ["MessageError", "normalize_message", "normalize_messages"]

_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_ROLE_ALIASES = {
    "human": "user", "ai": "assistant", "developer": "system", "function": "tool",
    "generic": "user",
}
_MAX_MESSAGES = 100_000  # a bound on what one conversation may hold (a list, not a stream)


class MessageError(GuardrailError, ValueError):
    """A chat message the guard cannot read. ``where`` names it: ``messages[2].content[1].text``."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def normalize_messages(messages: Iterable[Any] | None) -> list[dict[str, str]]:
    """The conversation as ``[{"role": ..., "content": ...}]`` with string content (see the module
    docstring for each shape). Already-normalised messages come back equal."""
    if messages is None:
        return []
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise MessageError("messages", f"expected a list of chat messages, got "
                                       f"{type(messages).__name__}")
    out: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        if index >= _MAX_MESSAGES:
            raise MessageError("messages", f"more than {_MAX_MESSAGES} messages")
        normal = normalize_message(message, index)
        if normal is not None:
            out.append(normal)
    return out


def normalize_message(message: Any, index: int = 0) -> dict[str, str] | None:
    """One message in the core's form (``None`` for a LangChain ``remove`` marker); ``index`` only
    names it in errors."""
    where = f"messages[{index}]"
    fields = _fields(message, where)
    role = _role(fields, where)
    if role is None:
        return None
    text = _content(fields.get("content"), f"{where}.content")
    calls = _tool_calls(fields, where)
    if calls:
        text = "\n".join([text, *calls]) if text else "\n".join(calls)
    return {"role": role, "content": text}


def _fields(message: Any, where: str) -> Mapping[str, Any]:
    """The message's fields as a mapping, whatever object carries them."""
    if isinstance(message, Mapping):
        return message
    if isinstance(message, str):  # LangChain: a bare string is a user message
        return {"role": "user", "content": message}
    if isinstance(message, (tuple, list)):  # LangChain: (role, content)
        if len(message) != 2 or not isinstance(message[0], str):
            raise MessageError(where, "a message pair must be (role, content)")
        return {"role": message[0], "content": message[1]}
    kind = getattr(message, "type", None)
    if isinstance(kind, str) and hasattr(message, "content"):  # a LangChain BaseMessage
        return {"type": kind, "role": getattr(message, "role", None),
                "content": message.content, "tool_calls": getattr(message, "tool_calls", None)}
    dump = getattr(message, "model_dump", None)
    if callable(dump):  # a pydantic model, e.g. an OpenAI SDK message
        dumped = dump(exclude_none=True)
        if isinstance(dumped, Mapping):
            return dumped
    raise MessageError(where, f"cannot read a {type(message).__name__} as a chat message")


def _role(fields: Mapping[str, Any], where: str) -> str | None:
    role = fields.get("role")
    kind = fields.get("type")
    if role is None and isinstance(kind, str):  # LangChain types, also as dicts
        kind = kind.removesuffix("MessageChunk").lower() if kind.endswith("MessageChunk") \
            else kind
        if kind == "remove":
            return None
        role = kind if kind != "chat" else None
        if role is None:
            raise MessageError(f"{where}.role", "a LangChain chat message needs a role")
    if not isinstance(role, str) or not role:
        got = "missing" if role is None else f"a {type(role).__name__}"
        raise MessageError(f"{where}.role", f"expected a non-empty string, got {got}")
    return _ROLE_ALIASES.get(role, role)


def _content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise MessageError(where, "expected a string, a list of content parts or null, got "
                                  f"{type(content).__name__}")
    texts: list[str] = []
    for i, part in enumerate(content):
        text = _part_text(part, f"{where}[{i}]")
        if text is not None:
            texts.append(text)
    return "\n".join(texts)


def _part_text(part: Any, where: str) -> str | None:
    """A content part's text, or None for a part that carries none (image, audio, file...)."""
    if isinstance(part, str):
        return part
    if not isinstance(part, Mapping):
        dump = getattr(part, "model_dump", None)
        part = dump(exclude_none=True) if callable(dump) else None
        if not isinstance(part, Mapping):
            raise MessageError(where, "a content part must be an object with a 'type'")
    kind = part.get("type")
    if not isinstance(kind, str):
        raise MessageError(f"{where}.type", "expected a string naming the part's type")
    key = "text" if kind in _TEXT_PARTS else "refusal" if kind == "refusal" else None
    if key is None:
        return None
    text = part.get(key)
    if not isinstance(text, str):
        raise MessageError(f"{where}.{key}", f"a {kind!r} part needs a string {key!r}")
    return text


def _tool_calls(fields: Mapping[str, Any], where: str) -> list[str]:
    """One ``name(arguments)`` line per tool call the message makes."""
    lines: list[str] = []
    calls = fields.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, (list, tuple)):
            raise MessageError(f"{where}.tool_calls", f"expected a list, got "
                                                      f"{type(calls).__name__}")
        for i, call in enumerate(calls):
            lines.append(_call_line(call, f"{where}.tool_calls[{i}]"))
    legacy = fields.get("function_call")
    if legacy is not None:
        lines.append(_call_line(legacy, f"{where}.function_call"))
    return lines


def _call_line(call: Any, where: str) -> str:
    if not isinstance(call, Mapping):
        dump = getattr(call, "model_dump", None)
        call = dump(exclude_none=True) if callable(dump) else None
        if not isinstance(call, Mapping):
            raise MessageError(where, "a tool call must be an object")
    key = "function" if "function" in call else "custom" if "custom" in call else None
    inner = call.get(key) if key is not None else None
    if key is not None and not isinstance(inner, Mapping):
        raise MessageError(f"{where}.{key}", "expected an object with a 'name'")
    if isinstance(inner, Mapping):  # OpenAI: {"function": {"name", "arguments"}}
        name, arguments = inner.get("name"), inner.get("arguments", inner.get("input"))
        where = f"{where}.{key}"
    else:  # LangChain {"name", "args"}; OpenAI's legacy function_call {"name", "arguments"}
        name, arguments = call.get("name"), call.get("args", call.get("arguments"))
    if not isinstance(name, str) or not name:
        raise MessageError(f"{where}.name", "a tool call needs a name")
    if arguments is None:
        arguments = ""
    elif not isinstance(arguments, str):
        try:
            arguments = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
        except (TypeError, ValueError):
            raise MessageError(f"{where}.arguments", "arguments must be a string or JSON "
                                                     "data") from None
    return f"{name}({arguments})"
