"""Traefik's rule language (`Host(...) && PathPrefix(...) || ...`) → the matches it stands for.

A rule is parsed into an expression and rewritten as a disjunction of conjunctions; each
conjunction becomes one (host, path, exact) match, so `Host(`a`) && (PathPrefix(`/x`) ||
PathPrefix(`/y`))` is two routers. Only what maps exactly onto host and path matching is
accepted: Host (HostHeader), HostRegexp of one label under a literal domain, Path and
PathPrefix (v2's several arguments too). Anything else (negation, Method, Headers, Query,
ClientIP, PathRegexp, path templates) refuses the whole rule: dropping a condition would make
the route wider than asked. Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edge.routing.routers import Refused, route_host, route_path

MAX_MATCHES = 32
TOKEN_RE = re.compile(r"\s*(?:(&&)|(\|\|)|(!)|(\()|(\))|(,)|([A-Za-z]+)|`([^`]*)`|\"((?:[^\"\\]|\\.)*)\")")
HOST_MATCHERS = ("host", "hostheader", "hostregexp")
PATH_MATCHERS = ("path", "pathprefix")
# A label pattern that matches every host label (as HAProxy sees hosts) and nothing with a dot.
ONE_LABEL = ("[^.]+", "[^\\.]+")
# Patterns that also match across dots: one label here is narrower, never wider.
ANY_LABELS = (".+", ".*")


@dataclass(frozen=True, order=True)
class Match:
    host: str = ""      # exact, `*.suffix` or "" for any host
    path: str = "/"
    exact: bool = False


@dataclass(frozen=True)
class Reading:
    matches: tuple[Match, ...]
    notes: tuple[str, ...] = ()     # what was narrowed or can never match (logged, not refused)


def tokens(rule: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    rule = rule.rstrip()
    while pos < len(rule):
        m = TOKEN_RE.match(rule, pos)
        if not m:
            raise Refused(f"rule does not parse at {rule[pos:pos + 20]!r}")
        kinds = ("and", "or", "not", "(", ")", ",", "name", "str", "str")
        kind = next(k for k, g in zip(kinds, m.groups(), strict=True) if g is not None)
        value = next(g for g in m.groups() if g is not None)
        out.append((kind, value.replace('\\"', '"') if kind == "str" else value))
        pos = m.end()
    return out


class _Parser:
    """expr := conj ('||' conj)* ; conj := unary ('&&' unary)* ; unary := '!' unary | '(' expr ')' | call.
    Every value is a disjunction: a list of conjunctions, each a list of (matcher, argument)."""

    def __init__(self, toks: list[tuple[str, str]]):
        self.toks, self.pos = toks, 0

    def peek(self) -> str:
        return self.toks[self.pos][0] if self.pos < len(self.toks) else "end"

    def take(self, kind: str) -> str:
        if self.peek() != kind:
            raise Refused(f"rule does not parse: expected {kind}, found {self.peek()}")
        self.pos += 1
        return self.toks[self.pos - 1][1]

    def expr(self) -> list[list[tuple[str, str]]]:
        out = self.conj()
        while self.peek() == "or":
            self.take("or")
            out = out + self.conj()
            _bound(out)
        return out

    def conj(self) -> list[list[tuple[str, str]]]:
        out = self.unary()
        while self.peek() == "and":
            self.take("and")
            right = self.unary()
            out = [a + b for a in out for b in right]
            _bound(out)
        return out

    def unary(self) -> list[list[tuple[str, str]]]:
        if self.peek() == "not":
            raise Refused("negation (!) cannot be expressed")
        if self.peek() == "(":
            self.take("(")
            out = self.expr()
            self.take(")")
            return out
        name = self.take("name").lower()
        if name not in HOST_MATCHERS + PATH_MATCHERS:
            raise Refused(f"{name}() cannot be expressed as host and path matching")
        self.take("(")
        args = [self.take("str")]
        while self.peek() == ",":
            self.take(",")
            args.append(self.take("str"))
        self.take(")")
        return [[(name, arg)] for arg in args]   # v2: several arguments are alternatives


def _bound(out: list) -> None:
    if len(out) > MAX_MATCHES:
        raise Refused(f"rule expands to more than {MAX_MATCHES} host/path combinations")


def host_regexp(pattern: str) -> tuple[str, str]:
    """HostRegexp → (`*.suffix`, note); v2 `{name:re}.domain` and v3 `^re\\.domain$` forms."""
    v2 = re.fullmatch(r"\{[A-Za-z_][A-Za-z0-9_]*(?::(.+?))?\}\.([A-Za-z0-9.-]+)", pattern)
    v3 = re.fullmatch(r"\^(.+?)\\\.((?:[A-Za-z0-9-]+\\\.)*[A-Za-z0-9-]+)\$", pattern)
    if v2:
        label, suffix = v2.group(1) or "[^.]+", v2.group(2)
    elif v3:
        label, suffix = v3.group(1), v3.group(2).replace("\\.", ".")
    else:
        raise Refused(f"HostRegexp({pattern!r}) is not one label under a literal domain")
    host = route_host(f"*.{suffix}")
    if label in ONE_LABEL:
        return host, ""
    if label in ANY_LABELS:
        return host, f"HostRegexp({pattern!r}) matches one label under {suffix} here, not several"
    raise Refused(f"HostRegexp({pattern!r}): label pattern {label!r} is narrower than any label")


def _host_of(parts: list[tuple[str, str]], notes: list[str]) -> str | None:
    """The one host a conjunction requires ("" none; None: two that never meet)."""
    hosts = set()
    for name, arg in parts:
        if name in HOST_MATCHERS:
            if name == "hostregexp":
                host, note = host_regexp(arg)
                if note:
                    notes.append(note)
            else:
                host = route_host(arg, wildcard=False)
            hosts.add(host)
    exact = {h for h in hosts if not h.startswith("*.")}
    wild = hosts - exact
    if len(exact) > 1 or len(wild) > 1:
        return None
    if exact and wild:
        (host,), (pattern,) = exact, wild
        return host if host.endswith(pattern[1:]) and "." not in host[:-len(pattern) + 1] else None
    return next(iter(hosts), "")


def _path_of(parts: list[tuple[str, str]]) -> tuple[str, bool] | None:
    """The path condition of a conjunction: (path, exact); None: conditions that never meet."""
    exact = {route_path(arg) for name, arg in parts if name == "path"}
    prefixes = sorted({route_path(arg) for name, arg in parts if name == "pathprefix"}, key=len)
    if len(exact) > 1:
        return None
    if any(not long.startswith(short) for short, long in zip(prefixes, prefixes[1:], strict=False)):
        return None
    if exact:
        (path,) = exact
        return (path, True) if all(path.startswith(p) for p in prefixes) else None
    return (prefixes[-1], False) if prefixes else ("/", False)


def read_rule(rule: str) -> Reading:
    """The matches a rule stands for; raises Refused for a rule that cannot be honoured exactly."""
    toks = tokens(rule)
    if not toks:
        raise Refused("empty rule")
    parser = _Parser(toks)
    disjunction = parser.expr()
    if parser.peek() != "end":
        raise Refused(f"rule does not parse: unexpected {parser.peek()}")
    matches, notes = set(), []
    for parts in disjunction:
        host, path = _host_of(parts, notes), _path_of(parts)
        if host is None or path is None:
            notes.append(f"{' && '.join(f'{n}({a})' for n, a in parts)} can never match; left out")
            continue
        matches.add(Match(host, *path))
    if not matches:
        raise Refused("the rule can never match")
    return Reading(tuple(sorted(matches)), tuple(dict.fromkeys(notes)))
