"""The certificate stage: keeps HAProxy's certificates, its ACME challenge map and its map of
HTTPS hosts equal to what the sources say, live through the runtime API, never by a reload.

It sits beside the route pipeline and runs on the control loop's thread (one writer of the
runtime socket and the state dir): the sources (`edge.tls.sources`, other threads) only hand
over their newest sets and wake the loop; `step(table)` then

1. takes in what changed: each source's new set against the one before (a source that has not
   answered yet counts with what is on disk from the last run, so a restart with Consul down
   serves the same set), and the certificates whose validity date has come; `plan.Served` turns
   that into files to load or unload and refusals (logged once each, counted in the metrics),
2. applies those changes, for at most BUDGET seconds a step so a large set never holds the
   routes up (the rest comes at the next step): CHUNK certificates at a time, their files and the
   crt-list first (a reload or restart then loads the same set), then the runtime commands
   (`new/set/commit ssl cert`, `add/del ssl crt-list`), and tells the OCSP stapler,
3. staples the OCSP responses the stapler (`edge.tls.ocsp`, its own thread) handed over, within
   the same budget: `<file>.ocsp` beside the certificate (a replaced or removed certificate loses
   its old one first), then `set ssl cert <file>.ocsp` and a commit,
4. updates the challenge map and, once every certificate is in, the map of hosts that get the
   HTTPS redirect (`add/set/del map`), file first too,
5. tells the ACME issuer (if any) which names the routes want and which certificates exist.

A step where nothing changed costs a few comparisons. A failed write (full or read-only state
dir) is logged once and retried; a runtime command that fails falls back to the control loop's
reload, which loads the files.
"""

from __future__ import annotations

import base64
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from edge.haproxy.process import GuardedWrites, HAProxy, RuntimeFailed, atomic_write
from edge.metrics import NoMetrics
from edge.routing.render import Https, served_hosts
from edge.routing.table import RouteTable
from edge.tls.certs import CertError, Certificate, CertSet, name_in_file, parse_bundle, self_signed
from edge.tls.plan import INVALID, REASONS, Delta, Served, cert_plan, crt_list, map_commands, map_text, tls_hosts

log = logging.getLogger("edge.certs")
RETRY = 5.0
CHUNK = 10                                # certificates per write of the crt-list and batch of commands
BUDGET = 0.05                             # seconds of certificate changes per step; the routes' turn in between
DEFAULT_NAME = "haproxy-consul.invalid"   # the default certificate's name: never a real host


@dataclass(frozen=True)
class CertPaths:
    directory: Path

    @property
    def crt_list(self) -> Path:
        return self.directory / "crt-list"

    @property
    def default_cert(self) -> Path:
        return self.directory / "default.pem"

    @property
    def challenges(self) -> Path:
        return self.directory / "acme-challenges.map"

    @property
    def tls_hosts(self) -> Path:
        return self.directory / "tls-hosts.map"

    def https(self, bind: str, redirect: bool, hsts: int) -> Https:
        """The TLS listener as the configuration renders it, on these files."""
        return Https(bind, str(self.default_cert), str(self.crt_list), str(self.challenges), str(self.tls_hosts),
                     redirect, hsts)


@dataclass
class LiveMap:
    """An HAProxy map file of the certificate stage and the entries HAProxy holds (as the file does)."""

    path: Path
    entries: dict[str, str] = field(default_factory=dict)

    def read(self) -> None:
        """What the last run left: HAProxy loads this file, so that is what it holds."""
        self.entries = dict(line.split(" ", 1) for line in _lines(self.path) if " " in line)
        if not self.path.is_file():
            atomic_write(self.path, "")


def utc_now() -> datetime:
    return datetime.now(UTC)


def _lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _same_names(old: RouteTable | None, new: RouteTable | None) -> bool:
    """Whether two tables serve the same host names, from vhosts and from routers (an instance
    change keeps every other route object and the routers as they were, so this is mostly
    identity checks)."""
    if old is new or old is None or new is None:
        return old is new
    return (old.routers is new.routers or old.routers == new.routers) and len(old.routes) == len(new.routes) and all(
        a is b or (a.name == b.name and a.hosts == b.hosts and a.vhost == b.vhost)
        for a, b in zip(old.routes, new.routes, strict=True))


