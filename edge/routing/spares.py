"""Spare backends: how a new vhost gets a backend without a reload on HAProxy 2.6–3.3.

HAProxy before 3.4 cannot add a backend at runtime, but it can fill the server slots of one it
already has (3.4 adds the route's own backend: edge.routing.dynamic; the pool stays declared there
as the fallback should HAProxy refuse `add backend`). So every configuration declares a pool of
empty backends (`be_spare_1` … `be_spare_N`, `--spare-backends`), each with the route default's
`balance` and options and `--min-slots` server slots parked in maintenance. A new route whose options are the defaults
(no sticky cookie, timeouts, connection cap, backend protocol; no TCP backend) and whose
instances fit those slots takes the lowest free spare: the plan (edge.routing.plan) fills its
slots (`set server … addr`, then `state ready`) and only then points the map entries at it.
A removed route that occupies a spare leaves the maps first, its slots go to maintenance, and
the spare is free again.

Which spare a route occupies is part of the route (`Route.spare`, a frozen value), so the files
written after a live change declare exactly what HAProxy runs: the spare with the route's
servers (and a `description` naming the route), the maps pointing at it, the free spares empty.
Any reload for another reason gives every route its own `be_<route>` again (`release`) and the
whole pool is free; when the pool is empty, a new vhost is a reload ("spare backends exhausted"),
and when it runs low (`running_low`: a quarter or less free) edge.refill schedules one reload at a
quiet moment.

A removed route on its own backend (default options, HTTP only) is `retire`d the same way: its
map entries go, its slots go to maintenance, and its backend stays declared, empty and unmapped
(`Route.retired`), until the next reload drops it; if the route comes back before that, it is
filled into its own backend again. So is a removed route on a spare it grew (edge.routing.growth:
`add server` gave the spare more slots than the pool's): the spare stays out of the pool, empty,
until the next reload.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge.routing.routers import BackendOptions
from edge.routing.table import MIN_SLOTS, Route, RouteTable

SPARE_PREFIX = "be_spare_"


@dataclass(frozen=True)
class SparePool:
    """The pool every configuration declares: `size` spares of `slots` server slots each."""

    size: int = 0
    slots: int = MIN_SLOTS

    def backend(self, index: int) -> str:
        return f"{SPARE_PREFIX}{index}"

    def free(self, table: RouteTable) -> tuple[int, ...]:
        """The spares no route of `table` occupies, lowest first."""
        used = table.spares
        return tuple(k for k in range(1, self.size + 1) if k not in used)

    def fits(self, route: Route) -> bool:
        """Whether a spare can serve `route` as its own backend would: default options, HTTP
        only, and its slots exactly the spare's."""
        return (not route.tcp and route.options == BackendOptions() and len(route.slots) == self.slots)


NO_POOL = SparePool()


def low_water(pool: SparePool) -> int:
    """At or below this many free spares the pool is refilled (edge.refill): a quarter of it, at
    least one. A deploy brings its services up within a second or so, rarely more than a few
    dozen at once (the default pool, 32, is sized for that): a quarter left still takes a burst
    of a quarter of the pool while the refill waits for quiet inputs, and refilling any earlier
    would cost reloads that no burst needed."""
    return max(1, pool.size // 4)


def running_low(pool: SparePool, table: RouteTable | None) -> str | None:
    """The reason to refill the pool now (a reload frees every spare), or None."""
    if pool.size == 0 or table is None:
        return None
    free = len(pool.free(table))
    if free == 0:
        return f"spare backends exhausted: 0 of {pool.size} free"
    if free <= low_water(pool):
        return f"spare backends running low: {free} of {pool.size} free"
    return None


def new_routes(live: RouteTable, desired: RouteTable) -> list[Route]:
    """The routes of `desired` that `live` lacks, in table order: of the routes `desired` says
    changed since `live` when it can say (update_table, `with_routes`), else of them all."""
    names = desired.changed_since(live)
    routes = desired.routes if names is None else [r for n in sorted(names) if (r := desired.get(n)) is not None]
    return [r for r in routes if live.get(r.name) is None]


def gone_routes(live: RouteTable, desired: RouteTable) -> list[Route]:
    """The routes of `live` that `desired` lacks, in table order (as `new_routes`)."""
    names = desired.changed_since(live)
    routes = live.routes if names is None else [r for n in sorted(names) if (r := live.get(n)) is not None]
    return [r for r in routes if desired.get(r.name) is None]


def assign(live: RouteTable | None, desired: RouteTable, pool: SparePool) -> RouteTable:
    """`desired` with a free spare for every new route (not in `live`) that fits one, as long as
    the pool lasts; routes keep the spare they occupy (the table carries it over). Unchanged
    (the same object) when there is nothing to assign."""
    if live is None or pool.size == 0:
        return desired
    new = [r for r in new_routes(live, desired) if not r.spare and not r.dynamic and pool.fits(r)]
    if not new:
        return desired
    # Not a spare `live` still has either: a route removed in the same change empties it only
    # after the maps have left it.
    held = live.spares
    free = [k for k in pool.free(desired) if k not in held]
    taken = {r.name: free.pop(0) for r in new if free}
    if not taken:
        return desired
    return desired.with_routes(replace(r, spare=taken[r.name]) for r in new if r.name in taken)


def retire(live: RouteTable | None, desired: RouteTable, pool: SparePool) -> RouteTable:
    """`desired` with every route `live` has and `desired` lacks kept as retired (slots free, no
    host, no vhost), when it is on its own backend with the default options or on a spare it grew
    (more slots than the pool's: edge.routing.growth), and every route already retired kept so; a
    removed route on a spare of the pool's size is not kept (its spare goes back to the pool).
    Unchanged (the same object) when there is nothing to keep."""
    if live is None or pool.size == 0:
        return desired
    kept = [r for r in gone_routes(live, desired) if (not r.spare or len(r.slots) > pool.slots)
            and (r.retired or (not r.tcp and r.options == BackendOptions()))]
    if not kept:
        return desired
    return desired.with_routes(r if r.retired else replace(r, hosts=(), slots=(None,) * len(r.slots), instances=0,
                                                           services=(), vhost=False, retired=True) for r in kept)


def release(table: RouteTable) -> RouteTable:
    """Every route on its own backend again, loaded from the configuration (not added live:
    edge.routing.dynamic), and the retired ones gone (what a reload renders); the same object when
    no route occupies a spare, is retired or was added live."""
    if not any(r.spare or r.retired or r.dynamic for r in table.routes):
        return table
    return replace(table, routes=tuple(replace(r, spare=0, dynamic=False) if r.spare or r.dynamic else r
                                       for r in table.routes if not r.retired))
