"""Dynamic backends: a new vhost gets its own backend live on HAProxy ≥ 3.4 (`add backend`).

HAProxy 3.4 can add a backend at runtime (`add backend be_NAME from routes`, the configuration's
named defaults section), give it servers (`add server`) and make it reachable (`publish backend`).
A new route whose backend would render as just that (default options, HTTP only: `balance
roundrobin` and its server lines) is `mark`ed `dynamic` when the probed HAProxy can
(`Capabilities.add_backend`) and live vhost changes are on (`--spare-backends` above 0). The plan
(edge.routing.plan) then adds its backend, a free server per slot as the configuration renders it
(edge.routing.growth), fills the slots (address first, then ready), publishes the backend, and
only then points the map entries at it. The files written after the change declare it as an
ordinary `be_NAME`, so the stats page, Prometheus labels, `edge routes` and the landing page name
the route itself; a reload loads the same backend from the file (`release` clears the flag).

A removed route leaves the maps first and its slots go to maintenance; it stays retired (empty,
unmapped: edge.routing.spares) while `delete_commands` remove its backend: `unpublish backend`, a
check that only its servers are in the way (`wait 1ms be-removable` answers that before anything
is deleted: a backend the loaded configuration names, e.g. in the landing page's `nbsrv`, cannot
be deleted), `wait … srv-removable` for every server, `del server`, `wait … be-removable`,
`del backend`. The control loop sends them once the removal applied (each `wait` on its own, so
nothing is deleted once one failed); when they succeed it `forget`s the route; when HAProxy
refuses, the route stays retired and the deletion is tried again at each reconcile
(`kept_backends`: a client's keep-alive connection still attached to a server makes HAProxy answer
"Server still has connections attached to it" at once, until that connection closes) or the next
reload drops it. Only a backend added live is deleted: one loaded from the configuration is named
by the landing page.

Until then, the 503 page of a backend added live is HAProxy's own (the rendered `http-error`
naming the route comes with the next reload), as is the landing page's list (read at load).
On 2.6–3.3, and on 3.4 once `add backend` was refused at runtime, new vhosts take spare backends.
Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import replace

from edge.haproxy.capabilities import Capabilities
from edge.routing import growth
from edge.routing.routers import BackendOptions
from edge.routing.spares import SparePool, new_routes
from edge.routing.table import Route, RouteTable, slot_name

DEFAULTS = "routes"   # the templates' named defaults section a backend added live takes its settings from
WAIT = "500ms"        # how long a removal waits for a server's last connections before it keeps the backend


def fits(route: Route) -> bool:
    """Whether `add backend … from routes` plus `add server` make what the configuration renders
    for `route`: default options (no backend lines), HTTP only."""
    return not route.tcp and route.options == BackendOptions()


def mark(live: RouteTable | None, desired: RouteTable, caps: Capabilities, pool: SparePool) -> RouteTable:
    """`desired` with every new route (not in `live`) that can get its own backend live marked
    `dynamic`. Unchanged (the same object) when there is none."""
    if live is None or pool.size == 0 or not caps.add_backend:
        return desired
    new = [r for r in new_routes(live, desired) if not r.dynamic and fits(r)]
    if not new:
        return desired
    return desired.with_routes(replace(r, dynamic=True) for r in new)


def create_commands(route: Route) -> list[str]:
    """The new route's backend and its free slots, unpublished (the plan fills them, then `publish`)."""
    return [f"add backend {route.backend} from {DEFAULTS}", *growth.add_commands(replace(route, slots=()), route)]


def publish(route: Route) -> str:
    return f"publish backend {route.backend}"


def delete_commands(route: Route, caps: Capabilities) -> tuple[str, ...]:
    """A removed route's backend deleted (its map entries gone, its slots in maintenance):
    nothing is deleted before HAProxy said the backend can go once its servers have."""
    backend, servers = route.backend, [f"{route.backend}/{slot_name(i)}" for i in range(len(route.slots))]
    waits = [f"wait {WAIT} srv-removable {s}" for s in servers] if caps.wait_srv_removable else []
    return (f"unpublish backend {backend}", f"wait 1ms be-removable {backend}", *waits,
            *(f"del server {s}" for s in servers), f"wait {WAIT} be-removable {backend}", f"del backend {backend}")


def kept_backends(table: RouteTable, caps: Capabilities) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The deletions to try again: routes retired on a backend added live (HAProxy refused to
    delete it when they were removed)."""
    if not caps.del_backend:
        return ()
    return tuple((r.name, delete_commands(r, caps)) for r in table.routes if r.retired and r.dynamic)


def forget(table: RouteTable, name: str) -> RouteTable:
    """`table` without the retired route `name`, whose backend HAProxy deleted."""
    return table.with_routes(removed=(name,))


def loaded(table: RouteTable) -> RouteTable:
    """`table` as an HAProxy started from its files has it: every backend loaded from the
    configuration, none added live (the same object when none was)."""
    if not any(r.dynamic for r in table.routes):
        return table
    return replace(table, routes=tuple(replace(r, dynamic=False) if r.dynamic else r for r in table.routes))
