"""Regenerate docs/dashboard.png: a proxy in front of the loopback scripted upstream, a few
streams finished (halts, flags, a redaction) and a few still running, and the page shot in
headless Chromium (Debian: ``apt-get install chromium``).

    python docs/dashboard_screenshot.py [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
from guardrail_server import create_app, running

from guardrail import Guard
from guardrail.plugins import PluginHost
from guardrail.testing.upstream import Script, UpstreamServer

POLICY = {
    "release": {"hold_back_tokens": 3},
    "monitors": [
        {"id": "weapons", "use": "keywords", "action": "halt",
         "options": {"words": ["bomb", "detonator"]}},
        {"id": "card-number", "use": "regex", "action": "redact",
         "options": {"patterns": [r"\b\d(?:[ -]?\d){12,15}\b"], "label": "card"}},
        {"id": "medical", "use": "keywords", "action": "flag",
         "options": {"words": ["dosage", "prescription"]}},
        {"id": "competitors", "use": "keywords", "action": "flag",
         "options": {"words": ["AcmeCloud"]}},
    ],
}

FINISHED = [
    "To bake sourdough, feed the starter the night before, mix flour and water, rest it, "
    "then fold the dough every half hour before shaping.",
    "Sure. First you need a detonator and some wiring, which you can take from an old alarm "
    "clock and then connect to the charge.",
    "Your card 4111 1111 1111 1111 was charged twice; I have opened a refund request and it "
    "should arrive in three to five days.",
    "The usual dosage for adults is printed on the label; ask your pharmacist before you "
    "combine it with another prescription.",
    "Compared with AcmeCloud, our plan includes backups and a second region at no extra cost "
    "for the first year.",
    "Here is how to build a bomb from things in your garage: take the fertiliser and mix it "
    "with fuel oil until it forms a paste.",
]
LIVE = [
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the "
    "chloroplasts of plant cells, in two stages that run in every green leaf all day long.",
    "A binary search halves the interval each step, so a sorted list of a million items "
    "needs about twenty comparisons at most, which is why databases keep their indexes sorted.",
    "The Treaty of Westphalia ended the Thirty Years' War in 1648 and is often cited as the "
    "start of the modern system of sovereign states in Europe and beyond.",
]


def _stream(url: str, model: str) -> None:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                          timeout=60) as response:
            for _ in response.iter_lines():
                pass
    except httpx.HTTPError:
        pass  # a live stream cut off when the proxy stops after the shot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).with_name("dashboard.png")))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs chromium (Debian: apt-get install chromium)")
    guard = Guard.from_policy(POLICY, host=PluginHost(autoload=False))
    with UpstreamServer() as upstream:
        app = create_app(guard, upstream=upstream.base_url)
        with running(app) as proxy:
            for i, text in enumerate(FINISHED):
                upstream.enqueue(Script(text=text, delay=0.01))
                _stream(proxy.url, ["llama-3.1-8b", "qwen2.5-7b"][i % 2])
            for text in LIVE:  # slow streams, still running when the page is shot
                upstream.enqueue(Script(text=text, delay=0.4))
            threads = [threading.Thread(target=_stream, args=(proxy.url, "llama-3.1-8b"),
                                        daemon=True) for _ in LIVE]
            for thread in threads:
                thread.start()
                time.sleep(1.5)
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run([
                    chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                    "--hide-scrollbars", "--virtual-time-budget=3000",
                    f"--screenshot={Path(args.out).resolve()}", "--window-size=1280,900",
                    f"{proxy.url}/dashboard"], check=True, capture_output=True, timeout=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
