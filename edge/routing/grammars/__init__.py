"""The tag grammars, and what a service's instances say through them taken together.

Each grammar is a pure parser from one instance's tags (and meta) to routers, backend options
and warnings: `edge` (our own `edge.` tags), `fabio` (`urlprefix-`), `traefik` (Consul Catalog
`traefik.` tags). `--tag-grammar` chooses which are read. `read_service` applies them to every
instance of a service, fills in each router's backend (the instance's route), merges backend
options (a disagreement is logged and settled the same way every time) and applies exposure:
`--expose all` gives every service its zero-config vhosts (today's behaviour), `--expose
tagged` only those that opt in (`edge.expose=true`, `traefik.enable=true`); an opt-out
(`edge.expose=false`, `traefik.enable=false`) keeps a service off the edge entirely. Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from edge.routing.grammars import edge, fabio, traefik
from edge.routing.model import Instance, Problem, route_name
from edge.routing.routers import BackendOptions, Origin, Parsed, Router

Parser = Callable[[str, Iterable[str], Iterable[tuple[str, str]]], Parsed]
GRAMMARS: dict[str, Parser] = {edge.NAME: edge.parse, fabio.NAME: fabio.parse, traefik.NAME: traefik.parse}
DEFAULT = (edge.NAME,)


@dataclass(frozen=True)
class ServiceRouting:
    """What the chosen grammars make of one service."""

    vhosts: bool = True                     # its routes get their zero-config vhosts
    routers: tuple[Router, ...] = ()        # with backends (route names), sorted, without duplicates
    options: tuple[tuple[str, BackendOptions], ...] = ()   # route name → options, where not default
    weights: tuple[tuple[tuple[str, str], int], ...] = ()  # instance key → server weight, where set
    problems: tuple[Problem, ...] = ()

    def options_of(self, route: str) -> BackendOptions:
        return dict(self.options).get(route, BackendOptions())


def read_service(service: str, instances: Iterable[Instance], grammars: tuple[str, ...] = DEFAULT,
                 expose_all: bool = True) -> ServiceRouting:
    readings: dict[tuple, list[Parsed]] = {}
    routers, weights, problems = set(), {}, set()
    settings: dict[str, dict[str, set[tuple[object, Origin]]]] = {}
    opted_in = opted_out = False
    for inst in instances:
        key = (inst.tags, inst.meta)
        if key not in readings:   # instances of a service mostly carry the same tags: read them once
            readings[key] = [GRAMMARS[g](service, inst.tags, inst.meta) for g in grammars]
        route = route_name(inst.service, inst.container_port)
        for parsed in readings[key]:
            problems.update(parsed.problems)
            opted_in |= parsed.expose is True
            opted_out |= parsed.expose is False
            routers.update(replace(r, backend=route) for r in parsed.routers)
            for name, value, origin in parsed.options:
                settings.setdefault(route, {}).setdefault(name, set()).add((value, origin))
            if parsed.weight is not None:
                weights[inst.key] = parsed.weight
    if opted_out:
        return ServiceRouting(vhosts=False, problems=tuple(sorted(problems)))
    options = []
    for route, chosen in sorted(settings.items()):
        values = {}
        for name, candidates in sorted(chosen.items()):
            value, origin = min(candidates, key=lambda c: (c[1], repr(c[0])))
            values[name] = value
            if len({repr(v) for v, _ in candidates}) > 1:
                problems.add(Problem(service, f"backend {route}: {name} is set differently by "
                                              f"{', '.join(sorted(str(o) for _, o in candidates))}; "
                                              f"{value!r} from {origin} is used"))
        options.append((route, BackendOptions(**values)))
    return ServiceRouting(vhosts=expose_all or opted_in, routers=tuple(sorted(routers, key=lambda r: r.key)),
                          options=tuple(options), weights=tuple(sorted(weights.items())),
                          problems=tuple(sorted(problems)))
