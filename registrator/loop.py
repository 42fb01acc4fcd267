"""The registrator's loop: events for one container at a time, full reconciliation on start and
every `--resync` seconds, TTL passes. Decisions are `mapping.registrations` and
`reconcile.diff`; this module only moves values between the Docker and Consul shells.

Order at start: the event stream is opened first, then containers are listed, so a container
started in between shows up in one or the other. When the stream breaks (the Docker Engine
restarted) it reconnects with backoff and a full reconciliation follows, since events may
have been missed. Consul failures are logged; the next reconciliation repairs them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from registrator.consul_sink import ConsulRejected, ConsulSink, ConsulUnavailable
from registrator.docker_source import DockerSource, DockerUnavailable
from registrator.mapping import Params, Registration, registrations
from registrator.reconcile import Changes, diff
from registrator.settings import Settings

log = logging.getLogger("registrator")

RESYNC = "*resync*"   # queued by the event thread after a reconnect
STOP = "*stop*"       # queued when the stop event is set, so a long wait for events ends at once


class Registrator:
    def __init__(self, settings: Settings, docker: DockerSource, consul: ConsulSink, stop: threading.Event):
        self.s = settings
        self.docker = docker
        self.consul = consul
        self.stop = stop
        self.events: queue.Queue[str] = queue.Queue()
        self.connected = threading.Event()
        self.params: Params | None = None
        self.ttl_ids: set[str] = set()

    # --- event stream thread -----------------------------------------------------------------
    def watch_events(self) -> None:
        delay = 0.0
        while not self.stop.is_set():
            try:
                stream = self.docker.open_events()
                if delay:
                    log.info("docker event stream reconnected; reconciling everything")
                    self.events.put(RESYNC)
                delay = 0.0
                self.connected.set()
                for _action, cid in stream:
                    self.events.put(cid)
                raise DockerUnavailable("event stream ended")
            except DockerUnavailable as exc:
                self.connected.clear()
                delay = min(5.0, delay * 2 or 0.25)
                log.error("docker at %s: %s; reconnecting in %.2fs", self.docker.url, exc, delay)
                self.stop.wait(delay)

    # --- main loop ---------------------------------------------------------------------------
    def wake_on_stop(self) -> None:
        self.stop.wait()
        self.events.put(STOP)

    def run(self) -> None:
        threading.Thread(target=self.watch_events, name="docker-events", daemon=True).start()
        threading.Thread(target=self.wake_on_stop, name="stop-waker", daemon=True).start()
        while not self.stop.is_set() and not (self.connected.wait(0.5) and self._reconcile(first=True)):
            self.stop.wait(1.0)
        if not self.stop.is_set():
            log.info("in sync; watching Docker events")
        next_resync = time.monotonic() + self.s.resync
        next_ttl = time.monotonic() + (self.s.ttl_refresh or 1e9)
        while not self.stop.is_set():
            timeout = max(0.0, min(next_resync, next_ttl) - time.monotonic())
            try:
                first = self.events.get(timeout=timeout)
            except queue.Empty:
                first = None
            pending = {first} if first else set()
            while not self.events.empty():          # coalesce a burst of events
                pending.add(self.events.get_nowait())
            if STOP in pending:
                break
            if RESYNC in pending or time.monotonic() >= next_resync:
                if self._reconcile():
                    next_resync = time.monotonic() + self.s.resync
                else:
                    next_resync = time.monotonic() + min(5.0, self.s.resync)
                pending.discard(RESYNC)
                continue
            for cid in sorted(pending):
                self._container(cid)
            if time.monotonic() >= next_ttl:
                self._pass_ttls()
                next_ttl = time.monotonic() + self.s.ttl_refresh

    def _params(self) -> Params:
        if self.params is None:
            agent_ip = self.s.ip or self.consul.agent_address()
            self.params = Params(self.s.hostname, self.s.ip, agent_ip, self.s.internal, self.s.tags, self.s.ttl)
            log.info("registering as host %r at %s%s", self.s.hostname, agent_ip,
                     " (container IPs, private ports)" if self.s.internal else "")
        return self.params

    def _desired(self, containers) -> list[Registration]:
        out = []
        for c in containers:
            regs, problems = registrations(c, self._params())
            for problem in problems:
                log.warning("container %s (%s): %s", c.name, c.id[:12], problem)
            out.extend(regs)
        return out

    def _reconcile(self, first: bool = False) -> bool:
        try:
            desired = self._desired(self.docker.running())
            registered = self.consul.registered()
            changes = diff(desired, registered, self.s.hostname)
            if first and not self.s.cleanup:
                # Without --cleanup, services of containers that no longer exist at all wait for
                # the first periodic resync; those of stopped containers go now.
                existing = self.docker.exists()
                changes = Changes(changes.register, tuple(
                    sid for sid in changes.deregister if registered[sid].container_id in existing))
            self._apply(changes, "reconcile")
            self.ttl_ids = {r.id for r in desired if r.check is not None and r.check.kind == "ttl"}
            return True
        except (DockerUnavailable, ConsulUnavailable) as exc:
            log.error("reconciliation failed: %s; retrying", exc)
            return False

    def _container(self, cid: str) -> None:
        try:
            container = self.docker.inspect(cid)
            desired = self._desired([container]) if container else []
            changes = diff(desired, self.consul.registered(), self.s.hostname, scope={cid})
            self._apply(changes, f"container {container.name if container else cid[:12]}")
            for r in desired:
                if r.check is not None and r.check.kind == "ttl":
                    self.ttl_ids.add(r.id)
        except (DockerUnavailable, ConsulUnavailable) as exc:
            log.error("container %s: %s; the next reconciliation retries", cid[:12], exc)

    def _apply(self, changes: Changes, why: str) -> None:
        """A refused request (4xx) skips that one service; an unavailable agent stops the batch."""
        for reg in changes.register:
            try:
                self.consul.register(reg)
                log.info("%s: registered %s as %s at %s:%d", why, reg.id, reg.name, reg.address, reg.port)
            except ConsulRejected as exc:
                log.warning("%s: Consul refused %s; skipped: %s", why, reg.id, exc)
        for sid in changes.deregister:
            try:
                self.consul.deregister(sid)
                log.info("%s: deregistered %s", why, sid)
            except ConsulRejected as exc:
                log.warning("%s: Consul refused to deregister %s: %s", why, sid, exc)
            self.ttl_ids.discard(sid)

    def _pass_ttls(self) -> None:
        for sid in sorted(self.ttl_ids):
            try:
                self.consul.ttl_pass(sid)
            except (ConsulUnavailable, ConsulRejected) as exc:
                log.warning("TTL pass for %s: %s", sid, exc)
