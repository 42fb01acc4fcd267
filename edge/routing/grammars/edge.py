"""The edge's own tag grammar: `edge.<key>=<value>` tags, or service meta `edge-<key>[-<any>]`.

    edge.host=<fqdn>                       the whole host goes to the service (unchanged since before routers)
    edge.route=<match> [<option> ...]      an HTTP router; <match> is `host/path`, `*.domain/path` or `/path`
        strip                              remove the route's path prefix before forwarding
        strip=<prefix>                     remove this prefix (one every matched path starts with)
        exact                              the path must equal <path>, not just start with it
        redirect=<code>,<url>[$path]       answer with a redirect (301/302/303/307/308) instead
        allow=<cidr>,... / deny=<cidr>,... only / never these client addresses
        auth=<user>:<crypt hash>,...       HTTP basic auth (hashes only, never a clear password)
        weight=<percent>                   this service's share of the match's traffic (canary)
    edge.tcp=<port> [allow=...] [deny=...] the edge's TCP port <port> goes to the service
    edge.sni=<host> [allow=...] [deny=...] TLS for <host> on the HTTPS port passes to the service untouched
    edge.expose=true|false                 opt in (under `--expose tagged`) or out of the edge entirely
    edge.proto=h1|h2c|https|h2             how the backend talks to instances; edge.tls-verify=false
    edge.sticky[=<cookie>]                 sticky sessions by cookie
    edge.timeout-connect=<d> / edge.timeout-server=<d>   e.g. 500ms, 30s, 2m
    edge.maxconn=<n>                       connections per instance at most
    edge.weight=<0-256>                    this instance's server weight (canary between instances)
    edge.proxy-protocol=true               PROXY protocol v1 to the instances

Consul meta keys cannot hold dots, so meta `edge-route-api=/api strip` reads as the tag
`edge.route=/api strip`; the suffix after the key lets one service carry several routes. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

from edge.routing.routers import (
    HTTP,
    PROTOCOLS,
    SNI,
    TCP,
    Origin,
    Parsed,
    Refused,
    Router,
    cidrs,
    credentials,
    duration_ms,
    number,
    port,
    redirect_target,
    refusal,
    route_host,
    route_path,
    strip_for,
)

NAME = "edge"
TAG_PREFIX = "edge."
META_PREFIX = "edge-"
ROUTER_KEYS = ("route", "tcp", "sni")
OPTION_KEYS = ("proto", "tls-verify", "sticky", "timeout-connect", "timeout-server", "maxconn", "weight",
               "proxy-protocol")
KEYS = ("host", "expose", *ROUTER_KEYS, *OPTION_KEYS)
WEIGHT_RE = re.compile(r"^(100|\d{1,2})(\.\d)?$")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def items(tags: Iterable[str], meta: Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(key, value, tag as written) for every edge tag and meta entry."""
    out = []
    for tag in tags:
        if tag.startswith(TAG_PREFIX):
            key, sep, value = tag[len(TAG_PREFIX):].partition("=")
            out.append((key, value if sep else "", tag))
    for key, value in meta:
        if key.startswith(META_PREFIX):
            name = key[len(META_PREFIX):]
            # `edge-route-api`: one of several routes; the other keys are named as they are.
            base = next((k for k in ("host", *ROUTER_KEYS) if name.startswith(f"{k}-")), name)
            out.append((base, value, f"meta {key}={value}"))
    return sorted(out)


def boolean(text: str) -> bool:
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise Refused(f"{text!r} is not true or false")


def parse(service: str, tags: Iterable[str], meta: Iterable[tuple[str, str]] = ()) -> Parsed:
    routers, options, problems = [], [], []
    weight = expose = None
    for key, value, tag in items(tags, meta):
        origin = Origin(NAME, service, tag)
        try:
            if key == "host":
                routers.append(Router(HTTP, host=route_host(value, wildcard=False), origin=origin))
            elif key == "expose":
                expose = boolean(value) if expose is not False else False   # an opt-out wins
            elif key in ROUTER_KEYS:
                router, note = _router(key, value, origin)
                routers.append(router)
                if note:
                    problems.append(refusal(service, tag, note))
            elif key in OPTION_KEYS:
                if key == "weight":
                    weight = number(value, 0, 256, "server weight")
                else:
                    options.append((*_option(key, value), origin))
            else:
                problems.append(refusal(service, tag, f"unknown edge key {key!r}; ignored"))
        except Refused as exc:
            what = "router refused" if key in ROUTER_KEYS or key == "host" else "ignored"
            problems.append(refusal(service, tag, f"{what}: {exc}"))
    return Parsed(tuple(routers), tuple(options), weight, expose, tuple(problems))


def _router(key: str, value: str, origin: Origin) -> tuple[Router, str]:
    """One router from an `edge.route`/`edge.tcp`/`edge.sni` value, and a note on an option that
    never applies (ignored); raises Refused for anything that cannot be honoured exactly."""
    words = value.split()
    if not words:
        raise Refused("empty value")
    first, opts = words[0], words[1:]
    if key == "tcp":
        router = Router(TCP, port=port(first), origin=origin)
    elif key == "sni":
        router = Router(SNI, host=route_host(first), origin=origin)
    else:
        host, slash, path = first.partition("/")
        if not slash:
            raise Refused(f"{first!r} has no path (write {first}/ for every path of the host)")
        router = Router(HTTP, host=route_host(host) if host else "", path=route_path("/" + path), origin=origin)
    fields, note, strips = {}, "", []
    for opt in opts:
        name, eq, arg = opt.partition("=")
        if key != "route" and name not in ("allow", "deny"):
            raise Refused(f"option {opt!r} does not apply to edge.{key}")
        if name == "exact" and not eq:
            fields["exact"] = True
        elif name == "strip":
            strips.append(route_path(arg) if eq else router.path)
        elif name == "redirect" and eq:
            code, _, url = arg.partition(",")
            fields["redirect"] = redirect_target(number(code, 300, 399, "redirect code"), url)
        elif name in ("allow", "deny") and eq:
            fields[name] = cidrs(arg)
        elif name == "auth" and eq:
            fields["users"] = credentials(arg)
        elif name == "weight" and eq:
            if not WEIGHT_RE.match(arg) or float(arg) <= 0:
                raise Refused(f"weight {arg!r} is not a percentage above 0 (one decimal at most)")
            fields["share"] = round(float(arg) * 10)
        else:
            raise Refused(f"unknown option {opt!r}")
    router = replace(router, **fields)
    if strips:
        strip = strip_for(router.path, router.exact, tuple(strips))
        if not strip:
            note = f"strip {strips[0]!r} never applies to {router.path!r}; ignored"
        router = replace(router, strip=strip)
    return router, note


def _option(key: str, value: str) -> tuple[str, object]:
    """A backend option as (BackendOptions field, value)."""
    if key == "proto":
        if value not in PROTOCOLS:
            raise Refused(f"protocol {value!r} is not one of {', '.join(PROTOCOLS)}")
        return ("protocol", value)
    if key == "tls-verify":
        return ("verify", boolean(value))
    if key == "sticky":
        name = value or "edge_sticky"
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise Refused(f"cookie name {name!r} is not usable (1-64 of A-Z a-z 0-9 _-)")
        return ("sticky", name)
    if key in ("timeout-connect", "timeout-server"):
        return (key.replace("timeout-", "") + "_timeout", duration_ms(value))
    if key == "maxconn":
        return ("maxconn", number(value, 1, 100_000, "maxconn"))
    return ("send_proxy", boolean(value))
