"""guardrail serve --ray without starting Ray: the deploy file, the command-line overrides and the
refusals, through the CLI and the public loader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="guardrail serve --ray needs ray[serve] "
                    "(pip install 'guardrail-server[ray]')")

from guardrail_server.ray import load_deploy_config

from guardrail import GuardrailError
from guardrail.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _doc_deploy_file() -> str:
    text = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "proxy:" in b]
    return block


def test_the_deploy_file_in_the_docs_loads_as_written(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(_doc_deploy_file())
    config = load_deploy_config(path)
    assert (config.proxy.replicas, config.observer.replicas, config.observer.num_gpus) == (2, 2, 1)
    assert config.observer.max_batch_size == 16 and config.observer.idle_timeout_s == 600


@pytest.mark.parametrize("text,named", [
    ("observer:\n  replicas: 0\n", "observer.replicas"),
    ("observer:\n  gpus: 1\n", "observer.gpus"),
    ("proxy: [1, 2]\n", "proxy"),
])
def test_a_bad_deploy_file_names_the_field(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    with pytest.raises(GuardrailError, match=re.escape(named)) as caught:
        load_deploy_config(path)
    assert str(path) in str(caught.value)


def test_command_line_options_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("proxy: {replicas: 3}\nobserver: {replicas: 1, num_gpus: 1}\n")
    config = load_deploy_config(path).with_overrides(observer_replicas=4, proxy_replicas=None)
    assert (config.proxy.replicas, config.observer.replicas, config.observer.num_gpus) == (3, 4, 1)
    with pytest.raises(GuardrailError, match="observer.replicas"):
        config.with_overrides(observer_replicas=0)


def test_ray_serves_an_upstream_not_a_local_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--ray", "--local", "smollm2-135m"]) == 2
    assert "--ray: give --upstream URL" in capsys.readouterr().err


def test_client_keys_are_not_shipped_through_ray(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--ray", "--ray-address", "auto", "--upstream",
                 "http://127.0.0.1:9/v1", "--api-key", "secret-key-1"]) == 2
    err = capsys.readouterr().err
    assert "GUARDRAIL_API_KEYS" in err and "secret-key-1" not in err


def test_a_bad_deploy_file_stops_the_command_before_ray_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("observer:\n  replicas: -1\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nmonitors:\n  - {id: w, use: keywords, action: halt, "
                      "options: {words: [bomb]}}\n")
    assert main(["serve", "--ray", "--upstream", "http://127.0.0.1:9/v1", "--policy",
                 str(policy), "--deploy-config", str(path)]) == 2
    assert "observer.replicas" in capsys.readouterr().err
