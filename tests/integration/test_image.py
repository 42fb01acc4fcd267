"""The image: built offline (host wheels, debootstrap base) and each program run from it with
`--net host` against real Consul, etcd and dockerd on loopback."""

from __future__ import annotations

import sys
import time

import pytest

from tests.support.docker_engine import IMAGE as BUSYBOX
from tests.support.docker_engine import running_engine
from tests.support.edge import REPO
from tests.support.etcd import EtcdServer
from tests.support.http import Backend, get
from tests.support.procs import consul_agent, free_ports, wait_until

sys.path.insert(0, str(REPO / "scripts"))
import build_image  # noqa: E402

pytestmark = pytest.mark.integration
TAG = "haproxy-consul:test"


def build(eng) -> None:
    t0 = time.monotonic()
    build_image.main(["--docker", eng.url, "--debootstrap", "--tag", TAG])
    size = eng.client().images.get(TAG).attrs["Size"]
    print(f"image built in {time.monotonic() - t0:.0f}s, {size / 1e6:.0f} MB")


@pytest.fixture(scope="module")
def dockerd():
    with running_engine(build) as eng:
        yield eng


@pytest.fixture(scope="module")
def consul(tmp_path_factory):
    with consul_agent(tmp_path_factory.mktemp("consul")) as agent:
        yield agent


def test_image_metadata(dockerd):
    image = dockerd.client().images.get(TAG)
    config = image.attrs["Config"]
    assert config["Entrypoint"] == ["haproxy-consul"] and config["Cmd"] == ["edge"]
    assert config["User"] == "haproxy-consul"
    assert config["Healthcheck"]["Test"] == ["CMD", "haproxy-consul", "health"]
    assert config["Labels"]["org.opencontainers.image.title"] == "haproxy-consul"
    out = dockerd.client().containers.run(TAG, ["--version"], remove=True)
    assert out.decode().strip() == "haproxy-consul 0.1.0"


def test_edge_from_the_image_routes_and_reports_healthy(dockerd, consul):
    port, admin = free_ports(2)
    backend = Backend("from-image")
    consul.api("PUT", "/v1/agent/service/register", {"Name": "web", "ID": "web-1", "Address": "127.0.0.1",
                                                     "Port": backend.port, "Meta": {"container_port": "80"}})
    c = dockerd.client().containers.run(
        TAG, ["edge", "--consul", consul.url, "--bind", f"127.0.0.1:{port}", "--admin-bind", f"127.0.0.1:{admin}",
              "--domain", "img.example"], detach=True, network_mode="host", name="edge-image")
    try:
        wait_until(lambda: get(port, "web-80.img.example") == (200, "from-image"), 30, what="the image's edge")
        code, output = c.exec_run(["haproxy-consul", "health"])
        assert code == 0, output
        assert c.exec_run(["id", "-un"]).output.decode().strip() == "haproxy-consul"
    finally:
        print(c.logs().decode()[-2000:])
        c.remove(force=True)
        backend.close()


def test_registrator_from_the_image_registers_a_container(dockerd, consul):
    sock = dockerd.url.removeprefix("unix://")
    c = dockerd.client().containers.run(
        TAG, ["registrator", "--consul", consul.url, "--hostname", "img", "--resync", "5"], detach=True,
        network_mode="host", user="root", volumes={sock: {"bind": "/var/run/docker.sock", "mode": "ro"}},
        name="registrator-image")
    web = None
    try:
        time.sleep(1)
        web = dockerd.client().containers.run(BUSYBOX, detach=True, publish_all_ports=True, name="img-web")
        wait_until(lambda: "img:img-web:80" in consul.api("GET", "/v1/agent/services"), 15,
                   what="registration by the image's registrator")
    finally:
        print(c.logs().decode()[-2000:])
        c.remove(force=True)
        if web is not None:
            web.remove(force=True)


def test_bootstrap_from_the_image_prints_its_agent_command(dockerd, tmp_path):
    etcd = EtcdServer(tmp_path / "etcd").start()
    try:
        out = dockerd.client().containers.run(
            TAG, ["bootstrap", "--etcd", etcd.url, "--machine-id", "img1", "--advertise", "127.0.0.1", "--dry-run"],
            network_mode="host", remove=True).decode()
        assert out.startswith("consul agent -server -bootstrap-expect=3 -advertise=127.0.0.1 -data-dir=/var/lib/consul")
    finally:
        etcd.stop()


# --- the seed's three-host walkthrough, with the image ------------------------------------------
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
EDGE_PORT = 8080
SERVE_OWN_NAME = 'echo "$NAME" > /www/index.html; exec httpd -f -p 80 -h /www'


