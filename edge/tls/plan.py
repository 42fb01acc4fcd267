"""The certificate plan (as `edge.routing.plan` is for routes): which certificates HAProxy should
load, and the runtime commands and files that get it there from what it has.

`Served` is the served set, kept change by change: certificates offered by the sources go in and
out one name at a time, and time moves certificates from "not yet valid" to valid to expired.
A certificate is served when it is valid now, every name on it is allowed, and it is the best
(valid longest) of the certificates carrying at least one of its names: a renewed or replaced
certificate shadows the old one instead of both being loaded (HAProxy would pick either). A
wildcard never decides that: a certificate's own names always have an exact candidate, itself.
So the work per change is the names of the certificates that changed, never the whole set, and
a step where neither the sources nor the next validity date moved does nothing at all.

The refused ones (expired, not yet valid, a name outside the configured domains) are reported
once each, as `Refusal`s for the caller to log, and counted by reason for the metric.

Below that: the runtime commands for a change (`cert_plan`), the crt-list, the HTTP-01 challenge
map and the map of hosts that get the HTTPS redirect (`challenges`, `tls_hosts`, `map_commands`).
Pure: no I/O, no clock (`now` is an argument).
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from edge.tls.certs import Certificate, file_name, file_text, normal, wildcard_of, within

VALID = "valid"
EXPIRED, NOT_YET_VALID, OUTSIDE = "expired", "not_yet_valid", "outside_domains"
INVALID = "invalid"                 # bundles that do not parse (the sources' CertSet.refused)
REASONS = (EXPIRED, NOT_YET_VALID, OUTSIDE, INVALID)


@dataclass(frozen=True)
class Refusal:
    cert: Certificate
    reason: str
    why: str                        # one line, with what to do about it

    def line(self) -> str:
        return f"certificate {self.cert.describe()} not served: {self.why}"


@dataclass(frozen=True)
class Delta:
    """What one update changed: file → the certificate now served from it (None: none any more),
    and the certificates refused by it (each reported once)."""

    files: tuple[tuple[str, Certificate | None], ...] = ()
    refused: tuple[Refusal, ...] = ()


def _rank(cert: Certificate) -> tuple:
    return cert.not_after, cert.name


class Served:
    """The served set, updated incrementally (see the module's docstring). `suffixes`: the names a
    certificate may carry (configured domains and allowed suffixes); empty: any name."""

    def __init__(self, suffixes: tuple[str, ...] = ()):
        self.suffixes = suffixes
        self.files: dict[str, Certificate] = {}                # file → certificate served
        self.refused: Counter[str] = Counter()                 # reason → certificates refused for it now
        self._offered: dict[str, Certificate] = {}             # certificate name → what is offered under it
        self._state: dict[str, str] = {}                       # certificate name → VALID or a refusal reason
        self._valid: dict[str, dict[str, Certificate]] = {}    # DNS name → certificate name → valid certificate
        self._best: dict[str, Certificate] = {}                # DNS name → the valid certificate it gets
        self._wins: Counter[str] = Counter()                   # certificate name → DNS names it is best for
        self._events: list[tuple[datetime, int, str, Certificate]] = []   # when a certificate's validity changes
        self._seq = itertools.count()

    # --- inputs ----------------------------------------------------------------------------------
    def update(self, offered: Mapping[str, Certificate | None], now: datetime) -> Delta:
        """Certificate name → the certificate now offered under it (None: withdrawn)."""
        names: set[str] = set()
        touched: set[str] = set()
        refused = []
        for name, cert in offered.items():
            old = self._offered.get(name)
            if old is cert or old == cert:
                continue
            touched.add(name)
            if old is not None:
                self._withdraw(old, names)
            if cert is None:
                del self._offered[name]
            else:
                self._offered[name] = cert
                refused += self._admit(cert, now, names)
        return self._settle(names, touched, refused)

    def advance(self, now: datetime) -> Delta:
        """Time moved: certificates that became valid or expired since."""
        due = {}
        while self._events and self._events[0][0] <= now:
            _, _, name, cert = heapq.heappop(self._events)
            if self._offered.get(name) is cert:
                due[name] = cert
        names: set[str] = set()
        refused = []
        for cert in due.values():
            self._withdraw(cert, names)
            refused += self._admit(cert, now, names)
        return self._settle(names, set(due), refused)

    @property
    def next_change(self) -> datetime | None:
        """When `advance` may have something to do (maybe earlier: replaced certificates' dates stay queued)."""
        return self._events[0][0] if self._events else None

    def covering(self, host: str) -> Certificate | None:
        """The served certificate HAProxy presents for `host`: its exact name, else the wildcard."""
        host = normal(host)
        best = self._best.get(host)
        if best is None and (wild := wildcard_of(host)) is not None:
            best = self._best.get(wild)
        return best

    # --- the index -------------------------------------------------------------------------------
    def _admit(self, cert: Certificate, now: datetime, names: set[str]) -> list[Refusal]:
        outside = [n for n in cert.names if not within(n, self.suffixes)] if self.suffixes else []
        if outside:
            refusal = Refusal(cert, OUTSIDE, (
                f"{', '.join(outside[:4])} {'is' if len(outside) == 1 else 'are'} outside the configured domains "
                f"({', '.join(self.suffixes)}); add the domain with --domain or --acme-allow, or serve any name "
                f"with --certs-any-name"))
        elif now < cert.not_before:
            self._queue(cert.not_before, cert)
            refusal = Refusal(cert, NOT_YET_VALID, f"not valid before {cert.not_before:%Y-%m-%d %H:%M:%S} UTC "
                                                   f"(served from then; check the issuer's and this host's clocks)")
        elif now >= cert.not_after:
            refusal = Refusal(cert, EXPIRED, f"expired {cert.not_after:%Y-%m-%d %H:%M:%S} UTC; renew or remove it")
        else:
            self._state[cert.name] = VALID
            self._queue(cert.not_after, cert)
            for n in cert.names:
                self._valid.setdefault(n, {})[cert.name] = cert
            names.update(cert.names)
            return []
        self._state[cert.name] = refusal.reason
        self.refused[refusal.reason] += 1
        return [refusal]

    def _withdraw(self, cert: Certificate, names: set[str]) -> None:
        state = self._state.pop(cert.name)
        if state != VALID:
            self.refused[state] -= 1
            return
        for n in cert.names:
            bucket = self._valid[n]
            del bucket[cert.name]
            if not bucket:
                del self._valid[n]
        names.update(cert.names)

    def _queue(self, when: datetime, cert: Certificate) -> None:
        heapq.heappush(self._events, (when, next(self._seq), cert.name, cert))
        if len(self._events) > 2 * len(self._offered) + 64:     # dates of replaced certificates pile up
            self._events = [e for e in self._events if self._offered.get(e[2]) is e[3]]
            heapq.heapify(self._events)

    def _settle(self, names: set[str], touched: set[str], refused: list[Refusal]) -> Delta:
        """Pick the best certificate again for each DNS name whose candidates changed, then see
        which certificates start or stop being served."""
        for n in names:
            bucket = self._valid.get(n)
            new = max(bucket.values(), key=_rank) if bucket else None
            old = self._best.get(n)
            if new is old:
                continue
            if old is not None:
                self._wins[old.name] -= 1
                touched.add(old.name)
            if new is None:
                del self._best[n]
            else:
                self._best[n] = new
                self._wins[new.name] += 1
                touched.add(new.name)
        files = []
        for name in sorted(touched):
            cert = self._offered.get(name)
            wins = self._wins.get(name, 0)
            if not wins:
                self._wins.pop(name, None)
            serve = cert if wins and self._state.get(name) == VALID else None
            f = cert.file if cert is not None else file_name(name)
            if self.files.get(f) is not serve:
                if serve is None:
                    del self.files[f]
                else:
                    self.files[f] = serve
                files.append((f, serve))
        return Delta(tuple(files), tuple(refused))


# --- what HAProxy loads, and how to get there from what it has ----------------------------------
TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")                  # RFC 8555 tokens: base64url
KEY_AUTHORIZATION = re.compile(r"^[A-Za-z0-9_-]{1,256}\.[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class CertPlan:
    """Live certificates → desired ones: files to write and remove, runtime commands, log lines."""

    writes: tuple[tuple[str, str], ...] = ()             # (file name, file text)
    removes: tuple[str, ...] = ()                        # file names
    commands: tuple[tuple[str, str], ...] = ()           # (runtime command, payload or "")
    changes: tuple[str, ...] = ()                        # one readable line per certificate, for the log

    @property
    def empty(self) -> bool:
        return not self.writes and not self.removes


def crt_list(directory: str, files: Iterable[str]) -> str:
    """The crt-list file: one certificate file per line; HAProxy takes the names from each
    certificate (no SNI filter), exact names before wildcards."""
    return "".join(f"{directory}/{f}\n" for f in sorted(files))


def cert_plan(live: Mapping[str, Certificate], changes: Mapping[str, Certificate | None], directory: str,
              crt_list_path: str) -> CertPlan:
    """Runtime commands that apply `changes` (file → certificate, None: remove) to HAProxy serving
    `live`, new and replaced certificates first so no name goes without one in between."""
    writes, commands, lines = [], [], []
    for f, cert in sorted((f, c) for f, c in changes.items() if c is not None):
        old = live.get(f)
        if old is not None and old.pem == cert.pem:
            continue
        path = f"{directory}/{f}"
        writes.append((f, file_text(cert)))
        if old is None:
            commands += [(f"new ssl cert {path}", ""), (f"set ssl cert {path}", cert.pem),
                         (f"commit ssl cert {path}", ""), (f"add ssl crt-list {crt_list_path} {path}", "")]
            lines.append(f"+ {cert.describe()}")
        else:
            commands += [(f"set ssl cert {path}", cert.pem), (f"commit ssl cert {path}", "")]
            lines.append(f"~ {cert.describe()}")
    removes = tuple(sorted(f for f, c in changes.items() if c is None and f in live))
    for f in removes:
        path = f"{directory}/{f}"
        commands += [(f"del ssl crt-list {crt_list_path} {path}", ""), (f"del ssl cert {path}", "")]
        lines.append(f"- {live[f].describe()}")
    return CertPlan(tuple(writes), removes, tuple(commands), tuple(lines))


def map_text(entries: Mapping[str, str]) -> str:
    return "".join(f"{k} {v}\n" for k, v in sorted(entries.items()))


def map_commands(path: str, live: Mapping[str, str], desired: Mapping[str, str]) -> tuple[str, ...]:
    """Runtime commands turning the map `path` from `live` into `desired` (values without spaces)."""
    commands = [f"del map {path} {k}" for k in sorted(set(live) - set(desired))]
    for key, value in sorted(desired.items()):
        if key not in live:
            commands.append(f"add map {path} {key} {value}")
        elif live[key] != value:
            commands.append(f"set map {path} {key} {value}")
    return tuple(commands)


def challenges(raw: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """HTTP-01 token → key authorization from KV (token → value), and what was refused. Anyone
    who can write the prefix can put anything there: only base64url shapes reach HAProxy."""
    good, bad = {}, []
    for token, value in sorted(raw.items()):
        value = value.strip()
        if TOKEN.match(token) and KEY_AUTHORIZATION.match(value) and value.startswith(token + "."):
            good[token] = value
        else:
            bad.append(token)
    return good, tuple(bad)


def tls_hosts(hosts: Iterable[str], served: Served) -> frozenset[str]:
    """Of the routed host names, those a served certificate covers: they get the HTTPS redirect."""
    return frozenset(h for h in hosts if served.covering(h) is not None)
