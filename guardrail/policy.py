"""Policies: which monitors run, how their scores become verdicts, and what each verdict does.

A policy is YAML (read with ``yaml.safe_load`` only) validated by the pydantic models below. Errors
name the field path and the YAML line. Monitors are referenced by registered name (``use:``), so a
policy can never make the process import or run arbitrary code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import PolicyError, PolicyIssue
from .rules import RuleSpec, ThresholdRule

__all__ = [
    "DEFAULT_HALT_MESSAGE",
    "AuditSpec",
    "MonitorSpec",
    "ObserverSpec",
    "Policy",
    "ReleaseSpec",
    "RouteTarget",
    "load_policy",
    "policy_json_schema",
    "policy_markdown",
]

DEFAULT_HALT_MESSAGE = "I can't continue with this answer."

# Bounds on what a policy file may make the loader do (a YAML "billion laughs" in 575 bytes
# expands to gigabytes): its size, its nesting, the nodes its aliases add, any one list's length.
MAX_POLICY_BYTES = 1_000_000
MAX_NESTING = 50
MAX_ALIAS_NODES = 10_000
MAX_LIST_ITEMS = 10_000

Action = Literal["flag", "halt", "route", "redact"]
OnError = Literal["fail_open", "fail_closed"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObserverSpec(_Strict):
    """The shared hidden-state source that every monitor reads."""

    model: str = Field("smollm2-135m", description="registered observer name or a local HF path")
    backend: Literal["torch", "onnx"] = Field("torch", description="inference backend")
    window: int = Field(2048, ge=16, description="tokens of context kept (KV cache bound)")
    max_delay_ms: float = Field(
        50, ge=0, description="a text stream's new tokens are read in one forward when a "
        "decision is due: before an unread token would be released, or once text that could be "
        "released has waited this long (checked as deltas arrive); 0: read every delta")
    read_ahead: bool = Field(
        True, description="a text stream's new tokens are read in the background while the "
        "upstream streams (when the driver waits for it and the observer keeps up) and scored "
        "at the next feed: the same releases and verdicts, sooner; a feed waits when a decision "
        "is due and at the end. false: reads wait until a decision is due (max_delay_ms)")
    options: dict[str, Any] = Field(default_factory=dict, description="observer-specific options")


class ReleaseSpec(_Strict):
    """When text reaches the reader."""

    hold_back_tokens: int = Field(
        8, ge=0, description="text is released only once this many newer tokens exist"
    )


class RouteTarget(_Strict):
    """Where a ``route`` action sends the stream."""

    model: str = Field(description="model name at the target (or a local model name)")
    base_url: str | None = Field(None, description="OpenAI-compatible base URL; None: local")
    api_key_env: str | None = Field(
        None, description="environment variable holding the target's API key (never the key)"
    )
    max_tokens: int = Field(32, ge=1, description="most tokens the target writes per segment")
    until: Literal["sentence", "tokens"] = Field(
        "sentence", description="a routed segment ends at the end of the sentence or max_tokens"
    )


class MonitorSpec(_Strict):
    """One monitor in the policy."""

    id: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", description="name in events")
    use: str = Field(description="registered monitor name (`guardrail plugins` lists them)")
    threshold: float | None = Field(
        None, description="score at or above which a token counts; None: the monitor's default"
    )
    rule: RuleSpec = Field(
        default_factory=ThresholdRule,
        description="decision rule; when omitted, the monitor's own default (a monitor may "
                    "ship one, such as a rule calibrated with its weights), else threshold")
    action: Action = Field("flag", description="what a verdict does")
    message: str | None = Field(None, description="shown to the reader on halt")
    route_to: RouteTarget | None = Field(None, description="target of the route action")
    on_error: OnError | None = Field(None, description="overrides the policy's on_error")
    timeout_ms: float | None = Field(
        None, gt=0, description="per-chunk time budget; an overrun counts as a monitor error"
    )
    enabled: bool = Field(True, description="false: keep it in the file but don't run it")
    options: dict[str, Any] = Field(default_factory=dict, description="monitor-specific options")

    @model_validator(mode="after")
    def _route_needs_target(self) -> MonitorSpec:
        if self.action == "route" and self.route_to is None:
            raise ValueError("action 'route' needs route_to")
        return self


class AuditSpec(_Strict):
    """Opt-in audit trail: every flag, halt, route and error as JSON Lines."""

    path: str = Field(
        min_length=1,
        description="JSON Lines file to append to (missing folders are created); no '..' parts",
    )
    fsync: bool = Field(
        False, description="also fsync each line (survives power loss, not just a killed process)"
    )

    @field_validator("path")
    @classmethod
    def _no_parent_parts(cls, path: str) -> str:
        # The file lands where the path says: a '..' could walk out of the folder it names
        # (and have folders created there); write the real folder instead.
        if ".." in PurePath(path).parts or ".." in PureWindowsPath(path).parts:
            raise ValueError("the audit path may not contain '..' parts; give the folder itself")
        return path


class Policy(_Strict):
    """A guard policy (``version: 1``)."""

    version: Literal[1] = Field(1, description="policy format version")
    observer: ObserverSpec | None = Field(
        None, description="hidden-state observer; needed by monitors that read model states"
    )
    release: ReleaseSpec = Field(default_factory=ReleaseSpec, description="hold-back window")
    on_error: OnError = Field("fail_closed", description="what a failing monitor does")
    halt_message: str = Field(DEFAULT_HALT_MESSAGE, description="default message on halt")
    raise_on_halt: bool = Field(
        False, description="adapters raise GuardrailViolation instead of a final halt chunk"
    )
    audit: AuditSpec | None = Field(None, description="opt-in JSON Lines audit trail")
    monitors: list[MonitorSpec] = Field(default_factory=list, description="monitors, in order")

    _lines: dict[tuple[str | int, ...], int] = PrivateAttr(default_factory=dict)
    _source: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _unique_ids(self) -> Policy:
        seen: set[str] = set()
        for spec in self.monitors:
            if spec.id in seen:
                raise ValueError(f"duplicate monitor id {spec.id!r}")
            seen.add(spec.id)
        return self

    def line_of(self, path: tuple[str | int, ...]) -> int | None:
        """The YAML line (1-based) of the deepest part of ``path`` that the source file has."""
        for n in range(len(path), -1, -1):
            line = self._lines.get(path[:n])
            if line is not None:
                return line
        return None

    @property
    def source(self) -> str | None:
        return self._source

    def narrowed(self, monitor_ids: list[str]) -> Policy:
        """A copy that keeps only the named monitors (``--monitor ID``)."""
        known = [m.id for m in self.monitors]
        missing = [i for i in monitor_ids if i not in known]
        if missing:
            raise PolicyError(
                [PolicyIssue("monitors", f"no monitor with id {i!r}; policy has {known}")
                 for i in missing],
                self._source,
            )
        copy = self.model_copy(
            update={"monitors": [m for m in self.monitors if m.id in monitor_ids]}
        )
        copy._lines, copy._source = self._lines, self._source
        return copy

    def to_yaml(self) -> str:
        """The policy as YAML that loads back to the same policy: every field that was set (a
        field left out keeps meaning "the default", e.g. a monitor's own rule), and each rule in
        full, its ``kind`` included."""
        data = self.model_dump(mode="json", exclude_unset=True)
        for spec, out in zip(self.monitors, data.get("monitors") or (), strict=False):
            if "rule" in spec.model_fields_set:
                out["rule"] = spec.rule.model_dump(mode="json")
        # non-ASCII stays escaped: PyYAML writes some (U+0085) raw and reads them back as breaks
        return yaml.safe_dump(data, sort_keys=False)


def format_path(loc: tuple[str | int, ...]) -> str:
    """``("monitors", 0, "rule", "k")`` -> ``monitors[0].rule.k``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


Path_ = tuple[str | int, ...]


def _line_map(node: yaml.Node, path: Path_ = ()) -> dict[Path_, int]:
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value if isinstance(key, yaml.ScalarNode) else str(key.value)
            lines[(*path, k)] = key.start_mark.line + 1
            sub = _line_map(value, (*path, k))
            sub.pop((*path, k), None)
            lines.update(sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, (*path, i)))
    return lines


