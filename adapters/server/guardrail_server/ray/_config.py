"""The deploy file of ``guardrail serve --ray``: replicas and resources of the two deployments.

    proxy:                 # the OpenAI-compatible ingress (guard sessions, monitors, upstream I/O)
      replicas: 2
      num_cpus: 1
    observer:              # the hidden-state model, one KV cache per live stream
      replicas: 2
      num_cpus: 2
      num_gpus: 1          # observer.options.device in the policy says which device the model uses
      max_batch_size: 16   # pending reads gathered into one batch (@serve.batch)
      batch_wait_ms: 2     # how long a batch waits to fill once its first read arrived
      max_streams: 256     # live streams one observer replica holds before refusing new ones

Command-line options (``--proxy-replicas``, ``--observer-gpus`` ...) override the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardrail import GuardrailError

__all__ = ["DeployConfig", "ObserverDeploy", "ProxyDeploy", "load_deploy_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProxyDeploy(_Strict):
    replicas: int = Field(1, ge=1, description="ingress replicas")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per ingress replica")
    max_ongoing_requests: int = Field(64, ge=1, description="streams one ingress replica serves")


class ObserverDeploy(_Strict):
    replicas: int = Field(1, ge=1, description="observer replicas (each its own KV caches)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per observer replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per observer replica")
    max_batch_size: int = Field(16, ge=1, description="reads gathered into one batch")
    batch_wait_ms: float = Field(2.0, ge=0, description="wait for a batch to fill, ms")
    max_streams: int = Field(256, ge=1, description="live streams per observer replica")
    idle_timeout_s: float = Field(600.0, gt=0,
                                  description="a stream unread this long is dropped (leak guard)")


class DeployConfig(_Strict):
    proxy: ProxyDeploy = Field(default_factory=ProxyDeploy)
    observer: ObserverDeploy = Field(default_factory=ObserverDeploy)

    def with_overrides(self, **overrides: Any) -> DeployConfig:
        """A copy with ``proxy_replicas=2``-style overrides (None values are ignored)."""
        data = self.model_dump()
        for key, value in overrides.items():
            if value is None:
                continue
            section, _, field = key.partition("_")
            if section not in data or field not in data[section]:
                raise GuardrailError(f"unknown deploy setting {key!r}")
            data[section][field] = value
        return _validated(data, "command-line options")


def _validated(data: Any, source: str) -> DeployConfig:
    try:
        return DeployConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors())
        raise GuardrailError(f"bad deploy config in {source}: {problems}") from None


def load_deploy_config(path: str | Path | None) -> DeployConfig:
    """The deploy file at ``path`` (None: the defaults); a bad field is named in the error."""
    if path is None:
        return DeployConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GuardrailError(f"cannot read deploy config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise GuardrailError(f"deploy config {path} is not valid YAML: {exc}") from None
    return _validated(data if data is not None else {}, str(path))
