"""The operators' live view: ``LiveView`` collects what the page shows, ``DASHBOARD_HTML`` is the
page (self-contained: inline CSS and JS, no CDN) that polls ``/dashboard.json`` once a second.

Only text that readers were shown appears here: the context around a verdict is cut from the
session's ``Release`` events (already redacted), so a halt's withheld tail, a redacted span or a
span still held back never reaches the page. Monitor error messages are not shown either (an
exception can carry a URL or a key); their type is.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from guardrail.events import Error, Flag, Halt, Release, Route
from guardrail.telemetry import GuardListener

if TYPE_CHECKING:
    from guardrail import Guard, GuardSession, Report
    from guardrail.events import Event

__all__ = ["DASHBOARD_HTML", "LiveView"]

CONTEXT_CHARS = 80  # released text shown on each side of a verdict, and of a span itself
RATE_WINDOW = 300.0  # seconds behind the per-minute rates
MAX_STREAMS = 50  # live streams listed (the oldest first)


@dataclass
class _Stream:
    """What the view keeps about one live stream."""

    id: str
    model: str | None
    started: float
    session: GuardSession
    starts: list[int] = field(default_factory=list)  # release start offsets (sorted)
    releases: list[tuple[int, int, str]] = field(default_factory=list)
    flags: int = 0
    flagged_by: set[str] = field(default_factory=set)

    def released(self, a: int, b: int, skip: tuple[int, int] | None = None) -> str:
        """Released text for raw offsets ``[a, b)``. A release whose text a redaction changed
        is shown whole (its text is already masked, its offsets no longer line up), except
        when it overlaps ``skip`` (the verdict's own span shows it)."""
        out: list[str] = []
        i = max(0, bisect.bisect_right(self.starts, a) - 1)
        for start, end, text in self.releases[i:]:
            if start >= b:
                break
            if end <= a:
                continue
            if len(text) == end - start:
                out.append(text[max(a, start) - start:min(b, end) - start])
            elif skip is None or not (start < skip[1] and end > skip[0]):
                out.append(text)
        return "".join(out)

    @property
    def released_to(self) -> int:
        return self.releases[-1][1] if self.releases else 0


@dataclass
class _Item:
    """A recent halt, flag, route or error, with the released text around it."""

    time: float
    session: str
    model: str | None
    kind: str
    monitor: str
    score: float | None
    detail: str
    span: tuple[int, int] | None
    stream: _Stream | None  # while the stream lives: its text is still being released
    before: str = ""
    text: str = ""
    after: str = ""
    hidden: str = ""  # why the span's own text is not shown

    def resolve(self, ended: bool) -> None:
        stream = self.stream
        if stream is None or self.span is None:
            return
        a, b = self.span
        if self.kind == "halt":  # its "text": what readers got at or after its token
            b = max(a, stream.released_to)
        self.before = stream.released(max(0, a - CONTEXT_CHARS), a, (a, b))[-CONTEXT_CHARS:]
        text = stream.released(a, b)
        self.text = text if len(text) <= CONTEXT_CHARS else text[:CONTEXT_CHARS] + "…"
        self.after = ("" if self.kind == "halt" else
                      stream.released(b, b + CONTEXT_CHARS, (a, b))[:CONTEXT_CHARS])
        if self.kind == "halt":
            self.hidden = "withheld from the reader"
        elif stream.released_to < b:
            self.hidden = "never released" if ended else "held back"
        else:
            self.hidden = ""
        if ended:
            self.stream = None

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time, "session": self.session, "model": self.model,
                "kind": self.kind, "monitor": self.monitor, "score": self.score,
                "detail": self.detail, "before": self.before, "text": self.text,
                "after": self.after, "hidden": self.hidden}


@dataclass
class _Rates:
    flags: int = 0
    halts: int = 0
    routes: int = 0
    errors: int = 0
    streams_flagged: int = 0
    streams_halted: int = 0
    recent_flags: deque[float] = field(default_factory=deque)
    recent_halts: deque[float] = field(default_factory=deque)


