"""The threads that feed the registrator's loop, against scripted fakes of Docker and Consul."""

from __future__ import annotations

import threading

import pytest

from haproxy_consul.consul_api import Answer, ConsulDenied, ConsulUnavailable
from registrator.docker_source import DockerUnavailable
from registrator.feeds import AGENT, LOST, RESYNC, AgentWatch, docker_events


class Stop(threading.Event):
    """A stop event whose waits return at once and are recorded: the feeds' only clock."""

    def __init__(self):
        super().__init__()
        self.waited: list[float] = []

    def wait(self, timeout=None):
        self.waited.append(timeout)
        return self.is_set()


class ScriptedDocker:
    """`open_events` follows a script: an exception to raise, or a list of events to stream
    before the stream breaks. When the script is over, the thread is told to stop."""

    url = "fake://docker"

    def __init__(self, script, stop):
        self.script, self.stop = list(script), stop

    def open_events(self):
        if not self.script:
            self.stop.set()
            raise DockerUnavailable("script over")
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return iter(step)


def test_docker_events_say_lost_once_per_outage_and_resync_at_every_opening():
    stop, connected, got = Stop(), threading.Event(), []
    down = DockerUnavailable("event stream: No such file or directory")
    docker = ScriptedDocker([down, down, [("start", "c1", "")], [("die", "c1", "")], down], stop)
    docker_events(docker, got.append, connected, stop)
    assert [a for a, _, _ in got] == [LOST, RESYNC, "start", LOST, RESYNC, "die", LOST]
    assert got[0][2] == str(down)
    assert stop.waited == [0.25, 0.5, 0.25, 0.25, 0.5, 1.0]     # backoff up to 1 s, reset by an opening


class ScriptedConsul:
    """`get` follows a script of (path prefix, answer or exception); records each request."""

    base = "http://127.0.0.1:8500"

    def __init__(self, script, stop):
        self.script, self.stop, self.requests = list(script), stop, []

    def get(self, path, params=(), wait=None):
        self.requests.append((path, dict(params).get("index", ""), wait))
        if not self.script:
            self.stop.set()
            raise ConsulUnavailable("script over")
        prefix, outcome = self.script.pop(0)
        assert path.startswith(prefix), (path, prefix)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


SELF = ("/v1/agent/self", Answer({"Config": {"NodeName": "n 1"}}))
REFUSED = ConsulUnavailable("connection refused")


def services(index):
    return "/v1/catalog/node-services/n%201", Answer({"Services": []}, index)


@pytest.mark.parametrize("script, reasons, asked", [
    # changes of this node's services, and the same index (a wait ran out): nothing to do
    ([SELF, services(12), services(15), services(15)], [], ["self", "", "12", "15", "15"]),
    # the agent restarted: the query's connection broke, then it answers again (from index 0:
    # Consul would hold a query with the old index, higher than the new agent's)
    ([SELF, services(12), services(12), ("/v1/catalog", REFUSED), ("/v1/agent/self", REFUSED), SELF,
      services(3)], ["it answers again after failing"], ["self", "", "12", "12", "self", "self", "", "3"]),
    # restarted between two queries: the index went back
    ([SELF, services(12), services(4)], ["its index went back from 12 to 4"], ["self", "", "12", "4"]),
    # an agent that was not there at start: its first answer asks for a reconciliation too
    ([("/v1/agent/self", REFUSED), SELF, services(7)], ["it answers again after failing"],
     ["self", "self", "", "7"]),
])
def test_agent_watch_asks_for_a_reconciliation_when_the_agent_may_have_forgotten(script, reasons, asked):
    stop, got = Stop(), []
    http = ScriptedConsul(script, stop)
    AgentWatch(http, wait=60).run(got.append, stop)
    assert got == [(AGENT, "", why) for why in reasons]
    assert all(delay <= 1.0 for delay in stop.waited)    # an agent that is down is asked again within 1 s
    assert ["self" if path == "/v1/agent/self" else index for path, index, _ in http.requests] == asked
    assert all(wait == (60 if index else None) for _, index, wait in http.requests)


def test_agent_watch_asks_a_refusing_agent_again_slowly_and_logs_once(caplog):
    stop, got = Stop(), []
    denied = ConsulDenied(403, "/v1/agent/self", "Permission denied")
    http = ScriptedConsul([("/v1/agent/self", denied), ("/v1/agent/self", denied)], stop)
    AgentWatch(http, wait=60).run(got.append, stop)
    assert stop.waited[:2] == [60, 60] and got == []           # not the 0.25 s → 1 s of an agent that is down
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "agent:read" in warnings[0]
