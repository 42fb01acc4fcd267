"""Writing the loop's decisions to the local Consul agent, one service at a time, each logged. A
request the agent refuses (4xx) skips that one service with a warning; an unavailable agent
(`ConsulUnavailable`) stops the batch and is the caller's. What to write comes from `reconcile`;
nothing is decided here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from registrator.consul_sink import ConsulRejected, ConsulSink
from registrator.mapping import NOTES_PREFIX, Registration
from registrator.reconcile import AgentCheck, Changes, health_updates

log = logging.getLogger("registrator")


def few(ids: Iterable[str], shown: int = 3) -> str:
    """`a, b, c and 97 more`: service IDs for one log line."""
    ids = list(ids)
    return ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def apply(consul: ConsulSink, changes: Changes, why: str, keep: Mapping[str, str]) -> None:
    """Register and deregister. `keep`: maintenance (service ID → reason) to put back on a service
    registered again, since registering replaces its checks, maintenance mode included."""
    for reg in changes.register:
        try:
            consul.register(reg)
            log.info("%s: registered %s as %s at %s:%d%s", why, reg.id, reg.name, reg.address, reg.port,
                     "".join(f"; {c.notes[len(NOTES_PREFIX) + 1:]}" for c in reg.checks))
            if reg.id in keep:
                consul.maintenance(reg.id, True, keep[reg.id])
        except ConsulRejected as exc:
            log.warning("%s: Consul refused %s; skipped: %s", why, reg.id, exc)
    for sid in changes.deregister:
        try:
            consul.deregister(sid)
            log.info("%s: deregistered %s", why, sid)
        except ConsulRejected as exc:
            log.warning("%s: Consul refused to deregister %s: %s", why, sid, exc)


def sync_checks(consul: ConsulSink, desired: list[Registration], checks: list[AgentCheck], changes: Changes,
                lift: Iterable[str], why: str, force: bool = False) -> None:
    """Docker health into its TTL checks; the registrator's maintenance that is over lifted (one
    line for all of them)."""
    fresh = {r.id for r in changes.register}     # just registered: the listed checks are gone
    for check_id, health in health_updates(desired, [c for c in checks if c.service_id not in fresh], force):
        try:
            consul.update_check(check_id, health)
            log.debug("%s: %s is %s", why, check_id, health.status)
        except ConsulRejected as exc:
            log.warning("%s: Consul refused to update %s: %s", why, check_id, exc)
    lifted = []
    for sid in lift:
        if sid in fresh:
            continue
        try:
            consul.maintenance(sid, False)
            lifted.append(sid)
        except ConsulRejected as exc:
            log.warning("%s: Consul refused to end maintenance of %s: %s", why, sid, exc)
    if lifted:
        log.info("%s: out of maintenance, %d services whose containers run: %s", why, len(lifted), few(lifted))


def hold(consul: ConsulSink, sids: Iterable[str], reason: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Maintenance for each service: (those put in it, those the agent refused); the caller says it
    in one line."""
    done, refused = [], []
    for sid in sids:
        try:
            consul.maintenance(sid, True, reason)
            done.append(sid)
        except ConsulRejected:
            refused.append(sid)
    return tuple(done), tuple(refused)
