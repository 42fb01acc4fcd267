"""Routers and backend options: what matches a request, and how the backend that serves it behaves.

A `Router` says what matches (an HTTP host, exact, `*.wildcard` or any, with a path prefix or an
exact path; a TCP port of the edge; a TLS server name passed through untouched) and what happens
on the way (prefix stripping, a redirect, allow/deny lists, basic auth, a share of the traffic).
It names its backend by route name (`<service>-<port>`), the backend the zero-config vhost of
that route uses too, so several routers share one backend. `BackendOptions` (protocol, sticky
cookie, timeouts, connection cap) belong to the backend, not to any router.

The tag grammars (`edge.routing.grammars`) build these values from Consul tags, which are
untrusted: every constructor here validates, so any value that exists can be written into
haproxy.cfg or a map as it is. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace

from edge.routing.model import Problem, valid_host, valid_port

HTTP, TCP, SNI = "http", "tcp", "sni"
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
SPLIT_PARTS = 4     # backends a weighted split shares one match between, at most
PROTOCOLS = ("h1", "h2c", "https", "h2")      # h2: HTTP/2 over TLS (gRPC over TLS)
# A path as it can go into a map key, a runtime API command and a regex-free config line: no
# space, quote, backslash, `#`, `;` (the runtime API's command separator), `%` or `$`.
PATH_RE = re.compile(r"^/[A-Za-z0-9._~!*+,=:@/-]{0,199}$")
USER_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# crypt(3) hashes HAProxy checks through the system's libcrypt: MD5-crypt, SHA-256/512-crypt,
# bcrypt and yescrypt. Apache's `$apr1$` and `{SHA}` are not among them.
HASH_RE = re.compile(r"^\$(1|5|6|2[aby]|y)\$[A-Za-z0-9./$=]{8,200}$")
DURATION_RE = re.compile(r"^(\d{1,7})(ms|s|m|h)?$")
MAX_TIMEOUT_MS = 24 * 3600 * 1000


class Refused(ValueError):
    """A tag value that cannot be honoured exactly; the message says what was ignored."""


@dataclass(frozen=True, order=True)
class Origin:
    """Where a router or an option came from, for `edge routes` and for warnings."""

    grammar: str
    service: str
    tag: str

    def __str__(self) -> str:
        return f"{self.grammar} {self.tag!r} of {self.service}"


@dataclass(frozen=True, order=True)
class Redirect:
    """An answer with a redirect instead of the backend.

    `location` (absolute `scheme://host[:port][/path]`) replaces the URL, with the request's path
    and query appended when `keep_path`; without a location, only the scheme (and port) change.
    `when` limits it to requests of one scheme (`http`: plain HTTP only), else every request."""

    code: int
    location: str = ""
    scheme: str = ""
    port: int = 0
    keep_path: bool = True
    when: str = ""


@dataclass(frozen=True, order=True)
class Credential:
    user: str
    hash: str

    def __repr__(self) -> str:
        return f"Credential({self.user!r}, <hash>)"


@dataclass(frozen=True)
class Router:
    """What matches and what happens on the way; `backend` is a route name (`<service>-<port>`)."""

    kind: str                       # HTTP, TCP or SNI
    backend: str = ""               # "" until the instance's route is known (grammars leave it)
    host: str = ""                  # HTTP: exact, `*.suffix` or "" (any host); SNI: exact or `*.suffix`
    path: str = "/"                 # HTTP: a prefix, or the exact path when `exact`
    exact: bool = False
    port: int = 0                   # TCP: the edge's listening port
    strip: str = ""                 # HTTP: this prefix is removed from the path before forwarding
    redirect: Redirect | None = None
    allow: tuple[str, ...] = ()     # CIDRs; non-empty: only these clients
    deny: tuple[str, ...] = ()      # CIDRs refused
    users: tuple[Credential, ...] = ()   # non-empty: HTTP basic auth
    share: int = 0                  # permille of the match's traffic for this backend (0: an equal part of the rest)
    set_host: str = ""              # HTTP: the Host header the backend gets ("" the client's)
    origin: Origin = field(default=Origin("", "", ""))

    @property
    def match(self) -> tuple:
        """What two routers must differ in to coexist."""
        return (self.kind, self.host, self.path if self.kind == HTTP else "", self.exact, self.port)

    @property
    def key(self) -> tuple:
        """A total order: by match, then backend, then origin (routers are not comparable as such:
        their options may be None)."""
        return (self.match, self.backend, self.origin, repr(self))

    def describe(self) -> str:
        """`host/path` (`*` for any host; a whole host without the `/`), `sni HOST` or `tcp :PORT`."""
        if self.kind == TCP:
            return f"tcp :{self.port}"
        if self.kind == SNI:
            return f"sni {self.host}"
        if self.path == "/" and not self.exact:
            return self.host or "*"
        return f"{self.host or '*'}{self.path}{' (exact)' if self.exact else ''}"

    @property
    def plain_host(self) -> bool:
        """A whole exact host to one backend and nothing else: what `edge.host=` always was (the
        host map holds these, as before routers existed)."""
        return (self.kind == HTTP and bool(self.host) and not self.host.startswith("*.") and self.path == "/"
                and not self.exact and self == Router(HTTP, self.backend, self.host, origin=self.origin))

    def options(self) -> tuple[str, ...]:
        """The router's options as short words, for `edge routes`."""
        out = []
        if self.strip:
            out.append(f"strip={self.strip}")
        if self.redirect:
            r = self.redirect
            target = r.location or f"{r.scheme}://{'<host>'}{f':{r.port}' if r.port else ''}"
            out.append(f"redirect={r.code},{target}{'+path' if r.keep_path else ''}"
                       f"{f' when {r.when}' if r.when else ''}")
        if self.allow:
            out.append("allow=" + ",".join(self.allow))
        if self.deny:
            out.append("deny=" + ",".join(self.deny))
        if self.users:
            out.append("auth=" + ",".join(c.user for c in self.users))
        if self.share:
            out.append(f"share={self.share / 10:g}%")
        if self.set_host:
            out.append(f"host={self.set_host}")
        return tuple(out)


