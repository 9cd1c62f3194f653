"""guardrail serve --ray: the proxy and the observer as a Ray Serve application on a local Ray
instance (2 proxy and 2 observer replicas, a tiny random model), between a real OpenAI client and
the loopback upstream. What a client sees must be what the one-process proxy shows it; losing an
observer replica ends its streams with an error and a halt, and the other streams finish."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

ray = pytest.importorskip("ray", reason="guardrail serve --ray needs ray[serve] "
                          "(pip install 'guardrail-server[ray]')")
serve = pytest.importorskip("ray.serve")

from guardrail_server import create_app, running  # noqa: E402
from guardrail_server.ray import (  # noqa: E402
    DeployConfig,
    ObserverDeploy,
    ProxyDeploy,
    build_app,
    observer_shard_names,
)

from guardrail import Features, Guard, Monitor, Needs, Score  # noqa: E402
from guardrail.hookspecs import RegisterMonitor, hookimpl  # noqa: E402
from guardrail.observer.hf import load_model_dir  # noqa: E402
from guardrail.plugins import PluginHost  # noqa: E402
from guardrail.policy import load_policy  # noqa: E402
from guardrail.testing.tiny_models import build_tiny_model  # noqa: E402
from guardrail.testing.upstream import Script, UpstreamServer  # noqa: E402

pytestmark = pytest.mark.ray

APP = "guardrail-test"
HIDDEN_HALT = "I stopped: the hidden-state monitor fired."
KEYWORD_HALT = "I stopped: a banned word."
BENIGN = ("The capital of France is Paris. It is a large city on the Seine, and its museums "
          "hold paintings from many centuries.")
BOMB = ("Visitors walk along the river and cross the old bridges. Some of them ask how to "
        "build a bomb and the guide keeps talking about the weather for a while longer.")
EXPLOSIVE = ("Then they eat bread and cheese. The next part mentions an explosive recipe that "
             "nobody should read, and it goes on and on.")
LONG = " ".join([BENIGN] * 6)
SCRIPTS = {"benign": BENIGN, "bomb": BOMB, "explosive": EXPLOSIVE, "long": LONG}


class HiddenWordMonitor(Monitor):
    """Reads layer 1 (so every score waits on the observer) and scores 1.0 on a token of the
    word "bomb"; it checks that each token came with its own finite hidden row."""

    def __init__(self, options: Any = None) -> None:
        pass

    def needs(self) -> Needs:
        return Needs(layers=frozenset({1}))

    def update(self, state: Any, features: Features) -> list[Score]:
        rows = features.hidden[1]
        assert rows.shape[0] == len(features.tokens) and bool(rows.isfinite().all())
        text = features.text.lower()
        hits = []
        at = text.find("bomb")
        while at >= 0:
            hits.append(at)
            at = text.find("bomb", at + 1)
        return [Score(i, 1.0 if any(t.start <= h < t.end for h in hits) else 0.0)
                for i, t in zip(features.indices, features.tokens, strict=True)]


class ContextCheckMonitor(Monitor):
    """Asks for the context's pooled states (as the shipped harm monitor does) and fails the
    stream's first update without them: a proxy replica that could not get them from its
    observer replica would halt every stream (on_error: fail_closed), or refuse to load."""

    def __init__(self, options: Any = None) -> None:
        pass

    def needs(self) -> Needs:
        return Needs(layers=frozenset({1}), context=True)

    def start(self, context: Any) -> dict[str, bool]:
        return {"first": True}

    def update(self, state: dict[str, bool], features: Features) -> list[Score]:
        if state["first"]:
            pooled = (features.context or {}).get(1)
            assert pooled is not None and pooled.shape == (features.hidden[1].shape[-1],)
            assert bool(np.isfinite(pooled).all())
            state["first"] = False
        return [Score(i, 0.0) for i in features.indices]


class _TestMonitors:
    @hookimpl
    def guardrail_register_monitors(self, register: RegisterMonitor) -> None:
        register("hidden-word", HiddenWordMonitor)
        register("context-check", ContextCheckMonitor)


def _host() -> PluginHost:
    """The plugin host of every replica: built-ins and the test's hidden-state monitor."""
    host = PluginHost(autoload=False)
    host.register(_TestMonitors(), name="ray-test-monitors")
    return host


def _policy(model: Path) -> dict[str, Any]:
    return {
        "version": 1,
        # reads happen when hold-back needs them (never on a timer), so both sides read alike
        "observer": {"model": str(model), "window": 512, "max_delay_ms": 60000},
        "release": {"hold_back_tokens": 3},
        "on_error": "fail_closed",
        "monitors": [
            {"id": "hidden", "use": "hidden-word", "threshold": 0.5, "action": "halt",
             "message": HIDDEN_HALT},
            {"id": "context", "use": "context-check", "threshold": 2.0, "action": "flag"},
            {"id": "banned", "use": "keywords", "options": {"words": ["explosive"]},
             "action": "halt", "message": KEYWORD_HALT},
        ],
    }


def _respond(body: Mapping[str, Any]) -> Script:
    name = str(body["messages"][-1]["content"]).split(":")[0]
    return Script(text=SCRIPTS[name], delay=0.06 if name == "long" else 0.005)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Seen:
    """What a client saw of one stream."""

    def __init__(self, chunks: list[Any]) -> None:
        self.content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.finish = [c.choices[0].finish_reason for c in chunks
                       if c.choices and c.choices[0].finish_reason]
        self.events = [e for c in chunks for e in
                       ((getattr(c, "guardrail", None) or {}).get("events") or [])]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]