# pydantic adds the tag of a union member to the location; users never wrote it.
_UNION_TAGS = {"threshold", "count", "consecutive", "span_max"}


def _clean_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    out: list[str | int] = []
    for i, part in enumerate(loc):
        if i > 0 and loc[i - 1] == "rule" and part in _UNION_TAGS:
            continue
        if isinstance(part, str) and re.fullmatch(r"function-\w+\[.*\]", part):
            continue
        out.append(part)
    return tuple(out)


def _validate(data: Any, lines: dict[tuple[str | int, ...], int], source: str | None) -> Policy:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise PolicyError(
            [PolicyIssue("", f"a policy is a mapping, got {type(data).__name__}", lines.get(()))],
            source,
        )
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        issues = []
        for err in exc.errors():
            loc = _clean_loc(tuple(err["loc"]))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            elif err["type"] == "union_tag_invalid":
                msg = "unknown rule kind; use one of threshold, count, consecutive, span_max"
            line = None
            for n in range(len(loc), -1, -1):
                if loc[:n] in lines:
                    line = lines[loc[:n]]
                    break
            issues.append(PolicyIssue(format_path(loc), msg, line))
        raise PolicyError(issues, source, data=data, lines=lines) from None
    policy._lines = lines
    policy._source = source
    return policy


