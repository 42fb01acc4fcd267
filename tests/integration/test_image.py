"""The image: built offline (host wheels, debootstrap base) and each program run from it with
`--net host` against real Consul, etcd and dockerd on loopback."""

from __future__ import annotations

import sys
import time

import pytest

from tests.support.docker_engine import IMAGE as BUSYBOX
from tests.support.docker_engine import build_image as build_busybox
from tests.support.docker_engine import cleanup, engine
from tests.support.edge import REPO
from tests.support.etcd import EtcdServer
from tests.support.http import Backend, get
from tests.support.procs import consul_agent, free_ports, wait_until

sys.path.insert(0, str(REPO / "scripts"))
import build_image  # noqa: E402

pytestmark = pytest.mark.integration
TAG = "haproxy-consul:test"


@pytest.fixture(scope="module")
def dockerd():
    eng = engine().start()
    t0 = time.monotonic()
    build_image.main(["--docker", eng.url, "--debootstrap", "--tag", TAG])
    size = eng.client().images.get(TAG).attrs["Size"]
    print(f"image built in {time.monotonic() - t0:.0f}s, {size / 1e6:.0f} MB")
    build_busybox(eng.client())
    yield eng
    for c in eng.client().containers.list(all=True):
        c.remove(force=True)
    eng.stop()
    cleanup(eng.root)


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
