"""The route table: which hosts and routers go to which healthy servers, in stable server slots.

`build_table(services, previous)` reads every service's tags through the chosen grammars
(`edge.routing.grammars`), groups instances into routes (backends) by route name, filters the
healthy ones and places each in a server slot. An instance keeps its slot for as long as it
stays healthy, so a change moves as few slots as possible and can be applied through HAProxy's
runtime API; a backend's slot count only grows (doubling) when it is full. A route exists when
its service is exposed (its zero-config vhost, `vhost`) or a router sends traffic to it.

`update_table(previous, services, changed)` gives the same result when only the services named
in `changed` differ, touching only their routes: the work per change does not grow with the
number of services. Routers are resolved per match across all services (two claiming one
match): a change to a service's routers resolves again only the matches it claims or claimed,
and rebuilds only the routes whose routers moved.

The table made carries forward what `previous` had indexed and says which routes and matches
the change touched (edge.routing.routes, `derive`), so the stages after it look at those only:
at 10,000 routes a change costs them about a millisecond (bench/per_change.py). Pure: no I/O.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edge.routing.grammars import DEFAULT, ServiceRouting, read_service
from edge.routing.model import Instance, Problem, route_name
from edge.routing.routers import SNI, TCP, Router, resolve
from edge.routing.routes import Resolution, Route, RouteTable, Server, derive, slot_name

# Route, RouteTable, Server and slot_name are the table's values: importable from here as before.
__all__ = ["DEFAULT_RULES", "MIN_SLOTS", "Route", "RouteTable", "Server", "TagRules", "build_table", "place",
           "slot_name", "update_table"]

MIN_SLOTS = 4


@dataclass(frozen=True)
class TagRules:
    """Which tag grammars are read (`--tag-grammar`), which services get vhosts (`--expose`), the
    edge's own ports (no TCP router may take them) and whether it has an HTTPS port (for SNI)."""

    grammars: tuple[str, ...] = DEFAULT
    expose_all: bool = True
    reserved_ports: frozenset[int] = frozenset()
    https: bool = False


DEFAULT_RULES = TagRules()


def _group(services: Mapping[str, tuple[Instance, ...]], names: Iterable[str], readings: Mapping[str, ServiceRouting],
           only: set[str] | None = None) -> dict[str, list[Instance]]:
    """Instances by route name, of the services that are exposed or routed to."""
    members: dict[str, list[Instance]] = defaultdict(list)
    for service in names:
        reading = readings[service]
        routed = {r.backend for r in reading.routers}
        for inst in services.get(service, ()):
            name = route_name(inst.service, inst.container_port)
            if name is not None and (only is None or name in only) and (reading.vhosts or name in routed):
                members[name].append(inst)
    return members


def _route(name: str, insts: list[Instance], hosts: tuple[str, ...], old: Route | None, min_slots: int,
           readings: Mapping[str, ServiceRouting], tcp: bool = False) -> Route:
    services = tuple(sorted({i.service for i in insts}))
    options = readings[services[0]].options_of(name)
    weights = {key: w for s in services for key, w in readings[s].weights}
    # A port from the tags (Traefik's `loadbalancer.server.port`) replaces the registered one. In
    # order, so that the outcome never depends on how the members were gathered.
    healthy = {i.key: Server(i.address, options.port or i.port, i.node, i.service_id, weights.get(i.key))
               for i in sorted(insts) if i.healthy}
    return Route(name=name, hosts=hosts, slots=place(healthy, old.slots if old else (), min_slots),
                 instances=len(insts), services=services, vhost=any(readings[s].vhosts for s in services),
                 options=options, tcp=tcp, spare=old.spare if old else 0, dynamic=old.dynamic if old else False)


def _read(services: Mapping[str, tuple[Instance, ...]], names: Iterable[str], rules: TagRules
          ) -> dict[str, ServiceRouting]:
    return {s: read_service(s, services.get(s, ()), rules.grammars, rules.expose_all) for s in names}