def load_policy(source: str | Path | Mapping[str, Any]) -> Policy:
    """Load and validate a policy from a YAML file path, a YAML string, or a mapping.

    Raises ``PolicyError`` listing every problem with its field path and line.
    """
    if isinstance(source, Mapping):
        return _validate(dict(source), {}, None)
    name: str | None
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                     and source.endswith((".yaml", ".yml", ".json"))):
        path = Path(source)
        name = str(path)
        try:
            if path.stat().st_size > MAX_POLICY_BYTES:  # don't read a huge file to refuse it
                raise PolicyError([PolicyIssue("", f"the policy is larger than "
                                                   f"{MAX_POLICY_BYTES} bytes")], name)
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyError([PolicyIssue("", f"file not found: {path}")], name) from None
        except UnicodeDecodeError as exc:
            raise PolicyError([PolicyIssue("", f"not UTF-8 text: {exc}")], name) from None
    else:
        text, name = str(source), None
    if len(text) > MAX_POLICY_BYTES // 4 and len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise PolicyError([PolicyIssue("", f"the policy is larger than {MAX_POLICY_BYTES} "
                                           "bytes")], name)
    try:
        _check_shape(text)  # before building anything: the checks below are linear in the text
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([PolicyIssue("", f"YAML syntax error: {problem}", line)], name) from None
    except _ShapeError as exc:
        raise PolicyError([PolicyIssue("", exc.message, exc.line)], name) from None
    lines = _line_map(node) if node is not None else {}
    return _validate(data, lines, name)


class _ShapeError(Exception):
    def __init__(self, message: str, line: int) -> None:
        self.message, self.line = message, line


