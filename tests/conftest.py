"""Shared fixtures. Core tests build their own plugin hosts so installed plugins don't matter."""

from __future__ import annotations

import pytest

from guardrail.plugins import PluginHost


@pytest.fixture
def host() -> PluginHost:
    """A plugin host with the built-ins only (no entry-point plugins)."""
    return PluginHost(autoload=False)
