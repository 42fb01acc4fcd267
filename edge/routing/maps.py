"""Router maps: the data HAProxy looks HTTP routers up in, per request.

A router's match is a map key: `host/path` for an exact host, `*.domain/path` for a wildcard and
`/path` for any host (host names hold no `/`, so the three never collide). `paths.map` is read
with `map_beg` (the longest prefix wins), `paths_exact.map` with `map_str`. Both give a router
id; `routers.map` gives that router's backend, so a route is bound to a backend through a map
and never by a rule of its own: changing either is a runtime map command, not a reload. The
router's actions are data too: `strip.map` (how many characters leave the path's front),
`redirects.map` (`code|when|prefix|h|suffix|p`: the Location is prefix, the request's host when
`h`, suffix, its path and query when `p`; `when` limits it to `http` or `https` requests) and
`host_headers.map` (the Host header the backend gets), `splits.map` for a match several
backends share by weight (`T1|be_1|T2|be_2|...`, cumulative
thresholds in permille: a request drawing a number under T1 goes to be_1, else under T2 to be_2
...). Access rules (allow/deny lists, basic auth) need configuration lines (`access`): a change
there is a reload.

Only routers that are more than a whole exact host go here: those stay in the host map, as
before routers existed. The host maps themselves (`hosts.map`: exact host → backend; `routes.map`
without domains: route name → backend; `spares.map`: spare → its route) are built here too
(`host_maps`), so the plan can change their entries at runtime when a route takes or leaves a
spare backend (edge.routing.spares).

A router names its route; `backend_of` (the table's) says which HAProxy backend serves that route
now: `be_<route>`, or the spare `be_spare_K` it occupies (spares.map names the route of each
spare taken live). Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from edge.routing.routers import HTTP, SPLIT_PARTS, Router

if TYPE_CHECKING:
    from edge.routing.table import Route, RouteTable

BackendOf = Callable[[str], str]


def own_backend(route: str) -> str:
    return f"be_{route}"


PATHS_MAP = "paths.map"
EXACT_MAP = "paths_exact.map"
ROUTERS_MAP = "routers.map"
STRIP_MAP = "strip.map"
REDIRECTS_MAP = "redirects.map"
SPLITS_MAP = "splits.map"
HOST_HEADERS_MAP = "host_headers.map"
HOSTS_MAP = "hosts.map"
ROUTES_MAP = "routes.map"
SPARES_MAP = "spares.map"
HOST_MAPS = (HOSTS_MAP, ROUTES_MAP, SPARES_MAP)
MAPPED = "mapped"     # in `map_sizes`: how many matches need the router maps
OPTIONAL_MAPS = (SPARES_MAP,)   # read by the templates' pages only: a template of one's own may not load it
ROUTER_MAPS = (PATHS_MAP, EXACT_MAP, ROUTERS_MAP, STRIP_MAP, REDIRECTS_MAP, SPLITS_MAP, HOST_HEADERS_MAP)

STRIP_BITS = (128, 64, 32, 16, 8, 4, 2, 1)    # a path prefix is at most 200 characters
REDIRECT_CODES = (301, 302, 303, 307, 308)


def router_id(router: Router) -> str:
    """Stable across edges and restarts: the same match always has the same id."""
    return "r" + hashlib.sha1(repr(router.match).encode()).hexdigest()[:12]


def map_key(router: Router) -> str:
    return f"{router.host}{router.path}"


def mapped(routers: Iterable[Router]) -> list[Router]:
    """The HTTP routers that need the router maps (the first of each match)."""
    return [parts[0] for parts in split_groups(routers)]


def _http_groups(routers: Iterable[Router]) -> list[list[Router]]:
    groups: dict[tuple, list[Router]] = {}
    for router in routers:
        if router.kind == HTTP:
            groups.setdefault(router.match, []).append(router)
    return list(groups.values())


def split_groups(routers: Iterable[Router]) -> list[list[Router]]:
    """The HTTP routers that need the router maps, by match: one each, or the parts of a split."""
    return [parts for parts in _http_groups(routers) if len(parts) > 1 or not parts[0].plain_host]


def split_value(parts: list[Router], backend_of: BackendOf = own_backend) -> str:
    """`T1|be_1|...`, padded to SPLIT_PARTS with the last part. Shares are permille of the match;
    parts without one share what the others leave; shares adding up to more (or leaving traffic
    to no one) are scaled to the whole, as fabio does."""
    fixed = sum(r.share for r in parts)
    free = [r for r in parts if not r.share]
    if fixed >= 1000 or not free:
        shares = [r.share * 1000 / fixed for r in parts]
    else:
        shares = [r.share or (1000 - fixed) / len(free) for r in parts]
    out, total = [], 0.0
    for router, share in zip(parts, shares, strict=True):
        total += share
        out.append((round(total) if router is not parts[-1] else 1000, backend_of(router.backend)))
    out += [out[-1]] * (SPLIT_PARTS - len(out))
    return "|".join(f"{t}|{b}" for t, b in out)


def redirect_value(router: Router) -> str:
    r = router.redirect
    if r.location:
        return f"{r.code}|{r.when}|{r.location}||" + "|" + ("p" if r.keep_path else "")
    return f"{r.code}|{r.when}|{r.scheme}://|h|{f':{r.port}' if r.port else ''}|{'p' if r.keep_path else ''}"


def router_maps(routers: Iterable[Router], backend_of: BackendOf = own_backend) -> dict[str, dict[str, str]]:
    """Map name → key → value, for every router map."""
    maps: dict[str, dict[str, str]] = {name: {} for name in ROUTER_MAPS}
    for parts in split_groups(routers):
        router = parts[0]
        rid = router_id(router)
        if len(parts) > 1:
            maps[SPLITS_MAP][rid] = split_value(parts, backend_of)
        maps[EXACT_MAP if router.exact else PATHS_MAP][map_key(router)] = rid
        maps[ROUTERS_MAP][rid] = backend_of(router.backend)
        if router.strip:
            maps[STRIP_MAP][rid] = str(len(router.strip))
        if router.redirect:
            maps[REDIRECTS_MAP][rid] = redirect_value(router)
        if router.set_host:
            maps[HOST_HEADERS_MAP][rid] = router.set_host
    return maps


def vhosts(table: RouteTable, domains: tuple[str, ...]) -> dict[str, str]:
    """Every host name the table routes → its backend. Exact hosts from `edge.host` tags come
    first and win over a generated `<route>.<domain>`; without domains only exact hosts are names."""
    seen: dict[str, str] = {}
    for route in table.routes:
        for host in route.hosts:
            seen.setdefault(host, route.backend)
    for route in table.routes:
        for domain in domains if route.vhost else ():
            seen.setdefault(f"{route.name}.{domain}", route.backend)
    return seen


def host_maps(table: RouteTable, domains: tuple[str, ...], routes: Iterable[Route] | None = None
              ) -> dict[str, dict[str, str]]:
    """hosts.map (exact host → backend), routes.map (without domains: route → backend) and
    spares.map (a spare backend taken live → the route it serves: what the landing page and a
    spare's 503 page name, since HAProxy reads both only at load). With `routes`, only the
    entries those routes can have (their exact hosts and vhosts, their name, their spare), as
    `table` has them, looked up in its indexes: all that differs between two tables that differ
    in those routes only, at a cost that follows them and not the table."""
    if routes is None:
        names = {} if domains else {r.name: r.backend for r in table.routes if r.vhost}
        spares = {r.backend: r.name for r in table.routes if r.spare}
        return {HOSTS_MAP: vhosts(table, domains), ROUTES_MAP: names, SPARES_MAP: spares}
    hosts, names, spares = set(), set(), set()
    for route in routes:
        hosts.update(route.hosts)
        hosts.update(f"{route.name}.{domain}" for domain in domains)
        names.add(route.name)
        spares.add(route.spare)
    on_spare = table.spares
    return {HOSTS_MAP: {h: b for h in sorted(hosts) if (b := _vhost(table, h, domains)) is not None},
            ROUTES_MAP: {} if domains else {n: r.backend for n in sorted(names) if (r := table.get(n)) and r.vhost},
            SPARES_MAP: {table.backend_of(on_spare[k]): on_spare[k] for k in sorted(spares) if k in on_spare}}


def map_sizes(table: RouteTable, domains: tuple[str, ...]) -> dict[str, int]:
    """How many entries each map the plan changes (the host maps, the router maps) holds for
    `table`, and how many matches need the router maps (MAPPED); kept with the table."""
    def count() -> dict[str, int]:
        maps = host_maps(table, domains) | router_maps(table.routers, table.backend_of)
        return {m: len(entries) for m, entries in maps.items()} | {MAPPED: len(mapped(table.routers))}
    return table.derived(("map sizes", domains), count)


def changed_maps(live: RouteTable, desired: RouteTable, domains: tuple[str, ...], routes: Iterable[Route],
                 old_routers: list[Router], new_routers: list[Router]
                 ) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]], dict[str, int], dict[str, int]]:
    """The map entries `routes` can have (`host_maps`) and those of the routers of some matches
    (`live`'s `old_routers`, `desired`'s `new_routers`), in `live` and in `desired`: all that
    differs when the two tables differ in those only. And the sizes of `live`'s maps and of
    `desired`'s (`map_sizes`), the latter `live`'s plus the difference, kept with `desired` (the
    next change's live table) so that no change counts the whole maps again."""
    routes = list(routes)
    old = host_maps(live, domains, routes) | router_maps(old_routers, live.backend_of)
    new = host_maps(desired, domains, routes) | router_maps(new_routers, desired.backend_of)
    before = map_sizes(live, domains)
    after = {m: before[m] + len(new[m]) - len(old[m]) for m in old}
    after[MAPPED] = before[MAPPED] - len(mapped(old_routers)) + len(mapped(new_routers))
    desired.keep(("map sizes", domains), after)
    return old, new, before, after


def _vhost(table: RouteTable, host: str, domains: tuple[str, ...]) -> str | None:
    """The backend `vhosts(table, domains)` sends `host` to: the first route with it as an exact
    host, else the route whose `<name>.<domain>` it is (route names hold no dot)."""
    owners = table.with_host(host)
    if owners:
        return table.backend_of(owners[0])
    name, _, domain = host.partition(".")
    route = table.get(name)
    return route.backend if route is not None and route.vhost and domain in domains else None


def table_maps(table: RouteTable, domains: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Every map the runtime API changes, as HAProxy loads it from the table's files: the host map,
    the route map (only without domains: the frontend reads it then), and the router maps when an
    HTTP router needs them. What `reconcile` compares with HAProxy's `show map`."""
    maps = host_maps(table, domains)
    if domains:
        del maps[ROUTES_MAP]
    if mapped(table.routers):
        maps.update(router_maps(table.routers, table.backend_of))
    return maps


def map_text(entries: Mapping[str, str]) -> str:
    return "".join(f"{k} {v}\n" for k, v in sorted(entries.items()))


# Maps a request is looked up by (host, route name, path): swapped whole when several of their
# entries change together. The maps they point into (keyed by router id) are not: a router's
# entries there change across several maps at once, which no per-map swap makes atomic; the order
# of `map_commands` keeps them consistent instead.
SWAPPED_MAPS = (PATHS_MAP, EXACT_MAP, HOSTS_MAP, ROUTES_MAP)
# A swap rewrites the whole map, a plain command one entry: see `swapped` for the figures.
SWAP_MAX_ENTRIES = 500
SWAP_SHARE = 5
NEXT_VERSION = "@next"     # the version `prepare map` answers; the HAProxy shell fills it in


def swapped(old: Mapping[str, str], new: Mapping[str, str], size: int | None = None) -> bool:
    """Whether the change from `old` to `new` goes in one atomic swap (`prepare map`, the new
    version's entries, `commit map @VER`: HAProxy ≥ 2.4) rather than entry by entry (`add`,
    `set`, `del map`), so requests see the map before or after the change, never half-way.

    A single changed entry is atomic anyway: plain. Two or more are swapped while the map holds
    at most SWAP_MAX_ENTRIES, or when at least one entry in SWAP_SHARE changes. Measured with
    bench/map_swap.py on 2.6, 3.0, 3.2 and 3.4 (load average ~7 on 2 cores): a swap costs
    ~6 ms per 1,000 entries (the entries go as payloads; 10,000: 57–64 ms, 1,000: 5–12 ms, 100:
    ~1 ms), a two-entry plain change 0.2–2 ms whatever the size, and a plain command ~27 µs an
    entry in a `;` batch. So a swap of a 10,000-entry host map would take a new vhost far past
    its 15 ms budget: past 500 entries (~3 ms) only a change of a fifth of the map or more,
    which plain commands would take as long to make, is swapped. `size`: how many entries the
    new map holds when `old` and `new` are only the entries that differ (`changed_maps`)."""
    changed = sum(1 for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    size = len(new) if size is None else size
    return changed >= 2 and (size <= SWAP_MAX_ENTRIES or changed * SWAP_SHARE >= size)


def swap_commands(name: str, entries: Mapping[str, str]) -> list[str]:
    return [f"prepare map {name}", *(f"add map {NEXT_VERSION} {name} {k} {v}" for k, v in sorted(entries.items())),
            f"commit map {NEXT_VERSION} {name}"]


def map_commands(live: Mapping[str, Mapping[str, str]], desired: Mapping[str, Mapping[str, str]],
                 atomic: bool = False, sizes: Mapping[str, int] | None = None) -> list[str]:
    """Runtime commands from the live maps to the desired ones. A router's backend, strip and
    redirect are in place before a path key points at it, and a path key is gone before what it
    pointed at goes. With `atomic` (the HAProxy has `prepare map`), a map of SWAPPED_MAPS whose
    change is `swapped` is swapped whole where its additions would go: after the maps its keys
    point into gained their entries, before they lose any. `sizes`: the whole desired maps' sizes
    of those given only in the entries that may differ (`changed_maps`; the caller gives the whole
    map instead when it is to be swapped)."""
    adds, dels = [], []
    whole = {name for name in SWAPPED_MAPS
             if atomic and swapped(live.get(name, {}), desired.get(name, {}), (sizes or {}).get(name))}
    for name in (SPARES_MAP, ROUTERS_MAP, STRIP_MAP, REDIRECTS_MAP, SPLITS_MAP, HOST_HEADERS_MAP, PATHS_MAP,
                 EXACT_MAP, HOSTS_MAP, ROUTES_MAP):
        old, new = live.get(name, {}), desired.get(name, {})
        if name in whole:
            adds.extend(swap_commands(name, new))
            continue
        for key in sorted(new):
            if key not in old:
                adds.append(f"add map {name} {key} {new[key]}")
            elif old[key] != new[key]:
                adds.append(f"set map {name} {key} {new[key]}")
    for name in (HOSTS_MAP, ROUTES_MAP, PATHS_MAP, EXACT_MAP, ROUTERS_MAP, STRIP_MAP, REDIRECTS_MAP, SPLITS_MAP,
                 HOST_HEADERS_MAP, SPARES_MAP):
        old, new = live.get(name, {}), desired.get(name, {})
        if name not in whole:
            dels.extend(f"del map {name} {key}" for key in sorted(old) if key not in new)
    return adds + dels


def access(routers: Iterable[Router]) -> dict[str, Router]:
    """Router id → router, for the routers whose access rules (allow, deny, basic auth) are
    configuration lines of their own."""
    return {router_id(r): r for r in mapped(routers) if r.allow or r.deny or r.users}
