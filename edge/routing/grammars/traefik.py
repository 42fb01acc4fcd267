"""Traefik's Consul Catalog tags (`traefik.…`), read as Traefik documents them.

    traefik.enable=true|false
    traefik.http.routers.<r>.rule=Host(`a.example.com`) && PathPrefix(`/api`)     (see traefik_rule)
    traefik.http.routers.<r>.middlewares=<m>,...    of the kinds below, defined in the same service's tags
    traefik.http.routers.<r>.service=<s>            one of the service's own `traefik.http.services`
    traefik.http.routers.<r>.tls / .tls.certresolver   the edge's HTTPS covers every routed host anyway
    traefik.http.middlewares.<m>.stripprefix.prefixes=/a,/b
    traefik.http.middlewares.<m>.redirectscheme.scheme=https [.port=, .permanent=]
    traefik.http.middlewares.<m>.redirectregex.regex=^https?://example\\.com/(.*)
        .replacement=https://www.example.com/${1} [.permanent=]   (a host-to-host redirect only)
    traefik.http.middlewares.<m>.basicauth.users=user:<crypt hash>,...
    traefik.http.middlewares.<m>.ipallowlist.sourcerange=<cidr>,...   (ipwhitelist: the v2 name)
    traefik.http.services.<s>.loadbalancer.server.port=<port> / .server.scheme=http|https|h2c
    traefik.http.services.<s>.loadbalancer.sticky.cookie[.name|.secure|.httponly]
    traefik.tcp.routers.<r>.rule=HostSNI(`db.example.com`) with .tls.passthrough=true

Tags are case-insensitive in Traefik, and so here (keys; values keep their case). A router
that cannot be honoured exactly is refused with one warning naming the tag; options that do not
change where a request goes (entrypoints, priority, realm, health checks) are ignored with one.
A router with no rule is not given Traefik's default rule: the zero-config vhost serves the
service instead. Redirect codes are those Traefik answers a GET with (301 permanent, else 302).
Pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

from edge.routing.grammars.traefik_rule import read_rule
from edge.routing.routers import (
    HTTP,
    SNI,
    Origin,
    Parsed,
    Redirect,
    Refused,
    Router,
    cidrs,
    credentials,
    port,
    redirect_target,
    refusal,
    route_host,
    route_path,
    strip_for,
)

NAME = "traefik"
PREFIX = "traefik."
NAME_RE = r"([a-z0-9_-]+)"
SILENT = ("tls", "tls.certresolver", "tls.options")  # what the edge's HTTPS does anyway
IGNORED = ("entrypoints", "priority", "rulesyntax")


def _split(tags: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Traefik keys (lower-cased, without `traefik.`) → (value, tag as written); later tags win."""
    keyed = {}
    for tag in tags:
        if tag[:len(PREFIX)].lower() == PREFIX:
            key, sep, value = tag[len(PREFIX):].partition("=")
            keyed[key.strip().lower()] = (value.strip() if sep else "", tag)
    return keyed


