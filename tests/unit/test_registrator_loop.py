"""The registrator's loop against recording fakes of its Docker and Consul shells."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from haproxy_consul.consul_api import ConsulSettings, parse_address
from registrator.consul_sink import ConsulRejected, ConsulUnavailable
from registrator.docker_source import DockerUnavailable
from registrator.feeds import AGENT, LOST, RESYNC
from registrator.loop import Registrator
from registrator.mapping import Registration, container_from_inspect
from registrator.reconcile import DRAIN_REASON, ENGINE_REASON, AgentCheck
from registrator.settings import Settings


def container(cid: str, name: str, host_port: int, running=True, health=None, **config):
    return container_from_inspect({
        "Id": cid, "Name": f"/{name}", "Config": {"Image": "nginx:1", **config},
        "State": {"Running": running,
                  **({"Health": {"Status": health, "Log": [{"Output": health}]}} if health else {})},
        "NetworkSettings": {"Ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(host_port)}]}}})


class FakeDocker:
    """`down`: every request fails, as with an engine that exited; `closed`: only a new connection
    fails (a ping), as with dockerd 20.10 stopping: its socket is gone, the connections it had still
    answer. `calls` records the requests."""

    url = "fake://docker"

    def __init__(self, containers=(), events=(), stop: threading.Event | None = None):
        self.containers = {c.id: c for c in containers}
        self.queued = list(events)
        self.stop = stop
        self.down = self.closed = False
        self.calls: list[str] = []

    def _gate(self, what):
        self.calls.append(what)
        if self.down or (self.closed and what == "ping"):
            raise DockerUnavailable(f"{what}: ('Connection aborted.', FileNotFoundError(2, 'No such file'))")

    def open_events(self):
        def stream():
            yield from self.queued
            self.stop.wait(30)          # a quiet stream until the loop is told to stop
        return stream()

    def ping(self):
        self._gate("ping")

    def running(self):
        self._gate("list")
        return list(self.containers.values())

    def inspect(self, cid):
        self._gate("inspect")
        return self.containers.get(cid)

    def exists(self):
        self._gate("list")
        return set(self.containers)


class FakeConsul:
    """Records every call; `refuse` names service IDs the agent answers 4xx for, `down` makes it unreachable."""

    trouble: str | None = None       # as ConsulSink: an ACL/TLS failure not yet followed by a success
    recovered = False

    def __init__(self, services: dict[str, Registration] | None = None, refuse=(), down=False):
        self.services = dict(services or {})
        self.agent_checks: dict[str, AgentCheck] = {}
        self.calls: list[tuple] = []
        self.refuse, self.down = set(refuse), down

    def _gate(self, sid):
        if self.down:
            raise ConsulUnavailable("connection refused")
        if sid in self.refuse:
            raise ConsulRejected(f"400 bad {sid}")

    def agent_address(self):
        return "10.0.0.9"

    def registered(self):
        self._gate("")
        return dict(self.services)

    def checks(self):
        self._gate("")
        return list(self.agent_checks.values())

    def register(self, reg):
        self.calls.append(("register", reg.id))
        self._gate(reg.id)
        self.services[reg.id] = reg
        self.agent_checks = {k: c for k, c in self.agent_checks.items() if c.service_id != reg.id}
        for cid, typ, notes in reg.check_signature():
            self.agent_checks[cid] = AgentCheck(cid, reg.id, typ, notes, "critical")

    def deregister(self, sid):
        self.calls.append(("deregister", sid))
        self._gate(sid)
        self.services.pop(sid, None)
        self.agent_checks = {k: c for k, c in self.agent_checks.items() if c.service_id != sid}

    def ttl_pass(self, sid):
        self.calls.append(("ttl_pass", sid))

    def update_check(self, check_id, health):
        self.calls.append(("update", check_id, health.status, health.output))
        c = self.agent_checks[check_id]
        self.agent_checks[check_id] = AgentCheck(c.id, c.service_id, c.type, c.notes, health.status, health.output)

    def maintenance(self, sid, enable, reason=""):
        self.calls.append(("maintenance", sid, enable, reason))
        self._gate(sid)
        key = f"_service_maintenance:{sid}"
        if enable:                      # as Consul: maintenance already on keeps its first reason
            self.agent_checks.setdefault(key, AgentCheck(key, sid, "maintenance", reason, "critical"))
        else:
            self.agent_checks.pop(key, None)


def settings(**kw):
    return Settings(docker="fake://docker", consul=ConsulSettings(parse_address("127.0.0.1:8500")), hostname="h1", **kw)


def loop(docker, consul, stop=None, **kw):
    return Registrator(settings(**kw), docker, consul, stop or threading.Event(), watch_agent=lambda put, stop: None)


def sync(r, first=False):
    return r._reconcile(r.docker.running(), first=first)


def running(r):
    """`r.run()` on a thread, started and in sync; stopped (and joined) when the test is done."""
    thread = threading.Thread(target=r.run, daemon=True)
    thread.start()
    eventually(lambda: r.synced and r.down_since is None, "first reconciliation")
    return thread


def eventually(predicate, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def other(sid, cid):
    return Registration(sid, "nginx", "10.0.0.3", 1, meta=(("container_id", cid),))


def test_event_for_a_vanished_container_deregisters_only_its_services():
    a, b = container("a" * 64, "a", 32001), container("b" * 64, "b", 32002)
    docker, consul = FakeDocker([a, b]), FakeConsul({"h2:x:80": other("h2:x:80", "a" * 64)})
    r = loop(docker, consul)
    assert sync(r, first=True)
    assert sorted(consul.services) == ["h1:a:80", "h1:b:80", "h2:x:80"]
    del docker.containers[a.id]                     # destroyed: no inspect data left
    consul.calls.clear()
    r._container(a.id)
    assert consul.calls == [("deregister", "h1:a:80")]   # never another host's, never container b's


def test_a_refused_registration_does_not_hold_up_the_others():
    cs = [container(c * 64, c, 32000 + i) for i, c in enumerate("abc")]
    consul = FakeConsul(refuse={"h1:b:80"})
    assert sync(loop(FakeDocker(cs), consul), first=True)
    assert [sid for op, sid in consul.calls if op == "register"] == ["h1:a:80", "h1:b:80", "h1:c:80"]
    assert sorted(consul.services) == ["h1:a:80", "h1:c:80"]


def test_an_unreachable_agent_fails_the_reconciliation_and_the_next_one_repairs():
    consul = FakeConsul(down=True)
    r = loop(FakeDocker([container("a" * 64, "a", 32001)]), consul)
    assert sync(r) is False
    consul.down = False
    assert sync(r) is True
    assert list(consul.services) == ["h1:a:80"]


@pytest.mark.parametrize("cleanup, expected", [
    (False, ["h1:gone:80", "h1:live:80"]),           # a vanished container's service waits for the resync
    (True, ["h1:live:80"]),
])
def test_cleanup_on_start(cleanup, expected):
    live = container("l" * 64, "live", 32001)
    stale = other("h1:gone:80", "g" * 64)
    consul = FakeConsul({"h1:gone:80": stale})
    assert sync(loop(FakeDocker([live]), consul, cleanup=cleanup), first=True)
    assert sorted(consul.services) == expected


def test_run_handles_events_and_stops_promptly():
    stop = threading.Event()
    c = container("e" * 64, "evented", 32005)
    docker = FakeDocker(events=[("start", c.id, "")], stop=stop)
    consul = FakeConsul()
    r = loop(docker, consul, stop=stop, resync=60.0)
    thread = threading.Thread(target=r.run, daemon=True)
    thread.start()
    assert r.connected.wait(5)
    docker.containers[c.id] = c                      # started after the initial listing
    r.events.put(("start", c.id, ""))
    for _ in range(100):
        if "h1:evented:80" in consul.services:
            break
        stop.wait(0.05)
    assert consul.services["h1:evented:80"].port == 32005
    stop.set()
    thread.join(3)
    assert not thread.is_alive()


def test_kill_drains_before_anything_else_and_die_deregisters():
    c = container("d" * 64, "web", 32001)
    docker, consul = FakeDocker([c]), FakeConsul()
    r = loop(docker, consul)
    assert sync(r, first=True)
    consul.calls.clear()
    r._drain(c.id, "15")
    assert consul.calls == [("maintenance", "h1:web:80", True, f"{DRAIN_REASON} (signal 15)")]
    assert sync(r)                            # a resync mid-drain leaves it alone
    assert consul.calls[1:] == []
    docker.containers[c.id] = container(c.id, "web", 32001, running=False)
    r._container(c.id)                               # die
    assert consul.calls[-1] == ("deregister", "h1:web:80") and c.id not in r.draining


@pytest.mark.parametrize("sig, stop_signal, drained", [
    ("1", None, False),                              # SIGHUP: a reload, not a stop
    ("1", "SIGHUP", True),                           # unless it is the image's STOPSIGNAL
    ("9", None, True),
])
def test_only_stopping_signals_drain(sig, stop_signal, drained):
    c = container("d" * 64, "web", 32001, **({"StopSignal": stop_signal} if stop_signal else {}))
    consul = FakeConsul()
    r = loop(FakeDocker([c]), consul)
    assert sync(r, first=True)
    r._drain(c.id, sig)
    assert any(call[0] == "maintenance" for call in consul.calls) is drained


@pytest.mark.parametrize("drain, calls, docker_calls", [
    (True, [("maintenance", "h1:web:80", True, f"{DRAIN_REASON} (signal 15)")], ["ping", "inspect"]),
    (False, [], ["ping"]),                           # the engine is still asked whether it is stopping
])
def test_no_drain_setting(drain, calls, docker_calls):
    c = container("d" * 64, "web", 32001)
    docker, consul = FakeDocker([c]), FakeConsul()
    r = loop(docker, consul, drain=drain)
    assert sync(r, first=True)
    consul.calls.clear()
    docker.calls.clear()
    r._handle([("kill", c.id, "15")], {"kill"})
    assert consul.calls == calls and docker.calls == docker_calls


def test_a_drain_the_container_survives_is_lifted_and_a_humans_maintenance_is_kept():
    c, other = container("d" * 64, "web", 32001), container("e" * 64, "db", 32002)
    consul = FakeConsul()
    r = loop(FakeDocker([c, other]), consul)
    assert sync(r, first=True)
    consul.maintenance("h1:db:80", True, "human: disk swap")
    r._drain(c.id, "15")
    r.draining[c.id] = 0.0                           # its stop timeout is over, and it still runs
    r._give_up_drains()
    assert ("maintenance", "h1:web:80", False, "") in consul.calls
    assert set(consul.agent_checks) == {"_service_maintenance:h1:db:80"}


def test_maintenance_survives_a_registration_that_replaces_the_checks():
    c = container("d" * 64, "web", 32001)
    docker, consul = FakeDocker([c]), FakeConsul()
    r = loop(docker, consul)
    assert sync(r, first=True)
    consul.maintenance("h1:web:80", True, "human: disk swap")
    docker.containers[c.id] = container(c.id, "web", 32009)          # a new host port: registered again
    r._container(c.id)
    assert consul.calls[-2:] == [("register", "h1:web:80"), ("maintenance", "h1:web:80", True, "human: disk swap")]


def test_docker_health_is_pushed_when_it_changes_and_refreshed_before_the_ttl_runs_out():
    c = container("d" * 64, "web", 32001, health="starting")
    docker, consul = FakeDocker([c]), FakeConsul()
    r = loop(docker, consul)
    assert sync(r, first=True)
    check = "service:h1:web:80:docker-health"
    assert consul.calls[-1] == ("update", check, "critical", "starting")
    consul.calls.clear()
    r._container(c.id)
    assert consul.calls == []                        # nothing changed: nothing sent
    docker.containers[c.id] = container(c.id, "web", 32001, health="healthy")
    r._container(c.id)                               # a health_status event
    assert consul.calls == [("update", check, "passing", "healthy")]
    r._refresh()
    assert consul.calls[-1] == ("update", check, "passing", "healthy") and len(consul.calls) == 2


def test_cleanup_removes_what_an_older_hostname_registered():
    live = container("ab" * 32, "live", 32001)
    r0 = loop(FakeDocker([live]), FakeConsul())
    assert sync(r0, first=True)
    old = {sid.replace("h1:", "h0:"): Registration(sid.replace("h1:", "h0:"), s.name, s.address, s.port, s.tags,
                                                    tuple((k, "h0" if k == "host" else v) for k, v in s.meta))
           for sid, s in r0.consul.services.items()}
    consul = FakeConsul({**old, "t3:elsewhere:80": other("t3:elsewhere:80", "x" * 64)})
    assert sync(loop(FakeDocker([live]), consul, cleanup=True), first=True)
    assert sorted(consul.services) == ["h1:live:80", "t3:elsewhere:80"]
    consul = FakeConsul(dict(old))
    assert sync(loop(FakeDocker([live]), consul), first=True)
    assert sorted(consul.services) == ["h0:live:80", "h1:live:80"]           # without --cleanup: kept


def test_a_restarted_registrator_restarts_every_docker_health_ttl_at_once():
    c = container("d" * 64, "web", 32001, health="healthy")
    consul = FakeConsul()
    assert sync(loop(FakeDocker([c]), consul), first=True)
    consul.calls.clear()
    restarted = loop(FakeDocker([c]), consul)
    assert sync(restarted, first=True)          # agent already equal to Docker: sent all the same
    assert consul.calls == [("update", "service:h1:web:80:docker-health", "passing", "healthy")]
    consul.calls.clear()
    assert sync(restarted)
    assert consul.calls == []


def test_an_engine_it_may_not_open_is_said_once_with_what_to_do(tmp_path, caplog, monkeypatch):
    import socket as socketlib

    import docker as docker_sdk

    from registrator.docker_source import DockerSource
    sock_path = tmp_path / "docker.sock"
    server = socketlib.socket(socketlib.AF_UNIX)
    server.bind(str(sock_path))
    source = DockerSource(f"unix://{sock_path}")

    def denied(*args, **kwargs):              # what the SDK raises for a socket this user may not open
        raise docker_sdk.errors.DockerException("Error while fetching server API version: "
                                                "('Connection aborted.', PermissionError(13, 'Permission denied'))")
    monkeypatch.setattr(docker_sdk, "APIClient", denied)
    stop = threading.Event()
    consul = FakeConsul()
    r = loop(source, consul, stop=stop)
    thread = threading.Thread(target=r.run, daemon=True)
    thread.start()
    stop.wait(1.5)                                          # several attempts (0.25 s, 0.5 s, 1 s, ...)
    stop.set()
    thread.join(3)
    errors = [rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert f"may not open {sock_path}" in errors[0]
    assert f"--group-add {sock_path.stat().st_gid}" in errors[0] and "root" in errors[0]
    assert consul.calls == [], "an engine never reached changes nothing in Consul"
    server.close()


def test_back_from_an_acl_or_tls_failure_registers_everything_again():
    a = container("a" * 64, "a", 32001)
    docker, consul = FakeDocker([a]), FakeConsul()
    r = loop(docker, consul)
    assert sync(r, first=True)
    assert consul.calls == [("register", "h1:a:80")]
    consul.calls.clear()
    assert sync(r) and consul.calls == []          # in sync: nothing to do
    consul.trouble = "ACL: token revoked"
    assert not sync(r), "while Consul refuses us, reconcile reports failure (retried soon)"
    consul.trouble, consul.recovered = None, True           # the sink saw a request succeed again
    assert sync(r)
    assert consul.calls == [("register", "h1:a:80")], "every service registered again, though the diff is empty"
    assert consul.recovered is False


def in_maintenance(consul):
    return {c.service_id: c.notes for c in consul.agent_checks.values() if c.type == "maintenance"}


@pytest.mark.parametrize("drain, how, first_sign", [
    (True, "closed", [("kill", "a" * 64, "15")]),   # dockerd 20.10 on SIGTERM: socket gone, then kills
    (False, "closed", [("kill", "a" * 64, "15")]),  # without the drain the ping on a kill tells all the same
    (True, "down", [("kill", "a" * 64, "15")]),
    (True, "down", [("die", "b" * 64, "")]),
    (True, "down", [(LOST, "", "event stream ended")]),   # dockerd killed: the stream breaks, the ping fails
])
def test_an_engine_that_goes_away_holds_its_services_and_its_return_sets_them_right(drain, how, first_sign,
                                                                                     caplog):
    a, b, c = (container(x * 64, x, 32001 + i) for i, x in enumerate("abc"))
    stop = threading.Event()
    docker = FakeDocker([a, b, c], stop=stop)
    consul = FakeConsul({"h2:x:80": other("h2:x:80", "x" * 64)})
    r = loop(docker, consul, stop=stop, drain=drain)
    thread = running(r)
    consul.maintenance("h1:c:80", True, "human: disk swap")
    caplog.clear()
    setattr(docker, how, True)
    for event in first_sign:
        r.events.put(event)
    eventually(lambda: r.down_since is not None, "the engine lost")
    assert in_maintenance(consul) == {"h1:a:80": ENGINE_REASON, "h1:b:80": ENGINE_REASON,
                                      "h1:c:80": "human: disk swap"}      # never another host's
    inspects = docker.calls.count("inspect")
    for x in "abc" * 20:                                  # the rest of the engine's shutdown
        r.events.put(("kill", x * 64, "9"))
        r.events.put(("die", x * 64, ""))
    stop.wait(0.6)
    assert docker.calls.count("inspect") == inspects, "no inspect while the engine is down"
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert len(errors) == 1 and "3 services" not in errors[0] and "2 services" in errors[0], errors

    restarted = container(a.id, "a", 32044)               # restart policy: running again, a new port
    docker.containers = {a.id: restarted, b.id: container(b.id, "b", 32002, running=False),
                         c.id: container(c.id, "c", 32003, running=False)}
    docker.down = docker.closed = False
    r.events.put((RESYNC, "", ""))                        # the event stream is open again
    eventually(lambda: r.down_since is None, "the engine back")
    assert sorted(consul.services) == ["h1:a:80", "h2:x:80"] and consul.services["h1:a:80"].port == 32044
    assert in_maintenance(consul) == {}
    lines = [rec.getMessage() for rec in caplog.records]
    assert len([m for m in lines if "answers again" in m]) == 1
    assert len([rec for rec in caplog.records if rec.levelno >= logging.WARNING]) == 1
    stop.set()
    thread.join(3)


def test_the_engine_back_lifts_its_maintenance_without_registering_again():
    a = container("a" * 64, "a", 32001)
    stop = threading.Event()
    docker, consul = FakeDocker([a], stop=stop), FakeConsul()
    r = loop(docker, consul, stop=stop)
    thread = running(r)
    docker.down = True
    r.events.put(("kill", a.id, "15"))
    eventually(lambda: in_maintenance(consul) == {"h1:a:80": ENGINE_REASON}, "maintenance")
    consul.calls.clear()
    docker.down = False                                   # a live-restore engine: the container never stopped
    r.events.put((RESYNC, "", ""))
    eventually(lambda: r.down_since is None, "the engine back")
    assert consul.calls == [("maintenance", "h1:a:80", False, "")]
    stop.set()
    thread.join(3)


def test_a_restarted_agent_gets_every_service_again_at_once():
    cs = [container(x * 64, x, 32001 + i) for i, x in enumerate("ab")]
    stop = threading.Event()
    docker, consul = FakeDocker(cs, stop=stop), FakeConsul()
    r = loop(docker, consul, stop=stop, resync=600.0)
    thread = running(r)
    assert sorted(consul.services) == ["h1:a:80", "h1:b:80"]
    consul.services, consul.agent_checks = {}, {}        # a dev agent restarted: it forgot everything
    r.events.put((AGENT, "", "it answers again after failing"))
    eventually(lambda: sorted(consul.services) == ["h1:a:80", "h1:b:80"], "registered again")
    stop.set()
    thread.join(3)
