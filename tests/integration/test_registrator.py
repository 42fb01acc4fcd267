"""The registrator against a real Docker Engine and a real Consul agent, on loopback.

One dockerd and one Consul agent serve the module; each test starts its own registrator and
containers and asserts on what the agent's service list holds.
"""

from __future__ import annotations

import sys
import time
import urllib.request

import pytest

from haproxy_consul.consul_api import ConsulSettings, parse_address
from registrator.consul_sink import ConsulRejected, ConsulSink, ConsulUnavailable
from registrator.mapping import Check, Registration
from tests.support.docker_engine import IMAGE, running_engine
from tests.support.edge import EdgeProcess
from tests.support.procs import LoggedProcess, consul_per_module, wait_until

pytestmark = pytest.mark.integration
HOST = "t9"


@pytest.fixture(scope="module")
def dockerd():
    with running_engine() as eng:
        yield eng


consul = consul_per_module()


class Registrator(LoggedProcess):
    def __init__(self, dockerd, consul, log_path, *extra):
        super().__init__([sys.executable, "-m", "haproxy_consul", "registrator", "--docker", dockerd.url,
                          "--consul", consul.url, "--hostname", HOST, "--resync", "2", "--log-level", "DEBUG",
                          *extra], log_path)


@pytest.fixture
def registrator(dockerd, consul, tmp_path):
    made = []

    def make(*extra):
        made.append(Registrator(dockerd, consul, tmp_path / f"registrator{len(made)}.log", *extra).start())
        return made[-1]
    yield make
    for r in made:
        r.stop()
        print(r.log()[-3000:])


@pytest.fixture
def run(dockerd):
    started = []

    def start(name, env=None, labels=None, ports=None, publish_all=True, **kw):
        c = dockerd.client().containers.run(IMAGE, detach=True, name=name, environment=env or {}, labels=labels or {},
                                            publish_all_ports=publish_all, ports=ports or {}, **kw)
        started.append(c)
        return c
    yield start
    for c in started:
        try:
            c.remove(force=True)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass


def ours(consul):
    return {sid: s for sid, s in consul.api("GET", "/v1/agent/services").items() if sid.startswith(f"{HOST}:")}


def host_port(container, port="80/tcp"):
    container.reload()
    return int(container.attrs["NetworkSettings"]["Ports"][port][0]["HostPort"])


def test_published_port_is_registered_fast_and_leaves_with_the_container(registrator, run, consul):
    registrator()
    time.sleep(1)
    t0 = time.monotonic()
    c = run("web1")
    wait_until(lambda: f"{HOST}:web1:80" in ours(consul), 5, what="registration")
    assert time.monotonic() - t0 < 2.0
    s = ours(consul)[f"{HOST}:web1:80"]
    assert (s["Service"], s["Address"], s["Port"]) == ("nginx", "127.0.0.1", host_port(c))
    assert s["Meta"]["container_port"] == "80" and s["Meta"]["image"] == IMAGE and s["Meta"]["host"] == HOST

    def answers():                          # registered before httpd listens: the proxy may close at first
        with urllib.request.urlopen(f"http://127.0.0.1:{s['Port']}/", timeout=5) as r:
            return b"busybox httpd" in r.read()
    wait_until(answers, 5, what="the registered port answering")
    c.stop(timeout=1)
    wait_until(lambda: f"{HOST}:web1:80" not in ours(consul), 5, what="deregistration after stop")


@pytest.mark.parametrize("how", ["kill", "rm"])
def test_kill_and_rm_deregister(registrator, run, consul, how):
    registrator()
    c = run(f"gone-{how}")
    wait_until(lambda: f"{HOST}:gone-{how}:80" in ours(consul), 5, what="registration")
    c.kill() if how == "kill" else c.remove(force=True)
    wait_until(lambda: f"{HOST}:gone-{how}:80" not in ours(consul), 5, what=f"deregistration after {how}")


def test_pause_deregisters_and_unpause_registers(registrator, run, consul):
    registrator()
    c = run("pausable")
    wait_until(lambda: f"{HOST}:pausable:80" in ours(consul), 5, what="registration")
    c.pause()
    wait_until(lambda: f"{HOST}:pausable:80" not in ours(consul), 5, what="gone while paused")
    c.unpause()
    wait_until(lambda: f"{HOST}:pausable:80" in ours(consul), 5, what="back after unpause")


