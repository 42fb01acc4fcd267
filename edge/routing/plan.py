"""Plan: the live route table and the desired one → runtime-API commands, or a reload and why.

Instance churn inside existing backends (a server added, removed, moved, flipped healthy)
becomes `set server` commands. Anything the runtime API cannot express—a vhost added or
removed, an exact host changed, a backend's slots grown—needs a reload, and the plan names
every reason so the reload is logged with them.

`reconcile` is the same for what HAProxy really serves (its server states) against the table
the edge applied: nothing should differ, and whatever does is put back. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from edge.routing.table import Route, RouteTable


@dataclass(frozen=True)
class Plan:
    reasons: tuple[str, ...] = ()   # non-empty: reload (the commands are then moot)
    commands: tuple[str, ...] = ()  # runtime API commands, in order
    changes: tuple[str, ...] = ()   # one readable line per server change, for the log

    @property
    def reload(self) -> bool:
        return bool(self.reasons)

    @property
    def empty(self) -> bool:
        return not self.reasons and not self.commands


def slot_name(index: int) -> str:
    return f"s{index + 1}"


def make_plan(live: RouteTable | None, desired: RouteTable) -> Plan:
    if live is None:
        return Plan(reasons=("initial sync",), changes=_all_servers(desired))
    reasons: list[str] = []
    added = sorted(set(desired.names) - set(live.names))
    removed = sorted(set(live.names) - set(desired.names))
    if added:
        reasons.append("vhost added: " + ", ".join(added))
    if removed:
        reasons.append("vhost removed: " + ", ".join(removed))
    commands: list[str] = []
    changes: list[str] = []
    for route in desired.routes:
        old = live.get(route.name)
        if old is route:
            continue  # untouched by this change (update_table reuses the object)
        if old is None:
            changes.extend(f"+ {route.name} {s}" for s in route.servers)
            continue
        if old.hosts != route.hosts:
            reasons.append(f"hosts of {route.name} changed: {list(old.hosts)} -> {list(route.hosts)}")
        if len(old.slots) != len(route.slots):
            reasons.append(f"{route.name} grew from {len(old.slots)} to {len(route.slots)} slots")
        route_cmds, route_changes = _slot_commands(old, route)
        commands.extend(route_cmds)
        changes.extend(route_changes)
    for name in removed:
        changes.extend(f"- {name} {s}" for s in live.get(name).servers)
    if reasons:
        return Plan(reasons=tuple(reasons), changes=tuple(changes))
    return Plan(commands=tuple(commands), changes=tuple(changes))


def _slot_commands(old: Route, new: Route) -> tuple[list[str], list[str]]:
    commands, changes = [], []
    for i in range(min(len(old.slots), len(new.slots))):
        before, after = old.slots[i], new.slots[i]
        if before == after:
            continue
        target = f"{new.backend}/{slot_name(i)}"
        if after is None:
            commands.append(f"set server {target} state maint")
            changes.append(f"- {new.name} {before}")
            continue
        # Address first: a slot is never made ready while it still points at its placeholder.
        commands.append(f"set server {target} addr {after.address} port {after.port}")
        if before is None or before.key != after.key:
            commands.append(f"set server {target} state ready")
        if before is not None and before.key != after.key:
            changes.append(f"- {new.name} {before}")
        changes.append(f"{'~' if before is not None and before.key == after.key else '+'} {new.name} {after}")
    return commands, changes


def _all_servers(table: RouteTable) -> tuple[str, ...]:
    return tuple(f"+ {r.name} {s}" for r in table.routes for s in r.servers)



def runtime_part(live: RouteTable, desired: RouteTable) -> RouteTable:
    """What of `desired` the runtime API can apply to `live` while a reload is held back (a burst
    settling, a refused configuration, a state dir that cannot be written): the routes `live`
    has, with `desired`'s servers where hosts and slot count are unchanged, and every slot in
    maintenance for a route `desired` no longer has. New routes wait for the reload."""
    routes = []
    for route in live.routes:
        new = desired.get(route.name)
        if new is None:
            routes.append(replace(route, slots=(None,) * len(route.slots), instances=0))
        elif new.hosts == route.hosts and len(new.slots) == len(route.slots):
            routes.append(new)
        else:
            routes.append(route)
    return RouteTable(tuple(routes), live.problems)


@dataclass(frozen=True)
class ServedSlot:
    """One server slot as HAProxy runs it now (from `show servers state`)."""

    backend: str
    name: str
    address: str
    port: int
    ready: bool          # takes traffic: neither in maintenance nor draining


def reconcile(table: RouteTable, served: Iterable[ServedSlot]) -> Plan:
    """What HAProxy serves against the table the edge applied: the commands that make every slot
    of every route's backend what the table says (address and port, ready or in maintenance), or
    a reload when backends or their slots differ. Backends that are not routes' are not looked at."""
    backends: dict[str, dict[str, ServedSlot]] = {}
    for slot in served:
        if slot.backend.startswith("be_"):
            backends.setdefault(slot.backend, {})[slot.name] = slot
    expected = {route.backend for route in table.routes}
    reasons = [f"HAProxy has no backend {name}" for name in sorted(expected - set(backends))]
    reasons += [f"HAProxy still has backend {name}" for name in sorted(set(backends) - expected)]
    commands: list[str] = []
    changes: list[str] = []
    for route in table.routes:
        slots = backends.get(route.backend)
        if slots is None:
            continue
        names = [slot_name(i) for i in range(len(route.slots))]
        if set(slots) != set(names):
            reasons.append(f"{route.backend} has {len(slots)} server slots in HAProxy, {len(names)} in the table")
            continue
        for name, want in zip(names, route.slots, strict=True):
            have, target = slots[name], f"{route.backend}/{name}"
            if want is None:
                if have.ready:
                    commands.append(f"set server {target} state maint")
                    changes.append(f"{target} served {have.address}:{have.port}, a free slot: now in maintenance")
                continue
            if (have.address, have.port) == (want.address, want.port) and have.ready:
                continue
            commands.append(f"set server {target} addr {want.address} port {want.port}")
            if not have.ready:
                commands.append(f"set server {target} state ready")
            changes.append(f"{target} served {have.address}:{have.port}"
                           f"{'' if have.ready else ' in maintenance'}: now {want}")
    if reasons:
        return Plan(reasons=tuple(reasons), changes=tuple(changes))
    return Plan(commands=tuple(commands), changes=tuple(changes))
