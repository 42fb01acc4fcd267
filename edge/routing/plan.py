"""Plan: the live route table and the desired one → runtime-API commands, or a reload and why.

Instance churn inside existing backends (a server added, removed, moved, flipped healthy)
becomes `set server` commands, and a router added, changed or removed (to a backend HAProxy
has) becomes map commands (`edge.routing.maps`). A new route that occupies a spare backend
(edge.routing.spares) is filled first (`set server … addr`, `state ready`), then its map entries
point at it (host map, routes map, router maps): no request ever reaches an empty backend. On
HAProxy 3.4 a new route gets its own backend instead (edge.routing.dynamic: `add backend`, `add
server`, filled, `publish backend`, then the maps), and a removed one's backend is deleted after
the maps left it and its slots went to maintenance (`Plan.deletions`). (A
new route with no healthy instance yet, its check still critical, is mapped at once: the spare
answers its 503 until an instance is filled in.) A removed route on a spare leaves the maps
first, then its slots go to maintenance. Map entries move whenever a route takes or leaves a
backend, whether or not there are slots to fill or empty. A route whose instances outgrew its
slots gets the new slots with `add server` in each of its backends (edge.routing.growth), then
they are filled like any free slot. Anything the runtime API cannot express—another vhost added
or removed (the pool exhausted, options that are not the defaults), an exact host changed, a
growth this HAProxy cannot add servers for, the first router or the last one (the frontend gains
or loses its lookups)—needs a reload, and the plan names every reason so the reload is logged
with them.

When `desired` was derived from `live` (update_table, then the spares' and dynamic stages: the
control loop's case), the plan looks at the routes it says changed and the routers of the
matches resolved again or pointing at them (`RouteTable.changed_since`, `rerouted_since`), and
at those map entries only, the maps' sizes kept with the tables (`maps.map_sizes`): a change
costs its routes, not the table. Otherwise it compares the whole tables; both give the same plan.

`reconcile` is the same for what HAProxy really serves (its server states and maps) against the table
the edge applied: nothing should differ, and whatever does is put back. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from edge.haproxy.capabilities import Capabilities
from edge.routing import dynamic, growth
from edge.routing.maps import (
    HOST_MAPS,
    MAPPED,
    OPTIONAL_MAPS,
    SWAPPED_MAPS,
    access,
    changed_maps,
    host_maps,
    map_commands,
    mapped,
    router_maps,
    swapped,
    table_maps,
)
from edge.routing.routers import HTTP, Router
from edge.routing.spares import NO_POOL, SPARE_PREFIX, SparePool
from edge.routing.table import Route, RouteTable, slot_name

UNPROBED = Capabilities(version="unknown")


@dataclass(frozen=True)
class Plan:
    reasons: tuple[str, ...] = ()   # non-empty: reload (the commands are then moot)
    commands: tuple[str, ...] = ()  # runtime API commands, in order
    changes: tuple[str, ...] = ()   # one readable line per server change, for the log
    # Backends added live whose routes were removed: (route, commands deleting the backend), each
    # sent once `commands` applied; one HAProxy refuses stays retired until a reload (edge.routing.dynamic).
    deletions: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def reload(self) -> bool:
        return bool(self.reasons)

    @property
    def empty(self) -> bool:
        return not self.reasons and not self.commands


def make_plan(live: RouteTable | None, desired: RouteTable, domains: tuple[str, ...] = (),
              pool: SparePool = NO_POOL, caps: Capabilities = UNPROBED) -> Plan:
    """`desired` usually comes through `spares.assign(live, …, pool)`: new routes that occupy a
    spare are applied live; `domains` (the listeners') say what the host map holds; `caps` what
    the running HAProxy accepts (until probed, nothing beyond `set server` and maps; with
    `prepare map`, several entries of a map change in one swap)."""
    if live is None:
        return Plan(reasons=("initial sync",), changes=_all_servers(desired))
    reasons: list[str] = []
    # The routes that may differ: those `desired` says changed since `live` (update_table, the
    # spares' and dynamic steps), so a change costs its routes, not the table; else every route.
    names = desired.changed_since(live)
    if names is None:
        routes = desired.routes
        added = sorted(desired.by_name.keys() - live.by_name.keys())
        removed = sorted(live.by_name.keys() - desired.by_name.keys())
    else:
        routes = [r for n in sorted(names) if (r := desired.get(n)) is not None]
        added = [r.name for r in routes if live.get(r.name) is None]
        removed = [n for n in sorted(names) if desired.get(n) is None and live.get(n) is not None]
    own = [n for n in added if not desired.get(n).spare and not desired.get(n).dynamic]
    if own:
        exhausted = [n for n in own if pool.size and pool.fits(desired.get(n))]
        if exhausted:
            reasons.append(f"spare backends exhausted ({pool.size} in use): " + ", ".join(exhausted))
        if len(exhausted) < len(own):
            reasons.append("vhost added: " + ", ".join(n for n in own if n not in exhausted))
    dropped = [n for n in removed if not live.get(n).spare]
    if dropped:
        reasons.append("vhost removed: " + ", ".join(dropped))
    fill: list[str] = []       # new routes' spares filled: before any map entry points at them
    commands: list[str] = []
    drain: list[str] = []      # removed routes' spares emptied: after their map entries are gone
    deletions: list[tuple[str, tuple[str, ...]]] = []
    changes: list[str] = []
    # update_table reuses the objects of untouched routes
    unchanged = set(map(id, live.routes)) if names is None else {id(live.get(n)) for n in names}
    # A route that takes or leaves a backend at runtime (a spare, its own retired one) moves map
    # entries, whether or not it has a healthy instance (then `fill` or `drain` is empty).
    remap = False
    for route in routes:
        if id(route) in unchanged:
            continue
        old = live.get(route.name)
        if old is None:
            changes.extend(f"+ {route.name} {s}" for s in route.servers)
            if route.spare:
                fill.extend(_slot_commands(_emptied(route), route)[0])
                changes.append(f"+ {route.name} on {route.backend}")
                remap = True
            elif route.dynamic:
                fill.extend(_new_backend(route))
                changes.append(f"+ {route.name} on {route.backend}, added live")
                remap = True
            continue
        if old.retired:                       # back before the reload that drops its backend
            changes.extend(f"+ {route.name} {s}" for s in route.servers)
            if route.tcp or route.options != old.options or len(route.slots) != len(old.slots):
                reasons.append(f"vhost added: {route.name}")
            else:
                fill.extend(_slot_commands(old, route)[0])
                # a backend added live may have been unpublished by a deletion HAProxy then refused
                fill.extend([dynamic.publish(route)] if route.dynamic else [])
                changes.append(f"+ {route.name} on {route.backend} again")
                remap = True
            continue
        if route.retired:                     # removed: maps first, then its slots to maintenance
            changes.extend(f"- {route.name} {s}" for s in old.servers)
            drain.extend(_slot_commands(old, route)[0])
            if route.dynamic and caps.del_backend:
                deletions.append((route.name, dynamic.delete_commands(route, caps)))
                changes.append(f"- {route.name}: {route.backend} to be deleted")
            else:
                changes.append(f"- {route.name}: {route.backend} left empty until the next reload")
            remap = True
            continue
        if old.hosts != route.hosts:
            reasons.append(f"hosts of {route.name} changed: {list(old.hosts)} -> {list(route.hosts)}")
        if old.vhost != route.vhost:
            reasons.append(f"vhost of {route.name} {'exposed' if route.vhost else 'withdrawn'}")
        if old.tcp != route.tcp:
            reasons.append(f"TCP backend of {route.name} {'added' if route.tcp else 'removed'}")
        if old.options != route.options:
            reasons.append(f"options of {route.name} changed: {' '.join(route.options.words()) or 'defaults'}")
        if old.backend != route.backend:
            reasons.append(f"{route.name} moves from {old.backend} to {route.backend}")
        if len(old.slots) != len(route.slots):
            why, added = _grow(old, route, caps)
            reasons.extend([why] if why else [])
            commands.extend(added)
            old = growth.with_free_slots(old, route)
        route_cmds, route_changes = _slot_commands(old, route)
        commands.extend(route_cmds)
        changes.extend(route_changes)
    for name in removed:
        old = live.get(name)
        changes.extend(f"- {name} {s}" for s in old.servers)
        if old.spare:
            drain.extend(_slot_commands(old, _emptied(old))[0])
            changes.append(f"- {name} off {old.backend} (free again)")
            remap = True
    live_maps: dict[str, dict[str, str]] = {}
    desired_maps: dict[str, dict[str, str]] = {}
    old_routers, new_routers, others = live.routers, desired.routers, False
    scoped, sizes = None, None
    matches = desired.rerouted_since(live) if names is not None else None
    if matches is not None:
        # Only the map entries of the changed routes and the routers of the matches resolved again
        # or pointing at a changed route; the maps' sizes (kept with the tables) say whether a
        # change is swapped (a swap sends the whole map) and whether other routers use the maps.
        matches = sorted(matches | {m for n in names for t in (live, desired) for m in t.matches_to(n)})
        old_routers = [r for m in matches for r in live.resolved.get(m, ((), ()))[0]]
        new_routers = [r for m in matches for r in desired.resolved.get(m, ((), ()))[0]]
        old_maps, new_maps, before, sizes = changed_maps(
            live, desired, domains, (r for n in names for r in (live.get(n), desired.get(n)) if r is not None),
            old_routers, new_routers)
        others = before[MAPPED] > len(mapped(old_routers))
        scoped = old_maps, new_maps
        if caps.atomic_maps and any(swapped(old_maps[m], new_maps[m], sizes[m]) for m in SWAPPED_MAPS):
            old_routers, new_routers, others, scoped, sizes = live.routers, desired.routers, False, None, None
    if remap:
        live_maps.update(host_maps(live, domains) if scoped is None else {m: scoped[0][m] for m in HOST_MAPS})
        desired_maps.update(host_maps(desired, domains) if scoped is None else {m: scoped[1][m] for m in HOST_MAPS})
    if live.routers is not desired.routers or remap:
        reasons.extend(_stream_reasons(old_routers, new_routers))
        router_changes, reason = _router_changes(old_routers, new_routers, others)
        changes.extend(router_changes)
        reasons.extend([reason] if reason else [])
        live_maps.update(router_maps(old_routers, live.backend_of))
        desired_maps.update(router_maps(new_routers, desired.backend_of))
    if reasons:
        return Plan(reasons=tuple(reasons), changes=tuple(changes))
    return Plan(commands=tuple(fill + commands + map_commands(live_maps, desired_maps, caps.atomic_maps, sizes)
                               + drain),
                changes=tuple(changes), deletions=tuple(deletions))


def _grow(old: Route, new: Route, caps: Capabilities) -> tuple[str, list[str]]:
    """A route whose slots grew: the `add server` commands for its new slots (edge.routing.growth),
    or why it needs a reload. (Slots never shrink: `place` keeps a route's capacity.)"""
    why = growth.refusal(old, new, caps) if len(new.slots) > len(old.slots) else \
        f"{new.name} went from {len(old.slots)} to {len(new.slots)} slots"
    return why, [] if why else growth.add_commands(old, new)


def _new_backend(route: Route) -> list[str]:
    """A new route's own backend added live (edge.routing.dynamic): the backend and its free slots,
    filled (address first, then ready), then published; its map entries come after."""
    return [*dynamic.create_commands(route), *_slot_commands(_emptied(route), route)[0], dynamic.publish(route)]


def _emptied(route: Route) -> Route:
    """`route` with every slot free: a spare as it waits in the pool."""
    return replace(route, slots=(None,) * len(route.slots), instances=0)


def _slot_commands(old: Route, new: Route) -> tuple[list[str], list[str]]:
    commands, changes = [], []
    for i in range(min(len(old.slots), len(new.slots))):
        before, after = old.slots[i], new.slots[i]
        if before == after:
            continue
        targets = [f"{backend}/{slot_name(i)}" for backend in new.backends]
        if after is None:
            commands.extend(f"set server {t} state maint" for t in targets)
            if before.weight is not None:     # a free slot has the default weight, as rendered
                commands.extend(f"set server {t} weight 1" for t in targets)
            changes.append(f"- {new.name} {before}")
            continue
        # Address first: a slot is never made ready while it still points at its placeholder.
        if before is None or (before.address, before.port) != (after.address, after.port):
            commands.extend(f"set server {t} addr {after.address} port {after.port}" for t in targets)
        if (before.weight if before else None) != after.weight:
            commands.extend(f"set server {t} weight {1 if after.weight is None else after.weight}" for t in targets)
        if before is None or before.key != after.key:
            commands.extend(f"set server {t} state ready" for t in targets)
        if before is not None and before.key != after.key:
            changes.append(f"- {new.name} {before}")
        changes.append(f"{'~' if before is not None and before.key == after.key else '+'} {new.name} {after}")
    return commands, changes


def _stream_reasons(live: Iterable[Router], desired: Iterable[Router]) -> list[str]:
    """TCP and SNI routers are listeners and rules in the configuration: any change is a reload.
    `live`, `desired`: the routers of the two tables (or of the same matches in each)."""
    old = {r.match: r for r in live if r.kind != HTTP}
    new = {r.match: r for r in desired if r.kind != HTTP}
    added = sorted(new[m].describe() for m in new.keys() - old.keys())
    removed = sorted(old[m].describe() for m in old.keys() - new.keys())
    changed = sorted(new[m].describe() for m in new.keys() & old.keys() if new[m] != old[m])
    return ([f"TCP/SNI router added: {', '.join(added)}"] if added else []) + \
        ([f"TCP/SNI router removed: {', '.join(removed)}"] if removed else []) + \
        ([f"TCP/SNI router changed: {', '.join(changed)}"] if changed else [])


def _router_changes(live: list[Router], desired: list[Router], others: bool) -> tuple[list[str], str]:
    """A line for each router that changed, and a reason to reload instead of changing the maps.
    `live`, `desired`: the routers of the two tables, or of the same matches in each while the
    others are the same in both (`others`: some of those use the router maps)."""
    old = {r.match: r for r in mapped(live)}
    new = {r.match: r for r in mapped(desired)}
    changes = [f"{'-' if new.get(m) is None else '~' if m in old else '+'} router {(new.get(m) or old[m]).describe()}"
               f"{f' -> {new[m].backend}' if m in new else ''}"
               for m in sorted(old.keys() | new.keys()) if old.get(m) != new.get(m)]
    if not others and bool(old) != bool(new):
        return changes, "the first HTTP router (the frontend gains its lookups)" if new else \
            "no HTTP router left (the frontend drops its lookups)"
    rules = {rid: (r.allow, r.deny, r.users) for rid, r in access(live).items()}
    wanted = {rid: (r.allow, r.deny, r.users) for rid, r in access(desired).items()}
    if rules != wanted:
        routers = access(live) | access(desired)
        which = sorted(routers[rid].describe() for rid in rules.keys() | wanted.keys()
                       if rules.get(rid) != wanted.get(rid))
        return changes, f"access rules (allow, deny, basic auth) changed: {', '.join(which)}"
    return changes, ""


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
            # the backend it has now: the spare it occupies, or its own added live
            same = (new.spare, new.dynamic) == (route.spare, route.dynamic)
            routes.append(new if same else replace(new, spare=route.spare, dynamic=route.dynamic))
        else:
            routes.append(route)
    return replace(live, routes=tuple(routes))


@dataclass(frozen=True)
class ServedSlot:
    """One server slot as HAProxy runs it now (from `show servers state`)."""

    backend: str
    name: str
    address: str
    port: int
    ready: bool          # takes traffic: neither in maintenance nor draining


def reconcile(table: RouteTable, served: Iterable[ServedSlot], pool: SparePool = NO_POOL,
              maps: Mapping[str, Mapping[str, str] | None] | None = None, domains: tuple[str, ...] = ()) -> Plan:
    """What HAProxy serves against the table the edge applied: the commands that make every slot
    of every route's backend what the table says (address and port, ready or in maintenance), then
    every map `maps` holds (HAProxy's `show map`, by name; None: HAProxy has no such map) what the
    table renders (`table_maps`: a host left pointing at a spare the edge thinks free, after a
    runtime step and its fallback reload both failed, is deleted before anything can take that
    spare), then every slot of a free spare backend in maintenance; or a reload when backends,
    their slots or the maps themselves differ. Backends that are not routes' or spares are not
    looked at."""
    backends: dict[str, dict[str, ServedSlot]] = {}
    for slot in served:
        if slot.backend.startswith(("be_", "tcp_")):
            backends.setdefault(slot.backend, {})[slot.name] = slot
    free = {pool.backend(k) for k in pool.free(table)}
    expected = {backend for route in table.routes for backend in route.backends}
    reasons = [f"HAProxy has no backend {name}" for name in sorted((expected | free) - set(backends))]
    reasons += [f"HAProxy still has backend {name}" for name in sorted(set(backends) - expected - free)
                if not name.startswith(SPARE_PREFIX)]   # a spare beyond the pool: a smaller --spare-backends
    commands: list[str] = []
    changes: list[str] = []
    emptied: list[str] = []     # free spares' slots: after no map entry points there any more
    for backend in sorted(free & set(backends)):
        for name, have in sorted(backends[backend].items()):
            if have.ready:
                emptied.append(f"set server {backend}/{name} state maint")
                changes.append(f"{backend}/{name} served {have.address}:{have.port} from a free spare: "
                               "now in maintenance")
    for route, backend in ((r, b) for r in table.routes for b in r.backends):
        slots = backends.get(backend)
        if slots is None:
            continue
        names = [slot_name(i) for i in range(len(route.slots))]
        if set(slots) != set(names):
            reasons.append(f"{backend} has {len(slots)} server slots in HAProxy, {len(names)} in the table")
            continue
        for name, want in zip(names, route.slots, strict=True):
            have, target = slots[name], f"{backend}/{name}"
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
    if maps is not None:
        wanted = {name: entries for name, entries in table_maps(table, domains).items()
                  if name in maps and (maps[name] is not None or name not in OPTIONAL_MAPS)}
        reasons += [f"HAProxy has no map {name}" for name, entries in sorted(wanted.items())
                    if maps[name] is None and entries]
        have = {name: maps[name] or {} for name in wanted}
        for name in sorted(wanted):
            changes.extend(f"{name}: {key} -> {have[name].get(key, '(none)')} in HAProxy, "
                           f"{wanted[name].get(key, '(none)')} in the table"
                           for key in sorted(have[name].keys() | wanted[name].keys())
                           if have[name].get(key) != wanted[name].get(key))
        commands += map_commands(have, wanted)
    if reasons:
        return Plan(reasons=tuple(reasons), changes=tuple(changes))
    return Plan(commands=tuple(commands + emptied), changes=tuple(changes))