@dataclass(frozen=True, order=True)
class BackendOptions:
    """How a backend talks to its instances. Defaults are today's behaviour."""

    protocol: str = "h1"        # one of PROTOCOLS
    verify: bool = True         # https/h2: verify the instance's certificate against the system CAs
    sticky: str = ""            # cookie name; "" no stickiness
    connect_timeout: int = 0    # ms; 0: the defaults section's
    server_timeout: int = 0     # ms; 0: the defaults section's
    maxconn: int = 0            # per server; 0: no cap
    port: int = 0               # connect to this port of each instance instead of the registered one
    send_proxy: bool = False    # PROXY protocol v1 to the instances (TCP)

    def words(self) -> tuple[str, ...]:
        default = BackendOptions()
        return tuple(f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                     if getattr(self, f.name) != getattr(default, f.name))


@dataclass(frozen=True)
class Parsed:
    """One grammar's reading of one instance's tags (and meta)."""

    routers: tuple[Router, ...] = ()
    options: tuple[tuple[str, object, Origin], ...] = ()  # backend options set: (field, value, origin)
    weight: int | None = None       # this instance's server weight (0-256)
    expose: bool | None = None      # an explicit opt-in (True) or opt-out (False)
    problems: tuple[Problem, ...] = ()


def refusal(service: str, tag: str, what: str) -> Problem:
    """The one warning for a tag that is not honoured (exactly): service, tag, what was ignored."""
    return Problem(service, f"tag {tag!r}: {what}")


# --- validation: each returns a value that is safe in haproxy.cfg and in maps, or raises Refused --
def route_host(text: str, wildcard: bool = True) -> str:
    """An exact host or `*.suffix` (one label), lower-cased."""
    raw = text.strip().lower()
    if wildcard and raw.startswith("*."):
        suffix = valid_host(raw[2:])
        if suffix is None or "." not in suffix:
            raise Refused(f"{text!r} is not a wildcard host (`*.` and a domain of two labels or more)")
        return f"*.{suffix}"
    host = valid_host(raw)
    if host is None:
        raise Refused(f"{text!r} is not a host name")
    return host


def route_path(text: str) -> str:
    if not PATH_RE.match(text):
        raise Refused(f"path {text!r} is not usable (starts with /, at most 200 of A-Z a-z 0-9 ._~!*+,=:@/-)")
    return text


def cidrs(text: str) -> tuple[str, ...]:
    """Comma-separated addresses or networks (`ip:` prefixes allowed, as fabio writes them)."""
    out = []
    for item in (i.strip() for i in text.split(",")):
        item = item[3:] if item.startswith("ip:") else item
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise Refused(f"{item!r} is not an address or a network") from None
    if not out:
        raise Refused("no address or network given")
    return tuple(sorted(set(out)))


def credentials(text: str) -> tuple[Credential, ...]:
    """Comma-separated `user:hash` pairs; a clear password is never accepted."""
    out = []
    for item in (i.strip() for i in text.split(",")):
        user, _, hashed = item.partition(":")
        if not USER_RE.match(user):
            raise Refused(f"user name {user!r} is not usable (1-64 of A-Z a-z 0-9 ._-)")
        if not HASH_RE.match(hashed):
            raise Refused(f"the password of {user!r} is not a crypt(3) hash ($1$, $5$, $6$, $2b$/$2y$ or $y$); "
                          "clear passwords and $apr1$/{SHA} are refused")
        out.append(Credential(user, hashed))
    if len({c.user for c in out}) != len(out):
        raise Refused("a user is named twice")
    return tuple(sorted(out))


