"""Entry point of the ``guardrail`` plugin group: the ``entity-hallucination`` monitor and its
trainer (``guardrail train entity-hallucination``)."""

from __future__ import annotations

from guardrail import hookimpl
from guardrail.hookspecs import RegisterMonitor, RegisterTrainer


@hookimpl
def guardrail_register_monitors(register: RegisterMonitor) -> None:
    register("entity-hallucination",
             "guardrail_entity_hallucination.monitor:EntityHallucinationMonitor",
             description="linear head on hidden states: flags fabricated entities (one "
             "score per entity, span max)", default=True)


def _train(argv: list[str]) -> int:
    from .training.train import main

    return main(argv)


@hookimpl
def guardrail_register_trainers(register: RegisterTrainer) -> None:
    register("entity-hallucination", _train,
             description="build the offline data, train the entity probe on SmolLM2, evaluate it")