def test_service_settings(registrator, run, consul):
    registrator("--tags", "edge,fleet")
    run("multi", ports={"80/tcp": ("127.0.0.1", None), "8080/tcp": ("127.0.0.1", None)}, publish_all=False,
        env={"SERVICE_8080_NAME": "admin", "SERVICE_TAGS": "a,b", "SERVICE_META_TEAM": "core"})
    run("ignored", env={"SERVICE_IGNORE": "1"})
    run("named", labels={"SERVICE_NAME": "Front End", "SERVICE_80_TAGS": "x"}, env={"SERVICE_NAME": "loser"})
    wait_until(lambda: {f"{HOST}:multi:80", f"{HOST}:multi:8080", f"{HOST}:named:80"} <= set(ours(consul)), 5,
               what="registrations")
    s = ours(consul)
    assert s[f"{HOST}:multi:80"]["Service"] == "nginx-80" and s[f"{HOST}:multi:8080"]["Service"] == "admin"
    assert s[f"{HOST}:multi:80"]["Tags"] == ["a", "b", "edge", "fleet"]
    assert s[f"{HOST}:multi:80"]["Meta"]["team"] == "core"
    assert s[f"{HOST}:named:80"]["Service"] == "front-end" and "x" in s[f"{HOST}:named:80"]["Tags"]
    time.sleep(0.5)
    assert not any(":ignored:" in sid for sid in ours(consul))


def test_checks_pass_and_fail(registrator, run, consul):
    registrator()
    run("checked-ok", env={"SERVICE_CHECK_HTTP": "/index.html", "SERVICE_CHECK_INTERVAL": "1s"})
    run("checked-bad", env={"SERVICE_CHECK_HTTP": "/missing", "SERVICE_CHECK_INTERVAL": "1s"})
    run("checked-tcp", env={"SERVICE_CHECK_TCP": "true", "SERVICE_CHECK_INTERVAL": "1s",
                            "SERVICE_CHECK_TIMEOUT": "not-a-duration"})

    def status(sid):
        checks = consul.api("GET", "/v1/agent/checks")
        return checks.get(f"service:{sid}", {}).get("Status")
    wait_until(lambda: status(f"{HOST}:checked-ok:80") == "passing", 10, what="HTTP check passing")
    wait_until(lambda: status(f"{HOST}:checked-bad:80") == "critical", 10, what="HTTP check failing")
    wait_until(lambda: status(f"{HOST}:checked-tcp:80") == "passing", 10, what="TCP check passing")


def test_internal_registers_the_container_ip_and_private_port(registrator, run, consul):
    registrator("--internal")
    c = run("inside")
    wait_until(lambda: f"{HOST}:inside:80" in ours(consul), 5, what="registration")
    c.reload()
    s = ours(consul)[f"{HOST}:inside:80"]
    # Asserted on, never connected to: the bridge address is off limits for the tests.
    assert (s["Address"], s["Port"]) == (c.attrs["NetworkSettings"]["IPAddress"], 80)
    assert s["Address"] and not s["Address"].startswith("127.")


def test_docker_health_status_gates_the_registration_when_opted_out(registrator, run, consul):
    registrator("--resync", "60")                  # only the health_status events can move it
    c = run("healthy", env={"SERVICE_CHECK_DOCKER_HEALTH": "false"},
            healthcheck={"test": ["CMD-SHELL", "test -s /tmp/ok"], "interval": 200_000_000,
                         "timeout": 1_000_000_000, "retries": 1})
    time.sleep(1)
    assert f"{HOST}:healthy:80" not in ours(consul)   # starting, then unhealthy: not routable
    c.exec_run(["sh", "-c", "echo ok > /tmp/ok"])     # shell builtins only
    wait_until(lambda: f"{HOST}:healthy:80" in ours(consul), 5, what="registered once healthy")
    c.exec_run(["sh", "-c", ": > /tmp/ok"])
    wait_until(lambda: f"{HOST}:healthy:80" not in ours(consul), 5, what="deregistered once unhealthy")


def test_sigterm_stops_it_promptly_even_with_a_long_resync(registrator, consul):
    r = registrator("--resync", "60")
    wait_until(lambda: "in sync; watching Docker events" in r.log(), 10, what="first reconciliation")
    t0 = time.monotonic()
    r.stop()
    assert r.proc.returncode == 0 and time.monotonic() - t0 < 3.0


