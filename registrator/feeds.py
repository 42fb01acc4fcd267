"""The threads that feed the registrator's loop (`registrator.loop`) besides its own clock: the
Docker Engine's event stream, and one long-poll that notices a restart of the local Consul agent.
They only put items on the loop's queue; the loop decides what to do with them.

Docker: every time the event stream is opened, `RESYNC` asks for a full reconciliation, and the
loop lists containers only while the stream is open (`connected`), so a container started in
between is seen by one or the other, and events missed while it was closed are made up for.
When it breaks, `LOST` says so once (the loop asks the engine whether it is really gone); it is
opened again every 0.25 s → 1 s (a refused local socket costs nothing). Dockerd 20.10 removes its
socket at once on SIGTERM but keeps an open stream going while it stops its containers, so the
first sign of an engine going down is usually a failed inspect in the loop, not this thread.

Consul: a blocking query on this node's services in the catalog
(`/v1/catalog/node-services/<node>`, the node name from `/v1/agent/self`), waiting up to a minute.
It wakes when this node's services change, and its connection breaks when the agent stops.
`reconcile.agent_reset` decides from each answer whether the agent may have lost what was
registered with it; then `AGENT` asks the loop for a reconciliation. After a failure the next query
starts from index 0: a restarted agent's index is lower, and Consul would hold a query with the
old index until its wait ran out. While the agent does not answer, it is asked again every
0.25 s → 1 s.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Callable

from haproxy_consul.consul_api import ConsulError, ConsulHTTP, ConsulUnavailable
from registrator.docker_source import DockerSource, DockerUnavailable
from registrator.reconcile import agent_reset

log = logging.getLogger("registrator")

RESYNC = "*resync*"   # the event stream is open (again): reconcile everything
LOST = "*lost*"       # the event stream broke: is the engine gone?
AGENT = "*agent*"     # the Consul agent may have lost our services: reconcile everything
MARKERS = (RESYNC, LOST, AGENT)
RETRY_MAX = 1.0       # seconds between attempts while the engine or the agent does not answer
AGENT_WAIT = 60.0     # seconds a blocking query on this node's services waits

Put = Callable[[tuple[str, str, str]], None]


def docker_events(docker: DockerSource, put: Put, connected: threading.Event, stop: threading.Event) -> None:
    """(action, container id, signal) for each container event; the markers above around them."""
    delay = 0.0
    while not stop.is_set():
        try:
            stream = docker.open_events()
            connected.set()
            put((RESYNC, "", ""))
            delay = 0.0
            for event in stream:
                put(event)
            raise DockerUnavailable("event stream ended")
        except DockerUnavailable as exc:
            connected.clear()
            if not delay:
                put((LOST, "", str(exc)))
            log.debug("docker at %s: %s; opening the event stream again", docker.url, exc)
            delay = min(RETRY_MAX, delay * 2 or 0.25)
            stop.wait(delay)


class AgentWatch:
    """The long-poll on this node's services, with a `ConsulHTTP` of its own (a session is not
    shared between threads, and its timeout follows each query's wait)."""

    def __init__(self, http: ConsulHTTP, wait: float = AGENT_WAIT):
        self.http = http
        self.wait = wait

    def _node(self) -> str:
        me = self.http.get("/v1/agent/self").body or {}
        return str((me.get("Config") or {}).get("NodeName") or "")

    def run(self, put: Put, stop: threading.Event) -> None:
        node, index, failing, delay = "", 0, False, 0.0
        while not stop.is_set():
            try:
                node = node or self._node()
                blocking = [("index", str(index)), ("wait", f"{self.wait:g}s")] if index else []
                answer = self.http.get(f"/v1/catalog/node-services/{urllib.parse.quote(node, safe='')}",
                                       blocking, wait=self.wait if index else None)
            except ConsulError as exc:
                if not failing and isinstance(exc, ConsulUnavailable):
                    log.warning("Consul agent: watching this node's services failed: %s; every service is checked "
                                "again once it works (a restarted agent forgets them)", exc)
                elif not failing:
                    log.warning("Consul agent: watching this node's services is refused: %s; an agent restart is "
                                "noticed only at the next resync (the token needs agent:read and node:read); "
                                "asking again every %g s", exc, self.wait)
                failing, node, index = True, "", 0
                delay = min(RETRY_MAX, delay * 2 or 0.25) if isinstance(exc, ConsulUnavailable) else self.wait
                stop.wait(delay)
                continue
            if not answer.index:                 # not a blocking answer: asking again at once would spin
                log.debug("Consul agent at %s: no X-Consul-Index on %s's services", self.http.base, node)
                stop.wait(self.wait)
                continue
            why = agent_reset(index, answer.index, failing)
            if why:
                log.info("Consul agent at %s: %s; reconciling (a restarted agent forgets every service)",
                         self.http.base, why)
                put((AGENT, "", why))
            failing, delay, index = False, 0.0, answer.index