class LiveView(GuardListener):
    """Live streams, recent verdicts and per-monitor rates of one guard, for ``/dashboard``."""

    def __init__(self, recent: int = 50) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._recent: deque[_Item] = deque(maxlen=recent)
        self._rates: dict[str, _Rates] = {}
        self._monitors: list[dict[str, str]] = []
        self._started_at = time.time()
        self.started_total = self.ended_total = self.halted_total = self.aborted_total = 0
        self.tokens_total = 0

    def attach(self, guard: Guard) -> LiveView:
        super().attach(guard)
        self._monitors = [{"id": s.id, "use": s.use, "action": s.action}
                          for s, _ in guard.monitors]
        self._rates = {s.id: _Rates() for s, _ in guard.monitors}
        return self

    # -- listener ----------------------------------------------------------------------------

    def started(self, session: GuardSession) -> None:
        model = session.metadata.get("model")
        stream = _Stream(session.id, model if isinstance(model, str) else None, time.time(),
                         session)
        with self._lock:
            self._streams[session.id] = stream
            self.started_total += 1

    def event(self, event: Event, session: GuardSession) -> None:
        with self._lock:
            stream = self._streams.get(session.id)
            if stream is None:
                return
            if isinstance(event, Release):
                stream.starts.append(event.start)
                stream.releases.append((event.start, event.end, event.text))
                return
            now = time.time()
            rates = self._rates.setdefault(event.monitor, _Rates())
            item: _Item
            if isinstance(event, Flag):
                stream.flags += 1
                stream.flagged_by.add(event.monitor)
                rates.flags += 1
                rates.recent_flags.append(now)
                item = self._item(stream, "flag", event.monitor, event.score,
                                  f"{event.action} · {event.rule}"
                                  + (f" · {event.label}" if event.label else ""), event.span)
            elif isinstance(event, Halt):
                rates.halts += 1
                rates.recent_halts.append(now)
                item = self._item(stream, "halt", event.monitor, event.score,
                                  f"token {event.at} · {event.retracted_tokens} tokens withheld",
                                  (event.at_char, event.at_char))
            elif isinstance(event, Route):
                rates.routes += 1
                item = self._item(stream, "route", event.monitor, event.score,
                                  f"to {event.target.get('model', '?')} at token {event.at}",
                                  (event.at_char, event.at_char))
            elif isinstance(event, Error):
                rates.errors += 1
                item = self._item(stream, "error", event.monitor, None,
                                  f"{event.error_type} · {event.outcome}", None)
            else:
                return
            item.resolve(ended=False)
            self._recent.append(item)

    def _item(self, stream: _Stream, kind: str, monitor: str, score: float | None,
              detail: str, span: tuple[int, int] | None) -> _Item:
        return _Item(time.time(), stream.id, stream.model, kind, monitor, score, detail, span,
                     stream)

    def ended(self, session: GuardSession, report: Report) -> None:
        with self._lock:
            stream = self._streams.pop(session.id, None)
            self.ended_total += 1
            self.halted_total += report.halted
            self.aborted_total += bool(report.aborted) and not report.halted
            self.tokens_total += report.tokens
            if stream is None:
                return
            for monitor in stream.flagged_by:
                self._rates.setdefault(monitor, _Rates()).streams_flagged += 1
            if report.halt is not None:
                self._rates.setdefault(report.halt.monitor, _Rates()).streams_halted += 1
            for item in self._recent:
                if item.stream is stream:
                    item.resolve(ended=True)

    # -- the page's data ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything ``/dashboard.json`` returns."""
        now = time.time()
        with self._lock:
            streams = sorted(self._streams.values(), key=lambda s: s.started)
            live = []
            for stream in streams[:MAX_STREAMS]:
                session = stream.session
                live.append({
                    "session": stream.id, "model": stream.model,
                    "age_seconds": round(now - stream.started, 1),
                    "tokens": session.tokens, "released_tokens": session.released_tokens,
                    "flags": stream.flags, "halted": session.halted is not None,
                    "tail": stream.released(max(0, stream.released_to - CONTEXT_CHARS),
                                            stream.released_to)[-CONTEXT_CHARS:],
                })
            for item in self._recent:
                item.resolve(ended=False)
            recent = [item.to_dict() for item in reversed(self._recent)]
            ended = self.ended_total
            monitors = []
            for info in self._monitors or [{"id": m, "use": "", "action": ""}
                                           for m in self._rates]:
                rates = self._rates.get(info["id"], _Rates())
                for times in (rates.recent_flags, rates.recent_halts):
                    while times and times[0] < now - RATE_WINDOW:
                        times.popleft()
                window = min(RATE_WINDOW, max(now - self._started_at, 1.0)) / 60
                monitors.append({
                    **info, "flags": rates.flags, "halts": rates.halts,
                    "routes": rates.routes, "errors": rates.errors,
                    "flag_rate": rates.streams_flagged / ended if ended else 0.0,
                    "halt_rate": rates.streams_halted / ended if ended else 0.0,
                    "flags_per_min": round(len(rates.recent_flags) / window, 2),
                    "halts_per_min": round(len(rates.recent_halts) / window, 2),
                })
            return {
                "time": now, "uptime_seconds": round(now - self._started_at, 1),
                "totals": {"started": self.started_total, "ended": ended,
                           "active": len(self._streams), "halted": self.halted_total,
                           "aborted": self.aborted_total,
                           "tokens": self.tokens_total + sum(s.session.tokens for s in streams)},
                "streams": live, "recent": recent, "monitors": monitors,
            }


DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>guardrail · live</title>
<style>
:root{--bg:#0f1419;--card:#182029;--fg:#d8dee6;--dim:#8795a5;--halt:#ff6b6b;--flag:#f5c451;
--route:#6bb7ff;--ok:#5fd38d;--line:#263241}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.4 system-ui,sans-serif}
header{display:flex;align-items:baseline;gap:16px;padding:14px 20px;
border-bottom:1px solid var(--line)}
h1{font-size:18px;margin:0}h2{font-size:14px;margin:0 0 8px;color:var(--dim);font-weight:600;
text-transform:uppercase;letter-spacing:.05em}
#status{color:var(--dim)}
main{display:grid;grid-template-columns:1fr 1fr;gap:14px;padding:14px 20px}
section{background:var(--card);border-radius:8px;padding:12px 14px;min-width:0}
.wide{grid-column:1/-1}
.totals{display:flex;gap:26px}.totals div b{display:block;font-size:24px}
.totals div span{color:var(--dim);font-size:12px}
table{width:100%;border-collapse:collapse}
th,td{text-align:left;padding:4px 6px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--dim);font-weight:500;font-size:12px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.mono{font-family:ui-monospace,monospace;font-size:12px}
.nowrap,.mono,td.num{white-space:nowrap}
.kind{font-weight:700;text-transform:uppercase;font-size:11px}
.halt{color:var(--halt)}.flag{color:var(--flag)}.route{color:var(--route)}.error{color:var(--dim)}
.ctx{font-family:ui-monospace,monospace;font-size:12px;color:var(--dim);white-space:pre-wrap;
word-break:break-word}
.ctx mark{background:#3a3212;color:var(--flag);padding:0 1px}
.ctx .cut{color:var(--halt);font-weight:700}
.ctx .hid{color:var(--dim);font-style:italic}
.empty{color:var(--dim);font-style:italic}
</style></head>
<body>
<header><h1>guardrail · live</h1><span id="status">connecting…</span></header>
<main>
<section class="wide"><div class="totals" id="totals"></div></section>
<section><h2>Live streams</h2><table><thead><tr><th>session</th><th>model</th>
<th class="num">age</th><th class="num">read</th><th class="num">released</th>
<th class="num">flags</th><th>latest released text</th></tr></thead><tbody id="streams"></tbody>
</table></section>
<section><h2>Per monitor</h2><table><thead><tr><th>monitor</th><th>action</th>
<th class="num">flags</th><th class="num">halts</th><th class="num">flag rate</th>
<th class="num">halt rate</th><th class="num">flags/min</th><th class="num">halts/min</th>
</tr></thead><tbody id="monitors"></tbody></table></section>
<section class="wide"><h2>Recent halts and flags</h2><table><thead><tr><th>when</th>
<th>kind</th><th>monitor</th><th class="num">score</th><th>session</th><th>detail</th>
<th>released text around the verdict</th></tr></thead><tbody id="recent"></tbody></table>
</section>
</main>
<script>
"use strict";
// Every value goes in through textContent: stream text and model names are untrusted.
function el(tag, text, cls){const e=document.createElement(tag);
  if(text!==undefined&&text!==null)e.textContent=String(text);if(cls)e.className=cls;return e;}
function row(cells){const tr=document.createElement("tr");
  for(const c of cells){tr.appendChild(c instanceof Node?c:el("td",c));}return tr;}
function num(v){return el("td",v,"num");}
function pct(v){return (100*v).toFixed(1)+"%";}
function fill(id, rows, cols){const body=document.getElementById(id);body.replaceChildren();
  if(!rows.length){const td=el("td","none yet","empty");td.colSpan=cols;
    body.appendChild(row([td]));}
  for(const r of rows)body.appendChild(r);}
function context(item){const td=el("td",null,"ctx");td.appendChild(el("span",item.before));
  if(item.text){td.appendChild(el("mark",item.text));}
  if(item.kind==="halt"){td.appendChild(el("span"," ✂ halted ","cut"));}
  if(item.hidden&&item.kind!=="halt"){td.appendChild(el("span"," ["+item.hidden+"] ","hid"));}
  td.appendChild(el("span",item.after));return td;}
function render(d){
  const t=d.totals,tot=document.getElementById("totals");tot.replaceChildren();
  for(const [k,v] of [["active streams",t.active],["started",t.started],["ended",t.ended],
      ["halted",t.halted],["aborted",t.aborted],["tokens read",t.tokens]]){
    const box=el("div");box.appendChild(el("b",v));box.appendChild(el("span",k));
    tot.appendChild(box);}
  fill("streams",d.streams.map(s=>row([el("td",s.session,"mono"),el("td",s.model||"","nowrap"),
    num(s.age_seconds.toFixed(1)+" s"),
    num(s.tokens),num(s.released_tokens),num(s.flags),el("td",s.tail,"ctx")])),7);
  fill("monitors",d.monitors.map(m=>row([el("td",m.id,"mono"),m.action,num(m.flags),num(m.halts),
    num(pct(m.flag_rate)),num(pct(m.halt_rate)),num(m.flags_per_min),num(m.halts_per_min)])),8);
  fill("recent",d.recent.map(i=>row([el("td",new Date(i.time*1000).toLocaleTimeString(),"nowrap"),
    el("td",i.kind,"kind "+i.kind),el("td",i.monitor,"mono"),
    num(i.score===null?"":i.score.toFixed(3)),el("td",i.session,"mono"),i.detail,context(i)])),7);
  document.getElementById("status").textContent="up "+Math.round(d.uptime_seconds)+" s · updated "
    +new Date(d.time*1000).toLocaleTimeString();}
async function poll(){
  try{const r=await fetch("dashboard.json",{cache:"no-store",credentials:"same-origin"});
    if(!r.ok)throw new Error("HTTP "+r.status);render(await r.json());}
  catch(e){document.getElementById("status").textContent="disconnected: "+e.message;}
  setTimeout(poll,1000);}
poll();
</script>
</body></html>
"""
