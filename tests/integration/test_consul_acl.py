"""The edge against a Consul agent with ACLs on and `default_policy = "deny"`: ACL surprises never
empty the route table, the cause is logged, and the token comes from a file, never from argv."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration.edge_helpers import answers, logged, register, reloads
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import ConsulAgent, free_ports, wait_until

pytestmark = pytest.mark.integration
DOMAIN = "acl.example"
READ_ALL = 'node_prefix "" { policy = "read" } service_prefix "" { policy = "read" }'
SERVICES_ONLY = 'service_prefix "" { policy = "read" }'


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = ConsulAgent(tmp_path_factory.mktemp("consul-acl"), http_port=free_ports(1)[0], acl=True).start()
    wait_until(lambda: a.api("GET", "/v1/catalog/nodes"), 20, what="the agent's node in the catalog")
    yield a
    a.stop()


def token(agent, name: str, rules: str) -> dict:
    agent.api("PUT", "/v1/acl/policy", {"Name": name, "Rules": rules})
    return agent.api("PUT", "/v1/acl/token", {"Description": f"edge test {name}", "Policies": [{"Name": name}]})


@pytest.fixture(scope="module")
def backend():
    b = Backend("acl-backend")
    yield b
    b.close()


@pytest.fixture(scope="module")
def served(agent, backend, tmp_path_factory):
    """An edge reading with a full read token from a file, serving `guarded-80`."""
    register(agent, "guarded", "guarded-1", backend)
    secret = token(agent, "edge-read", READ_ALL)
    path = tmp_path_factory.mktemp("token") / "edge.token"
    path.write_text(secret["SecretID"] + "\n")
    edge = EdgeProcess(agent.url, domains=(DOMAIN,), env={"CONSUL_HTTP_TOKEN_FILE": str(path)}).start()
    answers(edge, f"guarded-80.{DOMAIN}", {"acl-backend"})
    yield edge, secret, path
    edge.stop()


def test_the_token_from_a_file_shows_in_neither_ps_nor_the_log(served):
    edge, secret, path = served
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert secret["SecretID"] not in ps and str(edge.proc.pid)
    assert secret["SecretID"] not in edge.log()
    assert f"token from {path}" in edge.log()


def test_a_token_revoked_while_running_keeps_the_routes(agent, served, backend):
    edge, secret, _ = served
    before = reloads(edge.log())
    agent.api("DELETE", f"/v1/acl/token/{secret['AccessorID']}")
    other = Backend("acl-other")
    try:
        register(agent, "guarded", "guarded-2", other)            # a change the edge can no longer read
        logged(edge, "Consul does not know the token", timeout=15)
        answers(edge, f"guarded-80.{DOMAIN}", {"acl-backend"})   # still the last known state
        assert reloads(edge.log()) == before, "nothing applied from a refused read"
    finally:
        agent.api("PUT", "/v1/agent/service/deregister/guarded-2")
        other.close()


def test_no_token_keeps_the_routes_of_the_previous_run_and_says_why(agent, served):
    edge, _, _ = served
    edge.stop()
    bare = EdgeProcess(agent.url, domains=(DOMAIN,), state_dir=edge.state_dir, port=edge.port,
                       admin_port=edge.admin_port).start()
    try:
        logged(bare, "no ACL token is configured", timeout=15)
        assert "ERROR" in bare.log() and "node:read" in bare.log()
        answers(bare, f"guarded-80.{DOMAIN}", {"acl-backend"})    # HAProxy serves the previous configuration
    finally:
        bare.stop()


def test_a_token_with_only_service_read_is_one_clear_error_at_start(agent, tmp_path):
    secret = token(agent, "services-only", SERVICES_ONLY)
    path = tmp_path / "token"
    path.write_text(secret["SecretID"])
    edge = EdgeProcess(agent.url, domains=(DOMAIN,), env={"CONSUL_HTTP_TOKEN_FILE": str(path)}).start()
    try:
        logged(edge, "cannot read the catalog: node:read missing", timeout=15)
        first = [line for line in edge.log().splitlines() if "cannot read the catalog" in line]
        assert len(first) == 1 and "ERROR" in first[0]
    finally:
        edge.stop()
