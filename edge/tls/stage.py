"""The certificate stage: keeps HAProxy's certificates, its ACME challenge map and its map of
HTTPS hosts equal to what the sources say, live through the runtime API, never by a reload.

It sits beside the route pipeline and runs on the control loop's thread (one writer of the
runtime socket and the state dir): the sources (`edge.tls.sources`, other threads) only hand
over their newest sets and wake the loop; `step(table)` then

1. merges every source's newest set (a source that has not answered yet counts with what is
   on disk from the last run, so a restart with Consul down serves the same certificates),
2. picks what HAProxy should load (`certs.serving`) and plans the difference (`certs.cert_plan`),
3. writes each certificate file and the crt-list first (a reload or restart then loads the same
   set), then applies the runtime commands (`new/set/commit ssl cert`, `add/del ssl crt-list`),
4. updates the challenge map and the map of hosts that get the HTTPS redirect (`add/set/del
   map`), file first too,
5. tells the ACME issuer (if any) which names the routes want and which certificates exist.

A failed write (full or read-only state dir) is logged once and retried; a runtime command that
fails falls back to the control loop's reload, which loads the files.
"""

from __future__ import annotations

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
from edge.tls.certs import (
    CertError,
    Certificate,
    CertSet,
    cert_plan,
    crt_list,
    file_name,
    map_commands,
    map_text,
    name_in_file,
    parse_bundle,
    self_signed,
    serving,
    tls_hosts,
)

log = logging.getLogger("edge.certs")
RETRY = 5.0
RECHECK = 60.0                            # seconds: certificates expire and become valid with time alone
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



