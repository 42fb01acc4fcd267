"""Fixtures shared by all test folders."""

from __future__ import annotations

import pytest

from tests.support.procs import consul_agent


@pytest.fixture
def consul(tmp_path):
    """A fresh real Consul dev agent on free loopback ports."""
    with consul_agent(tmp_path / "consul") as agent:
        yield agent
