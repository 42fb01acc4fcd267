"""All three programs against a Consul agent on HTTPS with `verify_incoming = true`, configured by
the CONSUL_* variables alone (certificates from `consul tls ca create` / `consul tls cert create`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.edge_helpers import answers, register
from tests.support.docker_engine import IMAGE, running_engine
from tests.support.edge import EdgeProcess
from tests.support.etcd import EtcdServer
from tests.support.http import Backend
from tests.support.procs import ConsulAgent, LoggedProcess, free_ports, require, wait_until

pytestmark = pytest.mark.integration
DOMAIN = "tls.example"
PROGRAM = [sys.executable, "-m", "haproxy_consul"]


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = ConsulAgent(tmp_path_factory.mktemp("consul-tls"), http_port=free_ports(1)[0], tls=True).start()
    yield a
    a.stop()


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_plain_http_is_refused_and_a_client_without_certificate_too(agent):
    """The agent really demands TLS and a client certificate: what the next tests rely on."""
    env = clean_env(**agent.client_env())
    ok = subprocess.run([require("consul"), "members"], env=env, capture_output=True, text=True, timeout=20)
    assert ok.returncode == 0, ok.stderr
    del env["CONSUL_CLIENT_CERT"], env["CONSUL_CLIENT_KEY"]
    refused = subprocess.run([require("consul"), "members"], env=env, capture_output=True, text=True, timeout=20)
    assert refused.returncode != 0, refused.stdout
    env["CONSUL_HTTP_ADDR"] = env["CONSUL_HTTP_ADDR"].replace("https://", "http://")
    plain = subprocess.run([require("consul"), "members"], env=env, capture_output=True, text=True, timeout=20)
    assert plain.returncode != 0, plain.stdout


def test_edge_routes_with_the_consul_variables_alone(agent, tmp_path):
    backend = Backend("tls-backend")
    edge = EdgeProcess(None, domains=(DOMAIN,), env=agent.client_env()).start()
    try:
        register(agent, "secure", "secure-1", backend)
        answers(edge, f"secure-80.{DOMAIN}", {"tls-backend"})
        assert f"consul {agent.url}, CA {agent.cert('ca')}, client cert {agent.cert('client')}" in edge.log()
        # Without the client certificate the edge says why, and keeps serving what it has.
        edge.stop()
        env = {k: v for k, v in agent.client_env().items() if not k.startswith("CONSUL_CLIENT")}
        bare = EdgeProcess(None, domains=(DOMAIN,), env=env, state_dir=edge.state_dir, port=edge.port,
                           admin_port=edge.admin_port).start()
        try:
            wait_until(lambda: "CONSUL_CLIENT_CERT" in bare.log(), 10, what="a TLS error naming the setting")
            answers(bare, f"secure-80.{DOMAIN}", {"tls-backend"})    # the previous configuration
        finally:
            bare.stop()
    finally:
        edge.stop()
        backend.close()


def test_registrator_registers_with_the_consul_variables_alone(agent, tmp_path):
    with running_engine() as dockerd:
        reg = LoggedProcess([*PROGRAM, "registrator", "--docker", dockerd.url, "--hostname", "tlshost",
                             "--resync", "2", "--log-level", "DEBUG"], tmp_path / "registrator.log")
        reg.proc = subprocess.Popen(reg.argv, stdout=open(reg.log_path, "ab"), stderr=subprocess.STDOUT,
                                    env=clean_env(**agent.client_env()), cwd=Path(__file__).resolve().parents[2])
        try:
            container = dockerd.client().containers.run(IMAGE, name="tlsweb", detach=True,
                                                         ports={"80/tcp": ("127.0.0.1", None)})
            wait_until(lambda: any(s["Service"] == "nginx" and s["ID"].startswith("tlshost:")
                                   for s in agent.api("GET", "/v1/agent/services").values()), 20,
                       what="the container registered over TLS")
            container.remove(force=True)
            wait_until(lambda: not any(s["ID"].startswith("tlshost:")
                                       for s in agent.api("GET", "/v1/agent/services").values()), 20,
                       what="the container deregistered")
            health = subprocess.run([*PROGRAM, "health", "registrator", "--docker", dockerd.url],
                                    env=clean_env(**agent.client_env()), capture_output=True, text=True, timeout=30)
            assert health.returncode == 0, health.stderr
        finally:
            reg.stop()
            print(reg.log()[-3000:])
        assert "ERROR" not in reg.log()


def test_bootstrap_leaves_gracefully_over_tls_with_the_variables_alone(agent, tmp_path):
    """bootstrap runs a TLS-only server agent; on SIGTERM its `consul leave` gets the TLS settings
    through the environment (no flags), and the agent leaves gracefully."""
    etcd = EtcdServer(tmp_path / "etcd").start()
    https, serf_lan, serf_wan, server = free_ports(4)
    hcl = (f'ca_file = "{agent.cert("ca")}" cert_file = "{agent.cert("server")}" '
           f'key_file = "{agent.cert("server-key")}" verify_incoming = true verify_outgoing = true '
           f"ports {{ http = -1 https = {https} }} disable_update_check = true")
    env = clean_env(**{**agent.client_env(), "CONSUL_HTTP_ADDR": f"https://127.0.0.1:{https}"})
    boot = LoggedProcess([*PROGRAM, "bootstrap", "--etcd", etcd.url, "--machine-id", "tlsmachine",
                          "--advertise", "127.0.0.1", "--expect", "1", "--data-dir", str(tmp_path / "data"),
                          "--consul", require("consul"), "--wait-timeout", "5", "--",
                          "-bind=127.0.0.1", "-client=127.0.0.1", "-node=tls-server", "-dns-port=-1",
                          f"-serf-lan-port={serf_lan}", f"-serf-wan-port={serf_wan}", f"-server-port={server}",
                          "-grpc-port=-1", f"-hcl={hcl}"], tmp_path / "bootstrap.log")
    try:
        boot.proc = subprocess.Popen(boot.argv, stdout=open(boot.log_path, "ab"), stderr=subprocess.STDOUT, env=env,
                                     cwd=Path(__file__).resolve().parents[2])
        probe = [*PROGRAM, "health", "bootstrap", "--etcd", etcd.url]
        wait_until(lambda: subprocess.run(probe, env=env, capture_output=True, timeout=10).returncode == 0, 40,
                   interval=0.5, what="the bootstrapped agent to elect itself (health over TLS)")
        time.sleep(1)
        boot.proc.send_signal(signal.SIGTERM)
        boot.proc.wait(40)
        log = boot.log()
        assert "leaving the cluster gracefully" in log
        assert "consul agent exited with status 0" in log, log[-3000:]   # it left, whatever leave answered
        assert "WARNING bootstrap: consul leave" not in log, log[-3000:]
        assert "server starting leave" in log, log[-3000:]     # the agent itself got the leave
    finally:
        boot.kill()
        etcd.stop()
