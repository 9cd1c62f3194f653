"""Entry point of the ``guardrail`` plugin group: the ``router`` monitor and its trainer."""

from __future__ import annotations

from guardrail import hookimpl
from guardrail.hookspecs import RegisterMonitor, RegisterTrainer


@hookimpl
def guardrail_register_monitors(register: RegisterMonitor) -> None:
    register("router", "guardrail_router.monitor:RouterMonitor",
             description="R2R router: tokens where a small model diverges from a reference",
             default=True)


def _train(argv: list[str]) -> int:
    from .training.train import main

    return main(argv)


@hookimpl
def guardrail_register_trainers(register: RegisterTrainer) -> None:
    register("router", _train,
             description="label the offline SmolLM2 pair, train the router and evaluate it")