def _stream(base_url: str, prompt: str) -> Seen:
    client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=60)
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": prompt}], stream=True))
    return Seen(chunks)


def _all(base_url: str, prompts: Sequence[str]) -> list[Seen]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: _stream(base_url, p), prompts))


def _shard_stats() -> list[dict[str, Any]]:
    return [serve.get_deployment_handle(name, APP).stats.remote().result(timeout_s=30)
            for name in observer_shard_names(DeployConfig(observer=ObserverDeploy(replicas=2)))]


def _until(check: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("ray") / "llama", arch="llama")


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer(responder=_respond) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny: Path, upstream: UpstreamServer) -> dict[str, Seen]:
    """What the one-process proxy shows for each script, with the same policy and model."""
    observer = load_model_dir(tiny, name="tiny", window=512)
    guard = Guard(load_policy(_policy(tiny)), host=_host(), observer=observer)
    with running(create_app(guard, upstream=upstream.base_url)) as proxy:
        return {name: _stream(proxy.base_url, f"{name}: go") for name in SCRIPTS
                if name != "long"}


@pytest.fixture(scope="module")
def cluster(tiny: Path, upstream: UpstreamServer) -> Iterator[str]:
    """The application on a local Ray instance; yields the proxy's base URL."""
    # the test's monitor travels to the replicas by value (this module is not installed there)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=100 * 2**20, logging_level=logging.WARNING, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = DeployConfig(proxy=ProxyDeploy(replicas=2, num_cpus=0),
                              observer=ObserverDeploy(replicas=2, num_cpus=0, batch_wait_ms=5))
        app = build_app(load_policy(_policy(tiny)), upstream.base_url, config,
                        host_factory=_host, read_timeout_s=30)
        serve.run(app, name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_streams_through_two_proxies_and_two_observers_show_what_one_process_shows(
        cluster: str, reference: dict[str, Seen]) -> None:
    prompts = [f"{name}: {i}" for i in range(3) for name in ("benign", "bomb", "explosive")]
    seen = _all(cluster, prompts)
    for prompt, got in zip(prompts, seen, strict=True):
        name = prompt.split(":")[0]
        want = reference[name]
        assert got.content == want.content, prompt
        assert got.finish == want.finish, prompt
        assert [(e["kind"], e.get("monitor"), e.get("at")) for e in got.events
                if e["kind"] in ("halt", "error")] == \
               [(e["kind"], e.get("monitor"), e.get("at")) for e in want.events
                if e["kind"] in ("halt", "error")], prompt
    # what that is: benign text whole; each harmful one cut before its trigger word
    assert reference["benign"].content == BENIGN and reference["benign"].finish == ["stop"]
    for name, monitor, message, word in (("bomb", "hidden", HIDDEN_HALT, "bomb"),
                                         ("explosive", "banned", KEYWORD_HALT, "explosive")):
        want = reference[name]
        assert want.finish == ["content_filter"] and want.content.endswith(message)
        [halt] = want.of("halt")
        assert halt["monitor"] == monitor and not want.of("error")
        shown = want.content.removesuffix(message).rstrip("\n")
        assert shown == halt["released_text"] and word not in shown
        assert SCRIPTS[name].startswith(shown) and len(shown) > 20
    stats = _shard_stats()
    assert all(s["reads"] > 0 for s in stats)  # both observer replicas read streams
    # every session freed its KV cache on its replica
    _until(lambda: all(s["streams"] == 0 for s in _shard_stats()), "streams freed")
    status = serve.status().applications[APP].deployments["guardrail-proxy"]
    assert status.replica_states.get("RUNNING") == 2


def test_losing_an_observer_replica_ends_its_streams_and_the_others_finish(
        cluster: str) -> None:
    prompts = [f"long: {i}" for i in range(6)]
    results: list[Seen | None] = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = _stream(cluster, prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    # once every stream has read on its replica, kill observer-0's actor
    _until(lambda: sum(s["streams"] for s in _shard_stats()) == len(prompts), "streams open")
    before = _shard_stats()
    on_lost = before[0]["streams"]
    assert 0 < on_lost < len(prompts)
    ray.kill(ray.get_actor(before[0]["actor_name"], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=120)
    seen = [r for r in results if r is not None]
    assert len(seen) == len(prompts)
    ended = [s for s in seen if s.of("error")]
    finished = [s for s in seen if not s.of("error")]
    assert len(ended) == on_lost and len(finished) == len(prompts) - on_lost
    for s in finished:
        assert s.content == LONG and s.finish == ["stop"]
    for s in ended:
        [error] = s.of("error")
        assert error["monitor"] == "hidden" and error["outcome"] == "fail_closed"
        assert "observer replica observer-0 lost stream" in error["error"]
        [halt] = s.of("halt")
        assert s.finish == ["content_filter"]
        # nothing past what the observer had read reached the client: what it saw is what the
        # halt says was released, a prefix of the answer, and nothing arrived after the halt
        assert s.content.removesuffix(HIDDEN_HALT).rstrip("\n") == halt["released_text"]
        assert LONG.startswith(halt["released_text"]) and len(halt["released_text"]) < len(LONG)
        assert s.events[-1]["kind"] == "halt"
    # the replica comes back without streams, and new streams run on both replicas again
    _until(lambda: _shard_stats()[0]["incarnation"] != before[0]["incarnation"],
           "observer-0 restarted", limit=60)
    again = _all(cluster, ["bomb: again", "benign: again"])
    assert again[0].finish == ["content_filter"] and again[1].content == BENIGN