class CertStage:
    def __init__(self, haproxy: HAProxy, paths: CertPaths, domains: tuple[str, ...], wake: Callable[[], None],
                 redirect: bool = True, issuer=None, wildcards: bool = False, clock: Callable[[], datetime] = utc_now,
                 suffixes: tuple[str, ...] = ()):
        self.haproxy = haproxy
        self.paths = paths
        self.redirect = redirect             # the configuration uses the map of HTTPS hosts only then
        self.domains = domains
        self.wake = wake
        self.issuer = issuer                 # edge.acme.issuer.Issuer, or None without ACME
        self.wildcards = wildcards           # DNS-01: order `*.<domain>` instead of one name per route
        self.clock = clock
        self.metrics = NoMetrics()           # edge.metrics: expiry of each served certificate, refusals
        self.served = Served(suffixes)       # what HAProxy should have (suffixes: names a certificate may carry)
        self.live: dict[str, Certificate] = {}          # file name → certificate HAProxy has
        self.challenge_map = LiveMap(paths.challenges)   # ACME token → key authorization
        self.host_map = LiveMap(paths.tls_hosts)         # hosts with a certificate → "1" (the redirect)
        self._new: dict[str, CertSet] = {}               # newest set per source, not taken in yet
        self._offered: dict[str, dict[str, Certificate]] = {}   # source → certificate name → certificate taken in
        self._invalid: dict[str, int] = {}               # source → bundles it refused to parse
        self._pending: dict[str, Certificate | None] = {}       # file → certificate to load (None: unload)
        self._challenges: dict[str, str] = {}
        self._lock = threading.Lock()
        self._table: RouteTable | None = None
        self._vhosts: frozenset[str] = frozenset()
        self._hosts_due = True               # the map of HTTPS hosts may differ from what it should be
        self._want_due = True                # the issuer has not heard of the latest names or certificates
        self._counted: dict[str, int] = {}   # refusals by reason, as the metrics last heard them
        self.stapler = None                  # edge.tls.ocsp.Stapler, or None without OCSP stapling
        self._staples: dict[str, tuple[Certificate, bytes]] = {}   # file → OCSP response to staple
        self._known: dict[str, bytes] | None = {}                  # responses the last run left, for the stapler
        self._write = GuardedWrites(f"certificates in {paths.directory}", "HAProxy keeps serving the ones it has",
                                    RETRY)

    # --- inputs, from other threads -------------------------------------------------------------
    def on_certs(self, source: str, certs: CertSet) -> None:
        with self._lock:
            self._new[source] = certs
        self.wake()

    def on_ocsp(self, file: str, cert: Certificate, der: bytes) -> None:
        """From the stapler's thread: a checked OCSP response for the certificate served from `file`."""
        with self._lock:
            self._staples[file] = (cert, der)
        self.wake()

    def on_challenges(self, tokens: dict[str, str]) -> None:
        with self._lock:
            self._challenges = dict(tokens)
        self.wake()

    # --- start-up --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Before HAProxy first loads its configuration: the certificate directory, a default
        certificate (made once), and what the last run left (the crt-list with its files, the
        maps) read back as the live state, since HAProxy loads exactly those files: a restart
        serves the same set until the sources answer."""
        self.paths.directory.mkdir(mode=0o700, exist_ok=True)
        if not self.paths.default_cert.is_file():
            atomic_write(self.paths.default_cert, self_signed(DEFAULT_NAME, self.clock()), mode=0o600)
            log.info("made a self-signed default certificate %s for names without a certificate",
                     self.paths.default_cert)
        listed = _lines(self.paths.crt_list)
        for line in listed:
            path = Path(line.split()[0])
            try:
                text = path.read_text()
                cert = parse_bundle(name_in_file(text) or f"disk/{path.name}", text)
            except (OSError, CertError) as exc:
                log.warning("certificate %s from the last run not served again: %s", path, exc)
                continue
            if cert.file == path.name and path.parent == self.paths.directory:
                self.live[path.name] = cert
                self._offered.setdefault(cert.name.split("/", 1)[0], {})[cert.name] = cert
        if len(self.live) != len(listed) or not self.paths.crt_list.is_file():
            atomic_write(self.paths.crt_list, crt_list(str(self.paths.directory), self.live))
        self._take_in(self.served.update({c.name: c for c in self.live.values()}, self.clock()))
        for f, cert in self.live.items():
            if cert.ocsp_url is not None and (self.paths.directory / f"{f}.ocsp").is_file():
                self._known[f] = (self.paths.directory / f"{f}.ocsp").read_bytes()
        self._pending.update(dict.fromkeys(self.live.keys() - self.served.files.keys()))   # refused now
        for live_map in (self.challenge_map, self.host_map):
            live_map.read()

    # --- the step, on the control loop's thread --------------------------------------------------
    def step(self, table: RouteTable | None) -> bool:
        """Bring HAProxy's certificates and maps up to date; False when the runtime API failed
        (the caller reloads: the files already hold the new state)."""
        if self._write.waiting:
            return True                    # the state dir refused a write: wait for RETRY
        t0 = time.perf_counter()
        with self._lock:
            new, self._new = self._new, {}
            tokens = self._challenges
        now = self.clock()
        if new:
            self._take_in(self.served.update(self._changes(new), now))
        if self.served.next_change is not None and now >= self.served.next_change:
            self._take_in(self.served.advance(now))
        self._count()
        if self._known is not None:              # the first step: what is served, and the responses known
            if self.stapler is not None:
                self.stapler.serve(dict(self.live), self._known)
            self._known = None
        ok = self._apply_certs(t0)
        ok = self._apply_staples(t0) and ok
        ok = self._apply_map(self.challenge_map, tokens) and ok
        if not _same_names(self._table, table):
            self._vhosts = frozenset(served_hosts(table, self.domains)) if table else frozenset()
            self._hosts_due = self._want_due = True
        self._table = table
        if self.redirect and self._hosts_due and not self._pending:
            self._hosts_due = False
            ok = self._apply_map(self.host_map, dict.fromkeys(tls_hosts(self._vhosts, self.served), "1")) and ok
        self._want(table)
        if self._pending or self._staples:
            self.wake()                    # the rest of a large change comes next, after the routes' turn
        return ok

    def _changes(self, new: dict[str, CertSet]) -> dict[str, Certificate | None]:
        """Certificate name → what is offered under it now (None: withdrawn), over the sources
        that sent a new set."""
        changes: dict[str, Certificate | None] = {}
        for source, certs in new.items():
            old = self._offered.get(source, {})
            fresh = {c.name: c for c in certs.certs}
            changes.update(dict.fromkeys(old.keys() - fresh.keys()))
            changes.update((name, c) for name, c in fresh.items() if old.get(name) is not c)
            self._offered[source] = fresh
            self._invalid[source] = len(certs.refused)
        self._want_due = True
        return changes

    def _take_in(self, delta: Delta) -> None:
        for refusal in delta.refused:
            log.warning("%s", refusal.line())
        for f, cert in delta.files:
            if self.live.get(f) is cert:
                self._pending.pop(f, None)          # back to what HAProxy has
            else:
                self._pending[f] = cert

    def _count(self) -> None:
        counts = {reason: self.served.refused[reason] for reason in REASONS}
        counts[INVALID] = sum(self._invalid.values())
        if counts != self._counted:
            self.metrics.certificates_refused(counts)
            self._counted = counts

    def _apply_certs(self, t0: float) -> bool:
        """Pending certificates, CHUNK at a time, until they are all in or BUDGET is spent since
        the step began at `t0` (the rest comes at the next step): additions and replacements
        before any removal. The log line's time is the step's, from taking the sources' sets in."""
        changes: list[str] = []
        ok = True
        while self._pending and ok and not self._write.waiting:
            batch = list(itertools.islice((f for f, c in self._pending.items() if c is not None), CHUNK))
            ok = self._apply_batch({f: self._pending[f] for f in batch or itertools.islice(self._pending, CHUNK)},
                                   changes)
            if time.perf_counter() - t0 >= BUDGET:
                break
        if changes:
            log.info("certificates applied live in %.1f ms, no reload: %s%s%s", (time.perf_counter() - t0) * 1000,
                     "; ".join(changes[:20]), f"; and {len(changes) - 20} more" if len(changes) > 20 else "",
                     f" ({len(self._pending)} to go)" if self._pending else "")
        return ok

    def _apply_batch(self, batch: dict[str, Certificate | None], changes: list[str]) -> bool:
        plan = cert_plan(self.live, batch, str(self.paths.directory), str(self.paths.crt_list))
        desired = {**self.live, **{f: c for f, c in batch.items() if c is not None}}
        for f in plan.removes:
            del desired[f]
        if not plan.empty and not self._write(lambda: self._write_certs(plan, desired)):
            return True                    # kept pending: tried again after RETRY
        for f in batch:
            del self._pending[f]
        if plan.empty:
            self.live = desired
            return True
        self._hosts_due = True
        try:
            self.haproxy.ssl(plan.commands)
        except RuntimeFailed as exc:
            log.warning("certificate change through the runtime API failed (%s); reloading instead", exc)
            return False
        finally:
            for f in plan.removes:
                (self.paths.directory / f).unlink(missing_ok=True)
                (self.paths.directory / f"{f}.ocsp").unlink(missing_ok=True)
            self._served(desired, batch)
            if self.stapler is not None:
                self.stapler.serve({f: batch[f] for f in (*dict(plan.writes), *plan.removes)})
        changes += plan.changes
        return True

    def _apply_staples(self, t0: float) -> bool:
        """OCSP responses from the stapler, within the step's BUDGET: each beside its certificate
        (a reload loads it), then in HAProxy (`set ssl cert <file>.ocsp` and a commit)."""
        with self._lock:
            staples, self._staples = list(self._staples.items()), {}
        for n, (f, (cert, der)) in enumerate(staples):
            if n and time.perf_counter() - t0 >= BUDGET:
                self._later(staples[n:])
                return True
            if self.live.get(f) is not cert or f in self._pending:
                continue                         # no longer served as it was: the stapler has been told
            path = self.paths.directory / f
            if not self._write(lambda p=path, d=der: atomic_write(Path(f"{p}.ocsp"), d, mode=0o600)):
                self._later(staples[n:])
                return True
            try:
                self.haproxy.ssl(((f"set ssl cert {path}.ocsp", base64.b64encode(der).decode()),
                                  (f"commit ssl cert {path}", "")))
            except RuntimeFailed as exc:
                log.warning("OCSP response for %s through the runtime API failed (%s); reloading instead",
                            cert.name, exc)
                self._later(staples[n + 1:])     # this one's file is written: the reload loads it
                return False
            log.debug("OCSP response stapled for %s", cert.name)
        return True

    def _later(self, staples: list[tuple[str, tuple[Certificate, bytes]]]) -> None:
        with self._lock:                         # a newer response for the same file wins
            self._staples = {**dict(staples), **self._staples}

    def _served(self, desired: dict[str, Certificate], batch: dict[str, Certificate | None]) -> None:
        for f in batch:
            if f in self.live and f not in desired:
                self.metrics.certificate_expires(self.live[f].name, None)
            elif f in desired:
                self.metrics.certificate_expires(desired[f].name, desired[f].not_after.timestamp())
        self.live = desired

    def _write_certs(self, plan, desired) -> None:
        for f, pem in plan.writes:
            (self.paths.directory / f"{f}.ocsp").unlink(missing_ok=True)   # never a staple of the old one
            atomic_write(self.paths.directory / f, pem, mode=0o600)
        if desired.keys() != self.live.keys():          # a renewal or replacement keeps the list as it is
            atomic_write(self.paths.crt_list, crt_list(str(self.paths.directory), desired))

    def _apply_map(self, live: LiveMap, desired: dict[str, str]) -> bool:
        commands = map_commands(str(live.path), live.entries, desired)
        if not commands:
            return True
        if not self._write(lambda: atomic_write(live.path, map_text(desired))):
            self._hosts_due = self._hosts_due or live is self.host_map
            return True
        live.entries = desired
        try:
            self.haproxy.runtime(commands)
        except RuntimeFailed as exc:
            log.warning("map %s through the runtime API failed (%s); reloading instead", live.path.name, exc)
            return False
        log.debug("map %s: %s", live.path.name, "; ".join(commands))
        return True

    def _want(self, table: RouteTable | None) -> None:
        if self.issuer is None or table is None or not self._want_due:
            return
        self._want_due = False
        names = frozenset(f"*.{d}" for d in self.domains) if self.wildcards else self._vhosts
        self.issuer.want(names, CertSet(tuple(c for offered in self._offered.values() for c in offered.values())))
