"""What the templates see of backends and routers: server lines, backend options, router maps,
access rules, TCP listeners, SNI passthrough and the landing page's routes by path.

Every string here is built from values the routers module validated (host names, paths, CIDRs,
crypt hashes, numbers), so it can go into haproxy.cfg as it is. `edge.routing.render` hands these
to the templates. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from markupsafe import Markup

from edge.routing.maps import (
    EXACT_MAP,
    HOST_HEADERS_MAP,
    PATHS_MAP,
    REDIRECTS_MAP,
    ROUTERS_MAP,
    SPLITS_MAP,
    STRIP_MAP,
    access,
    mapped,
)
from edge.routing.routers import SNI, TCP, Credential, Router
from edge.routing.table import Route, RouteTable, slot_name

SNI_MAP = "sni.map"
TLS_SOCKET = "tls.sock"     # the TLS port's local hop to the terminating frontend, beside the runtime socket


@dataclass(frozen=True)
class RouterMaps:
    """The router maps' file names, for the template (present only when the table has routers)."""

    paths: str = PATHS_MAP
    exact: str = EXACT_MAP
    routers: str = ROUTERS_MAP
    strip: str = STRIP_MAP
    redirects: str = REDIRECTS_MAP
    splits: str = SPLITS_MAP
    host_headers: str = HOST_HEADERS_MAP


@dataclass(frozen=True)
class SlotView:
    name: str
    address: str    # `IP:PORT` for HAProxy; the parked placeholder for a free slot
    free: bool
    params: str = ""   # the server's keywords from the backend's options (each after a space)


def slots(route: Route) -> list[SlotView]:
    return [SlotView(slot_name(i), "0.0.0.0:0", True, server_params(route, i, None)) if s is None
            else SlotView(slot_name(i), f"{s.address}:{s.port}", False, server_params(route, i, s.weight))
            for i, s in enumerate(route.slots)]


def server_params(route: Route, index: int, weight: int | None) -> str:
    """` weight 5 cookie s1 maxconn 10 ssl verify none ...`: every value is validated (routers)."""
    o = route.options
    words = [f"weight {weight}"] if weight is not None else []
    words += [f"cookie {slot_name(index)}"] if o.sticky else []
    words += [f"maxconn {o.maxconn}"] if o.maxconn else []
    if o.protocol == "h2c":
        words.append("proto h2")
    elif o.protocol in ("https", "h2"):
        # Verified against the system's CAs and the name the client asked for (sent as SNI).
        words.append("ssl verify required ca-file @system-ca sni var(txn.host)" if o.verify else "ssl verify none")
        words += ["alpn h2"] if o.protocol == "h2" else []
    words += ["send-proxy"] if o.send_proxy else []
    return "".join(f" {w}" for w in words)


def backend_lines(route: Route, tcp: bool = False) -> list[str]:
    """A backend's own lines from its options (sticky cookie in HTTP, timeouts)."""
    o = route.options
    return ([f"cookie {o.sticky} insert indirect nocache httponly"] if o.sticky and not tcp else []) + \
        ([f"timeout connect {o.connect_timeout}ms"] if o.connect_timeout else []) + \
        ([f"timeout server {o.server_timeout}ms"] if o.server_timeout else [])


def tcp_server_params(route: Route, weight: int | None) -> str:
    """A TCP backend's server keywords: those of `server_params` that apply to a byte stream."""
    o = route.options
    words = ([f"weight {weight}"] if weight is not None else []) + ([f"maxconn {o.maxconn}"] if o.maxconn else [])
    return "".join(f" {w}" for w in words + (["send-proxy"] if o.send_proxy else []))


def tcp_slots(route: Route) -> list[SlotView]:
    """A TCP backend's slots: the same servers, with the keywords that apply to a byte stream."""
    return [SlotView(slot_name(i), "0.0.0.0:0", True, tcp_server_params(route, None)) if s is None
            else SlotView(slot_name(i), f"{s.address}:{s.port}", False, tcp_server_params(route, s.weight))
            for i, s in enumerate(route.slots)]


@dataclass(frozen=True)
class TcpListener:
    """A TCP router's listener: the edge's port, its access rules, its route's TCP backend."""

    port: int
    bind: str
    backend: str
    rules: tuple[str, ...]


def _src_rules(action: str, condition: str, router: Router) -> list[str]:
    return ([f"{action} if {condition}{{ src {' '.join(router.deny)} }}"] if router.deny else []) + \
        ([f"{action} if {condition}!{{ src {' '.join(router.allow)} }}"] if router.allow else [])


def tcp_listeners(table: RouteTable, bind: str) -> list[TcpListener]:
    """One per TCP router, on the address of the HTTP listener (`bind`, `ADDR:PORT`)."""
    address = bind.rsplit(":", 1)[0]
    return [TcpListener(r.port, f"{address}:{r.port}", f"tcp_{r.backend}",
                        tuple(_src_rules("tcp-request connection reject", "", r)))
            for r in sorted((r for r in table.routers if r.kind == TCP), key=lambda r: r.port)]


@dataclass(frozen=True)
class SniView:
    """TLS passed through by name on the HTTPS port; the rest goes on to be terminated."""

    map: str
    socket: str                     # `unix@…`: the local hop to `frontend http`, with the PROXY protocol
    rules: tuple[str, ...]


def sni_entries(table: RouteTable) -> dict[str, str]:
    return {r.host: f"tcp_{r.backend}" for r in table.routers if r.kind == SNI}


def sni_view(table: RouteTable, https: bool, runtime_socket: str) -> SniView | None:
    """None without SNI routers or an HTTPS port; the local hop's socket sits beside the runtime one."""
    routers = [r for r in table.routers if r.kind == SNI]
    if not routers or not https:
        return None
    rules = []
    for r in routers:
        exact = "{ req.ssl_sni,lower -m str " + r.host + " } "
        wild = ("{ req.ssl_sni,lower,regsub('^[^.]*','*') -m str " + r.host + " } "
                "!{ req.ssl_sni,lower,map_str(" + SNI_MAP + ") -m found } ")
        key = wild if r.host.startswith("*.") else exact
        rules += _src_rules("tcp-request content reject", key, r)
    return SniView(SNI_MAP, f"unix@{PurePosixPath(runtime_socket).parent / TLS_SOCKET}", tuple(rules))


@dataclass(frozen=True)
class AccessView:
    """A router's access rules as the frontend checks them (router id, CIDRs, a userlist)."""

    id: str
    allow: str
    deny: str
    userlist: str
    users: tuple[Credential, ...]


def access_rules(table: RouteTable) -> list[AccessView]:
    return [AccessView(rid, " ".join(r.allow), " ".join(r.deny), f"users_{rid}" if r.users else "", r.users)
            for rid, r in sorted(access(table.routers).items())]


@dataclass(frozen=True)
class RouterView:
    """A route by path, as the landing page lists it."""

    match: str
    host: str
    path: str
    link: bool
    backend: str
    healthy: Markup


def router_views(table: RouteTable) -> list[RouterView]:
    return [RouterView(r.describe(), r.host, r.path, bool(r.host) and not r.host.startswith("*."), r.backend,
                       Markup(f"%[nbsrv({table.backend_of(r.backend)})]")) for r in mapped(table.routers)]
