"""``Guard``: a validated policy with its monitors and observer loaded, ready to make sessions.

A Guard holds no per-stream state; any number of sessions (threads, tasks) share one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .errors import GuardrailError, MonitorNotFound, ObserverError, PolicyError, PolicyIssue
from .monitor import Message, Monitor, Needs
from .plugins import PluginHost, _OptionsError, build_monitor, get_host
from .policy import MonitorSpec, ObserverSpec, Policy, load_policy
from .prepared import Prepared
from .rules import RuleSpec
from .session import GuardSession
from .stream import Tokenizer, WordTokenizer

__all__ = ["Guard", "build_monitors", "default_policy", "load_checked"]

log = logging.getLogger("guardrail.guard")
_RULE: TypeAdapter[RuleSpec] = TypeAdapter(RuleSpec)


class Guard:
    """Monitors, rules and actions of one policy, loaded once."""

    def __init__(self, policy: Policy, *, host: PluginHost | None = None,
                 observer: Any = None) -> None:
        self.policy = policy
        self.host = host or get_host()
        self.monitors = build_monitors(policy, self.host)
        self.needs_of: dict[str, Needs] = {spec.id: m.needs() for spec, m in self.monitors}
        self.needs = Needs()
        for needs in self.needs_of.values():
            self.needs = self.needs.union(needs)
        self.observer = observer
        if self.observer is None and self.needs.observer:
            self.observer = self._load_observer(policy.observer or ObserverSpec())
        # One scheduler batches all streams' reads; an observer of another class (a wrapper
        # that overrides start or extend) keeps reading per session.
        if getattr(type(self.observer), "batchable", False):
            from .observer.batch import BatchedObserver, default_gather_ms

            spec = policy.observer or ObserverSpec()
            gather = default_gather_ms(spec.max_delay_ms, policy.release.hold_back_tokens)
            self.observer = BatchedObserver(self.observer, workers=spec.options.get("workers"),
                                            gather_ms=spec.options.get("gather_ms", gather))
        self.tokenizer: Tokenizer = getattr(self.observer, "tokenizer", None) or WordTokenizer()
        if self.needs.context:
            self._check_context()

    def _check_context(self) -> None:
        """A monitor that asks for the context's pooled states gets them or the Guard does not
        load: an observer that cannot pool them would hand it nothing, silently."""
        asked = sorted(i for i, needs in self.needs_of.items() if needs.context)
        if getattr(self.observer, "pools_context", False):
            return
        if self.observer is None:
            raise ObserverError(f"monitor(s) {', '.join(asked)} ask for the context's pooled "
                                "states (Needs.context) but read no layers: there is no "
                                "observer to pool them")
        name = getattr(self.observer, "name", type(self.observer).__name__)
        backend = getattr(self.observer, "backend", type(self.observer).__name__)
        raise ObserverError(f"monitor(s) {', '.join(asked)} ask for the context's pooled states "
                            f"(Needs.context), which observer {name!r} (backend {backend!r}) "
                            "cannot give; use the torch or onnx backend")

    @property
    def blocks_event_loop(self) -> bool:
        """Whether a session's reads would block an async driver: an observer whose reads cannot
        be awaited (no ``submit``; the Guard's batched observer has one). Async drivers run such
        a guard in a worker thread by default and await ``afeed``/``afinish`` otherwise."""
        return self.observer is not None and not callable(getattr(self.observer, "submit", None))

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, **kwargs: Any) -> Guard:
        """Load a policy file; raises ``PolicyError`` naming each bad field and its line."""
        return cls(load_checked(Path(path), kwargs.get("host")), **kwargs)

    @classmethod
    def from_policy(cls, policy: Policy | Mapping[str, Any] | str, **kwargs: Any) -> Guard:
        """From a ``Policy``, a mapping, or YAML text."""
        if not isinstance(policy, Policy):
            policy = load_checked(policy, kwargs.get("host"))
        return cls(policy, **kwargs)

    @classmethod
    def default(cls, **kwargs: Any) -> Guard:
        """The built-in default policy: every installed built-in monitor on the embedded default
        observer (``make demo`` uses it)."""
        host = kwargs.get("host") or get_host()
        return cls(default_policy(host), **kwargs)

    def _load_observer(self, spec: ObserverSpec) -> Any:
        observers = self.host.observers()
        if spec.model in observers:
            entry = observers[spec.model]
        elif Path(spec.model).expanduser().exists():
            if "hf" not in observers:
                raise ObserverError("no observer plugin can load local model paths ('hf')")
            entry = observers["hf"]
            spec = spec.model_copy(update={"options": {**spec.options, "path": spec.model}})
        else:
            raise ObserverError(
                f"observer {spec.model!r} is neither a registered observer "
                f"({', '.join(sorted(observers)) or 'none'}) nor a local model path; "
                "fix observer.model in the policy"
            )
        try:
            return entry.factory(spec)
        except ObserverError:
            raise
        except Exception as exc:
            raise ObserverError(
                f"could not load observer {spec.model!r} ({type(exc).__name__}: {exc}); "
                "check observer.model in the policy and that its files are installed"
            ) from exc

    # -- use -------------------------------------------------------------------------------

    def threshold_of(self, spec: MonitorSpec) -> float:
        """The spec's threshold, else the monitor's own default for the spec's action
        (``default_thresholds``), else its ``default_threshold`` (read from the instance: a
        monitor whose weights carry a calibrated threshold sets it when it loads them)."""
        if spec.threshold is not None:
            return spec.threshold
        for s, monitor in self.monitors:
            if s.id == spec.id:
                by_action = getattr(monitor, "default_thresholds", None) or {}
                return float(by_action.get(spec.action, monitor.default_threshold))
        raise KeyError(spec.id)

    def session(
        self,
        messages: Sequence[Message | Any] | None = None,  # any shape normalize_messages reads
        *,
        prompt: str | None = None,
        metadata: dict[str, Any] | None = None,
        record_scores: bool = False,
        can_route: bool = False,
        dry_run: bool = False,
        prepared: Prepared | None = None,
    ) -> GuardSession:
        """A new session for one stream. Pass the conversation as ``messages`` (any OpenAI or
        LangChain shape: content parts, tool calls, ``BaseMessage`` objects; see
        ``guardrail.normalize_messages``) or a single user ``prompt``; observers read it as context
        before the response. An unreadable message raises ``MessageError`` naming it.

        ``can_route``: the driver carries out ``route`` actions (it calls ``session.reroute`` and
        feeds the target's text); otherwise routes are only recorded, like flags.
        ``dry_run``: every verdict becomes a flag (its ``action`` says what it would have done);
        nothing halts, routes or is redacted (evaluation, shadow mode).
        ``prepared``: the conversation's read begun by ``prepare`` with the same messages; the
        session takes it over (and frees it when it ends)."""
        return GuardSession(self, _conversation(messages, prompt), metadata=metadata,
                            record_scores=record_scores, can_route=can_route, dry_run=dry_run,
                            prepared=prepared)

    def prepare(self, messages: Sequence[Message | Any] | None = None, *,
                prompt: str | None = None) -> Prepared:
        """Start the observer's read of a conversation before its stream exists: call it when
        the request goes upstream, and pass the result to ``session(..., prepared=)`` when the
        answer starts, so the read runs while the upstream works on its first token. ``close()``
        it (or use it as a context manager) if no session follows. Empty, and harmless, for a
        guard that reads no layers or whose observer does not batch."""
        return Prepared(self, _conversation(messages, prompt))

    def check(self, text: str, *, prompt: str | None = None,
              messages: Sequence[Message | Any] | None = None) -> Any:
        """Guard a complete text in one go; returns the session's ``Report``."""
        session = self.session(messages, prompt=prompt)
        session.feed(text)
        return session.finish()

    def as_runnable(self, **kwargs: Any) -> Any:
        """A LangChain Runnable that guards a stream: ``prompt | model | guard.as_runnable()``.
        A stream reads the prompt from the model that feeds it; ``invoke`` cannot (the model has
        finished before the guard runs): use ``wrap_model`` or ``messages=`` there.

        Needs the ``guardrail-langchain`` distribution."""
        return self._adapter("as_runnable", "guardrail-langchain")(self, **kwargs)

    def wrap_model(self, model: Any, **kwargs: Any) -> Any:
        """A LangChain chat model and this guard as one Runnable, ``prompt | guard.wrap_model(m)``:
        the monitors read the model's input as the conversation in every mode (``invoke``,
        ``batch``, ``stream``). ``kwargs`` as for ``as_runnable``."""
        return self._adapter("wrap_model", "guardrail-langchain")(self, model, **kwargs)

    def wrap(self, client: Any, **kwargs: Any) -> Any:
        """Wrap an ``openai.OpenAI`` or ``openai.AsyncOpenAI`` client so its chat completions are
        guarded. Needs the ``guardrail-openai`` distribution."""
        return self._adapter("wrap", "guardrail-openai")(self, client, **kwargs)

    def _adapter(self, name: str, dist: str) -> Any:
        """The factory an installed adapter registered for ``Guard.<name>``
        (``guardrail_register_adapters``). A host built without entry-point plugins (tests,
        ``PluginHost(autoload=False)``) falls back to the process-wide one, where adapters load."""
        for host in (self.host, get_host()):
            entry = host.adapters().get(name)
            if entry is not None:
                return entry.factory
        raise GuardrailError(f"Guard.{name} needs an adapter that provides it, such as {dist}: "
                             f"pip install {dist}")

    def warn_routes_recorded(self, driver: str) -> None:
        """Log a warning when this guard has ``route`` actions and ``driver`` (an adapter that
        owns no second model) can only record them as events; a driver that owns the route
        target carries them out (``session(can_route=True)``, docs/concepts.md)."""
        ids = [spec.id for spec, _ in self.monitors if spec.action == "route"]
        if ids:
            log.warning("%s records the route actions of %s as events and does not carry them "
                        "out; a driver that owns the route target does (docs/concepts.md)",
                        driver, ", ".join(repr(i) for i in ids))

    def __repr__(self) -> str:
        ids = ", ".join(spec.id for spec, _ in self.monitors)
        return f"Guard(monitors=[{ids}], observer={getattr(self.observer, 'name', None)!r})"


def _conversation(messages: Sequence[Message | Any] | None,
                  prompt: str | None) -> Sequence[Message | Any]:
    if messages is None:
        return [{"role": "user", "content": prompt}] if prompt is not None else []
    if prompt is not None:
        raise GuardrailError("pass messages or prompt, not both")
    return messages


def load_checked(source: str | Path | Mapping[str, Any], host: PluginHost | None = None
                 ) -> Policy:
    """``load_policy``, except that a policy failing validation is also checked for monitor
    names no installed plugin registers, so one ``PolicyError`` lists both kinds of mistake
    (valid policies get that check from ``build_monitors``)."""
    try:
        return load_policy(source)
    except PolicyError as exc:
        monitors = exc.data.get("monitors") if isinstance(exc.data, Mapping) else None
        if not isinstance(monitors, list):
            raise
        host = host or get_host()
        reported = {issue.path for issue in exc.issues}
        issues = list(exc.issues)
        for i, entry in enumerate(monitors):
            path = f"monitors[{i}].use"
            use = entry.get("use") if isinstance(entry, Mapping) else None
            if not isinstance(use, str) or path in reported:
                continue
            try:
                host.monitor(use)
            except MonitorNotFound as missing:
                issues.append(PolicyIssue(path, str(missing),
                                          exc.lines.get(("monitors", i, "use"))))
        if len(issues) == len(exc.issues):
            raise
        issues.sort(key=lambda issue: (issue.line is None, issue.line or 0))
        raise PolicyError(issues, exc.source, data=exc.data, lines=exc.lines) from None


def build_monitors(
    policy: Policy, host: PluginHost | None = None
) -> list[tuple[MonitorSpec, Monitor]]:
    """Instantiate the policy's enabled monitors; raise ``PolicyError`` for unknown names and bad
    options, each issue naming the field and its line. Loads no observer."""
    host = host or get_host()
    built: list[tuple[MonitorSpec, Monitor]] = []
    issues: list[PolicyIssue] = []
    for i, spec in enumerate(policy.monitors):
        if not spec.enabled:
            continue
        monitor = _build(policy, host, i, spec, issues)
        if monitor is None:
            continue
        outside = _threshold_outside_scores(policy, i, spec, monitor)
        if outside is not None:
            issues.append(outside)
            continue
        built.append((_with_default_rule(policy, i, spec, monitor, issues), monitor))
    if issues:
        raise PolicyError(issues, policy.source)
    return built


def _build(policy: Policy, host: PluginHost, i: int, spec: MonitorSpec,
           issues: list[PolicyIssue]) -> Monitor | None:
    path: tuple[str | int, ...] = ("monitors", i, "use")
    try:
        entry = host.monitor(spec.use)
    except MonitorNotFound as exc:
        issues.append(PolicyIssue(f"monitors[{i}].use", str(exc), policy.line_of(path)))
        return None
    try:
        return build_monitor(entry, spec.options)
    except _OptionsError as exc:
        for rel, message in exc.errors:
            sub = ("monitors", i, "options", *rel)
            dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rel)
            issues.append(PolicyIssue(f"monitors[{i}].options{dotted}", message,
                                      policy.line_of(sub)))
    except ValueError as exc:
        issues.append(PolicyIssue(f"monitors[{i}].options", str(exc),
                                  policy.line_of(("monitors", i, "options"))))
    return None


def _threshold_outside_scores(policy: Policy, i: int, spec: MonitorSpec,
                              monitor: Monitor) -> PolicyIssue | None:
    """The issue when the policy's threshold lies outside the scores the monitor declares
    (``Monitor.score_range``): such a rule never fires, or fires on every token."""
    low_high = getattr(monitor, "score_range", None)
    if spec.threshold is None or low_high is None:
        return None
    low, high = low_high
    if low <= spec.threshold <= high:
        return None
    outcome = "never fire" if spec.threshold > high else "fire on every token"
    return PolicyIssue(
        f"monitors[{i}].threshold",
        f"{spec.threshold:g} is outside the scores {spec.use!r} gives ({low:g} to {high:g}): "
        f"it would {outcome}", policy.line_of(("monitors", i, "threshold")))


def _with_default_rule(policy: Policy, i: int, spec: MonitorSpec, monitor: Monitor,
                       issues: list[PolicyIssue]) -> MonitorSpec:
    """``spec`` with the monitor's own default rule when the policy entry names no ``rule``
    (a harm head calibrated for count-k would otherwise halt on its first flagged token)."""
    default = getattr(monitor, "default_rule", None)
    if default is None or "rule" in spec.model_fields_set:
        return spec
    try:
        rule = _RULE.validate_python(default)
    except ValidationError as exc:
        issues.append(PolicyIssue(f"monitors[{i}].rule",
                                  f"{spec.use!r} has an invalid default rule {default!r}: "
                                  f"{exc.errors()[0]['msg']}",
                                  policy.line_of(("monitors", i))))
        return spec
    return spec.model_copy(update={"rule": rule})


def default_policy(host: PluginHost | None = None) -> Policy:
    """The built-in default policy for what is installed: each monitor registered with
    ``default=True``, by name, with the settings it ships (``Monitor.default_spec``), on the
    embedded default observer."""
    host = host or get_host()
    monitors = []
    for name in sorted(n for n, e in host.monitors().items() if e.default):
        try:  # an installed plugin without its trained weights can't be part of the default
            entry = host.monitor(name)
            spec = dict(getattr(entry.factory, "default_spec", {}) or {})
            spec.setdefault("id", name.split("-")[0])
            spec["use"] = name
            build_monitor(entry, spec.get("options", {}))
        except (GuardrailError, ValueError, OSError) as exc:
            log.warning("default policy leaves out %s: %s", name, exc)
            continue
        monitors.append(spec)
    data: dict[str, Any] = {"version": 1, "monitors": monitors}
    if monitors:
        data["observer"] = {"model": "smollm2-135m"}
    return load_policy(data)
