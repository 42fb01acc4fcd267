"""The fleet-wide ACME issuer: each name ordered once for the whole fleet, results in Consul KV.

Every edge runs an `Issuer` thread. The control loop calls `want(names, certs)` whenever the
route table or the certificate set changes (latest wins); `run()` turns that into orders:

1. `edge.acme.plan` decides, from values, which names need an order now (no certificate
   covers them, or a third of the lifetime is left), which wait (a fleet-wide backoff after
   failures, the fleet-wide hourly cap, another edge ordering) and which are refused (not a
   host name under a configured domain or allowed suffix: Consul data is untrusted).
2. For each name to order, a worker takes the Consul session lock `P/_acme/locks/<name>`. An
   edge that does not get it leaves the name to the holder and looks again after `lock_retry`
   seconds. The holder first re-reads `P/<name>` and the name's backoff state under the lock
   (another edge may have just finished), then reserves a slot in the fleet's hourly count
   (`P/_acme/orders`, a CAS write) and only then orders, through `edge.acme.client`.
3. The new key and chain go to `P/<name>`, where every edge's KV source picks them up. A
   failure doubles the name's wait, kept in `P/_acme/state/<name>` so no other edge retries
   sooner. One name's failure never delays another: orders run in parallel workers.

ACME server or Consul unreachable: one warning when the outage starts, one line when it ends,
retries with capped backoff in between. A certificate issued while Consul is down is kept in
memory and written when Consul is back, not ordered again. Private keys are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from acme.crypto_util import make_csr
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge.acme.client import AcmeClient, AcmeUnavailable, OrderFailed, Stopped
from edge.acme.dns import Rfc2136, load_key_file
from edge.acme.plan import (
    NEW,
    REFUSED,
    RENEW,
    WAIT,
    AcmePlan,
    Decision,
    Failure,
    after_failure,
    best_cover,
    plan,
    renewal_due,
    reserve_order,
)
from edge.acme.settings import AcmeSettings, DnsSettings  # noqa: F401 - the issuer's settings, re-exported
from edge.consul.kv import ConsulKV, KVUnavailable
from edge.tls.certs import CertError, Certificate, CertSet, parse_bundle

log = logging.getLogger("edge.acme")


class Acme(Protocol):
    """What the issuer needs from the ACME side (`AcmeClient`; a fake in unit tests)."""

    def prepare(self) -> None:
        """Reach the server and the fleet's account (raises AcmeUnavailable when it is down)."""

    def issue(self, name: str, csr_pem: bytes) -> str:
        """One order; the full chain PEM (raises AcmeUnavailable, OrderFailed or Stopped)."""


@dataclass
class Stats:
    orders: int = 0        # orders this edge placed
    issued: int = 0        # of which succeeded and were stored
    failed: int = 0
    left_to_others: int = 0  # lock held by another edge, or its result found under the lock

    def __str__(self) -> str:
        return (f"orders={self.orders} issued={self.issued} failed={self.failed} "
                f"left_to_others={self.left_to_others}")


class Outage:
    """One warning when a dependency stops answering, one line when it is back; capped backoff."""

    def __init__(self, what: str, cap: float):
        self.what, self.cap = what, cap
        self.since: float | None = None
        self.delay = 0.0
        self.until = 0.0
        self._lock = threading.Lock()    # workers report concurrently; one warning per outage

    def failed(self, exc: Exception) -> None:
        with self._lock:
            now = time.monotonic()
            if self.since is None:
                self.since = now
                log.warning("ACME: %s unavailable: %s; retrying until it answers (logged once)", self.what, exc)
            else:
                log.debug("ACME: %s still unavailable: %s", self.what, exc)
            self.delay = min(self.cap, self.delay * 2 if self.delay else 1.0)
            self.until = max(self.until, now + self.delay)

    def ok(self) -> None:
        with self._lock:
            if self.since is not None:
                log.info("ACME: %s available again after %.1f s", self.what, time.monotonic() - self.since)
            self.since, self.delay, self.until = None, 0.0, 0.0

    def wait_left(self) -> float:
        with self._lock:
            return max(0.0, self.until - time.monotonic())


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _State:
    """What `want()` hands over and what the workers report, under one lock."""

    wanted: frozenset[str] = frozenset()
    certs: CertSet = field(default_factory=CertSet)
    issued: dict[str, Certificate] = field(default_factory=dict)    # our results, until the caller's set has them
    unsaved: dict[str, Certificate] = field(default_factory=dict)   # issued while Consul was down
    held: dict[str, datetime] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)
    failures: dict[str, Failure] = field(default_factory=dict)


