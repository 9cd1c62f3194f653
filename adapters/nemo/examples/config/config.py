"""NeMo loads this file with the config directory and calls init(app) once."""

from pathlib import Path

from guardrail_nemo import register


def init(app: object) -> None:
    register(app, policy=str(Path(__file__).with_name("policy.yaml")))
