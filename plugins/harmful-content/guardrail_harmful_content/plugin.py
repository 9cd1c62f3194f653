"""Entry point of the ``guardrail`` plugin group: the ``harmful-content`` monitor and trainer."""

from __future__ import annotations

from guardrail import hookimpl
from guardrail.hookspecs import RegisterMonitor, RegisterTrainer


@hookimpl
def guardrail_register_monitors(register: RegisterMonitor) -> None:
    register("harmful-content", "guardrail_harmful_content.monitor:HarmfulContentMonitor",
             description="SCM streaming content monitor: halts a harmful answer early",
             default=True)


def _train(argv: list[str]) -> int:
    from .training.train import main

    return main(argv)


@hookimpl
def guardrail_register_trainers(register: RegisterTrainer) -> None:
    register("harmful-content", _train,
             description="build the offline data, train SCM's dual head and calibrate count-k")