class Issuer:
    def __init__(self, kv: ConsulKV, settings: AcmeSettings, stop: threading.Event, acme: Acme | None = None,
                 clock: Callable[[], datetime] = utc_now):
        self.kv, self.settings, self.stop, self.clock = kv, settings, stop, clock
        dns = None
        if settings.dns is not None:
            key = load_key_file(settings.dns.tsig_key_file)
            dns = Rfc2136(settings.dns.host, settings.dns.port, key)
        self.acme: Acme = acme or AcmeClient(
            kv, settings.prefix, settings.directory, settings.email, settings.ca_bundle, dns, stop,
            http_propagation_wait=settings.http_propagation_wait,
            dns_propagation_wait=settings.dns_propagation_wait, order_timeout=settings.order_timeout)
        self.holder = f"{socket.gethostname()} pid {os.getpid()}"
        self.stats = Stats()
        self.consul = Outage("Consul", settings.outage_retry_max)
        self.server = Outage(f"ACME server {settings.directory}", settings.outage_retry_max)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._state = _State()
        self._said: dict[str, tuple[str, str]] = {}

    def _count(self, counter: str) -> None:
        with self._lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    # --- keys in KV ------------------------------------------------------------------------------
    def cert_key(self, name: str) -> str:
        return f"{self.settings.prefix}/{name}"

    def _lock_key(self, name: str) -> str:
        return f"{self.settings.prefix}/_acme/locks/{name}"

    def _state_key(self, name: str) -> str:
        return f"{self.settings.prefix}/_acme/state/{name}"

    def _orders_key(self) -> str:
        return f"{self.settings.prefix}/_acme/orders"

    # --- the control loop's side -----------------------------------------------------------------
    def want(self, names: Iterable[str], certs: CertSet) -> None:
        """The names to keep covered, and every certificate the edge has now. Thread-safe; the
        latest call wins."""
        names = frozenset(names)
        with self._lock:
            self._state.wanted, self._state.certs = names, certs
            known = {c.fingerprint for c in certs.certs}
            # Our own results count until the caller's set includes them (its KV watch caught up).
            for name in [n for n, c in self._state.issued.items() if c.fingerprint in known]:
                del self._state.issued[name]
        self._wake.set()

    def run(self) -> None:
        """The thread body: plan, order, wait for a change or a timer; returns once `stop` is set."""
        s = self.settings
        log.info("ACME: issuer on %s for names under %s; at most %d orders an hour fleet-wide%s", s.directory,
                 ", ".join(s.suffixes) or "(nothing)", s.max_orders_per_hour,
                 f"; DNS-01 via {s.dns.host}:{s.dns.port}" if s.dns else "")
        pool = ThreadPoolExecutor(max_workers=s.workers, thread_name_prefix="acme-order")
        try:
            while not self.stop.is_set():
                self._wake.clear()
                delay = self._round(pool)
                self._sleep(delay)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            log.info("ACME: issuer stopped (%s)", self.stats)

    def _sleep(self, delay: float) -> None:
        """Until woken by want() or a finished order, `delay` passes or stop is set."""
        deadline = time.monotonic() + delay
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self._wake.wait(min(left, 0.25)):
                return

    # --- one round ---------------------------------------------------------------------------------
    def _round(self, pool: ThreadPoolExecutor) -> float:
        s = self.settings
        waits = [self.consul.wait_left(), self.server.wait_left()]
        if max(waits) > 0:
            return max(waits)
        self._save_unsaved()
        now = self.clock()
        with self._lock:
            st = self._state
            st.held = {n: t for n, t in st.held.items() if t > now}
            wanted, busy, held = st.wanted, frozenset(st.busy), dict(st.held)
            certs = st.certs | CertSet(tuple(st.issued.values()))
            local_failures = dict(st.failures)
        kwargs = dict(suffixes=s.suffixes, max_per_hour=s.max_orders_per_hour, renew_fraction=s.renew_fraction,
                      now=now, held=held, busy=busy, wildcards=s.dns is not None)
        p = plan(wanted, certs, local_failures, (), **kwargs)
        if p.to_order:
            # Something may need an order: only now read the fleet's backoff state and order count,
            # so an edge whose names are all covered asks Consul nothing.
            try:
                fleet = self._fleet_failures()
                times = self._order_times()[1]
                self.consul.ok()
            except KVUnavailable as exc:
                self.consul.failed(exc)
                return self.consul.wait_left()
            for name, f in local_failures.items():
                if name not in fleet or fleet[name].retry_at < f.retry_at:
                    fleet[name] = f
            p = plan(wanted, certs, fleet, times, **kwargs)
        self._report(p)
        for d in p.to_order:
            with self._lock:
                self._state.busy.add(d.name)
            pool.submit(self._job, d)
        nxt = p.next_check
        delay = (nxt - now).total_seconds() if nxt else 3600.0
        with self._lock:
            unsaved = bool(self._state.unsaved)
        if unsaved:
            delay = min(delay, max(1.0, self.consul.delay))
        return min(3600.0, max(0.05, delay))

    def _report(self, p: AcmePlan) -> None:
        """Log each name's decision when it changes (not every round)."""
        for d in p.decisions:
            said = (d.kind, d.reason if d.kind in (REFUSED, WAIT) else "")
            if self._said.get(d.name) == said:
                continue
            self._said[d.name] = said
            if d.kind == REFUSED:
                log.warning("ACME: refusing to order %r: %s", d.name, d.reason)
            elif d.kind == WAIT and not d.reason.startswith("being ordered"):   # the worker said so
                at = f" (until {d.at:%H:%M:%S})" if d.at else ""
                log.info("ACME: %s waits: %s%s", d.name, d.reason, at)
            elif d.kind in (NEW, RENEW):
                log.info("ACME: %s: %s order (%s)", d.name, "new" if d.kind == NEW else "renewal", d.reason)
        for gone in set(self._said) - {d.name for d in p.decisions}:
            del self._said[gone]

    def _fleet_failures(self) -> dict[str, Failure]:
        prefix = f"{self.settings.prefix}/_acme/state/"
        _, entries = self.kv.list(prefix)
        failures = {}
        for key, value in entries.items():
            f = _failure_from_json(value)
            if f is not None:
                failures[key[len(prefix):]] = f
        return failures

    def _order_times(self) -> tuple[int, tuple[datetime, ...]]:
        found = self.kv.get(self._orders_key())
        if found is None:
            return 0, ()
        index, value = found
        try:
            times = tuple(datetime.fromisoformat(t) for t in json.loads(value)["times"])
            if any(t.tzinfo is None for t in times):
                raise ValueError("naive time")
            return index, times
        except (ValueError, KeyError, TypeError):
            log.warning("ACME: %s is not an order count this program wrote; counting it as empty",
                        self._orders_key())
            return index, ()

    def _save_unsaved(self) -> None:
        with self._lock:
            pending = dict(self._state.unsaved)
        for name, cert in pending.items():
            try:
                self.kv.put(self.cert_key(name), cert.pem)
                self.kv.delete(self._state_key(name))
            except KVUnavailable as exc:
                self.consul.failed(exc)
                return
            self.consul.ok()
            log.info("ACME: %s stored at %s (issued while Consul was unreachable)", name, self.cert_key(name))
            with self._lock:
                self._state.unsaved.pop(name, None)

    # --- one order (a worker thread) ----------------------------------------------------------
    def _job(self, d: Decision) -> None:
        name = d.name
        try:
            self._order(name)
            self.consul.ok()
        except Stopped:
            pass
        except KVUnavailable as exc:
            self.consul.failed(exc)
        except AcmeUnavailable as exc:
            self.server.failed(exc)
        except OrderFailed as exc:
            self._failed(name, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the issuer; the name backs off
            log.exception("ACME: %s: unexpected error", name)
            self._failed(name, f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._state.busy.discard(name)
            self._wake.set()

    def _order(self, name: str) -> None:
        s = self.settings
        session = self.kv.session(f"haproxy-consul acme {name}", s.lock_ttl)
        keeper = threading.Event()
        renewer = threading.Thread(target=self._keep_session, args=(session, keeper, name), daemon=True,
                                   name=f"acme-session-{name}")
        renewer.start()
        try:
            lock_value = json.dumps({"holder": self.holder, "since": self.clock().isoformat()})
            if not self.kv.put(self._lock_key(name), lock_value, acquire=session):
                self._left_to_other(name, "another edge holds its lock; waiting for its result")
                return
            if self._present_in_kv(name) or self._backing_off_fleet_wide(name):
                return
            # Reach the server before counting an order: an outage must not use up the hourly cap.
            self.acme.prepare()
            self.server.ok()
            if self._reserve_slot(name):
                self._issue(name)
        finally:
            keeper.set()
            try:
                self.kv.destroy(session)      # releases the lock; the key stays
            except KVUnavailable as exc:
                log.debug("ACME: session for %s not destroyed (%s); it expires in %d s", name, exc, s.lock_ttl)

    def _keep_session(self, session: str, done: threading.Event, name: str) -> None:
        while not done.wait(self.settings.lock_ttl / 3):
            try:
                if not self.kv.renew(session):
                    log.warning("ACME: lost the lock on %s (session expired); another edge may order it too",
                                name)
                    return
            except KVUnavailable as exc:
                log.debug("ACME: session renewal for %s failed: %s", name, exc)

    def _left_to_other(self, name: str, why: str) -> None:
        self._count("left_to_others")
        with self._lock:
            self._state.held[name] = self.clock() + timedelta(seconds=self.settings.lock_retry)
        log.info("ACME: %s: %s", name, why)

    def _present_in_kv(self, name: str) -> bool:
        """Under the lock: has another edge stored a certificate that needs no renewal yet?"""
        found = self.kv.get(self.cert_key(name))
        if found is None:
            return False
        try:
            cert = parse_bundle(f"kv/{name}", found[1])
        except CertError:
            return False       # unusable: ours replaces it
        if not cert.covers(name) or self.clock() >= renewal_due(cert, self.settings.renew_fraction):
            return False
        with self._lock:
            self._state.issued[name] = cert
        self._count("left_to_others")
        log.info("ACME: %s: another edge already stored %s", name, cert.describe())
        return True

    def _backing_off_fleet_wide(self, name: str) -> bool:
        found = self.kv.get(self._state_key(name))
        f = _failure_from_json(found[1]) if found else None
        if f is None or self.clock() >= f.retry_at:
            return False
        with self._lock:
            self._state.failures[name] = f
        return True

    def _reserve_slot(self, name: str) -> bool:
        """Count this order in the fleet's hourly total (CAS), or False when the cap is reached."""
        for _ in range(10):
            index, times = self._order_times()
            reserved = reserve_order(times, self.clock(), self.settings.max_orders_per_hour)
            if reserved is None:
                log.info("ACME: %s: the fleet reached %d orders this hour; waiting", name,
                         self.settings.max_orders_per_hour)
                return False
            doc = json.dumps({"times": [t.isoformat() for t in reserved]})
            if self.kv.put(self._orders_key(), doc, cas=index):
                return True
        raise KVUnavailable(f"{self._orders_key()} kept changing under us")

    def _issue(self, name: str) -> None:
        self._count("orders")
        started = time.monotonic()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        chain = self.acme.issue(name, make_csr(key_pem, [name]))
        try:
            cert = parse_bundle(f"kv/{name}", chain.rstrip("\n") + "\n" + key_pem.decode())
        except CertError as exc:
            raise OrderFailed(f"the CA's certificate is unusable: {exc}") from None
        if not cert.covers(name):
            raise OrderFailed(f"the CA's certificate does not cover {name}: {', '.join(cert.names)}")
        with self._lock:
            self._state.issued[name] = cert
            self._state.failures.pop(name, None)
        self._count("issued")
        log.info("ACME: %s issued in %.1f s: %s", name, time.monotonic() - started, cert.describe())
        try:
            self.kv.put(self.cert_key(name), cert.pem)
            self.kv.delete(self._state_key(name))
        except KVUnavailable:
            with self._lock:
                self._state.unsaved[name] = cert
            raise
        log.info("ACME: %s stored at %s", name, self.cert_key(name))

    def _failed(self, name: str, error: str) -> None:
        s = self.settings
        self._count("failed")
        with self._lock:
            previous = self._state.failures.get(name)
        try:
            found = self.kv.get(self._state_key(name))
            fleet = _failure_from_json(found[1]) if found else None
            if fleet is not None and (previous is None or fleet.failures > previous.failures):
                previous = fleet
        except KVUnavailable:
            pass
        f = after_failure(previous, error[:500], self.clock(), s.backoff_first, s.backoff_max)
        with self._lock:
            self._state.failures[name] = f
        log.warning("ACME: %s: order failed (%d in a row): %s; next attempt after %s", name, f.failures, error,
                    f"{f.retry_at:%Y-%m-%d %H:%M:%S} UTC")
        try:
            self.kv.put(self._state_key(name), _failure_to_json(f))
        except KVUnavailable as exc:
            log.debug("ACME: backoff state of %s kept here only: %s", name, exc)

    # --- for tests and the lead's status output -------------------------------------------------
    def covered(self, name: str) -> Certificate | None:
        """The certificate the issuer currently counts on for `name`."""
        with self._lock:
            return best_cover(self._state.certs | CertSet(tuple(self._state.issued.values())), name)


def _failure_to_json(f: Failure) -> str:
    return json.dumps({"failures": f.failures, "retry_at": f.retry_at.isoformat(), "error": f.error})


def _failure_from_json(text: str) -> Failure | None:
    try:
        doc = json.loads(text)
        retry_at = datetime.fromisoformat(doc["retry_at"])
        if retry_at.tzinfo is None:
            return None
        return Failure(int(doc["failures"]), retry_at, str(doc.get("error", "")))
    except (ValueError, KeyError, TypeError):
        return None
