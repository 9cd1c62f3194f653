"""Memory over many sessions: closed and aborted streams free their observer KV cache at once.

    python -m bench.observer_rss           # 10,000 sessions (bench/results/observer_rss.json)
    python -m bench.observer_rss --quick    # 300 sessions

A Guard with one monitor that reads layer 1 of a tiny random Llama (guardrail.testing; 4 layers,
hidden 32: the KV cache costs 512 bytes a token) serves ``SESSIONS`` short streams (a prompt of
the tiny corpus, 20-60 tokens of answer fed in small deltas) from ``WORKERS`` threads, so reads
share batched forwards; every third stream is aborted half way. The process's resident set size is
sampled ``SAMPLES`` times: *flat* means its growth after the warm-up is noise, not a
per-session cost.

*Kept sessions*: the driver keeps every finished session object (as an app that holds them for an
audit would). With the cache released at close, what stays is the session's own record; with the
release turned off (the scheme before: a cache lived as long as its session object), each kept
session also keeps its KV cache.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from .common import write_result

NAME = "observer_rss"
SESSIONS = 10_000
QUICK_SESSIONS = 300
KEPT = 2_000
QUICK_KEPT = 100
WORKERS = 4
SAMPLES = 20  # RSS samples over a run


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _guard(model_dir: Path) -> Any:
    from guardrail import Features, Guard, Monitor, Needs, Score
    from guardrail.testing import plugin_monitors

    class LayerOneMonitor(Monitor):
        """Reads layer 1 (so every stream is read by the observer); scores its mean."""

        def __init__(self, options: Any = None) -> None:
            pass

        def needs(self) -> Needs:
            return Needs(layers=frozenset({1}))

        def update(self, state: Any, features: Features) -> list[Score]:
            rows = features.hidden[1]
            return [Score(i, float(r.mean())) for i, r in zip(features.indices, rows,
                                                               strict=True)]

    policy = {"observer": {"model": str(model_dir), "window": 256},
              "release": {"hold_back_tokens": 4},
              "monitors": [{"id": "l1", "use": "layer-one", "threshold": 0.99,
                            "action": "flag"}]}
    with plugin_monitors(layer_one=LayerOneMonitor) as host:
        return Guard.from_policy(policy, host=host)


def _texts() -> list[tuple[str, list[str]]]:
    from guardrail.testing.tiny_models import CORPUS

    out = []
    for k in range(len(CORPUS) // 4):
        prompt = CORPUS[k].split(".")[0]
        answer = " ".join(CORPUS[(k + j) % 10] for j in range(1 + k % 3))
        words = answer.split(" ")
        out.append((prompt, [w + " " for w in words]))
    return out


def _serve(guard: Any, n: int, *, keep: list[Any] | None = None,
           samples: list[dict[str, Any]] | None = None) -> None:
    """``n`` sessions from ``WORKERS`` threads; every third aborted half way."""
    texts = _texts()
    lock = threading.Lock()
    counter = [0]

    def work() -> None:
        while True:
            with lock:
                k = counter[0]
                if k >= n:
                    return
                counter[0] += 1
            prompt, deltas = texts[k % len(texts)]
            session = guard.session(prompt=prompt)
            cut = len(deltas) // 2 if k % 3 == 2 else len(deltas)
            for delta in deltas[:cut]:
                session.feed(delta)
            if cut < len(deltas):
                session.abort("client gone")
            else:
                session.finish()
            if keep is not None:
                with lock:
                    keep.append(session)
            if samples is not None and (k + 1) % max(1, n // SAMPLES) == 0:
                gc.collect()
                with lock:
                    samples.append({"sessions": k + 1, "rss_mb": round(rss_mb(), 1),
                                    "live_streams": guard.observer.live_streams(),
                                    "cached_tokens": guard.observer.cached_tokens()})

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _slope_kb(samples: list[dict[str, Any]], start: int) -> float:
    """Least-squares RSS growth in KB per 1,000 sessions, from ``start`` sessions on."""
    pts = [(s["sessions"], s["rss_mb"] * 1024) for s in samples if s["sessions"] >= start]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return 1000 * sum((x - mx) * (y - my) for x, y in pts) / var


def _kept(guard: Any, n: int, release: bool) -> dict[str, Any]:
    """RSS growth while ``n`` finished sessions stay referenced."""
    observer = guard.observer
    keep: list[Any] = []
    if not release:  # the scheme before: a stream's cache lived as long as its session object
        observer.release = keep.append
    gc.collect()
    before = rss_mb()
    _serve(guard, n, keep=keep)
    gc.collect()
    after = rss_mb()
    held = observer.cached_tokens()
    if not release:
        del observer.release
    out = {"sessions": n, "release": release, "rss_before_mb": round(before, 1),
           "rss_after_mb": round(after, 1),
           "kb_per_session": round(1024 * (after - before) / n, 2),
           "cached_tokens_held": held}
    keep.clear()
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sessions", type=int, default=None)
    args = parser.parse_args(argv)
    n = args.sessions or (QUICK_SESSIONS if args.quick else SESSIONS)
    kept = QUICK_KEPT if args.quick else KEPT
    from guardrail.testing.tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        guard = _guard(build_tiny_model(Path(tmp) / "llama", arch="llama"))
        _serve(guard, 50)  # warm-up: allocator pools, the batched steps
        samples: list[dict[str, Any]] = []
        _serve(guard, n, samples=samples)
        warm = min(1000, n // 5)
        flat = {"sessions": n, "samples": samples, "slope_kb_per_1000": _slope_kb(samples, warm),
                "rss_first_mb": samples[0]["rss_mb"] if samples else None,
                "rss_last_mb": samples[-1]["rss_mb"] if samples else None,
                "live_streams_after": guard.observer.live_streams()}
        kept_rows = [_kept(guard, kept, release=True), _kept(guard, kept, release=False)]
    return write_result(NAME, {"quick": args.quick, "workers": WORKERS, "flat": flat,
                               "kept": kept_rows, "load_average": os.getloadavg()[0]})


def render(result: dict[str, Any]) -> str:
    flat = result["flat"]
    rows = {r["release"]: r for r in result["kept"]}
    out = [
        "## Memory over many sessions: the observer's KV caches",
        "",
        f"{flat['sessions']:,} short streams (every third aborted half way) from "
        f"{result['workers']} threads on one Guard, a tiny random Llama observer "
        "(bench/observer_rss.py). Resident set size "
        f"{flat['rss_first_mb']:.0f} MB after {flat['samples'][0]['sessions']:,} sessions and "
        f"{flat['rss_last_mb']:.0f} MB after {flat['sessions']:,} "
        f"({flat['slope_kb_per_1000']:+.0f} KB per 1,000 sessions after the warm-up); "
        f"{flat['live_streams_after']} observer streams live at the end.",
        "",
    ]
    if True in rows and False in rows:
        on, off = rows[True], rows[False]
        out += [
            f"Keeping {on['sessions']:,} finished session objects referenced: "
            f"{on['kb_per_session']:.1f} KB each with the cache released at close "
            f"({on['cached_tokens_held']} cached tokens held), {off['kb_per_session']:.1f} KB "
            f"each without (the scheme before; {off['cached_tokens_held']:,} cached tokens "
            "held).", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
