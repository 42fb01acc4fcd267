"""Growth: a full backend gets more server slots live, with `add server`, on every release.

The table doubles a route's slots when its healthy instances outgrow them (edge.routing.table,
`place`: 4, 8, 16, … with `--min-slots 4`), so a backend grows rarely and each growth adds as
many slots as it had: a route of N instances has needed about N `add server` in all, in
log2(N / min-slots) steps. The plan (edge.routing.plan) sends, for every backend of the route
(its HTTP one, its TCP one), one `add server BE/sK 0.0.0.0:0 KEYWORDS` per new slot: a free slot
exactly as the configuration renders it (same placeholder address, same keywords from
edge.routing.views; a dynamic server starts in maintenance as a rendered `disabled` one does),
then fills the new slots like any free slot (`set server … addr`, then `state ready`). The new
slots are part of the route (a frozen value), so the files written after the change declare
them as ordinary `server` lines: a reload gives the same routing, though the servers added at
runtime vanish with the old worker.

No `init-state`: it sets the first health-check state of a server, and the edge's servers have no
checks; a server added with it starts in maintenance all the same (recorded on 3.2 and 3.4).

A route on a spare backend grows the spare the same way; the spare then has more slots than the
pool's, so when its route leaves it stays with it, retired, until the next reload frees it
(edge.routing.spares, `retire`). A growth HAProxy cannot apply live is a reload with its reason
(`refusal`): no dynamic servers (an HAProxy not yet probed), a sticky route where `add server`
refuses `cookie` (2.6).
Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import replace

from edge.haproxy.capabilities import Capabilities
from edge.routing.table import Route, slot_name
from edge.routing.views import server_params, tcp_server_params

FREE_ADDRESS = "0.0.0.0:0"   # a free slot's placeholder, as the templates render it


def refusal(old: Route, new: Route, caps: Capabilities) -> str:
    """Why `new`'s extra slots cannot be added live here; "" when they can."""
    grew = f"{new.name} grew from {len(old.slots)} to {len(new.slots)} slots"
    if not caps.dynamic_servers:
        return f"{grew} (this HAProxy cannot add servers at runtime)"
    if new.options.sticky and not caps.server_cookie:
        return f"{grew} (sticky: HAProxy {caps.version} refuses `cookie` on a server added at runtime)"
    return ""


def add_commands(old: Route, new: Route) -> list[str]:
    """`add server` for every slot `new` has beyond `old`'s, in every backend of the route, free
    and with the keywords the configuration renders for that slot."""
    added = range(len(old.slots), len(new.slots))
    commands = [f"add server {new.backend}/{slot_name(i)} {FREE_ADDRESS}{server_params(new, i, None)}"
                for i in added]
    if new.tcp:
        commands += [f"add server {new.tcp_backend}/{slot_name(i)} {FREE_ADDRESS}{tcp_server_params(new, None)}"
                     for i in added]
    return commands


def with_free_slots(old: Route, new: Route) -> Route:
    """`old` as it is once the new slots are added: the same servers, and free slots up to `new`'s
    count (what the plan then fills like any other free slot)."""
    return replace(old, slots=old.slots + (None,) * (len(new.slots) - len(old.slots)))
