"""fabio's `urlprefix-` tags, read as fabio documents them (its `route add` options).

    urlprefix-/css                              any host, path prefix /css
    urlprefix-i.com/static                      host i.com, path prefix /static
    urlprefix-*.example.com/                    every name one label under example.com
    urlprefix-/foo/bar strip=/foo               forward /foo/bar/x as /bar/x
    urlprefix-/foo proto=https tlsskipverify=true
    urlprefix-/my.service proto=grpc            gRPC (h2c); proto=grpcs: over TLS
    urlprefix-:3306 proto=tcp [pxyproto=true]   the edge's TCP port 3306
    urlprefix-/path redirect=301,https://x.org$path
    urlprefix-/path weight=0.05                 5% of the traffic for this prefix (canary)
    urlprefix-/path allow=ip:10.0.0.0/8 / deny=ip:10.1.0.0/16

`host=<name>` sets the Host header the backend gets. Not honoured, and said so in one warning per
tag: `prepend=` and `auth=` (fabio's own server configuration) refuse the router; `host=dst`
(each server's own name), `register=`, `grpcservername=` and unknown options are ignored.
fabio's `*` in a host matches across dots; here it matches one label. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

from edge.routing.routers import (
    HTTP,
    TCP,
    Origin,
    Parsed,
    Refused,
    Router,
    cidrs,
    port,
    redirect_target,
    refusal,
    route_host,
    route_path,
    strip_for,
)

NAME = "fabio"
PREFIX = "urlprefix-"
PROTOCOLS = {"http": "h1", "https": "https", "grpc": "h2c", "grpcs": "h2"}
IGNORED = ("register", "grpcservername")
WEIGHT_RE = re.compile(r"^(0(\.\d+)?|1(\.0*)?|\.\d+)$")


def parse(service: str, tags: Iterable[str], meta: Iterable[tuple[str, str]] = ()) -> Parsed:
    routers, options, problems = [], [], []
    for tag in tags:
        text = tag.strip()
        if not text.startswith(PREFIX):
            continue
        origin = Origin(NAME, service, tag)
        try:
            router, opts, notes = _route(text[len(PREFIX):].strip(), origin)
        except Refused as exc:
            problems.append(refusal(service, tag, f"router refused: {exc}"))
            continue
        routers.append(router)
        options.extend((name, value, origin) for name, value in opts)
        problems.extend(refusal(service, tag, note) for note in notes)
    return Parsed(tuple(routers), tuple(options), problems=tuple(problems))


def _route(text: str, origin: Origin) -> tuple[Router, list[tuple[str, object]], list[str]]:
    src, _, rest = text.partition(" ")
    opts = dict(_options(rest.split()))
    notes = [f"option {name}={opts.pop(name)!r} is not supported; ignored" for name in sorted(opts)
             if name in IGNORED or name not in KNOWN or (name, opts[name]) == ("host", "dst")]
    proto = opts.pop("proto", "http")
    options: list[tuple[str, object]] = []
    if proto == "tcp":
        if not src.startswith(":"):
            raise Refused(f"proto=tcp needs :<port>, not {src!r}")
        router = Router(TCP, port=port(src[1:]), origin=origin)
        if opts.pop("pxyproto", "false") == "true":
            options.append(("send_proxy", True))
    else:
        if proto not in PROTOCOLS:
            raise Refused(f"proto={proto!r} is not one of tcp, {', '.join(PROTOCOLS)}")
        if src.startswith(":"):
            raise Refused(f"{src!r} names a port without proto=tcp")
        host, slash, path = src.partition("/")
        if not slash:
            raise Refused(f"{src!r} has no path (fabio needs a trailing slash: {src}/)")
        router = Router(HTTP, host=route_host(host) if host else "", path=route_path("/" + path), origin=origin)
        if PROTOCOLS[proto] != "h1":
            options.append(("protocol", PROTOCOLS[proto]))
        if opts.pop("tlsskipverify", "false") == "true":
            options.append(("verify", False))
    if "prepend" in opts:
        raise Refused("prepend= is not supported")
    if "auth" in opts:
        raise Refused(f"auth={opts['auth']!r} names a scheme of fabio's own configuration")
    fields: dict[str, object] = {}
    for name in ("allow", "deny"):
        if name in opts:
            fields[name] = cidrs(opts.pop(name))
    if "weight" in opts:
        weight = opts.pop("weight")
        if not WEIGHT_RE.match(weight):
            raise Refused(f"weight {weight!r} is not a fraction from 0 to 1")
        fields["share"] = round(float(weight) * 1000)
    if "redirect" in opts:
        code, _, url = opts.pop("redirect").partition(",")
        if not re.fullmatch(r"3\d\d", code):
            raise Refused(f"redirect code {code!r} is not 300-399")
        fields["redirect"] = redirect_target(int(code), url)
    if "host" in opts:      # the Host header the backend gets (`host=dst`, the server's own, is not known here)
        fields["set_host"] = route_host(opts.pop("host"), wildcard=False)
    if "strip" in opts:
        strip_prefix = route_path(opts.pop("strip"))
        strip = strip_for(router.path, False, (strip_prefix,)) if router.kind == HTTP else ""
        if not strip:
            notes.append(f"strip={strip_prefix} never applies to {router.path!r}; ignored")
        fields["strip"] = strip
    if router.kind == TCP and set(fields) - {"allow", "deny"}:
        raise Refused(f"{', '.join(sorted(set(fields) - {'allow', 'deny'}))} do not apply to proto=tcp")
    return replace(router, **fields), options, notes


KNOWN = ("proto", "pxyproto", "tlsskipverify", "strip", "prepend", "auth", "allow", "deny", "weight", "redirect",
         "host", *IGNORED)


def _options(words: list[str]) -> list[tuple[str, str]]:
    out = []
    for word in words:
        name, _, value = word.partition("=")
        out.append((name, value))
    return out
