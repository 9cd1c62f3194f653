"""``guardrail serve --ray``: deploy the application on Ray and serve until interrupted.

Without ``--ray-address`` a local Ray instance starts (and stops with the command); with one
(``auto``, ``ray://head:10001``) the application is deployed on that cluster, and stays up until
this command is interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

import ray
from ray import serve

from guardrail import GuardrailError
from guardrail.plugins import get_host

from .._access import CLIENT_KEYS_ENV
from ._app import build_app, policy_needs
from ._config import DeployConfig, load_deploy_config

__all__ = ["deploy_config_from_args", "serve_ray_cli"]

APP_NAME = "guardrail"


def deploy_config_from_args(args: argparse.Namespace) -> DeployConfig:
    config = load_deploy_config(getattr(args, "deploy_config", None))
    return config.with_overrides(
        proxy_replicas=getattr(args, "proxy_replicas", None),
        observer_replicas=getattr(args, "observer_replicas", None),
        proxy_num_cpus=getattr(args, "proxy_cpus", None),
        observer_num_cpus=getattr(args, "observer_cpus", None),
        observer_num_gpus=getattr(args, "observer_gpus", None),
    )


def serve_ray_cli(args: argparse.Namespace, keys: list[str], max_body_bytes: int) -> int:
    """Deploy and serve until SIGINT or SIGTERM; returns the exit status. ``keys``: the client
    keys the caller checked (from ``--api-key`` and ``GUARDRAIL_API_KEYS``)."""
    from guardrail.cli import policy_from_args  # --policy, --monitor

    if not args.upstream or args.local:
        print("guardrail serve --ray: give --upstream URL (--local is not served on Ray)",
              file=sys.stderr)
        return 2
    address = getattr(args, "ray_address", None)
    if address and getattr(args, "api_key", None):
        print("guardrail serve --ray: with --ray-address, set the client keys as "
              f"{CLIENT_KEYS_ENV} in the cluster nodes' environment, not with --api-key (Ray "
              "would keep them in the cluster's config)", file=sys.stderr)
        return 2
    try:
        config = deploy_config_from_args(args)
        policy = policy_from_args(args)
        observed = policy_needs(policy, get_host()).observer
        app = build_app(policy, args.upstream, config, max_body_bytes=max_body_bytes,
                        metrics=False if getattr(args, "no_metrics", False) else None,
                        dashboard=not getattr(args, "no_dashboard", False))
    except GuardrailError as exc:
        print(f"guardrail serve: {exc}", file=sys.stderr)
        return 2
    if keys and not address:  # local workers inherit this process's environment
        os.environ[CLIENT_KEYS_ENV] = ",".join(keys)
    # "local": a new instance even when `ray start` left one running on this machine
    ray.init(address=address or "local", include_dashboard=False if not address else None,
             logging_level=logging.WARNING)
    stop = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        observers = (f"{config.observer.replicas} observer" if observed
                     else "no observer (the policy reads no hidden states)")
        print(f"guardrail serve --ray: http://{args.host}:{args.port}/v1 -> {args.upstream} "
              f"({config.proxy.replicas} proxy, {observers} replicas; "
              f"client keys: {len(keys) or 'none'})", file=sys.stderr)
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        if not address:
            serve.shutdown()
        ray.shutdown()
    return 0
