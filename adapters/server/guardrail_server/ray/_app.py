"""The Ray Serve application: ``GuardProxy`` (ingress) in front of the observer shards.

``GuardProxy`` serves the very app ``guardrail serve`` serves (``create_app``: the same routes,
SSE translation, hold-back, halts and upstream handling); only its Guard reads hidden states
through ``RemoteObserver`` instead of a model in the process. Keys stay out of Ray's config: a
replica reads ``GUARDRAIL_UPSTREAM_API_KEY`` and ``GUARDRAIL_API_KEYS`` from its own environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve import Application

from guardrail import Guard, Needs, Policy
from guardrail.guard import build_monitors
from guardrail.plugins import PluginHost, get_host
from guardrail.policy import ObserverSpec, load_policy

from .._access import CLIENT_KEYS_ENV, DEFAULT_MAX_BODY_BYTES, keys_from_env
from .._app import create_app
from ._config import DeployConfig
from ._remote import RemoteObserver
from ._shard import ObserverShard

__all__ = ["GuardProxy", "ProxySettings", "build_app", "observer_shard_names", "policy_needs"]

UPSTREAM_KEY_ENV = "GUARDRAIL_UPSTREAM_API_KEY"  # guardrail_server.API_KEY_ENV


@dataclass
class ProxySettings:
    """What every ingress replica is built from (no secrets: those come from the environment).

    ``host_factory`` makes the plugin host monitors and observers are looked up in (default: the
    installed plugins); it must be importable, or picklable by value, on every node."""

    policy: dict[str, Any]
    upstream: str
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    metrics: bool | None = None
    dashboard: bool = True
    timeout_s: float = 60.0
    read_timeout_s: float = 60.0
    host_factory: Callable[[], PluginHost] | None = field(default=None, repr=False)


@serve.ingress()
class GuardProxy:
    """The ingress deployment: one ``create_app`` per replica, its Guard on the shards."""

    def __init__(self, shards: list[Any], settings: ProxySettings) -> None:
        self.shards = shards
        self.settings = settings

    async def __serve_build_asgi_app__(self) -> Any:
        settings = self.settings
        host = settings.host_factory() if settings.host_factory is not None else get_host()
        observer = None
        if self.shards:
            described = await self.shards[0].describe.remote()
            observer = RemoteObserver(self.shards, described, timeout_s=settings.read_timeout_s)
        guard = Guard(load_policy(settings.policy), host=host, observer=observer)
        return create_app(guard, upstream=settings.upstream,
                          api_key=os.environ.get(UPSTREAM_KEY_ENV),
                          client_keys=keys_from_env(os.environ.get(CLIENT_KEYS_ENV)),
                          timeout=settings.timeout_s, max_body_bytes=settings.max_body_bytes,
                          metrics=settings.metrics, dashboard=settings.dashboard)


def observer_shard_names(config: DeployConfig) -> list[str]:
    """The deployment names of the shards: ``observer-0`` ..."""
    return [f"observer-{i}" for i in range(config.observer.replicas)]


def policy_needs(policy: Policy, host: PluginHost) -> Needs:
    needs = Needs()
    for _, monitor in build_monitors(policy, host):
        needs = needs.union(monitor.needs())
    return needs


def build_app(policy: Policy, upstream: str, config: DeployConfig | None = None, *,
              host_factory: Callable[[], PluginHost] | None = None,
              **settings: Any) -> Application:
    """The Serve application for ``serve.run``: ``config.proxy.replicas`` ingress replicas and,
    when the policy reads hidden states, ``config.observer.replicas`` observer shards.
    ``settings``: the other ``ProxySettings`` fields (``max_body_bytes``, ``metrics`` ...)."""
    config = config or DeployConfig()
    host = host_factory() if host_factory is not None else get_host()
    shards: list[Application] = []
    if policy_needs(policy, host).observer:
        obs = config.observer
        spec = (policy.observer or ObserverSpec()).model_dump(mode="json")
        shard_settings = obs.model_dump(include={"max_batch_size", "batch_wait_ms",
                                                 "max_streams", "idle_timeout_s"})
        actor = {"num_cpus": obs.num_cpus, "num_gpus": obs.num_gpus}
        shard: Any = serve.deployment(ObserverShard)
        shards = [
            shard.options(
                name=name, num_replicas=1, ray_actor_options=actor,
                max_ongoing_requests=max(64, obs.max_streams),
            ).bind(spec, shard_settings, host_factory)
            for name in observer_shard_names(config)
        ]
    proxy = config.proxy
    deployment: Any = serve.deployment(GuardProxy)
    ingress = deployment.options(
        name="guardrail-proxy", num_replicas=proxy.replicas,
        ray_actor_options={"num_cpus": proxy.num_cpus},
        max_ongoing_requests=proxy.max_ongoing_requests,
    )
    data = policy.model_dump(mode="json", exclude_unset=True)
    return ingress.bind(shards, ProxySettings(data, upstream, host_factory=host_factory,
                                              **settings))
