"""Desired registrations vs what this host has in its Consul agent → what to register,
deregister, update, put in or take out of maintenance; and when the agent may have lost what was
registered with it. Pure.

Only services whose ID starts with `<hostname>:` are ours to remove: the registrator never
touches another host's (or a human's) registrations. The one exception is `--cleanup`'s
`older_hostnames()`: services that carry this registrator's own meta under a host name that is
no longer ours (the host was renamed, or `--hostname` changed).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from registrator.mapping import OUR_META, Health, Registration

MAINTENANCE = "_service_maintenance:"                 # Consul's check ID prefix for maintenance mode
DRAIN_REASON = "haproxy-consul registrator: container stopping"
ENGINE_REASON = "haproxy-consul registrator: docker engine unavailable"
OUR_REASONS = (DRAIN_REASON, ENGINE_REASON)           # maintenance the registrator starts, and lifts
CONTAINER_ID_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class AgentCheck:
    """One entry of the agent's `/v1/agent/checks`."""

    id: str
    service_id: str
    type: str
    notes: str = ""
    status: str = ""
    output: str = ""


@dataclass(frozen=True)
class Changes:
    register: tuple[Registration, ...] = ()
    deregister: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.register and not self.deregister


def signatures(checks: Iterable[AgentCheck]) -> dict[str, tuple[tuple[str, str, str], ...]]:
    """Per service ID, its checks as `Registration.check_signature()` gives them; maintenance
    checks are not part of a service's definition."""
    found = defaultdict(list)
    for c in checks:
        if c.service_id and not c.id.startswith(MAINTENANCE):
            found[c.service_id].append((c.id, c.type, c.notes))
    return {sid: tuple(sorted(v)) for sid, v in found.items()}


def same(desired: Registration, current: Registration, current_checks: tuple = ()) -> bool:
    """Equal as far as the agent shows: the service fields, and each check's ID, type and notes."""
    return (desired.name, desired.address, desired.port, desired.tags, desired.meta, desired.check_signature()) == (
        current.name, current.address, current.port, current.tags, current.meta, current_checks)


def diff(desired: Iterable[Registration], registered: Mapping[str, Registration], checks: Iterable[AgentCheck],
         hostname: str, scope: set[str] | None = None) -> Changes:
    """`scope`: only these container IDs are being looked at (an event); None: everything."""
    prefix = f"{hostname}:"
    sigs = signatures(checks)
    want = {r.id: r for r in desired}
    ours = {sid: r for sid, r in registered.items() if sid.startswith(prefix)
            and (scope is None or r.container_id in scope)}
    register = [r for sid, r in sorted(want.items())
                if sid not in ours or not same(r, ours[sid], sigs.get(sid, ()))]
    deregister = [sid for sid in sorted(ours) if sid not in want]
    return Changes(tuple(register), tuple(deregister))


def older_hostnames(registered: Mapping[str, Registration], hostname: str) -> tuple[str, ...]:
    """Services this registrator made under another `--hostname`: all of its meta keys present, a
    Docker container ID, and a `host` that is not this one. Their container is either gone or
    registered under the current name, so each is stale or a duplicate (gliderlabs #181, #622)."""
    out = []
    for sid, r in registered.items():
        meta = dict(r.meta)
        if (all(k in meta for k in OUR_META) and meta["host"] != hostname and not sid.startswith(f"{hostname}:")
                and CONTAINER_ID_RE.match(meta["container_id"])):
            out.append(sid)
    return tuple(sorted(out))


def health_updates(desired: Iterable[Registration], checks: Iterable[AgentCheck],
                   force: bool = False) -> tuple[tuple[str, Health], ...]:
    """Docker health checks whose status or output in the agent differs from Docker's (all of
    them when `force`: a TTL check must be updated before it expires)."""
    current = {c.id: c for c in checks}
    out = []
    for r in desired:
        for c in r.checks:
            if c.kind != "docker" or r.health is None:
                continue
            now = current.get(c.check_id(r.id))
            if force or now is None or (now.status, now.output) != (r.health.status, r.health.output):
                out.append((c.check_id(r.id), r.health))
    return tuple(sorted(out, key=lambda u: u[0]))


def maintenance(checks: Iterable[AgentCheck]) -> dict[str, str]:
    """Service ID → maintenance reason, for every service in maintenance mode."""
    return {c.id[len(MAINTENANCE):]: c.notes for c in checks if c.id.startswith(MAINTENANCE)}


@dataclass(frozen=True)
class Held:
    """What becomes of the services in maintenance mode."""

    keep: tuple[tuple[str, str], ...] = ()   # (service ID, reason): put back if it is registered again
    lift: tuple[str, ...] = ()               # the registrator's own, whose reason is over: taken off


def held(checks: Iterable[AgentCheck], running: Iterable[str], draining: Iterable[str]) -> Held:
    """Maintenance the registrator started is over when the service's container runs and no drain
    of it is under way: a stop that did not come (the process survived the signal, or the
    registrator restarted in between), or a Docker Engine that answers again. Every other
    maintenance is kept, and a human's (another reason) is never lifted. Registering a service
    again replaces its checks, maintenance included: `keep` is what must be put back then."""
    running, draining = set(running), set(draining)
    keep, lift = [], []
    for sid, reason in sorted(maintenance(checks).items()):
        if reason.startswith(OUR_REASONS) and sid in running and sid not in draining:
            lift.append(sid)
        else:
            keep.append((sid, reason))
    return Held(tuple(keep), tuple(lift))


def engine_gone(registered: Mapping[str, Registration], checks: Iterable[AgentCheck], hostname: str
                ) -> tuple[str, ...]:
    """This host's services to put in maintenance when its Docker Engine stops answering: the
    engine stops its containers on the way down, and the userland proxy of their published ports
    dies with it (even with live-restore), so none of them is served. Services already in
    maintenance (a drain, a human's) keep theirs."""
    prefix, down = f"{hostname}:", maintenance(checks)
    return tuple(sorted(sid for sid in registered if sid.startswith(prefix) and sid not in down))


def agent_reset(last_index: int, index: int, after_failure: bool) -> str:
    """Why the local Consul agent may have lost the services registered with it, from one answer
    of the blocking query on this node's services ('' when nothing says so): it answers again
    after failing (it may have restarted: a dev agent, or one whose data dir was wiped, forgets
    every service), or its index went backwards (a new agent with a fresh Raft log, restarted
    between two queries). A higher index is a change; the same index is nothing new."""
    if after_failure:
        return "it answers again after failing"
    if index < last_index:
        return f"its index went back from {last_index} to {index}"
    return ""