def test_hostile_container_settings_are_ignored_and_logged(registrator, run, consul):
    r = registrator()
    run("hostile", labels={"SERVICE_NAME": "\n\n", "SERVICE_TAGS": "ok,\u0000bad,", "SERVICE_META_bad key": "1",
                           "SERVICE_CHECK_HTTP": "no slash"})
    wait_until(lambda: f"{HOST}:hostile:80" in ours(consul), 5, what="registration despite bad settings")
    s = ours(consul)[f"{HOST}:hostile:80"]
    assert s["Service"] == "nginx" and all("\u0000" not in t for t in s["Tags"])
    wait_until(lambda: "not a path starting with /" in r.log(), 5, what="bad setting logged")
    assert r.proc.poll() is None


def test_restart_while_containers_change_loses_nothing_and_leaves_nothing_stale(registrator, run, consul):
    r = registrator()
    keep, drop = run("keep"), run("drop")
    wait_until(lambda: {f"{HOST}:keep:80", f"{HOST}:drop:80"} <= set(ours(consul)), 5, what="registrations")
    other = {"ID": "t3:elsewhere:80", "Name": "nginx", "Port": 1}
    consul.api("PUT", "/v1/agent/service/register", other)        # another host's: never touched
    r.kill()
    drop.remove(force=True)
    new = run("new")
    moved_port = host_port(keep)
    registrator("--cleanup")
    wait_until(lambda: set(ours(consul)) == {f"{HOST}:keep:80", f"{HOST}:new:80"}, 5,
               what="exactly the running containers")
    assert ours(consul)[f"{HOST}:keep:80"]["Port"] == moved_port and new.status in ("created", "running")
    assert "t3:elsewhere:80" in consul.api("GET", "/v1/agent/services")
    consul.api("PUT", "/v1/agent/service/deregister/t3:elsewhere:80")


def test_dockerd_restart_is_survived(dockerd, registrator, run, consul):
    r = registrator()
    run("before")
    wait_until(lambda: f"{HOST}:before:80" in ours(consul), 5, what="registration")
    dockerd.stop()                                                  # stops its containers too
    wait_until(lambda: "does not answer" in r.log(), 10, what="engine loss noticed")
    dockerd.start()
    wait_until(lambda: "answers again" in r.log(), 15, what="engine back")
    wait_until(lambda: f"{HOST}:before:80" not in ours(consul), 10, what="stopped container deregistered")
    run("after")
    wait_until(lambda: f"{HOST}:after:80" in ours(consul), 5, what="registration after the restart")
    assert r.proc.poll() is None


def test_container_answers_through_the_edge(registrator, run, consul):
    registrator()
    edge = EdgeProcess(consul.url, domains=("t9.example",)).start()
    try:
        run("e2e")
        wait_until(lambda: edge.get("nginx-80.t9.example") == (200, "hello from busybox httpd\n"), 10,
                   what="nginx-80 through the edge")
    finally:
        edge.stop()


def test_ttl_checks_are_kept_passing_while_the_registrator_runs(registrator, run, consul):
    r = registrator("--ttl", "3", "--ttl-refresh", "1")
    run("ttl")
    sid = f"{HOST}:ttl:80"

    def status():
        return consul.api("GET", "/v1/agent/checks").get(f"service:{sid}", {}).get("Status")
    wait_until(lambda: status() == "passing", 5, what="TTL check registered passing")
    time.sleep(5)                                        # longer than the TTL: only the refresh keeps it up
    assert status() == "passing"
    r.kill()
    wait_until(lambda: status() == "critical", 10, what="TTL check critical once nobody passes it")


def test_consul_sink_does_not_retry_a_refused_registration(consul):
    sink = ConsulSink(ConsulSettings(parse_address(consul.url)))
    bad = Registration(f"{HOST}:refused:80", "nginx", "127.0.0.1", 80, checks=(Check("http", "http://x/", "bogus"),))
    t0 = time.monotonic()
    with pytest.raises(ConsulRejected):
        sink.register(bad)
    assert time.monotonic() - t0 < 0.5                             # no backoff spent on a 4xx
    assert f"{HOST}:refused:80" not in ours(consul)
    with pytest.raises(ConsulUnavailable):                         # nothing listening: retried, then typed
        ConsulSink(ConsulSettings(parse_address("127.0.0.1:1"))).registered()
