"""Hand-written training sets in the writers' format, turned into the build's examples.

A writer's file is JSON Lines, one answer a line (the format the sets were commissioned in)::

    {"id": "A-001", "prompt": "...", "response": "...", "label": 1, "category": "fraud",
     "kind": "harmful_turn", "harm_start": 212, "style": "chatty"}

``label`` 1 is a harmful answer, 0 a benign one; ``kind`` is ``harmful`` or ``harmful_turn``
(opens benignly, then turns) for label 1 and one of ``BENIGN_KINDS`` for label 0;
``harm_start`` is the char offset in ``response`` where the harm begins (label 1; ``null`` for
label 0). Each file is one source for leave-one-source-out validation: its records carry the
file's tag (``SETS``). Sentences ending after ``harm_start`` are labelled harmful, the ones
before it benign (``records.make_record``), so a benign opening is never taught as harm.
Records are grouped by prompt: every answer to one prompt lands in one split.

An answer to a multi-turn conversation also carries ``messages``, the conversation up to and
including the final user turn, ``[{"role": "user"|"assistant"|"system", "content": str}, ...]``,
whose last item is a user turn equal to ``prompt`` (as in ``guardrail eval`` records, whose check
it shares: ``guardrail.toolkit.records.check_messages``). The record keeps it, and the trainer's
observer reads it as the runtime does; such a record is grouped by its first user message, so
every answer to one conversation (and to every conversation opening with that request) lands in
one split. A conversation of the final user turn alone (or ``null``) is the prompt alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from guardrail.toolkit.records import DataError, check_messages

from .jsonl import jsonl_objects
from .records import Example, group_id, opening

__all__ = ["BENIGN_KINDS", "CATEGORIES", "HARMFUL_KINDS", "ROLES", "SETS", "HandwrittenError",
           "HandwrittenSet", "WAVES", "default_sets", "read_handwritten", "read_sets"]

# ``technical``: a benign answer with no harm topic at all (code, configs, logs: the technical
# set); a harmful answer always names the harm it is in
CATEGORIES = ("violence", "weapons", "drugs", "self-harm", "harassment", "hate", "extremism",
              "fraud", "privacy", "cybercrime", "misinformation", "crime", "technical")
HARMFUL_KINDS = ("harmful", "harmful_turn")
BENIGN_KINDS = ("benign_safety", "benign_medical", "benign_support", "benign_history",
                "benign_fiction", "benign_refusal", "benign_explainer", "benign_news",
                "benign_everyday", "benign_technical")
ROLES = ("system", "user", "assistant")  # the roles of a writer's ``messages``
# shipped file name (in this package's data/) -> its source tag
SETS: dict[str, str] = {
    "handwritten_assist.jsonl": "handwritten:assist-v1",  # assistant-style answers
    "handwritten_plain.jsonl": "handwritten:plain-v1",  # plain human prose
    "handwritten_long.jsonl": "handwritten:long-v1",  # long answers, late turns
    "handwritten_hard.jsonl": "handwritten:hard-v1",  # euphemistic harm, alarming-word benign
    "handwritten_social.jsonl": "handwritten:social-v2",  # messages, posts, chats to send
    "handwritten_turns.jsonl": "handwritten:turns-v2",  # answers that turn, at every depth
    "handwritten_everyday.jsonl": "handwritten:everyday-v3",  # alarming words in everyday life
    "handwritten_support.jsonl": "handwritten:support-v3",  # supportive texts, sensitive topics
    "handwritten_coded.jsonl": "handwritten:coded-v4",  # harm said politely or in code
    "handwritten_assistant.jsonl": "handwritten:assistant-v4",  # chat-assistant formatting
    "handwritten_claims.jsonl": "handwritten:claims-v4",  # misinformation, stereotypes as fact
    "handwritten_messages.jsonl": "handwritten:messages-v5",  # the answer is a short message
    "handwritten_drafted.jsonl": "handwritten:drafted-v5",  # the assistant drafts a message
    "handwritten_followups.jsonl": "handwritten:followups-v6",  # answers after a follow-up turn
    "handwritten_late.jsonl": "handwritten:late-v7",  # harm that turns late or in a helpful form
    "handwritten_curt.jsonl": "handwritten:curt-v8",  # brief follow-ups, rough register
    "handwritten_turned.jsonl": "handwritten:turned-v9",  # helpful openings that turn, fake news
    "handwritten_technical.jsonl": "handwritten:technical-v10",  # code, configs; cybercrime how-tos
}
# The build splits each wave of sets in a pass of its own, so adding a wave leaves the splits
# of the sets before it as they were.
WAVES: dict[str, int] = {"handwritten:social-v2": 2, "handwritten:turns-v2": 2,
                         "handwritten:everyday-v3": 3, "handwritten:support-v3": 3,
                         "handwritten:coded-v4": 4, "handwritten:assistant-v4": 4,
                         "handwritten:claims-v4": 4, "handwritten:messages-v5": 5,
                         "handwritten:drafted-v5": 5, "handwritten:followups-v6": 6,
                         "handwritten:late-v7": 7, "handwritten:curt-v8": 8,
                         "handwritten:turned-v9": 9, "handwritten:technical-v10": 10}


class HandwrittenError(ValueError):
    """A writer's line that does not follow the format (the message names file, line, field)."""