def build_table(services: Mapping[str, tuple[Instance, ...]], previous: RouteTable | None = None,
                min_slots: int = MIN_SLOTS, rules: TagRules = DEFAULT_RULES) -> RouteTable:
    """The whole table, reading every service's tags."""
    previous = previous or RouteTable()
    readings = _read(services, services, rules)
    members = _group(services, sorted(services), readings)
    usable, refused = _listenable((r for s in sorted(readings) for r in readings[s].routers), rules)
    claims: dict[tuple, tuple[Router, ...]] = defaultdict(tuple)
    for router in usable:
        claims[router.match] += (router,)
    resolved = {m: resolve(claims[m]) for m in claims}
    hosts, tcp = _bindings(resolved, set(members))
    routes = tuple(_route(name, members[name], hosts.get(name, ()), previous.get(name), min_slots, readings,
                          name in tcp) for name in sorted(members))
    return _table(routes, readings, dict(claims), resolved, refused)


def _table(routes: tuple[Route, ...], readings: Mapping[str, ServiceRouting],
           claims: Mapping[tuple, tuple[Router, ...]], resolved: Mapping[tuple, Resolution],
           refused: Mapping[str, tuple[Problem, ...]]) -> RouteTable:
    matches = sorted(resolved)
    problems = (tuple(p for s in sorted(readings) for p in readings[s].problems)
                + tuple(p for m in matches for p in resolved[m][1])
                + tuple(p for s in sorted(refused) for p in refused[s]))
    return RouteTable(routes, tuple(r for m in matches for r in resolved[m][0]), problems, readings, claims, resolved,
                      refused)


def _bindings(resolved: Mapping[tuple, Resolution], backends: set[str]) -> tuple[dict[str, tuple[str, ...]], set[str]]:
    """For these backends: the whole hosts routed to them (a match with one plain router: the host
    map), and which of them have TCP or SNI routers (a TCP backend)."""
    hosts: dict[str, list[str]] = defaultdict(list)
    tcp = set()
    for winners, _ in resolved.values():
        for router in winners:
            if router.backend in backends:
                if router.kind in (TCP, SNI):
                    tcp.add(router.backend)
                elif len(winners) == 1 and router.plain_host:
                    hosts[router.backend].append(router.host)
    return {b: tuple(sorted(h)) for b, h in hosts.items()}, tcp


def _listenable(routers: Iterable[Router], rules: TagRules) -> tuple[list[Router], dict[str, tuple[Problem, ...]]]:
    """TCP routers on a port of the edge's own, and SNI routers without an HTTPS port, are refused
    (the problems by service)."""
    out, problems = [], defaultdict(tuple)
    for router in routers:
        service = router.origin.service
        if router.kind == TCP and router.port in rules.reserved_ports:
            problems[service] += (Problem(service, f"{router.origin.tag!r}: port {router.port} is one of the edge's "
                                                   "own listeners; router refused"),)
        elif router.kind == SNI and not rules.https:
            problems[service] += (Problem(service, f"{router.origin.tag!r}: SNI passthrough needs the HTTPS port "
                                                   "(--https-bind); router refused"),)
        else:
            out.append(router)
    return out, dict(problems)


def _same_routing(old: ServiceRouting | None, new: ServiceRouting | None) -> bool:
    """Whether a service's tags say the same as before (only its instances moved): then no
    router, host or option changes, and only its routes' slots need work (the fast path)."""
    if old is None or new is None:
        plain = [r for r in (old, new) if r is not None]
        return all(not r.routers and not r.options and not r.weights for r in plain)
    return (old.vhosts, old.routers, old.options, old.weights) == (new.vhosts, new.routers, new.options, new.weights)


