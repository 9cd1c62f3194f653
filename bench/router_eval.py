"""Router (R2R) quality on the benchmarks page.

The router's evaluation is part of its training run (labelling the SmolLM2 pair takes about ten
minutes on two cores, so it lives in ``make train``, not ``make bench``):

    guardrail train router --results bench/results/router.json --plot docs/router-accuracy.png

This module only checks that those results exist and renders them for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .common import RESULTS, results_dir

NAME = "router"


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(prog="python -m bench.router_eval")
    parser.add_argument("--quick", action="store_true", help="the same: nothing is measured here")
    parser.parse_args(argv)
    path = RESULTS / f"{NAME}.json"
    if not path.exists():
        print(f"[router_eval] {path} is missing: run `guardrail train router --results {path}`",
              file=sys.stderr)
        return None
    if results_dir() != RESULTS:  # a scratch run: the page there shows the training results too
        results_dir().mkdir(parents=True, exist_ok=True)
        shutil.copy(path, results_dir() / path.name)
    print(render(json.loads(path.read_text(encoding="utf-8"))))
    return path


def render(result: dict[str, Any]) -> str:
    from guardrail_router.training.evaluate import render_markdown

    seconds = result.get("seconds", {})
    note = ("_From the training run (`make train`): labels "
            f"{seconds.get('labels', '?')} s, training {seconds.get('training', '?')} s, "
            f"evaluation {seconds.get('evaluation', '?')} s._")
    plot = "![router: answer accuracy against the share of tokens routed](router-accuracy.png)"
    return render_markdown(result).rstrip() + "\n\n" + plot + "\n\n" + note + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
