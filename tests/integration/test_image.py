"""The README's container path, in CI.

`make walkthrough` (WALKTHROUGH_ONCE=1) runs the README's own blocks on 127.0.0.1-3, from
`make image` to reading redis in Consul's catalog, with no engine answering at DOCKER_HOST: it
starts its own dockerd and says so. The image it built is then checked on that engine's data
(tags, the 250 MB bound, size per layer, what the layers leave out, users), each program run
from it as the README shows it, and the three-host behaviour (stop, failing check) from the
image. Every engine is stopped and its root removed, with no mount left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.docker_engine import IMAGE as BUSYBOX
from tests.support.docker_engine import cleanup, mounts_below, running_engine
from tests.support.edge import REPO
from tests.support.etcd import EtcdServer
from tests.support.http import Backend, get
from tests.support.procs import consul_per_module, free_ports, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
TAG = "haproxy-consul:latest"
VERSION_TAG = "haproxy-consul:0.1.0"
MAX_SIZE = 250e6


@pytest.fixture(scope="module")
def walkthrough():
    """`make walkthrough` once, its own engine's root kept for the tests of the image it built."""
    root = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))      # short: a unix socket path is
    env = {**os.environ, "DOCKER_HOST": f"unix://{root}/nobody.sock", "WALKTHROUGH_ENGINE_ROOT": str(root),
           "WALKTHROUGH_ONCE": "1"}
    t0 = time.monotonic()
    try:
        out = subprocess.run(["make", "-s", "walkthrough"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=540)
        elapsed = time.monotonic() - t0
        print(out.stdout[-30000:], out.stderr[-5000:])       # shown when a test of it fails
        print(f"make walkthrough (image included) took {elapsed:.0f}s")
        yield out, root, mounts_below(root)
    finally:
        cleanup(root)


@pytest.fixture(scope="module")
def dockerd(walkthrough):
    """The walkthrough's engine again, on the same data: the image is there."""
    _, root, _ = walkthrough
    with running_engine(root=root) as eng:
        yield eng


consul = consul_per_module()


def test_make_image_with_no_engine_says_how_to_start_one_in_one_line(tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/nobody.sock"}
    out = subprocess.run(["make", "-s", "image"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    # make's own "make: ***" (or "make[1]: ***" under another make, as in `make test`) is not ours.
    ours = [line for line in out.stderr.splitlines()
            if not re.match(r"make(\[\d+\])?: \*\*\*", line) and not line.startswith("WARNING: Location")]
    assert out.returncode != 0 and "Traceback" not in out.stderr + out.stdout
    assert len(ours) == 1 and "no Docker engine answers" in ours[0] and "DOCKER_HOST" in ours[0], out.stderr


def test_the_readme_walkthrough_runs_verbatim_on_one_machine(walkthrough):
    out, root, mounts_after = walkthrough
    assert out.returncode == 0, "make walkthrough failed: its output is in the captured stdout of the setup"
    stdout = out.stdout
    assert f"no Docker engine answers at unix://{root}/nobody.sock: starting one" in stdout
    assert "t1$ make image" in stdout and "t3$ docker run -d --name edge-t3" in stdout
    for n in (1, 2, 3):        # each edge answered from both nginx containers
        line = next(x for x in stdout.splitlines() if f"t{n}'s edge:" in x)
        assert len(set(re.findall(r"container (\w+)", line))) == 2, line
    assert re.search(r"redis at 127\.0\.0\.1:\d+ \(1 instance\)", stdout)
    for n in (1, 2, 3):        # Consul DNS answered redis where each host's resolved drop-in points
        assert f"dig +short -p 8600 @127.1.0.{n} redis.service.consul    t{n}'s Consul DNS" in stdout
    assert "Consul lists consul, nginx, redis; no edge routes etcd" in stdout               # SERVICE_IGNORE
    assert "http://127.0.0.1:8500/ui/, http://127.0.0.2:8500/ui/, http://127.0.0.3:8500/ui/" in stdout
    assert "no resolved drop-in left (3 hosts)" in stdout
    assert "removed 11 containers and 3 volumes" in stdout and "stopped the walkthrough's dockerd" in stdout
    assert mounts_after == []                        # its stopped engine left nothing mounted
    print(re.search(r"The walkthrough is up in \d+s", stdout).group(0))


def test_image_tags_size_and_layers(dockerd):
    client = dockerd.client()
    image = client.images.get(TAG)
    assert client.images.get(VERSION_TAG).id == image.id
    layers = [(e["Size"], e["CreatedBy"]) for e in reversed(client.api.history(TAG)) if e["Size"]]
    print("\n".join(f"{size / 1e6:7.1f} MB  {step[:90]}" for size, step in layers))
    print(f"total {image.attrs['Size'] / 1e6:.0f} MB")
    assert image.attrs["Size"] <= MAX_SIZE
    # What the layers leave out: apt lists and caches, .debs; docs, manuals and translations (a few
    # MB of copyright files stay, as in Debian's -slim images); pip and setuptools in the venv.
    leftovers = client.containers.run(TAG, ["-c", (
        "ls /var/lib/apt/lists/*_* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /opt/haproxy-consul/bin/pip* "
        "/opt/haproxy-consul/lib/python3*/site-packages/pip /opt/haproxy-consul/lib/python3*/site-packages/setuptools "
        "2>/dev/null; du -sck /usr/share/doc /usr/share/man /usr/share/locale /usr/share/info | tail -1")],
        entrypoint="sh", remove=True).decode().split()
    assert leftovers[1:] == ["total"] and int(leftovers[0]) < 5000, leftovers      # KB; was 42 MB
    config = image.attrs["Config"]
    assert config["Entrypoint"] == ["haproxy-consul"] and config["Cmd"] == ["edge"]
    assert config["User"] == "haproxy-consul"
    assert config["Healthcheck"]["Test"] == ["CMD", "haproxy-consul", "health"]
    assert config["Labels"]["org.opencontainers.image.version"] == "0.1.0"
    assert client.containers.run(TAG, ["--version"], remove=True).decode().strip() == "haproxy-consul 0.1.0"
    # Debian 13 "trixie": HAProxy 3.0 LTS and Python 3.13 (issue 19 item 5; was bookworm's 2.6 and 3.11).
    versions = client.containers.run(TAG, ["-c", ". /etc/os-release; echo $VERSION_CODENAME; haproxy -v | head -1; "
                                             "/opt/haproxy-consul/bin/python --version"],
                                     entrypoint="sh", remove=True).decode().splitlines()
    assert versions[0] == "trixie" and versions[1].startswith("HAProxy version 3.0."), versions
    assert versions[2].startswith("Python 3.13."), versions


def test_make_image_takes_another_consul_binary(dockerd, tmp_path):
    """`IMAGE_ARGS=--consul-binary FILE` (here a stand-in that names its version; no registry has
    the official images in CI) replaces Debian 11's 1.8.7 in the image: only its layer and the
    package's are rebuilt. Tagged apart, so the other tests keep the walkthrough's image."""
    fake = tmp_path / "consul"
    fake.write_text("#!/bin/sh\necho 'Consul v1.99.0 (a stand-in)'\n")
    fake.chmod(0o755)
    env = {**os.environ, "DOCKER_HOST": dockerd.url,
           "IMAGE_ARGS": f"--debootstrap --repository haproxy-consul-other --consul-binary {fake}"}
    out = subprocess.run(["make", "-s", "image"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "consul in the image: Consul v1.99.0 (a stand-in) (from consul-file)" in out.stdout
    client = dockerd.client()
    version = client.containers.run("haproxy-consul-other:latest", ["version"], entrypoint="consul", remove=True)
    assert version.decode().startswith("Consul v1.99.0")
    assert client.containers.run(TAG, ["version"], entrypoint="consul", remove=True).decode().startswith(
        "Consul v1.8.7")
    client.images.remove("haproxy-consul-other:latest")
    client.images.remove("haproxy-consul-other:0.1.0")


def test_edge_from_the_image_runs_unprivileged_and_reports_healthy(dockerd, consul):
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


def test_bootstrap_refuses_a_data_dir_it_cannot_write_before_announcing(dockerd, tmp_path):
    etcd = EtcdServer(tmp_path / "etcd").start()
    data = tmp_path / "data"
    data.mkdir(mode=0o755)                                     # root's: not writable by uid 10001
    try:
        c = dockerd.client().containers.run(
            TAG, ["bootstrap", "--etcd", etcd.url, "--machine-id", "img1", "--advertise", "127.0.0.1"],
            network_mode="host", volumes={str(data): {"bind": "/var/lib/consul", "mode": "rw"}}, detach=True)
        assert c.wait(timeout=30)["StatusCode"] == 2
        errors = [line for line in c.logs().decode().splitlines() if "ERROR" in line]
        c.remove()
        assert len(errors) == 1 and "-v consul-data:/var/lib/consul" in errors[0] and "--user root" in errors[0]
        keys = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{etcd.url}/v3/kv/range", data=json.dumps({"key": "Lw==", "range_end": "MA=="}).encode()),
            timeout=5).read())
        assert "kvs" not in keys                                 # nothing announced
    finally:
        etcd.stop()


def test_ctrl_c_removes_everything_the_walkthrough_started(dockerd):
    """Interrupted while its Consul servers start (on an engine that answers: it uses that one)."""
    client = dockerd.client()

    def state():
        return {c.id for c in client.containers.list(all=True)}, {v.name for v in client.volumes.list()}
    before = state()
    env = {k: v for k, v in os.environ.items() if k != "WALKTHROUGH_ONCE"} | {"DOCKER_HOST": dockerd.url}
    proc = subprocess.Popen(["make", "-s", "walkthrough"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("t2$ docker run -d --name consul-t2"):
                break
        wait_until(lambda: client.containers.list(filters={"name": "^/consul-t2$"}), 30, what="consul-t2 started")
        assert f"using the Docker engine at {dockerd.url}" in "".join(seen)
        os.killpg(proc.pid, signal.SIGINT)                    # what Ctrl-C in a terminal does
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "SIGINT: cleaning up" in rest and re.search(r"removed [1-9]\d* containers and [23] volumes", rest), rest
    assert state() == before


# --- three hosts from the image: containers stopped and failing their checks -------------------
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
SERVE_OWN_NAME = 'echo "$NAME" > /www/index.html; exec httpd -f -p 80 -h /www'


def http_json(url):
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def test_three_hosts_follow_containers_started_stopped_and_failing(dockerd, tmp_path):
    """Bootstrapped servers on 127.0.0.1-3 (named volumes, as the README), an edge per host on a
    free port, the registrator with the socket's group: every edge follows the containers."""
    client = dockerd.client()
    etcd = EtcdServer(tmp_path / "etcd").start()
    http, serf_lan, serf_wan, server, edge_port = free_ports(5)
    started = []
    t0 = time.monotonic()

    def run(name, args, **kw):
        started.append(client.containers.run(TAG, args, detach=True, name=name, network_mode="host", **kw))
        return started[-1]

    def get_all():
        return [get(edge_port, f"nginx-80.t{n}.example", address=a) for n, a in enumerate(HOSTS, 1)]
    try:
        for n, addr in enumerate(HOSTS, 1):
            run(f"hosts-consul-t{n}", [
                "bootstrap", "--etcd", etcd.url, "--machine-id", f"t{n}", "--advertise", addr, "--expect", "3",
                "--ttl", "5", "--", f"-bind={addr}", f"-client={addr}", f"-node=t{n}",
                f"-http-port={http}", "-dns-port=-1", f"-serf-lan-port={serf_lan}", f"-serf-wan-port={serf_wan}",
                f"-server-port={server}", "-grpc-port=-1", "-retry-interval=1s", "-hcl=disable_update_check = true",
                "-hcl=performance { raft_multiplier = 1 }"],
                volumes={f"hosts-data-t{n}": {"bind": "/var/lib/consul", "mode": "rw"}})

        def formed():
            leaders = {http_json(f"http://{a}:{http}/v1/status/leader") for a in HOSTS}
            return len(leaders) == 1 and "" not in leaders and all(
                len(http_json(f"http://{a}:{http}/v1/status/peers")) == 3 for a in HOSTS)
        wait_until(formed, 60, interval=0.2, what="one Consul cluster over t1..t3")
        for n, addr in enumerate(HOSTS, 1):
            run(f"hosts-edge-t{n}", ["edge", "--consul", f"http://{addr}:{http}", "--domain", f"t{n}.example",
                               "--bind", f"{addr}:{edge_port}", "--admin-bind", f"{addr}:{free_ports(1)[0]}"])
        socket_gid = str(dockerd.socket.stat().st_gid)
        run("hosts-registrator", ["registrator", "--consul", f"http://127.0.0.1:{http}", "--hostname", "t1",
                               "--ip", "127.0.0.1"], group_add=[socket_gid],
            volumes={str(dockerd.socket): {"bind": "/var/run/docker.sock", "mode": "ro"}})

        def nginx(name):
            started.append(client.containers.run(
                BUSYBOX, ["sh", "-c", SERVE_OWN_NAME], detach=True, name=name, publish_all_ports=True,
                environment={"NAME": name, "SERVICE_CHECK_HTTP": "/index.html", "SERVICE_CHECK_INTERVAL": "1s"}))
            return started[-1]

        def answers(expected):
            def ok():
                return all({get(edge_port, f"nginx-80.t{n}.example", address=a)[1].strip() for _ in range(6)}
                           == expected for n, a in enumerate(HOSTS, 1))
            wait_until(ok, 30, interval=0.2, what=f"nginx-80 on every host answering {sorted(expected)}")

        first = nginx("nginx1")
        answers({"nginx1"})
        print(f"cluster, edges and the first container answering on 3 hosts in {time.monotonic() - t0:.1f}s")
        second = nginx("nginx2")
        answers({"nginx1", "nginx2"})
        first.stop(timeout=1)
        answers({"nginx2"})
        code, _ = second.exec_run(["busybox", "rm", "/www/index.html"])   # its health check fails: 503
        assert code == 0
        wait_until(lambda: all(r[0] == 503 for r in get_all()), 30, what="503 on every host")
        second.stop(timeout=1)                               # gone: the vhost goes, the landing page lists none
        wait_until(lambda: all(r[0] == 404 for r in get_all()), 30, what="404 landing page on every host")
        print(f"three hosts done in {time.monotonic() - t0:.1f}s")
    finally:
        for c in reversed(started):
            c.remove(force=True)
        for v in client.volumes.list(filters={"name": "hosts-data-"}):
            v.remove(force=True)
        etcd.stop()


def test_a_stopped_test_engine_leaves_nothing_behind():
    with running_engine() as eng:
        eng.client().containers.run(BUSYBOX, ["sh", "-c", "true"], network_mode="host", remove=True)
        eng.client().containers.run(BUSYBOX, ["sh", "-c", "true"], publish_all_ports=True, remove=True)
        assert mounts_below(eng.root)                   # dockerd mounted the host netns under its exec root
        root, bridge = eng.root, eng.bridge
        assert bridge in subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    assert not root.exists() and mounts_below(root) == []
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0
    for table in ("filter", "nat"):
        assert bridge not in subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True).stdout
