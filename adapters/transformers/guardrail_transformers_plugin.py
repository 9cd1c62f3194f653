"""Entry point of the ``guardrail`` plugin group for guardrail-transformers: ``guardrail demo``,
which streams the embedded SmolLM2's own answers (and the recorded replays) through the guard.

A module of its own, outside the package, so that loading plugins (every ``guardrail`` start)
does not import torch; the command imports it when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from typing import Any

from guardrail import GuardSession, hookimpl


class EmbeddedSmolLM2:
    """The embedded SmolLM2 as ``guardrail.toolkit.demo.LocalGeneration``."""

    def __init__(self) -> None:
        from guardrail_transformers import default_generator

        self.generator = default_generator()
        self.observer = self.generator.observer

    def guarded(self, session: GuardSession, prompt: str, max_new_tokens: int
                ) -> Iterable[Any]:
        from guardrail_transformers import guarded_stream

        return guarded_stream(session.guard, prompt, generator=self.generator, session=session,
                              max_new_tokens=max_new_tokens)

    def text(self, prompt: str, max_new_tokens: int) -> Iterator[str]:
        from guardrail_transformers import stream_text

        return stream_text(prompt, max_new_tokens=max_new_tokens)


def demo(args: argparse.Namespace) -> int:
    from guardrail.toolkit.demo import run_demo

    return run_demo(args, local=EmbeddedSmolLM2)


@hookimpl
def guardrail_register_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    from guardrail.toolkit.demo import add_demo_args

    p = subparsers.add_parser("demo", help="stream real model output through the default policy")
    add_demo_args(p)
    p.set_defaults(func=demo)