class CertStage:
    def __init__(self, haproxy: HAProxy, paths: CertPaths, domains: tuple[str, ...], wake: Callable[[], None],
                 redirect: bool = True, issuer=None, wildcards: bool = False, clock: Callable[[], datetime] = utc_now):
        self.haproxy = haproxy
        self.paths = paths
        self.redirect = redirect             # the configuration uses the map of HTTPS hosts only then
        self.domains = domains
        self.wake = wake
        self.issuer = issuer                 # edge.acme.issuer.Issuer, or None without ACME
        self.wildcards = wildcards           # DNS-01: order `*.<domain>` instead of one name per route
        self.clock = clock
        self.metrics = NoMetrics()           # edge.metrics: the expiry of each served certificate
        self.live: dict[str, Certificate] = {}          # file name → certificate HAProxy has
        self.challenge_map = LiveMap(paths.challenges)   # ACME token → key authorization
        self.host_map = LiveMap(paths.tls_hosts)         # hosts with a certificate → "1" (the redirect)
        self._sources: dict[str, CertSet] = {}           # newest set per source
        self._disk: dict[str, Certificate] = {}          # what the last run left, until its source answers
        self._challenges: dict[str, str] = {}
        self._lock = threading.Lock()
        self._changed = True
        self._table: RouteTable | None = None
        self._wanted: tuple | None = None
        self._write = GuardedWrites(f"certificates in {paths.directory}", "HAProxy keeps serving the ones it has",
                                    RETRY)
        self._recheck_at = 0.0

    # --- inputs, from other threads -------------------------------------------------------------
    def on_certs(self, source: str, certs: CertSet) -> None:
        with self._lock:
            self._sources[source] = certs
            self._changed = True
        self.wake()

    def on_challenges(self, tokens: dict[str, str]) -> None:
        with self._lock:
            self._challenges = dict(tokens)
            self._changed = True
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
            if file_name(cert.name) == path.name and path.parent == self.paths.directory:
                self._disk[path.name] = cert
        self.live = dict(self._disk)
        if len(self.live) != len(listed) or not self.paths.crt_list.is_file():
            atomic_write(self.paths.crt_list, crt_list(str(self.paths.directory), self.live))
        for live_map in (self.challenge_map, self.host_map):
            live_map.read()

    # --- the step, on the control loop's thread --------------------------------------------------
    def step(self, table: RouteTable | None) -> bool:
        """Bring HAProxy's certificates and maps up to date; False when the runtime API failed
        (the caller reloads: the files already hold the new state)."""
        now = time.monotonic()
        with self._lock:
            due = self._changed or table is not self._table or now >= self._recheck_at
            if not due or self._write.waiting:
                return True                # nothing new, or the state dir refused a write: wait for RETRY
            sources, tokens = dict(self._sources), dict(self._challenges)
            self._changed = False
        self._table, self._recheck_at = table, now + RECHECK
        certs = self._merged(sources)
        ok = self._apply_certs(serving(certs, self.clock()))
        ok = self._apply_map(self.challenge_map, tokens) and ok
        if self.redirect:
            hosts = tls_hosts(served_hosts(table, self.domains) if table else (), self.live)
            ok = self._apply_map(self.host_map, dict.fromkeys(hosts, "1")) and ok
        self._want(table, certs)
        return ok

    def _merged(self, sources: dict[str, CertSet]) -> CertSet:
        """Every source's newest set; for a source that has not answered, what is on disk of it."""
        from_disk = tuple(c for f, c in self._disk.items()
                          if not any(f.startswith(f"{s}_") for s in sources))
        return CertSet(tuple(c for s in sources.values() for c in s.certs) + from_disk)

    def _apply_certs(self, desired: dict[str, Certificate]) -> bool:
        plan = cert_plan(self.live, desired, str(self.paths.directory), str(self.paths.crt_list))
        if plan.empty:
            return True
        t0 = time.perf_counter()
        if not self._write(lambda: self._write_certs(plan.writes, desired)):
            self._again()
            return True
        try:
            self.haproxy.ssl(plan.commands)
        except RuntimeFailed as exc:
            log.warning("certificate change through the runtime API failed (%s); reloading instead", exc)
            self._served(desired)
            return False
        finally:
            for f in plan.removes:
                (self.paths.directory / f).unlink(missing_ok=True)
        self._served(desired)
        log.info("certificates applied live in %.1f ms, no reload: %s", (time.perf_counter() - t0) * 1000,
                 "; ".join(plan.changes))
        return True

    def _served(self, desired: dict[str, Certificate]) -> None:
        for f in set(self.live) - set(desired):
            self.metrics.certificate_expires(self.live[f].name, None)
        for cert in desired.values():
            self.metrics.certificate_expires(cert.name, cert.not_after.timestamp())
        self.live = desired

    def _write_certs(self, writes, desired) -> None:
        for f, pem in writes:
            atomic_write(self.paths.directory / f, pem, mode=0o600)
        if set(desired) != set(self.live):          # a renewal or replacement keeps the list as it is
            atomic_write(self.paths.crt_list, crt_list(str(self.paths.directory), desired))

    def _apply_map(self, live: LiveMap, desired: dict[str, str]) -> bool:
        commands = map_commands(str(live.path), live.entries, desired)
        if not commands:
            return True
        if not self._write(lambda: atomic_write(live.path, map_text(desired))):
            self._again()
            return True
        live.entries = desired
        try:
            self.haproxy.runtime(commands)
        except RuntimeFailed as exc:
            log.warning("map %s through the runtime API failed (%s); reloading instead", live.path.name, exc)
            return False
        log.debug("map %s: %s", live.path.name, "; ".join(commands))
        return True

    def _want(self, table: RouteTable | None, certs: CertSet) -> None:
        if self.issuer is None or table is None:
            return
        names = (frozenset(f"*.{d}" for d in self.domains) if self.wildcards
                 else frozenset(served_hosts(table, self.domains)))
        if (names, certs) != self._wanted:
            self._wanted = (names, certs)
            self.issuer.want(names, certs)

    def _again(self) -> None:
        """A refused write: the whole step runs again once the retry delay is over."""
        with self._lock:
            self._changed = True
