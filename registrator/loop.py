"""The registrator's loop: events for one container at a time, full reconciliation on start and
every `--resync` seconds, TTL refreshes, drains. Decisions are `mapping.registrations` and the
functions of `reconcile`; this module only moves values between the Docker and Consul shells.

Order at start: the event stream is opened first, then containers are listed, so a container
started in between shows up in one or the other. When the stream breaks (the Docker Engine
restarted) it reconnects with backoff and a full reconciliation follows, since events may
have been missed. Consul failures are logged; the next reconciliation repairs them. After an
ACL or TLS failure, the first request Consul accepts again triggers a reconciliation that
registers every service again (see `consul_sink`), and reconciliations stay frequent until then.

Drain: a `kill` event with a signal that stops the container (what `docker stop` sends first)
puts its services in maintenance at once, ahead of anything else queued, so the edges stop
sending new requests while the process is still finishing the ones it has; `die` deregisters
them. A container still running `stop_timeout` + 5 s after such a signal survived it: its
services come out of maintenance.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from registrator.consul_sink import ConsulRejected, ConsulSink, ConsulUnavailable
from registrator.docker_source import DockerSource, DockerUnavailable
from registrator.mapping import NOTES_PREFIX, Container, Params, Registration, registrations, stopping_signal
from registrator.reconcile import (
    DRAIN_REASON,
    AgentCheck,
    Changes,
    diff,
    health_updates,
    maintenance,
    older_hostnames,
    stale_drains,
)
from registrator.settings import Settings

log = logging.getLogger("registrator")

RESYNC = "*resync*"   # queued by the event thread after a reconnect
STOP = "*stop*"       # queued when the stop event is set, so a long wait for events ends at once
HEALTH_TTL = 60       # seconds, for Docker health checks when --ttl is not given
DRAIN_GRACE = 5.0     # seconds past a container's stop timeout before a drain is given up


class Registrator:
    def __init__(self, settings: Settings, docker: DockerSource, consul: ConsulSink, stop: threading.Event):
        self.s = settings
        self.docker = docker
        self.consul = consul
        self.stop = stop
        self.events: queue.Queue[tuple[str, str, str]] = queue.Queue()
        self.connected = threading.Event()
        self.params: Params | None = None
        self.heartbeats: set[str] = set()            # service IDs whose --ttl check we pass
        self.watched: set[str] = set()               # container IDs with a Docker health check
        self.draining: dict[str, float] = {}         # container ID → when to give the drain up
        self.reported: dict[str, tuple[str, ...]] = {}   # container ID → the problems last logged
        self.refresh_every = settings.ttl_refresh or HEALTH_TTL / 3

    # --- event stream thread -----------------------------------------------------------------
    def watch_events(self) -> None:
        delay = 0.0
        while not self.stop.is_set():
            try:
                stream = self.docker.open_events()
                if delay:
                    log.info("docker event stream reconnected; reconciling everything")
                    self.events.put((RESYNC, "", ""))
                delay = 0.0
                self.connected.set()
                for event in stream:
                    self.events.put(event)
                raise DockerUnavailable("event stream ended")
            except DockerUnavailable as exc:
                self.connected.clear()
                # Said once per outage (the first error says why); retries in between are DEBUG.
                (log.debug if delay else log.error)("docker at %s: %s; reconnecting (backoff up to 5 s)",
                                                    self.docker.url, exc)
                delay = min(5.0, delay * 2 or 0.25)
                self.stop.wait(delay)

    # --- main loop ---------------------------------------------------------------------------
    def wake_on_stop(self) -> None:
        self.stop.wait()
        self.events.put((STOP, "", ""))

    def run(self) -> None:
        threading.Thread(target=self.watch_events, name="docker-events", daemon=True).start()
        threading.Thread(target=self.wake_on_stop, name="stop-waker", daemon=True).start()
        while not self.stop.is_set() and not (self.connected.wait(0.5) and self._reconcile(first=True)):
            self.stop.wait(1.0)
        if not self.stop.is_set():
            log.info("in sync; watching Docker events")
        next_resync = time.monotonic() + self.s.resync
        next_refresh = time.monotonic() + self.refresh_every
        while not self.stop.is_set():
            wake = time.monotonic() if self.consul.recovered else min(
                next_resync, next_refresh, *self.draining.values())
            try:
                pending = [self.events.get(timeout=max(0.0, wake - time.monotonic()))]
            except queue.Empty:
                pending = []
            while not self.events.empty():          # coalesce a burst of events
                pending.append(self.events.get_nowait())
            actions = {action for action, _, _ in pending}
            if STOP in actions:
                break
            for action, cid, sig in pending:        # drains first: the process is exiting
                if action == "kill":
                    self._drain(cid, sig)
            self._give_up_drains()
            if RESYNC in actions or self.consul.recovered or time.monotonic() >= next_resync:
                ok = self._reconcile()
                next_resync = time.monotonic() + (self.s.resync if ok else min(5.0, self.s.resync))
                continue
            for cid in sorted({cid for action, cid, _ in pending if action != "kill"}):
                self._container(cid)
            if time.monotonic() >= next_refresh:
                self._refresh()
                next_refresh = time.monotonic() + self.refresh_every

    def _params(self) -> Params:
        if self.params is None:
            agent_ip = self.s.ip or self.consul.agent_address()
            self.params = Params(self.s.hostname, self.s.ip, agent_ip, self.s.internal, self.s.tags, self.s.ttl,
                                 self.s.explicit, self.s.script_checks, f"{self.s.ttl or HEALTH_TTL}s")
            log.info("registering as host %r at %s%s", self.s.hostname, agent_ip,
                     " (container IPs, private ports)" if self.s.internal else "")
        return self.params

    def _desired(self, containers) -> list[Registration]:
        out = []
        for c in containers:
            regs, problems = registrations(c, self._params())
            if self.reported.get(c.id) != problems:     # once per container, not at every resync
                for problem in problems:
                    log.warning("container %s (%s): %s", c.name, c.id[:12], problem)
                self.reported[c.id] = problems
            out.extend(regs)
        return out

    def _reconcile(self, first: bool = False) -> bool:
        try:
            containers = self.docker.running()
            self.reported = {cid: p for cid, p in self.reported.items() if cid in {c.id for c in containers}}
            desired = self._desired(containers)
            registered = self.consul.registered()
            checks = self.consul.checks()
            changes = diff(desired, registered, checks, self.s.hostname)
            if first and not self.s.cleanup:
                # Without --cleanup, services of containers that no longer exist at all wait for
                # the first periodic resync; those of stopped containers go now.
                existing = self.docker.exists()
                changes = Changes(changes.register, tuple(
                    sid for sid in changes.deregister if registered[sid].container_id in existing))
            if self.consul.recovered:
                self.consul.recovered = False
                changes = Changes(tuple(desired), changes.deregister)
            self._apply(changes, "reconcile", checks)
            if self.s.cleanup:
                self._apply(Changes(deregister=older_hostnames(registered, self.s.hostname)),
                            "cleanup (registered under an older --hostname)", checks)
            draining = {sid for sid, r in registered.items() if r.container_id in self.draining}
            # At start every Docker health check is sent: its TTL ran on while we were not running.
            self._sync_checks(desired, checks, changes, draining, "reconcile", force=first)
            self.heartbeats = {r.id for r in desired if any(c.kind == "heartbeat" for c in r.checks)}
            self.watched = {r.container_id for r in desired if r.health is not None}
            return self.consul.trouble is None   # still refused (ACL, TLS): come back soon
        except (DockerUnavailable, ConsulUnavailable) as exc:
            log.error("reconciliation failed: %s; retrying", exc)
            return False

    def _container(self, cid: str, refresh: bool = False) -> None:
        try:
            container = self.docker.inspect(cid)
            desired = self._desired([container]) if container else []
            checks = self.consul.checks()
            changes = diff(desired, self.consul.registered(), checks, self.s.hostname, scope={cid})
            why = f"container {container.name if container else cid[:12]}"
            self._apply(changes, why, checks)
            self._sync_checks(desired, checks, changes, {r.id for r in desired} if cid in self.draining else set(),
                              why, force=refresh)
            if container is None or not container.running:
                self.draining.pop(cid, None)
                self.reported.pop(cid, None)
            for r in desired:
                if any(c.kind == "heartbeat" for c in r.checks):
                    self.heartbeats.add(r.id)
            if any(r.health is not None for r in desired):
                self.watched.add(cid)
            else:
                self.watched.discard(cid)
        except (DockerUnavailable, ConsulUnavailable) as exc:
            log.error("container %s: %s; the next reconciliation retries", cid[:12], exc)

    def _apply(self, changes: Changes, why: str, checks: list[AgentCheck]) -> None:
        """A refused request (4xx) skips that one service; an unavailable agent stops the batch."""
        held = maintenance(checks)
        for reg in changes.register:
            try:
                self.consul.register(reg)
                log.info("%s: registered %s as %s at %s:%d%s", why, reg.id, reg.name, reg.address, reg.port,
                         "".join(f"; {c.notes[len(NOTES_PREFIX) + 1:]}" for c in reg.checks))
                if reg.id in held:
                    # Registering again replaces the checks, maintenance mode included: put it back.
                    self.consul.maintenance(reg.id, True, held[reg.id])
            except ConsulRejected as exc:
                log.warning("%s: Consul refused %s; skipped: %s", why, reg.id, exc)
        for sid in changes.deregister:
            try:
                self.consul.deregister(sid)
                log.info("%s: deregistered %s", why, sid)
            except ConsulRejected as exc:
                log.warning("%s: Consul refused to deregister %s: %s", why, sid, exc)
            self.heartbeats.discard(sid)

    def _sync_checks(self, desired: list[Registration], checks: list[AgentCheck], changes: Changes,
                     draining: set[str], why: str, force: bool = False) -> None:
        """Docker health into its TTL checks; drains that did not end in a stop lifted."""
        fresh = {r.id for r in changes.register}     # just registered: the listed checks are gone
        for check_id, health in health_updates(desired, [c for c in checks if c.service_id not in fresh], force):
            try:
                self.consul.update_check(check_id, health)
                log.debug("%s: %s is %s", why, check_id, health.status)
            except ConsulRejected as exc:
                log.warning("%s: Consul refused to update %s: %s", why, check_id, exc)
        for sid in stale_drains(checks, [r.id for r in desired], draining):
            try:
                self.consul.maintenance(sid, False)
                log.info("%s: %s out of maintenance (its container still runs)", why, sid)
            except ConsulRejected as exc:
                log.warning("%s: Consul refused to end maintenance of %s: %s", why, sid, exc)

    def _drain(self, cid: str, sig: str) -> None:
        """Maintenance for a container's services as it is being stopped (before it exits)."""
        if not self.s.drain:
            return
        try:
            container: Container | None = self.docker.inspect(cid)
            if container is None or not container.running or not stopping_signal(sig, container.stop_signal):
                return
            self.draining[cid] = time.monotonic() + container.stop_timeout + DRAIN_GRACE
            prefix = f"{self.s.hostname}:"
            for sid, reg in sorted(self.consul.registered().items()):
                if reg.container_id == cid and sid.startswith(prefix):
                    try:
                        self.consul.maintenance(sid, True, f"{DRAIN_REASON} (signal {sig})")
                        log.info("container %s: signal %s; %s in maintenance until it exits",
                                 container.name, sig, sid)
                    except ConsulRejected as exc:
                        log.warning("container %s: Consul refused maintenance for %s: %s", container.name, sid, exc)
        except (DockerUnavailable, ConsulUnavailable) as exc:
            log.error("container %s: drain failed: %s", cid[:12], exc)

    def _give_up_drains(self) -> None:
        now = time.monotonic()
        for cid, deadline in sorted(self.draining.items()):
            if now >= deadline:
                del self.draining[cid]
                log.warning("container %s still runs after its stop signal; ending the drain", cid[:12])
                self._container(cid)

    def _refresh(self) -> None:
        """Before TTLs run out: pass --ttl heartbeats, and send each Docker health status again
        (inspecting those containers, so the output is Docker's newest probe)."""
        for sid in sorted(self.heartbeats):
            try:
                self.consul.ttl_pass(sid)
            except (ConsulUnavailable, ConsulRejected) as exc:
                log.warning("TTL pass for %s: %s", sid, exc)
        for cid in sorted(self.watched):
            self._container(cid, refresh=True)
