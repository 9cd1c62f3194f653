"""Benign long-form answers to LongFact prompts (CC-BY-4.0, Copyright 2024 DeepMind).

First version, without the observer: a grammar writes a generic, encyclopaedic answer about the
prompt's subject (taken from the question by stripping its stem) from ~30 sentence templates in
three paragraphs: overview, details, significance. The answers are deliberately vague and make no
checkable claims; they are benign text of the right register and length for the harm monitor and
must not be used as factual data (e.g. for the entity-hallucination probe). Whole LongFact topics
are held out for the test split (``HELDOUT_TOPICS``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .records import Example, group_id

__all__ = ["HELDOUT_TOPICS", "LongFactPrompt", "default_longfact_dir", "longfact_examples",
           "read_longfact", "subject_of", "unused_longfact_prompts"]

HELDOUT_TOPICS = frozenset({"virology", "chemistry", "computer-security", "movies", "prehistory",
                            "international-law"})


def default_longfact_dir() -> Path:
    return Path("/work/shared/data/longfact")


@dataclass(frozen=True)
class LongFactPrompt:
    prompt: str
    topic: str  # file stem without the "longfact-objects_" prefix, e.g. "astronomy"
    subtask: str  # objects or concepts


def read_longfact(root: Path) -> list[LongFactPrompt]:
    """Every prompt under ``root`` (sorted by file, then line)."""
    if not root.is_dir():
        raise FileNotFoundError(f"LongFact folder not found: {root} (pass --longfact DIR)")
    out: list[LongFactPrompt] = []
    for path in sorted(root.glob("*/*.jsonl")):
        subtask, _, topic = path.stem.partition("_")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(LongFactPrompt(json.loads(line)["prompt"].strip(), topic,
                                          subtask.removeprefix("longfact-")))
    return out


_STEM = re.compile(
    r"^(?:(?:can|could|would) you (?:please )?(?:provide|give|share|tell|explain|describe|detail|"
    r"elaborate on|discuss|shed light on|outline|talk about)(?: me| us)?(?: some| more)?"
    r"(?: information| details| an overview| insights?| background)?(?: about| on| of| regarding)?"
    r"(?: what| who| how)?|what (?:can you tell me about|do you know about)"
    r"|(?:what|who) (?:is|are|was|were)|tell me about)\s+"
    r"(?:the (?:concept|notion|idea|principle|role|significance|importance) of\s+)?",
    re.IGNORECASE)
_CUT = re.compile(r"\s+(?:and|in|is|was|are|were|works?|does|do|within|for|on|to)\b|[,;:?]")


def subject_of(prompt: str) -> str:
    """The prompt's subject phrase, or "this subject" when the question has no clear one."""
    first = prompt.split("?")[0].strip()
    rest = _STEM.sub("", first, count=1)
    if rest == first:
        return "this subject"
    cut = _CUT.search(rest)
    subject = (rest[: cut.start()] if cut else rest).strip(" .\"'")
    subject = re.sub(r"^(?:the (?:event|person|company|organization|book|film|game),?\s+)", "the ",
                     subject, flags=re.IGNORECASE)
    words = subject.split()
    return subject if 1 <= len(words) <= 8 else "this subject"


_OVERVIEW = (
    "{Subject} is a well-known topic in {field}.",
    "{Subject} comes up often when people study {field}.",
    "In broad terms, {subject} is best understood by looking at its context and its effects.",
    "People usually first meet {subject} in an introductory course or a general reference work.",
    "There is a large literature on {subject}, from short introductions to detailed studies.",
    "Discussions of {subject} usually begin with a few basic definitions.",
    "The short answer is that {subject} matters because it connects several ideas in {field}.",
)
_DETAIL = (
    "Specialists describe it in more precise terms, but the main ideas are accessible.",
    "Several features are usually emphasised: its origins, how it works, and how it has been used.",
    "Different sources stress different aspects, so it helps to compare a few of them.",
    "Much of what is known comes from careful observation and comparison over many years.",
    "It is often explained with examples, which make the general points concrete.",
    "Scholars have debated some of the details, while agreeing on the broad outline.",
    "Textbooks usually present it step by step, starting from simple cases.",
    "It also has practical sides, which explains why it appears outside academic work.",
    "Some of the terminology can be confusing at first, but it becomes clearer with use.",
    "Comparisons with related topics in {field} help to show what is distinctive about it.",
    "Over time, new evidence and new methods have refined the standard account.",
)
_SIGNIFICANCE = (
    "Its significance lies partly in how it influenced later work in {field}.",
    "For students, it is a good example of how ideas in {field} develop.",
    "Many introductory courses use it to illustrate broader principles.",
    "It continues to be discussed in classrooms, books and public debate.",
    "Anyone interested in {field} will find it a useful point of reference.",
    "Reading a standard reference work is a good next step for a deeper understanding.",
    "In summary, {subject} remains an instructive part of {field}.",
)


def _answer(rng: random.Random, subject: str, field: str) -> str:
    subject_cap = subject[:1].upper() + subject[1:]
    paragraphs = []
    for bank, low, high in ((_OVERVIEW, 2, 4), (_DETAIL, 4, 7), (_SIGNIFICANCE, 2, 4)):
        chosen = rng.sample(bank, rng.randint(low, high))
        paragraphs.append(" ".join(s.format(subject=subject, Subject=subject_cap, field=field)
                                   for s in chosen))
    return "\n\n".join(paragraphs)


def longfact_examples(prompts: list[LongFactPrompt], seed: int, count: int) -> list[Example]:
    """``count`` prompts sampled with ``seed``, each with one generated benign answer."""
    rng = random.Random(f"{seed}:longfact")
    chosen = rng.sample(prompts, min(count, len(prompts)))
    out = []
    for item in sorted(chosen, key=lambda p: (p.topic, p.prompt)):
        answer_rng = random.Random(f"{seed}:longfact:{item.prompt}")
        field = item.topic.replace("-", " ")
        out.append(Example(
            prompt=item.prompt, response=_answer(answer_rng, subject_of(item.prompt), field),
            label=0, source="longfact+generated:longform", group=group_id("prompt", item.prompt),
            kind="benign_longform", holdout=item.topic in HELDOUT_TOPICS,
            extra={"topic": item.topic}))
    return out


def unused_longfact_prompts(prompts: list[LongFactPrompt], seed: int, count: int,
                            ) -> list[LongFactPrompt]:
    """The prompts ``longfact_examples(prompts, seed, count)`` leaves unused, in a fixed shuffle
    (``random.Random(0)``): the order the model's own answers (``own_answers``) and the real-server
    false-halt measurement (bench/real_upstream) take them in."""
    used = {ex.prompt for ex in longfact_examples(prompts, seed, count)}
    rest = [p for p in prompts if p.prompt not in used]
    random.Random(0).shuffle(rest)
    return rest
