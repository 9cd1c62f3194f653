"""Reports of guarded streams: an HTML page per stream (token heatmap per monitor with hover
scores, the events list) and PNG plots of score timelines against thresholds.

HTML needs nothing beyond the standard library; plots need matplotlib (the ``report`` extra) and
are skipped with a note when it is missing.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..events import Event, event_to_dict
from ..session import Report

__all__ = ["StreamRecord", "plot_roc", "plot_scores", "render_html", "write_index",
           "write_stream_report"]


@dataclass
class StreamRecord:
    """Everything a report shows about one guarded stream."""

    title: str
    prompt: str
    text: str
    offsets: list[tuple[int, int]]
    report: Report
    thresholds: dict[str, float]
    seconds_per_token: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def scores(self) -> dict[str, list[tuple[int, float]]]:
        return self.report.scores


def _colour(score: float, threshold: float) -> str:
    """Background colour: white below half the threshold, to red at and above it."""
    x = max(0.0, min(1.0, score / threshold if threshold > 0 else score))
    if x < 0.5:
        return "transparent"
    alpha = 0.15 + 0.75 * (x - 0.5) / 0.5
    return f"rgba(220, 38, 38, {alpha:.2f})"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}
.tokens{white-space:pre-wrap;line-height:1.9;font-family:ui-monospace,monospace;
 border:1px solid #ddd;padding:.8em;border-radius:6px}
.tok{border-radius:3px}.tok.flag{text-decoration:underline wavy #b91c1c}
.tok.held{opacity:.35}.tok.halt{outline:2px solid #111}
.tok.route{text-decoration:underline double #1d4ed8}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
.muted{color:#666}code{background:#f4f4f4;padding:0 .2em}
"""


def _token_classes(i: int, flagged: set[int], released: int, halt_at: int | None,
                   routed: set[int]) -> list[str]:
    """The CSS classes of token ``i``: flagged, held back, where the halt fired, routed."""
    marks = [("flag", i in flagged), ("held", i >= released), ("halt", i == halt_at),
             ("route", i in routed)]
    return ["tok", *(name for name, on in marks if on)]


