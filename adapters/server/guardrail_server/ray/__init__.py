"""``guardrail serve --ray``: the proxy and the observer as a Ray Serve application.

    guardrail serve --ray --upstream http://127.0.0.1:8080/v1 --policy policy.yaml \\
        --proxy-replicas 2 --observer-replicas 2 --observer-gpus 1

or from Python::

    from ray import serve
    from guardrail_server.ray import DeployConfig, build_app
    serve.run(build_app(policy, "http://127.0.0.1:8080/v1", DeployConfig()), route_prefix="/")

Two kinds of deployment: ``guardrail-proxy`` (the ingress: the same OpenAI-compatible app as
``guardrail serve``, with sessions and monitors) and ``observer-N`` (one per observer replica:
the hidden-state model and the KV cache of each stream pinned to it, reads batched with
``@serve.batch``). Needs ``pip install 'guardrail-server[ray]'``. docs/scaling.md has the
multi-node setup and what happens when a replica is lost.
"""

from __future__ import annotations

from ._app import GuardProxy, ProxySettings, build_app, observer_shard_names
from ._cli import serve_ray_cli
from ._config import DeployConfig, ObserverDeploy, ProxyDeploy, load_deploy_config
from ._remote import RemoteObserver, RemoteStream
from ._shard import ObserverShard

__all__ = [
    "DeployConfig",
    "GuardProxy",
    "ObserverDeploy",
    "ObserverShard",
    "ProxyDeploy",
    "ProxySettings",
    "RemoteObserver",
    "RemoteStream",
    "build_app",
    "load_deploy_config",
    "observer_shard_names",
    "serve_ray_cli",
]
