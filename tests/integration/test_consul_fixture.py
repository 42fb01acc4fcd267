"""The Consul fixture itself: a real agent that elects itself and accepts registrations."""

import pytest

pytestmark = pytest.mark.integration


def test_dev_agent_registers_a_service(consul):
    consul.api("PUT", "/v1/agent/service/register", {"Name": "probe", "ID": "probe-1", "Port": 1234})
    services = consul.api("GET", "/v1/catalog/services")
    assert "probe" in services
    assert consul.api("GET", "/v1/catalog/service/probe")[0]["ServicePort"] == 1234
