"""The registrator's loop: events for one container at a time, full reconciliation on start and
every `--resync` seconds, TTL refreshes, drains, and the outages of the Docker Engine and of the
Consul agent. Decisions are `mapping.registrations` and the functions of `reconcile`; this module
only moves values between the Docker and Consul shells, fed by the threads of `feeds`, and writes
to the agent through `writes`.

Start: containers are listed only once the event stream is open, so a container started in
between shows up in one or the other. An engine that does not answer at start is said once and
waited for; nothing in Consul changes before it answers, since nothing is known of what it runs.

Docker Engine outage: the first request the engine does not answer (an inspect, a listing, or a
ping on a new connection after a `kill` event or after its event stream broke) puts every service
of this host in maintenance at once, with one log line: what the engine ran is not serving any
more. No inspect can work then, so events are dropped until the engine answers again (as soon as
the event stream is open again, or every 0.25 s → 1 s while it stayed open); the reconciliation
that follows, announced by one more line, makes Consul equal what the engine runs (the containers
it restarted registered again, the others deregistered) and lifts the maintenance.

Consul: failures are logged and the next reconciliation repairs them. `feeds.AgentWatch` asks for
a reconciliation as soon as an agent that failed answers again, which registers again everything
a restarted agent forgot. After an ACL or TLS failure, the first request Consul accepts again
triggers a reconciliation that registers every service again (see `consul_sink`), and
reconciliations stay frequent until then.

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
from collections.abc import Callable

from registrator.consul_sink import ConsulRejected, ConsulSink, ConsulUnavailable
from registrator.docker_source import DockerSource, DockerUnavailable
from registrator.feeds import AGENT, LOST, MARKERS, RESYNC, RETRY_MAX, Put, docker_events
from registrator.mapping import Container, Params, Registration, registrations, stopping_signal
from registrator.reconcile import DRAIN_REASON, ENGINE_REASON, Changes, diff, engine_gone, held, older_hostnames
from registrator.settings import Settings
from registrator.writes import apply, few, hold, sync_checks

log = logging.getLogger("registrator")

STOP = "*stop*"       # queued when the stop event is set, so a long wait for events ends at once
HEALTH_TTL = 60       # seconds, for Docker health checks when --ttl is not given
DRAIN_GRACE = 5.0     # seconds past a container's stop timeout before a drain is given up


class Registrator:
    def __init__(self, settings: Settings, docker: DockerSource, consul: ConsulSink, stop: threading.Event,
                 watch_agent: Callable[[Put, threading.Event], None]):
        self.s = settings
        self.docker = docker
        self.consul = consul
        self.stop = stop
        self.watch_agent = watch_agent
        self.events: queue.Queue[tuple[str, str, str]] = queue.Queue()
        self.connected = threading.Event()           # the event stream is open
        self.params: Params | None = None
        self.heartbeats: set[str] = set()            # service IDs whose --ttl check we pass
        self.watched: set[str] = set()               # container IDs with a Docker health check
        self.draining: dict[str, float] = {}         # container ID → when to give the drain up
        self.reported: dict[str, tuple[str, ...]] = {}   # container ID → the problems last logged
        self.refresh_every = settings.ttl_refresh or HEALTH_TTL / 3
        self.synced = False                          # a reconciliation has listed the engine's containers
        self.down_since: float | None = None         # when the engine stopped answering
        self.retry = 0.0                             # backoff between listings while it does not answer
        self.next_try = self.next_resync = self.next_refresh = 0.0

    def wake_on_stop(self) -> None:
        self.stop.wait()
        self.events.put((STOP, "", ""))

    def run(self) -> None:
        for name, target, args in (("docker-events", docker_events, (self.docker, self.events.put, self.connected,
                                                                      self.stop)),
                                   ("consul-agent", self.watch_agent, (self.events.put, self.stop)),
                                   ("stop-waker", self.wake_on_stop, ())):
            threading.Thread(target=target, args=args, name=name, daemon=True).start()
        while not self.stop.is_set():
            pending = self._next_events()
            actions = {action for action, _, _ in pending}
            if STOP in actions:
                break
            try:
                if LOST in actions and self.down_since is None:
                    self.docker.ping()                   # the event stream broke: is the engine gone too?
                if self.down_since is not None or not self.synced:
                    self._recover(actions)
                else:
                    self._handle(pending, actions)
            except DockerUnavailable as exc:
                self._lost(exc)

    def _next_events(self) -> list[tuple[str, str, str]]:
        """What was queued by the next time something is due (a burst of events coalesced)."""
        if self.down_since is not None or not self.synced:
            wake = self.next_try
        elif self.consul.recovered:
            wake = time.monotonic()
        else:
            wake = min(self.next_resync, self.next_refresh, *self.draining.values())
        try:
            pending = [self.events.get(timeout=max(0.0, wake - time.monotonic()))]
        except queue.Empty:
            pending = []
        while not self.events.empty():
            pending.append(self.events.get_nowait())
        return pending

    def _handle(self, pending: list[tuple[str, str, str]], actions: set[str]) -> None:
        if "kill" in actions:
            self.docker.ping()                  # an engine told to stop kills its containers
        for action, cid, sig in pending:        # drains first: the process is exiting
            if action == "kill" and self.s.drain:
                self._drain(cid, sig)
        self._give_up_drains()
        if actions & {RESYNC, AGENT} or self.consul.recovered or time.monotonic() >= self.next_resync:
            self._reconcile(self.docker.running())
            return
        for cid in sorted({cid for action, cid, _ in pending if action not in (*MARKERS, "kill")}):
            self._container(cid)
        if time.monotonic() >= self.next_refresh:
            self._refresh()
            self.next_refresh = time.monotonic() + self.refresh_every

    # --- the engine's outages ----------------------------------------------------------------
    def _recover(self, actions: set[str]) -> None:
        """At start or while the engine is down: list its containers once the event stream is open
        (RESYNC), or when a retry is due and the stream stayed open; then reconcile."""
        now = time.monotonic()
        if RESYNC not in actions and now < self.next_try:
            return
        self.retry = min(RETRY_MAX, self.retry * 2 or 0.25)
        self.next_try = now + self.retry
        if not self.connected.is_set():
            return                                  # the stream's RESYNC says when it is open again
        self.docker.ping()                          # a connection still open to a stopping engine may answer
        containers = self.docker.running()
        if self.synced:
            log.info("docker engine at %s answers again after %.1f s; reconciling (%d containers run)",
                     self.docker.url, now - self.down_since, len(containers))
        first, self.synced, self.down_since, self.retry = not self.synced, True, None, 0.0
        ok = self._reconcile(containers, first=first)
        if first:
            log.info("in sync; watching Docker events" if ok else "watching Docker events; Consul not in sync yet")
        self.next_refresh = time.monotonic() + self.refresh_every

    def _lost(self, exc: DockerUnavailable) -> None:
        """The engine does not answer: said once per outage; what it ran goes in maintenance."""
        if self.down_since is not None:
            log.debug("docker engine at %s still does not answer: %s", self.docker.url, exc)
            return
        self.down_since, self.retry, self.next_try = time.monotonic(), 0.0, time.monotonic()
        self.draining.clear()                       # no stop under way survives the engine
        if not self.synced:
            log.error("docker engine at %s: %s; waiting for it (nothing changes in Consul before it answers)",
                      self.docker.url, exc)
            return
        try:
            done, refused = hold(self.consul, engine_gone(self.consul.registered(), self.consul.checks(),
                                                          self.s.hostname), ENGINE_REASON)
        except ConsulUnavailable as c_exc:
            done, refused = (), (f"all ({c_exc})",)
        log.error("docker engine at %s does not answer (%s): %d services of its containers in maintenance "
                  "until it answers again%s", self.docker.url, exc, len(done),
                  f"; not put in maintenance: {few(refused)}" if refused else "")

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

    def _reconcile(self, containers: list[Container], first: bool = False) -> bool:
        """Consul made equal to the running `containers`. False when Consul failed or still refuses
        us: the next reconciliation comes soon. DockerUnavailable is the caller's."""
        try:
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
            plan = held(checks, [r.id for r in desired],
                        {sid for sid, r in registered.items() if r.container_id in self.draining})
            apply(self.consul, changes, "reconcile", dict(plan.keep))
            if self.s.cleanup:
                apply(self.consul, Changes(deregister=older_hostnames(registered, self.s.hostname)),
                      "cleanup (registered under an older --hostname)", dict(plan.keep))
            # At start every Docker health check is sent: its TTL ran on while we were not running.
            sync_checks(self.consul, desired, checks, changes, plan.lift, "reconcile", force=first)
            self.heartbeats = {r.id for r in desired if any(c.kind == "heartbeat" for c in r.checks)}
            self.watched = {r.container_id for r in desired if r.health is not None}
            ok = self.consul.trouble is None   # still refused (ACL, TLS): come back soon
        except ConsulUnavailable as exc:
            log.error("reconciliation failed: %s; retrying", exc)
            ok = False
        self.next_resync = time.monotonic() + (self.s.resync if ok else min(5.0, self.s.resync))
        return ok

    def _container(self, cid: str, refresh: bool = False) -> None:
        try:
            container = self.docker.inspect(cid)
            desired = self._desired([container]) if container else []
            checks = self.consul.checks()
            changes = diff(desired, self.consul.registered(), checks, self.s.hostname, scope={cid})
            why = f"container {container.name if container else cid[:12]}"
            plan = held(checks, [r.id for r in desired], [r.id for r in desired] if cid in self.draining else [])
            apply(self.consul, changes, why, dict(plan.keep))
            sync_checks(self.consul, desired, checks, changes, plan.lift, why, force=refresh)
            self.heartbeats.difference_update(changes.deregister)
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
        except ConsulUnavailable as exc:
            log.error("container %s: %s; the next reconciliation retries", cid[:12], exc)

    def _drain(self, cid: str, sig: str) -> None:
        """Maintenance for a container's services as it is being stopped (before it exits)."""
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
        except ConsulUnavailable as exc:
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