def _group(keyed: dict, kind: str) -> dict[str, dict[str, tuple[str, str]]]:
    """`<kind>.<name>.<prop>` keys → name → prop → (value, tag)."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for key, item in keyed.items():
        m = re.fullmatch(re.escape(kind) + r"\." + NAME_RE + r"\.(.+)", key)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = item
    return out


def parse(service: str, tags: Iterable[str], meta: Iterable[tuple[str, str]] = ()) -> Parsed:
    keyed = _split(tags)
    problems, routers, options = [], [], []
    expose = None
    if "enable" in keyed:
        value, tag = keyed.pop("enable")
        if value.lower() in ("true", "false"):
            expose = value.lower() == "true"
        else:
            problems.append(refusal(service, tag, "not true or false; ignored"))
    services = _group(keyed, "http.services")
    middlewares = _group(keyed, "http.middlewares")
    known = {f"http.services.{s}.{p}" for s, props in services.items() for p in props}
    known |= {f"http.middlewares.{m}.{p}" for m, props in middlewares.items() for p in props}
    service_options: dict[str, list] = {}
    for sname, props in sorted(services.items()):
        try:
            opts, notes = _service_options(props)
            service_options[sname] = opts
        except Refused as exc:
            problems.append(refusal(service, next(iter(props.values()))[1], f"ignored: {exc}"))
            continue
        problems.extend(refusal(service, tag, note) for tag, note in notes)
    # One Consul service is one backend: the first router's Traefik service gives its options; a
    # router to another Traefik service that sets them differently would land on the wrong port.
    owner = next(iter(services), None) if len(services) == 1 else None
    for name, props in sorted(_group(keyed, "http.routers").items()):
        known |= {f"http.routers.{name}.{p}" for p in props}
        try:
            found, notes = _http_router(service, name, props, services, middlewares)
            target = _target(service, props, services)
            owner = owner or target
            if _values(service_options.get(target)) != _values(service_options.get(owner)):
                raise Refused(f"service {target} is set up differently from {owner}, and {service} is one backend")
            routers.extend(found)
            problems.extend(refusal(service, tag, note) for tag, note in notes)
        except Refused as exc:
            tag = props.get("rule", next(iter(props.values())))[1]
            problems.append(refusal(service, tag, f"router {name} refused: {exc}"))
    options.extend((field, value, Origin(NAME, service, tag)) for field, value, tag in service_options.get(owner, ()))
    for name, props in sorted(_group(keyed, "tcp.routers").items()):
        known |= {f"tcp.routers.{name}.{p}" for p in props}
        try:
            found, notes = _tcp_router(service, name, props)
            routers.extend(found)
            problems.extend(refusal(service, tag, note) for tag, note in notes)
        except Refused as exc:
            tag = props.get("rule", next(iter(props.values())))[1]
            problems.append(refusal(service, tag, f"TCP router {name} refused: {exc}"))
    for key in sorted(set(keyed) - known):
        problems.append(refusal(service, keyed[key][1], "not a key the edge reads; ignored"))
    return Parsed(tuple(routers), tuple(options), expose=expose, problems=tuple(problems))


def _values(options: list | None) -> dict:
    return {field: value for field, value, _ in options or ()}


def _http_router(service: str, name: str, props: dict, services: dict, middlewares: dict
                 ) -> tuple[list[Router], list[tuple[str, str]]]:
    notes: list[tuple[str, str]] = []
    for prop, (_, tag) in sorted(props.items()):
        if prop in IGNORED or prop.startswith("tls.domains"):
            notes.append((tag, f"{prop} of router {name} is not honoured (every entry point serves it); ignored"))
        elif prop not in ("rule", "service", "middlewares", *SILENT):
            raise Refused(f"{prop} cannot be honoured")
    if "rule" not in props:
        raise Refused("no rule (Traefik's default rule is not used: the zero-config vhost serves the service)")
    rule, tag = props["rule"]
    _target(service, props, services)
    reading = read_rule(rule)
    notes.extend((tag, note) for note in reading.notes)
    origin = Origin(NAME, service, tag)
    routers = [Router(HTTP, host=m.host, path=m.path, exact=m.exact, origin=origin) for m in reading.matches]
    chain = [m.strip() for m in props.get("middlewares", ("", ""))[0].split(",") if m.strip()]
    for ref in chain:
        mname, _, provider = ref.lower().partition("@")
        if provider not in ("", "consulcatalog") or mname not in middlewares:
            raise Refused(f"middleware {ref!r} is not defined in this service's tags")
        routers, more = _apply(mname, middlewares[mname], routers)
        notes.extend(more)
    return routers, notes


def _target(service: str, props: dict, services: dict) -> str:
    """The Traefik service a router sends to: named, the only one defined, or the default one."""
    if "service" in props:
        target = props["service"][0].lower()
        if target in services or (not services and target == service.lower()):
            return target
        raise Refused(f"service {target!r} is not defined in this service's tags")
    if len(services) > 1:
        raise Refused("several services are defined and the router names none")
    return next(iter(services), service.lower())


def _apply(name: str, props: dict, routers: list[Router]) -> tuple[list[Router], list[tuple[str, str]]]:
    """One middleware applied to the routers it is attached to."""
    kinds = {p.split(".", 1)[0] for p in props}
    if len(kinds) != 1:
        raise Refused(f"middleware {name} has several kinds: {sorted(kinds)}")
    (kind,) = kinds
    get = {p.split(".", 1)[1] if "." in p else "": v for p, v in props.items()}
    extra = sorted(set(get) - KINDS.get(kind, set()))
    if kind not in KINDS or any(p not in NOTED for p in extra):
        raise Refused(f"middleware {name} ({kind}{': ' + ', '.join(extra) if extra else ''}) cannot be honoured")
    notes = [(get[p][1], f"{kind}.{p} of middleware {name} is not honoured; ignored") for p in extra]
    permanent = get.get("permanent", ("false", ""))[0].lower() == "true"
    if kind == "stripprefix":
        prefixes = tuple(route_path(p.strip()) for p in get["prefixes"][0].split(","))
        out = []
        for r in routers:
            strip = strip_for(r.path, r.exact, prefixes)
            out.append(replace(r, strip=strip) if strip else r)
        return out, notes
    if kind in ("ipallowlist", "ipwhitelist"):
        if any(r.allow for r in routers):
            raise Refused("two ipallowlist middlewares on one router")
        return [replace(r, allow=cidrs(get["sourcerange"][0])) for r in routers], notes
    if kind == "basicauth":
        if any(r.users for r in routers):
            raise Refused("two basicauth middlewares on one router")
        users = credentials(get["users"][0])
        return [replace(r, users=users) for r in routers], notes
    if kind == "redirectscheme":
        scheme = get["scheme"][0].lower()
        if scheme not in ("http", "https"):
            raise Refused(f"redirectscheme to {scheme!r}")
        redirect = Redirect(301 if permanent else 302, scheme=scheme,
                            port=port(get["port"][0]) if "port" in get else 0,
                            when="http" if scheme == "https" else "https")
        return [replace(r, redirect=redirect) for r in routers], notes
    regex, replacement = get["regex"][0], get["replacement"][0]
    return [replace(r, redirect=regex_redirect(r, regex, replacement, permanent)) for r in routers], notes


KINDS = {
    "stripprefix": {"prefixes"},
    "ipallowlist": {"sourcerange"},
    "ipwhitelist": {"sourcerange"},
    "basicauth": {"users"},
    "redirectscheme": {"scheme", "port", "permanent"},
    "redirectregex": {"regex", "replacement", "permanent"},
}
NOTED = {"realm", "removeheader", "forceslash", "headerfield"}   # cosmetic: ignored with a warning


REGEX_RE = re.compile(r"\^?(?P<scheme>https\?|\(https\?\)|\.\*|http|https)://(?P<host>[A-Za-z0-9\\.-]+)"
                      r"(?P<port>\(:\[0-9\]\+\)\?|\(:\\d\+\)\?)?(?P<slash>/?)\(\.\*\)\$?")
REPLACEMENT_RE = re.compile(r"(?P<base>https?://[^/$]+)(?P<slash>/?)(?P<group>\$\{?(?P<n>\d)\}?)?")


def regex_redirect(router: Router, regex: str, replacement: str, permanent: bool) -> Redirect:
    """A redirectregex that sends every request of the router's host elsewhere: the regex is
    `^<scheme>://<the router's host>[(:port)?]/(.*)` and the replacement a URL ending in `${1}`
    (the request's path) or in nothing. Any other regex would redirect only some requests."""
    if not router.host or router.host.startswith("*."):
        raise Refused("redirectregex needs a router on one exact host")
    m, r = REGEX_RE.fullmatch(regex), REPLACEMENT_RE.fullmatch(replacement)
    if not m or m["host"].replace("\\.", ".") != router.host:
        raise Refused(f"regex {regex!r} is not ^scheme://{router.host}/(.*)")
    path_group = 1 + m["scheme"].startswith("(") + (m["port"] is not None)   # the number of (.*)
    if not r or (r["group"] and (r["slash"] != m["slash"] or int(r["n"]) != path_group)):
        raise Refused(f"replacement {replacement!r} is not scheme://host/ followed by ${{{path_group}}} "
                      "(the path) or by nothing")
    when = {"http": "http", "https": "https"}.get(m["scheme"], "")
    url = r["base"] + ("$path" if r["group"] else r["slash"])
    return replace(redirect_target(301 if permanent else 302, url), when=when)


def _service_options(props: dict) -> tuple[list[tuple[str, object, str]], list[tuple[str, str]]]:
    opts, notes = [], []
    sticky = {}
    for prop, (value, tag) in sorted(props.items()):
        if prop == "loadbalancer.server.port":
            opts.append(("port", port(value), tag))
        elif prop == "loadbalancer.server.scheme":
            scheme = {"http": "h1", "https": "https", "h2c": "h2c"}.get(value.lower())
            if scheme is None:
                raise Refused(f"scheme {value!r} is not http, https or h2c")
            opts.append(("protocol", scheme, tag))
        elif prop.startswith("loadbalancer.sticky.cookie"):
            sticky[prop[len("loadbalancer.sticky.cookie"):].lstrip(".")] = (value, tag)
        else:
            notes.append((tag, f"{prop} is not honoured; ignored"))
    if sticky and sticky.get("", ("true", ""))[0].lower() != "false":
        name, tag = sticky.get("name", ("edge_sticky", next(iter(sticky.values()))[1]))
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise Refused(f"cookie name {name!r} is not usable")
        opts.append(("sticky", name, tag))
        notes.extend((t, f"sticky.cookie.{p} is not honoured; ignored") for p, (_, t) in sticky.items()
                     if p not in ("", "name"))
    return opts, notes


def _tcp_router(service: str, name: str, props: dict) -> tuple[list[Router], list[tuple[str, str]]]:
    notes = []
    for prop, (_, tag) in sorted(props.items()):
        if prop in IGNORED:
            notes.append((tag, f"{prop} of TCP router {name} is not honoured; ignored"))
        elif prop not in ("rule", "tls.passthrough", "service", "tls"):
            raise Refused(f"{prop} cannot be honoured")
    if props.get("tls.passthrough", ("false", ""))[0].lower() != "true":
        raise Refused("only tls.passthrough=true TCP routers (TLS passed through by SNI) are read; "
                      "use edge.tcp=<port> for a TCP port")
    rule, tag = props.get("rule", ("", ""))
    m = re.fullmatch(r"\s*HostSNI\((.*)\)\s*", rule, re.I)
    if not m:
        raise Refused(f"rule {rule!r} is not HostSNI(...)")
    hosts = [h.strip().strip("`\"") for h in m.group(1).split(",")]
    if "*" in hosts:
        raise Refused("HostSNI(`*`) would take every name of the HTTPS port")
    return [Router(SNI, host=route_host(h), origin=Origin(NAME, service, tag)) for h in hosts], notes
