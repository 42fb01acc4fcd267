"""The route table: which vhost goes to which healthy servers, in stable server slots.

`build_table(services, previous)` groups instances into routes by their route name, filters
the healthy ones and places each in a server slot. An instance keeps its slot for as long as it
stays healthy, so a change moves as few slots as possible and can be applied through HAProxy's
runtime API; a backend's slot count only grows (doubling) when it is full. Pure: no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from edge.model import Instance, Problem, edge_hosts, route_name

MIN_SLOTS = 4


@dataclass(frozen=True, order=True)
class Server:
    """A healthy instance placed in a backend slot."""

    address: str
    port: int
    node: str
    service_id: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.node, self.service_id)

    def __str__(self) -> str:
        return f"{self.address}:{self.port} ({self.service_id}@{self.node})"


@dataclass(frozen=True)
class Route:
    """One vhost `<name>.<domain>` (plus exact hosts from tags) and its backend's slots."""

    name: str
    hosts: tuple[str, ...]
    slots: tuple[Server | None, ...]
    instances: int

    @property
    def backend(self) -> str:
        return f"be_{self.name}"

    @property
    def servers(self) -> tuple[Server, ...]:
        return tuple(sorted(s for s in self.slots if s is not None))

    @property
    def healthy(self) -> int:
        return sum(s is not None for s in self.slots)


@dataclass(frozen=True)
class RouteTable:
    routes: tuple[Route, ...] = ()
    _by_name: dict[str, Route] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {r.name: r for r in self.routes})

    def get(self, name: str) -> Route | None:
        return self._by_name.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.routes)


def build_table(services: Mapping[str, tuple[Instance, ...]], previous: RouteTable | None = None,
                min_slots: int = MIN_SLOTS) -> tuple[RouteTable, tuple[Problem, ...]]:
    previous = previous or RouteTable()
    problems: list[Problem] = []
    members: dict[str, list[Instance]] = defaultdict(list)
    for service in sorted(services):
        for inst in services[service]:
            name = route_name(inst.service, inst.container_port)
            if name is None:
                problems.append(Problem(f"{inst.service}/{inst.service_id}",
                                        f"route name for port {inst.container_port} is not a safe host label"))
                continue
            members[name].append(inst)

    claims: dict[str, set[str]] = defaultdict(set)
    for name, insts in members.items():
        for inst in insts:
            hosts, bad = edge_hosts(inst.tags)
            for host in hosts:
                claims[host].add(name)
            problems.extend(Problem(f"{inst.service}/{inst.service_id}", f"edge.host tag {b!r} is not a host name")
                            for b in bad)
    owner: dict[str, list[str]] = defaultdict(list)
    for host, names in sorted(claims.items()):
        winner = min(names)
        owner[winner].append(host)
        if len(names) > 1:
            problems.append(Problem(host, f"claimed by routes {sorted(names)}; {winner} keeps it"))

    routes = []
    for name in sorted(members):
        insts = members[name]
        healthy = {i.key: Server(i.address, i.port, i.node, i.service_id) for i in insts if i.healthy}
        old = previous.get(name)
        slots = place(healthy, old.slots if old else (), min_slots)
        routes.append(Route(name=name, hosts=tuple(sorted(owner.get(name, ()))), slots=slots, instances=len(insts)))
    return RouteTable(tuple(routes)), tuple(sorted(set(problems)))


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
