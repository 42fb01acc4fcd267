"""The registrator across restarts of what it talks to, on loopback: its Docker Engine (stopped,
then started again on the same data root) and its Consul dev agent (stopped, then started again
on the same HTTP port, having forgotten every service). Each test restarts them, so each has a
dockerd and an agent of its own.

`--resync 600` throughout: what is asserted must come from the registrator noticing the restart,
not from its periodic reconciliation.
"""

from __future__ import annotations

import re
import sys
import threading
import time

import pytest

from tests.support.docker_engine import IMAGE, running_engine
from tests.support.procs import LoggedProcess, consul_agent, wait_until

pytestmark = pytest.mark.integration
HOST = "t9"
N = 20
# httpd exits on SIGTERM (as PID 1 it would ignore it, and each stop would take Docker's 10 s)
SERVE = 'httpd -f -p 80 -h /www & trap "kill $!; exit 0" TERM; wait'


@pytest.fixture
def dockerd():
    with running_engine() as eng:
        yield eng


@pytest.fixture
def consul(tmp_path):
    with consul_agent(tmp_path / "consul") as agent:
        yield agent


@pytest.fixture
def registrator(dockerd, consul, tmp_path):
    made = []

    def start(*extra):
        made.append(LoggedProcess([sys.executable, "-m", "haproxy_consul", "registrator", "--docker", dockerd.url,
                                   "--consul", consul.url, "--hostname", HOST, "--resync", "600", *extra],
                                  tmp_path / "registrator.log").start())
        wait_until(lambda: "in sync; watching Docker events" in made[-1].log(), 15, what="the registrator in sync")
        return made[-1]
    yield start
    for r in made:
        r.stop()
        print(r.log()[-4000:])


def ours(consul) -> dict[str, int]:
    """Service ID → port, of this host's services in the agent."""
    return {sid: s["Port"] for sid, s in consul.api("GET", "/v1/agent/services").items() if sid.startswith(f"{HOST}:")}


def health(consul) -> dict[str, bool]:
    """Service ID → passing (every check of the instance and its node), from the health API."""
    return {e["Service"]["ID"]: all(c["Status"] == "passing" for c in e["Checks"])
            for e in consul.api("GET", "/v1/health/service/nginx") if e["Service"]["ID"].startswith(f"{HOST}:")}


def truth(dockerd) -> dict[str, int]:
    """What the engine runs, as the registrator should register it."""
    out = {}
    for c in dockerd.client().containers.list():
        out[f"{HOST}:{c.name}:80"] = int(c.attrs["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"])
    return out


def start_containers(dockerd, n: int) -> None:
    client = dockerd.client()
    for i in range(n):                  # half of them come back when the engine does, half do not
        client.containers.run(IMAGE, ["sh", "-c", SERVE], detach=True, name=f"w{i}", publish_all_ports=True,
                              restart_policy={"Name": "always" if i % 2 == 0 else "no"})


def warnings_and_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r" (WARNING|ERROR|CRITICAL) ", line)]


@pytest.mark.parametrize("drain", [True, False])
def test_an_engine_that_stops_holds_every_service_at_once_and_its_return_sets_consul_right(
        dockerd, consul, registrator, drain):
    """`systemctl stop docker`: dockerd closes its socket, then stops its containers. Those already
    connected (the event stream, the registrator's pooled connection) still get answers meanwhile,
    so with the drain on, an inspect on the `kill` events still works; with --no-drain, nothing
    inspects them. Either way, every service must be held at once."""
    r = registrator(*(() if drain else ("--no-drain",)))
    start_containers(dockerd, N)
    wait_until(lambda: len(health(consul)) == N and all(health(consul).values()), 20, what="N services passing")
    before = len(r.log().splitlines())

    stopping = threading.Thread(target=dockerd.stop)
    t0 = time.monotonic()
    stopping.start()
    try:
        wait_until(lambda: len(health(consul)) == N and not any(health(consul).values()), 2,
                   what="every service held (critical) within 2 s of the engine's SIGTERM")
        held_after = time.monotonic() - t0
        stopping.join(60)
        assert len(health(consul)) == N and not any(health(consul).values()), "held while the engine was down"
    finally:
        stopping.join(60)
        dockerd.start()                                # same data root: restart policies apply
    t1 = time.monotonic()
    wait_until(lambda: ours(consul) == truth(dockerd) and len(health(consul)) == len(truth(dockerd))
               and all(health(consul).values()), 10, what="Consul equal to the engine's truth, all passing")
    back_after = time.monotonic() - t1
    assert len(truth(dockerd)) == N // 2               # those with `--restart always`
    print(f"drain {drain}: held {N} services {held_after:.2f} s after the engine went; Consul equal to "
          f"the engine {back_after:.2f} s after it started again")

    new = r.log().splitlines()[before:]
    loud = warnings_and_errors("\n".join(new))
    assert len(loud) == 1 and f"{N} services of its containers in maintenance" in loud[0], loud
    assert len([line for line in new if "answers again after" in line]) == 1, new
    assert not any("Traceback" in line for line in new)


def test_a_restarted_agent_gets_every_registration_back_within_seconds(dockerd, consul, registrator):
    r = registrator()
    start_containers(dockerd, 5)
    expected = truth(dockerd)
    wait_until(lambda: ours(consul) == expected, 10, what="registrations")
    consul.stop()
    consul.start()                                     # a dev agent: it comes back with nothing registered
    t0 = time.monotonic()
    wait_until(lambda: ours(consul) == expected and len(health(consul)) == len(expected), 3,
               what="registrations back within 3 s of the agent answering")
    print(f"back {time.monotonic() - t0:.2f} s after the restarted agent had a leader")
    loud = warnings_and_errors(r.log())
    assert len(loud) == 1 and "watching this node's services failed" in loud[0], loud
