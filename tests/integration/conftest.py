"""The HAProxy a test module runs on: every supported release unless the module names fewer.

A test (or a module fixture) that asks for `haproxy` runs once per release in the module's
`HAPROXY_VERSIONS` (default: all of tests.support.haproxy_versions.SUPPORTED), with ids such as
`haproxy3.4`, so `-k haproxy3.4` picks one release. Tests that do not ask run once.
"""

from __future__ import annotations

import pytest

from tests.support.haproxy_versions import SUPPORTED, HAProxyBinary, binary


def pytest_generate_tests(metafunc):
    if "haproxy" in metafunc.fixturenames:
        versions = getattr(metafunc.module, "HAPROXY_VERSIONS", SUPPORTED)
        metafunc.parametrize("haproxy", versions, indirect=True, scope="module", ids=lambda v: f"haproxy{v}")


@pytest.fixture(scope="module")
def haproxy(request) -> HAProxyBinary:
    return binary(request.param)