def _check_shape(text: str) -> None:
    """Refuse, from the YAML event stream (iterative, nothing built yet), nesting deeper than
    ``MAX_NESTING``, lists longer than ``MAX_LIST_ITEMS`` and aliases that would add more than
    ``MAX_ALIAS_NODES`` nodes in all: each anchor's expanded size is known when it closes, and
    each alias adds it."""
    sizes: dict[str, int] = {}  # anchor -> nodes it expands to
    stack: list[list[Any]] = []  # open collections: [anchor, nodes so far, items, is a list]
    aliased = 0

    def add(n: int, line: int) -> None:
        if stack:
            stack[-1][1] += n
            stack[-1][2] += 1
            if stack[-1][2] > (MAX_LIST_ITEMS if stack[-1][3] else 2 * MAX_LIST_ITEMS):
                what = "list" if stack[-1][3] else "mapping"
                raise _ShapeError(f"a {what} with more than {MAX_LIST_ITEMS} items", line)

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.AliasEvent):
            if any(frame[0] == event.anchor for frame in stack):
                raise _ShapeError(f"alias *{event.anchor} refers to a value that contains it",
                                  line)
            size = sizes.get(event.anchor or "", 1)
            aliased += size
            if aliased > MAX_ALIAS_NODES:
                raise _ShapeError(
                    f"aliases expand past {MAX_ALIAS_NODES} nodes (alias *{event.anchor}); "
                    "write the values out instead", line)
            add(size, line)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor:
                sizes[event.anchor] = 1
            add(1, line)
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_NESTING:
                raise _ShapeError(f"nested deeper than {MAX_NESTING} levels", line)
            stack.append([event.anchor, 1, 0, isinstance(event, yaml.SequenceStartEvent)])
        elif isinstance(event, yaml.CollectionEndEvent) and stack:
            anchor, size, _, _ = stack.pop()
            if anchor:
                sizes[anchor] = size
            add(size, line)


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file."""
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "guardrail policy"
    return schema


def policy_json_schema_text() -> str:
    return json.dumps(policy_json_schema(), indent=2)


def policy_markdown() -> str:
    """The policy reference in Markdown, generated from the pydantic models (docs/policy.md)."""
    schema = Policy.model_json_schema()
    defs = schema.get("$defs", {})
    out = [
        "# Policy reference",
        "",
        "Generated from the schema by `guardrail schema --markdown`; do not edit by hand.",
        "A policy is YAML, read with `yaml.safe_load`; `guardrail check FILE` validates one and",
        "names every error with its field path and line.",
        "",
        f"Limits, each refused with the line it stops at: a file of at most {MAX_POLICY_BYTES:,}",
        f"bytes, nesting at most {MAX_NESTING} levels deep, aliases adding at most "
        f"{MAX_ALIAS_NODES:,} nodes in all",
        f"(no YAML bombs) and none inside its own anchor, lists of at most {MAX_LIST_ITEMS:,} "
        "items (a keyword",
        "or regex monitor's words too). `Policy.to_yaml()` writes a policy that loads back the "
        "same.",
        "",
    ]

    def type_of(prop: dict[str, Any]) -> str:
        if "$ref" in prop:
            return prop["$ref"].rsplit("/", 1)[-1]
        if "enum" in prop:
            return " \\| ".join(f"`{v}`" for v in prop["enum"])
        if "const" in prop:
            return f"`{prop['const']}`"
        if "anyOf" in prop:
            return " or ".join(type_of(p) for p in prop["anyOf"])
        if "oneOf" in prop:
            return " or ".join(type_of(p) for p in prop["oneOf"])
        if prop.get("type") == "array":
            return f"list of {type_of(prop.get('items', {}))}"
        return str(prop.get("type", "any"))

    def table(title: str, model: dict[str, Any]) -> None:
        out.extend([f"## {title}", "", (model.get("description") or "").strip(), "",
                    "| field | type | default | description |", "|---|---|---|---|"])
        required = set(model.get("required", []))
        for name, prop in model.get("properties", {}).items():
            if name in required:
                default = "required"
            elif "default" in prop:
                default = f"`{json.dumps(prop['default'])}`"
            else:
                default = "its defaults" if "$ref" in prop else "empty"
            desc = (prop.get("description") or "").replace("|", "\\|")
            out.append(f"| `{name}` | {type_of(prop)} | {default} | {desc} |")
        out.append("")

    table("Policy", schema)
    for name in ("ObserverSpec", "ReleaseSpec", "MonitorSpec", "RouteTarget", "AuditSpec",
                 "ThresholdRule", "CountRule", "ConsecutiveRule", "SpanMaxRule"):
        if name in defs:
            table(name, defs[name])
    return "\n".join(out).rstrip() + "\n"
