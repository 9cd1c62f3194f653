"""Where guardrail keeps what it builds or fetches: converted models, wheels, feature caches."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$GUARDRAIL_CACHE`` or ``~/.cache/guardrail``: converted models, wheels, feature caches."""
    root = os.environ.get("GUARDRAIL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "guardrail"