def update_table(previous: RouteTable, services: Mapping[str, tuple[Instance, ...]], changed: set[str],
                 min_slots: int = MIN_SLOTS, rules: TagRules = DEFAULT_RULES) -> RouteTable:
    """`build_table(services, previous)`, computed from the routes of the `changed` services only."""
    if not changed:
        return previous
    fresh = _read(services, changed & set(services), rules)
    readings = dict(previous.readings)     # a copy at C speed: the work per change stays small
    for gone in changed - fresh.keys():
        readings.pop(gone, None)
    readings.update(fresh)
    same = all(_same_routing(previous.readings.get(s), fresh.get(s)) for s in changed)
    claims, resolved, refused = previous.claims, previous.resolved, previous.refused
    touched: set[str] = set()         # backends whose routers changed
    rematched: set[tuple] = set()     # matches resolved again
    if not same:                      # re-resolve only the matches the changed services' routers claim(ed)
        old = [r for s in changed if (rd := previous.readings.get(s)) for r in rd.routers]
        new, new_refused = _listenable((r for s in sorted(fresh) for r in fresh[s].routers), rules)
        claims, resolved = dict(claims), dict(resolved)
        refused = {s: p for s, p in refused.items() if s not in changed} | new_refused
        for router in old:
            claims[router.match] = tuple(r for r in claims.get(router.match, ()) if r != router)
        for router in new:
            claims[router.match] = claims.get(router.match, ()) + (router,)
        rematched = {r.match for r in old} | {r.match for r in new}
        for match in rematched:
            touched |= {r.backend for r in resolved.get(match, ((), ()))[0]}
            if claims[match]:
                resolved[match] = resolve(claims[match])
                touched |= {r.backend for r in resolved[match][0]}
            else:
                claims.pop(match)
                resolved.pop(match, None)
    affected = {name for s in changed for name in previous.routes_of(s)}
    new_members = _group(services, sorted(fresh), readings)
    affected |= set(new_members) | {name for name in touched if previous.get(name) is not None}
    contributors = {s for name in affected if (r := previous.get(name)) for s in r.services} - changed
    members = _group(services, sorted(contributors), readings, only=affected)
    for name, insts in new_members.items():
        members[name].extend(insts)
    # the matches with a router to a touched backend: those resolved again, the others as before
    bound = rematched | {m for name in touched for m in previous.matches_to(name)}
    hosts, tcp = _bindings({m: resolved[m] for m in bound if m in resolved}, touched) if touched else ({}, set())
    routes: dict[str, Route | None] = {}
    for name in affected:
        old_route = previous.get(name)
        if not members.get(name):
            routes[name] = None
        elif name in touched:
            routes[name] = _route(name, members[name], hosts.get(name, ()), old_route, min_slots, readings,
                                  name in tcp)
        else:                         # its routers are as they were: so are its hosts and TCP backend
            routes[name] = _route(name, members[name], old_route.hosts if old_route else (), old_route, min_slots,
                                  readings, old_route.tcp if old_route else False)
    if not same:
        routers = _rerouted(previous.routers, resolved, rematched)
        # what the changed services and the matches resolved again said before, said afresh below
        stale = [p for s in changed if (rd := previous.readings.get(s)) for p in rd.problems]
        stale += [p for s in changed for p in previous.refused.get(s, ())]
        stale += [p for m in rematched for p in previous.resolved.get(m, ((), ()))[1]]
        problems = _without(previous.problems, stale)
        problems += tuple(p for m in sorted(rematched) if m in resolved for p in resolved[m][1])
    else:
        routers = previous.routers
        problems = tuple(p for p in previous.problems if p.subject not in changed)
    problems += tuple(p for s in sorted(fresh) for p in fresh[s].problems + refused.get(s, ()))
    return derive(previous, routes, frozenset(rematched), routers, problems, readings, claims, resolved, refused)


def _rerouted(routers: tuple[Router, ...], resolved: Mapping[tuple, Resolution], matches: set[tuple]
              ) -> tuple[Router, ...]:
    """`routers` (in match order, as `_table` lists them) with those of `matches` as `resolved`
    has them now: a binary search per match, not a walk through every router."""
    out = list(routers)
    for match in sorted(matches):
        low = bisect.bisect_left(out, match, key=_match)
        high = bisect.bisect_right(out, match, key=_match, lo=low)
        out[low:high] = resolved.get(match, ((), ()))[0]
    return tuple(out)


def _match(router: Router) -> tuple:
    return router.match


def _without(problems: tuple[Problem, ...], stale: Iterable[Problem]) -> tuple[Problem, ...]:
    """`problems` less one of each of `stale` (they are listed once per source)."""
    left = Counter(stale)
    out = []
    for problem in problems:
        if left[problem]:
            left[problem] -= 1
        else:
            out.append(problem)
    return tuple(out)


def place(servers: Mapping[tuple[str, str], Server], old: tuple[Server | None, ...],
          min_slots: int) -> tuple[Server | None, ...]:
    """Servers into slots: each keeps its old slot; newcomers take the lowest free ones."""
    capacity = max(len(old), min_slots)
    while capacity < len(servers):
        capacity *= 2
    slots: list[Server | None] = [None] * capacity
    placed = set()
    for i, prev in enumerate(old):
        if prev is not None and prev.key in servers:
            slots[i] = servers[prev.key]
            placed.add(prev.key)
    free = (i for i, s in enumerate(slots) if s is None)
    for key in sorted(servers):
        if key not in placed:
            slots[next(free)] = servers[key]
    return tuple(slots)