def render_html(rec: StreamRecord) -> str:
    """One self-contained HTML page for a stream."""
    rep = rec.report
    flagged: dict[str, set[int]] = {}
    for f in rep.flags:
        for i in range(f.tokens[0], f.tokens[1] + 1):
            flagged.setdefault(f.monitor, set()).add(i)
    routed = {r.at for r in rep.routes}
    halt_at = rep.halt.at if rep.halt else None
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(rec.title)}</title>",
             f"<style>{_CSS}</style><h1>{html.escape(rec.title)}</h1>",
             f"<p class=muted>Prompt: {html.escape(rec.prompt)}</p>"]
    summary = {
        "tokens read": rep.tokens,
        "tokens released": rep.released_tokens,
        "held back at the end": rep.tokens - rep.released_tokens,
        "halted": f"yes, by {rep.halt.monitor} at token {rep.halt.at}" if rep.halt else "no",
        "flags": len(rep.flags),
        "routes": len(rep.routes),
    }
    if rec.seconds_per_token is not None:
        summary["guard time per token"] = f"{rec.seconds_per_token * 1000:.2f} ms"
    parts.append("<table>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in summary.items()) + "</table>")
    monitors = list(rec.scores) or ["(no scores)"]
    for monitor in monitors:
        by_index = dict(rec.scores.get(monitor, []))
        threshold = rec.thresholds.get(monitor, 0.5)
        parts.append(f"<h2>{html.escape(monitor)} <span class=muted>(threshold "
                     f"{threshold:g})</span></h2><div class=tokens>")
        for i, (a, b) in enumerate(rec.offsets):
            score = by_index.get(i)
            classes = _token_classes(i, flagged.get(monitor, set()), rep.released_tokens,
                                     halt_at, routed)
            title = f"token {i}" + (f" · score {score:.3f}" if score is not None else "")
            style = f"background:{_colour(score, threshold)}" if score is not None else ""
            parts.append(f'<span class="{" ".join(classes)}" title="{title}" '
                         f'style="{style}">{html.escape(rec.text[a:b])}</span>')
        parts.append("</div>")
    parts.append("<p class=muted>Faded tokens never reached the reader; a box marks where a halt "
                 "fired; wavy underlines are flags; double underlines are routed tokens.</p>")
    listed: list[Event] = [*rep.flags, *rep.routes, *rep.errors]
    if rep.halt:
        listed.append(rep.halt)
    events = [event_to_dict(e) for e in listed]
    parts.append("<h2>Events</h2><table><tr><th>kind</th><th>monitor</th><th>details</th></tr>")
    for e in events:
        details = {k: v for k, v in e.items() if k not in ("kind", "monitor", "released_text")}
        parts.append(f"<tr><td>{e['kind']}</td><td>{html.escape(str(e.get('monitor')))}</td>"
                     f"<td><code>{html.escape(json.dumps(details))}</code></td></tr>")
    parts.append("</table>")
    for note in rec.notes:
        parts.append(f"<p class=muted>{html.escape(note)}</p>")
    return "\n".join(parts)


def plot_scores(path: Path, rec: StreamRecord) -> bool:
    """PNG of each monitor's score per token against its threshold; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=110)
    for monitor, points in sorted(rec.scores.items()):
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        line = ax.plot(xs, ys, label=monitor, lw=1.2)[0]
        ax.axhline(rec.thresholds.get(monitor, 0.5), color=line.get_color(), ls="--", lw=0.8)
    if rec.report.halt is not None and rec.report.halt.at >= 0:
        ax.axvline(rec.report.halt.at, color="black", lw=1.5, label="halt")
    if rec.report.released_tokens < rec.report.tokens:
        ax.axvspan(rec.report.released_tokens, rec.report.tokens, color="grey", alpha=0.15,
                   label="not released")
    ax.set_xlabel("token")
    ax.set_ylabel("score")
    ax.set_title(rec.title[:90], fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_roc(path: Path, curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
             title: str) -> bool:
    """PNG of ROC curves, one per name (labels, scores), AUC in the legend. False without
    matplotlib or when no curve has both classes."""
    from .metrics import roc_auc, roc_curve

    drawable = {name: c for name, c in curves.items() if 0 < sum(c[0]) < len(c[0])}
    if not drawable:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(4.8, 4.4), dpi=110)
    for name, (labels, scores) in sorted(drawable.items()):
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, lw=1.4, label=f"{name} (AUC {roc_auc(labels, scores):.3f}, "
                                         f"n={len(labels)})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title[:80], fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_stream_report(out_dir: Path, stem: str, rec: StreamRecord) -> list[Path]:
    """Write ``<stem>.html`` (and ``<stem>.png`` when matplotlib is there); return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / f"{stem}.html"
    html_path.write_text(render_html(rec), encoding="utf-8")
    paths = [html_path]
    png = out_dir / f"{stem}.png"
    if plot_scores(png, rec):
        paths.append(png)
    return paths


def write_index(out_dir: Path, rows: Sequence[Mapping[str, Any]], title: str = "guardrail demo",
                images: Sequence[str] = ()) -> Path:
    """An index page linking every stream report, with one summary row each (and ``images``,
    file names in ``out_dir``, shown above the table)."""
    keys = list(rows[0]) if rows else []
    body = "".join(
        "<tr>" + "".join(
            f'<td><a href="{html.escape(str(r["report"]))}">{html.escape(str(r[k]))}</a></td>'
            if k == "stream" else f"<td>{html.escape(str(r[k]))}</td>" for k in keys
            if k != "report") + "</tr>" for r in rows)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys if k != "report")
    pictures = "".join(f'<img src="{html.escape(i)}" alt="{html.escape(i)}">' for i in images)
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style><h1>{html.escape(title)}</h1>{pictures}"
            f"<table><tr>{head}</tr>{body}</table>")
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