def duration_ms(text: str) -> int:
    """`500ms`, `30s`, `2m`, `1h` or plain seconds → milliseconds (1 ms to 24 h)."""
    m = DURATION_RE.match(text.strip())
    if not m:
        raise Refused(f"{text!r} is not a duration (e.g. 500ms, 30s, 2m)")
    ms = int(m.group(1)) * {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, None: 1000}[m.group(2)]
    if not 0 < ms <= MAX_TIMEOUT_MS:
        raise Refused(f"{text!r} is not between 1 ms and 24 h")
    return ms


def number(text: str, low: int, high: int, what: str) -> int:
    if not re.fullmatch(r"\d{1,6}", text.strip()) or not low <= int(text) <= high:
        raise Refused(f"{what} {text!r} is not a whole number from {low} to {high}")
    return int(text)


def port(text: str) -> int:
    value = valid_port(text) if re.fullmatch(r"\d{1,5}", text.strip()) else None
    if value is None:
        raise Refused(f"port {text!r} is not 1-65535")
    return value


def redirect_target(code: int, url: str) -> Redirect:
    """`scheme://host[:port][/path]`, optionally ending in `$path` (append the request's path
    and query): a redirect value that is safe in a map."""
    if code not in REDIRECT_CODES:
        raise Refused(f"redirect code {code} is not one of {sorted(REDIRECT_CODES)}")
    keep = url.endswith("$path")
    base = url[:-len("$path")] if keep else url
    m = re.fullmatch(r"(https?)://([^/:]+)(?::(\d{1,5}))?(/.*)?", base)
    if not m:
        raise Refused(f"redirect target {url!r} is not http(s)://host[:port][/path]")
    scheme, host, port_text, path = m.groups()
    host = route_host(host, wildcard=False)
    location = f"{scheme}://{host}" + (f":{port(port_text)}" if port_text else "")
    if path:
        path = path.rstrip("/") if keep else path   # `…/$path` would double the slash
        if path:
            location += route_path(path)
    return Redirect(code, location=location, keep_path=keep)


def strip_for(route_prefix: str, exact: bool, prefixes: tuple[str, ...]) -> str:
    """The prefix stripped from every request a router matches, given strip prefixes tried in
    order (the first one the path starts with is removed). Raises Refused when that depends on
    the request (a strip prefix longer than the route's prefix), "" when none ever applies."""
    for prefix in prefixes:
        if route_prefix.startswith(prefix):
            return prefix
        if not exact and prefix.startswith(route_prefix):
            raise Refused(f"strip prefix {prefix!r} applies to some requests of {route_prefix!r} only")
    return ""


def resolve(routers: Iterable[Router]) -> tuple[tuple[Router, ...], tuple[Problem, ...]]:
    """Routers of every service → the ones that apply, and what was overruled (logged once).

    Several routers with one match: when they name one backend, the first (by origin) applies;
    when they name several and any of them gives itself a share, they split the traffic (a
    canary), as long as they agree on everything but backend and share; otherwise the lowest
    backend name keeps the match. The same input always gives the same answer."""
    groups: dict[tuple, list[Router]] = defaultdict(list)
    for router in routers:
        groups[router.match].append(router)
    out, problems = [], []
    for match in sorted(groups):
        group = sorted(groups[match], key=lambda r: r.key)
        firsts = {}
        for router in group:
            firsts.setdefault(router.backend, router)
        winner = group[0]
        if len(firsts) == 1:
            out.append(winner)
            if any(_behaviour(r) != _behaviour(winner) for r in group):
                origins = ", ".join(str(r.origin) for r in group)
                problems.append(Problem(winner.describe(), f"routers disagree ({origins}); {winner.origin} applies"))
            continue
        split = list(firsts.values())
        agree = all(_behaviour(r) == _behaviour(winner) for r in split)
        if any(r.share for r in split) and agree and len(split) <= SPLIT_PARTS:
            out.extend(split)
            continue
        why = "" if not any(r.share for r in split) else \
            " (a weighted split needs routers that differ in backend and weight only)" if not agree else \
            f" (a weighted split has {SPLIT_PARTS} backends at most)"
        problems.append(Problem(winner.describe(),
                                f"claimed by routes {sorted(firsts)}; {winner.backend} keeps it{why}"))
        out.append(winner)
    return tuple(out), tuple(problems)


def _behaviour(router: Router) -> Router:
    """A router without what may differ between the parts of a weighted split."""
    return replace(router, backend="", share=0, origin=Origin("", "", ""))