@dataclass(frozen=True)
class HandwrittenSet:
    path: Path
    tag: str
    wave: int = 1  # sets of one wave are split together, after the waves before


def default_sets() -> tuple[HandwrittenSet, ...]:
    """The shipped hand-written sets that are present in the package."""
    here = Path(__file__).parent
    return tuple(HandwrittenSet(here / name, tag, WAVES.get(tag, 1))
                 for name, tag in SETS.items() if (here / name).is_file())


def _check(row: Mapping[str, Any], where: str) -> None:
    def bad(field: str, why: str) -> HandwrittenError:
        return HandwrittenError(f"{where}: field {field!r} {why}")

    for key in ("id", "prompt", "response"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise bad(key, "must be a non-empty string")
    label = row.get("label")
    if label not in (0, 1) or isinstance(label, bool):
        raise bad("label", f"must be 0 or 1, got {label!r}")
    if row.get("category") not in CATEGORIES:
        raise bad("category", f"must be one of {list(CATEGORIES)}, got {row.get('category')!r}")
    if label == 1 and row["category"] == "technical":
        raise bad("category", "must name the harm of a label-1 answer, got 'technical' "
                              "(the category of benign answers with no harm topic)")
    kinds = HARMFUL_KINDS if label == 1 else BENIGN_KINDS
    if row.get("kind") not in kinds:
        raise bad("kind", f"must be one of {list(kinds)} for label {label}, "
                          f"got {row.get('kind')!r}")
    start = row.get("harm_start")
    if label == 0:
        if start is not None:
            raise bad("harm_start", f"must be null for label 0, got {start!r}")
        return
    if not isinstance(start, int) or isinstance(start, bool) or not (
            0 <= start < len(row["response"].rstrip())):
        raise bad("harm_start", f"must be a char offset into the response "
                                f"(0..{len(row['response'].rstrip()) - 1}), got {start!r}")


def _messages(row: Mapping[str, Any], path: Path, line: int
              ) -> tuple[dict[str, str], ...] | None:
    """A checked line's ``messages``, normalised (None without, null, or for the final user turn
    alone): ``guardrail eval``'s check, then the writers' own rules."""
    if row.get("messages") is None:
        return None
    where = f"{path}:{line}"
    try:
        messages = check_messages(path, line, row["messages"], ROLES)
    except DataError as exc:  # it names the file, the line and the message
        raise HandwrittenError(str(exc)) from None
    for i, message in enumerate(messages):
        if not message["content"].strip():
            raise HandwrittenError(f"{where}: field 'messages[{i}].content' must be a "
                                   "non-empty string")
    last = len(messages) - 1
    if messages[last]["role"] != "user":
        raise HandwrittenError(f"{where}: field 'messages[{last}]' must be the final user turn "
                               f"(the answer is 'response'), got role {messages[last]['role']!r}")
    if messages[last]["content"] != row["prompt"]:
        raise HandwrittenError(f"{where}: field 'prompt' must equal the final user turn's "
                               f"content (messages[{last}].content), got {row['prompt'][:60]!r}")
    return messages if len(messages) > 1 else None


def read_handwritten(path: Path, tag: str) -> list[Example]:
    """The examples of one writer's file, all with source ``tag``; raises ``HandwrittenError``
    naming the line and field of the first line that breaks the format, or a repeated id."""
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for n, row in jsonl_objects(path, HandwrittenError):
        where = f"{path}:{n}"
        _check(row, where)
        if row["id"] in seen:
            raise HandwrittenError(f"{where}: field 'id' {row['id']!r} repeats line "
                                   f"{seen[row['id']]}")
        seen[row["id"]] = n
        label = int(row["label"])
        example = Example(
            prompt=row["prompt"], response=row["response"], label=label, source=tag,
            group="", kind=f"handwritten_{row['kind']}",
            harm_start=int(row["harm_start"]) if label == 1 else None,
            extra={"category": row["category"], "style": str(row.get("style") or ""),
                   "writer_id": row["id"]},
            messages=_messages(row, path, n))
        examples.append(replace(example, group=group_id("prompt", opening(example))))
    return examples


def read_sets(sets: Sequence[HandwrittenSet]) -> list[Example]:
    """Every example of ``sets``, in order."""
    return [ex for s in sets for ex in read_handwritten(s.path, s.tag)]
