"""Entry point of the ``guardrail`` plugin group for guardrail-server: ``guardrail serve``.

A module of its own, outside the package, so that loading plugins (every ``guardrail`` start)
does not import the server stack; the command imports it when it runs.
"""

from __future__ import annotations

import argparse

from guardrail import hookimpl
from guardrail.cli import add_policy_args


def serve(args: argparse.Namespace) -> int:
    from guardrail_server import serve_cli

    return int(serve_cli(args))


@hookimpl
def guardrail_register_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible proxy with the guard in front")
    add_policy_args(p)
    p.add_argument("--upstream", help="upstream base URL, e.g. http://127.0.0.1:8011/v1")
    p.add_argument("--local", help="serve a local model instead, e.g. smollm2-135m")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; one other than loopback needs client keys or "
                        "--allow-unauthenticated")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help="a client key callers must send as 'Authorization: Bearer KEY' "
                        "(repeatable; also GUARDRAIL_API_KEYS=KEY1,KEY2, which keeps keys out "
                        "of the process list); never forwarded upstream")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, metavar="N",
                   help="refuse larger request bodies with 413 (default: 4 MiB)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="listen on a non-loopback --host without client keys")
    p.add_argument("--no-metrics", action="store_true",
                   help="no /metrics (on by default when prometheus-client is installed)")
    p.add_argument("--no-dashboard", action="store_true", help="no /dashboard live view")
    p.add_argument("--traces", action="store_true",
                   help="OpenTelemetry spans per stream (needs guardrail-server[otel]): to the "
                        "configured tracer provider, else OTLP when the OTLP exporter is "
                        "installed, else stderr")
    g = p.add_argument_group("Ray Serve (needs guardrail-server[ray]; docs/scaling.md)")
    g.add_argument("--ray", action="store_true",
                   help="serve as a Ray Serve application: proxy replicas in front of observer "
                        "replicas, each stream pinned to one (needs --upstream)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="the Ray cluster to deploy on (auto, ray://head:10001); default: a "
                        "local Ray instance that stops with the command")
    g.add_argument("--deploy-config", metavar="YAML",
                   help="replicas and resources of the proxy and observer deployments")
    g.add_argument("--proxy-replicas", type=int, metavar="N", help="proxy (ingress) replicas")
    g.add_argument("--observer-replicas", type=int, metavar="N",
                   help="observer replicas; each holds the KV caches of its streams")
    g.add_argument("--proxy-cpus", type=float, metavar="N", help="CPUs per proxy replica")
    g.add_argument("--observer-cpus", type=float, metavar="N", help="CPUs per observer replica")
    g.add_argument("--observer-gpus", type=float, metavar="N", help="GPUs per observer replica")
    p.set_defaults(func=serve)
