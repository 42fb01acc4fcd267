"""The registrator's loop against recording fakes of its Docker and Consul shells."""

from __future__ import annotations

import threading

import pytest

from haproxy_consul.consul_api import parse_address
from registrator.consul_sink import ConsulRejected, ConsulUnavailable
from registrator.loop import Registrator
from registrator.mapping import Registration, container_from_inspect
from registrator.settings import Settings


def container(cid: str, name: str, host_port: int, **config):
    return container_from_inspect({
        "Id": cid, "Name": f"/{name}", "Config": {"Image": "nginx:1", **config},
        "State": {"Running": True},
        "NetworkSettings": {"Ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(host_port)}]}}})


class FakeDocker:
    url = "fake://docker"

    def __init__(self, containers=(), events=(), stop: threading.Event | None = None):
        self.containers = {c.id: c for c in containers}
        self.queued = list(events)
        self.stop = stop

    def open_events(self):
        def stream():
            yield from self.queued
            self.stop.wait(30)          # a quiet stream until the loop is told to stop
        return stream()

    def running(self):
        return list(self.containers.values())

    def inspect(self, cid):
        return self.containers.get(cid)

    def exists(self):
        return set(self.containers)


class FakeConsul:
    """Records every call; `refuse` names service IDs the agent answers 4xx for, `down` makes it unreachable."""

    def __init__(self, services: dict[str, Registration] | None = None, refuse=(), down=False):
        self.services = dict(services or {})
        self.calls: list[tuple[str, str]] = []
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

    def register(self, reg):
        self.calls.append(("register", reg.id))
        self._gate(reg.id)
        self.services[reg.id] = reg

    def deregister(self, sid):
        self.calls.append(("deregister", sid))
        self._gate(sid)
        self.services.pop(sid, None)

    def ttl_pass(self, sid):
        self.calls.append(("ttl_pass", sid))


def settings(**kw):
    return Settings(docker="fake://docker", consul=parse_address("127.0.0.1:8500"), hostname="h1", **kw)


def loop(docker, consul, stop=None, **kw):
    return Registrator(settings(**kw), docker, consul, stop or threading.Event())


def other(sid, cid):
    return Registration(sid, "nginx", "10.0.0.3", 1, meta=(("container_id", cid),))


def test_event_for_a_vanished_container_deregisters_only_its_services():
    a, b = container("a" * 64, "a", 32001), container("b" * 64, "b", 32002)
    docker, consul = FakeDocker([a, b]), FakeConsul({"h2:x:80": other("h2:x:80", "a" * 64)})
    r = loop(docker, consul)
    assert r._reconcile(first=True)
    assert sorted(consul.services) == ["h1:a:80", "h1:b:80", "h2:x:80"]
    del docker.containers[a.id]                     # destroyed: no inspect data left
    consul.calls.clear()
    r._container(a.id)
    assert consul.calls == [("deregister", "h1:a:80")]   # never another host's, never container b's


def test_a_refused_registration_does_not_hold_up_the_others():
    cs = [container(c * 64, c, 32000 + i) for i, c in enumerate("abc")]
    consul = FakeConsul(refuse={"h1:b:80"})
    assert loop(FakeDocker(cs), consul)._reconcile(first=True)
    assert [sid for op, sid in consul.calls if op == "register"] == ["h1:a:80", "h1:b:80", "h1:c:80"]
    assert sorted(consul.services) == ["h1:a:80", "h1:c:80"]


def test_an_unreachable_agent_fails_the_reconciliation_and_the_next_one_repairs():
    consul = FakeConsul(down=True)
    r = loop(FakeDocker([container("a" * 64, "a", 32001)]), consul)
    assert r._reconcile() is False
    consul.down = False
    assert r._reconcile() is True
    assert list(consul.services) == ["h1:a:80"]


@pytest.mark.parametrize("cleanup, expected", [
    (False, ["h1:gone:80", "h1:live:80"]),           # a vanished container's service waits for the resync
    (True, ["h1:live:80"]),
])
def test_cleanup_on_start(cleanup, expected):
    live = container("l" * 64, "live", 32001)
    stale = other("h1:gone:80", "g" * 64)
    consul = FakeConsul({"h1:gone:80": stale})
    assert loop(FakeDocker([live]), consul, cleanup=cleanup)._reconcile(first=True)
    assert sorted(consul.services) == expected


def test_run_handles_events_and_stops_promptly():
    stop = threading.Event()
    c = container("e" * 64, "evented", 32005)
    docker = FakeDocker(events=[("start", c.id)], stop=stop)
    consul = FakeConsul()
    r = loop(docker, consul, stop=stop, resync=60.0)
    thread = threading.Thread(target=r.run, daemon=True)
    thread.start()
    assert r.connected.wait(5)
    docker.containers[c.id] = c                      # started after the initial listing
    r.events.put(c.id)
    for _ in range(100):
        if "h1:evented:80" in consul.services:
            break
        stop.wait(0.05)
    assert consul.services["h1:evented:80"].port == 32005
    stop.set()
    thread.join(3)
    assert not thread.is_alive()