def http_json(url):
    import json
    import urllib.request
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def test_three_host_walkthrough(dockerd, tmp_path):
    """t1..t3 on 127.0.0.1..3: bootstrap → Consul servers, an edge on :8080 of each address, the
    registrator on t1; `docker run -P` containers answer at nginx-80.tN.example on every host."""
    client = dockerd.client()
    etcd = EtcdServer(tmp_path / "etcd").start()
    http, serf_lan, serf_wan, server = free_ports(4)
    started = []
    t0 = time.monotonic()

    def run(name, args, **kw):
        started.append(client.containers.run(TAG, args, detach=True, name=name, network_mode="host", **kw))
        return started[-1]
    try:
        for n, addr in enumerate(HOSTS, 1):
            run(f"consul-t{n}", [
                "bootstrap", "--etcd", etcd.url, "--machine-id", f"t{n}", "--advertise", addr, "--expect", "3",
                "--data-dir", "/var/lib/consul", "--ttl", "5", "--", f"-bind={addr}", f"-client={addr}", f"-node=t{n}",
                f"-http-port={http}", "-dns-port=-1", f"-serf-lan-port={serf_lan}", f"-serf-wan-port={serf_wan}",
                f"-server-port={server}", "-grpc-port=-1", "-retry-interval=1s", "-hcl=disable_update_check = true",
                "-hcl=performance { raft_multiplier = 1 }"],
                user="root", volumes={str(tmp_path / f"data{n}"): {"bind": "/var/lib/consul", "mode": "rw"}})

        def formed():
            leaders = {http_json(f"http://{a}:{http}/v1/status/leader") for a in HOSTS}
            return len(leaders) == 1 and "" not in leaders and all(
                len(http_json(f"http://{a}:{http}/v1/status/peers")) == 3 for a in HOSTS)
        wait_until(formed, 60, interval=0.2, what="one Consul cluster over t1..t3")
        for n, addr in enumerate(HOSTS, 1):
            run(f"edge-t{n}", ["edge", "--consul", f"http://{addr}:{http}", "--domain", f"t{n}.example",
                               "--bind", f"{addr}:{EDGE_PORT}", "--admin-bind", f"{addr}:{free_ports(1)[0]}"])
        sock = dockerd.url.removeprefix("unix://")
        run("registrator-t1", ["registrator", "--consul", f"http://127.0.0.1:{http}", "--hostname", "t1",
                               "--ip", "127.0.0.1"],
            user="root", volumes={sock: {"bind": "/var/run/docker.sock", "mode": "ro"}})
        time.sleep(1)

        def nginx(name):
            c = client.containers.run(BUSYBOX, ["sh", "-c", SERVE_OWN_NAME], detach=True, name=name,
                                      publish_all_ports=True,
                                      environment={"NAME": name, "SERVICE_CHECK_HTTP": "/index.html",
                                                   "SERVICE_CHECK_INTERVAL": "1s"})
            started.append(c)
            return c

        def answers(expected):
            def ok():
                for n, addr in enumerate(HOSTS, 1):
                    seen = {get(EDGE_PORT, f"nginx-80.t{n}.example", address=addr)[1].strip() for _ in range(6)}
                    if seen != expected:
                        return False
                return True
            wait_until(ok, 30, interval=0.2, what=f"nginx-80 on every host answering {sorted(expected)}")

        first = nginx("nginx1")
        answers({"nginx1"})
        print(f"walkthrough: cluster, edges and the first container answering on 3 hosts in "
              f"{time.monotonic() - t0:.1f}s")
        second = nginx("nginx2")
        answers({"nginx1", "nginx2"})
        first.stop(timeout=1)
        answers({"nginx2"})
        code, _ = second.exec_run(["busybox", "rm", "/www/index.html"])   # its health check fails: 503
        assert code == 0
        wait_until(lambda: all(get(EDGE_PORT, f"nginx-80.t{n}.example", address=a)[0] == 503
                               for n, a in enumerate(HOSTS, 1)), 30, what="503 on every host")
        second.stop(timeout=1)                               # gone: the vhost goes, the landing page lists none
        wait_until(lambda: all(get(EDGE_PORT, f"nginx-80.t{n}.example", address=a)[0] == 404
                               for n, a in enumerate(HOSTS, 1)), 30, what="404 landing page on every host")
        print(f"walkthrough done in {time.monotonic() - t0:.1f}s")
    finally:
        for c in reversed(started):
            try:
                c.remove(force=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        etcd.stop()
