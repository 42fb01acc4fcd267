"""What the ACME issuer should do now, decided from values only.

The issuer (`edge.acme.issuer`) asks this module, each time something changes, which of the
names the control loop wants need an order now, which can wait and why, and which it must
refuse. Inputs are the wanted names (computed by the lead's code from the route table and the
configured domains), the certificates every source offers (`edge.tls.certs.CertSet`), the
fleet-wide failure state of each name (kept in Consul KV by the issuer), the fleet-wide times of
the orders of the last hour and `now`. Nothing here reads a clock, Consul or the network.

The allow-list check is a second line of defence: names come from Consul data, which is
untrusted, so a name that is not a host name under a configured domain (or an explicitly allowed
suffix) is refused here even if the caller let it through.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from edge.tls.certs import Certificate, CertSet, within

HOUR = timedelta(hours=1)
LDH_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

# Decision kinds, in the order a round acts on them.
NEW, RENEW, WAIT, VALID, REFUSED = "new", "renew", "wait", "valid", "refused"


@dataclass(frozen=True)
class Failure:
    """A name's consecutive failed orders, fleet-wide: no order before `retry_at`."""

    failures: int
    retry_at: datetime
    error: str = ""


@dataclass(frozen=True, order=True)
class Decision:
    """One wanted name: what to do and why. `at` is when the decision changes by itself
    (a backoff ends, a renewal falls due, an hourly slot frees), or None."""

    name: str
    kind: str
    reason: str
    at: datetime | None = None


@dataclass(frozen=True)
class AcmePlan:
    decisions: tuple[Decision, ...] = ()

    def of_kind(self, *kinds: str) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.kind in kinds)

    @property
    def to_order(self) -> tuple[Decision, ...]:
        """New names first (nothing covers them yet), then renewals, soonest expiry first."""
        new = sorted(self.of_kind(NEW))
        renew = sorted(self.of_kind(RENEW), key=lambda d: (d.at, d.name))
        return tuple(new) + tuple(renew)

    @property
    def next_check(self) -> datetime | None:
        """The earliest moment a decision changes without any new input."""
        times = [d.at for d in self.decisions if d.at is not None and d.kind in (WAIT, VALID)]
        return min(times, default=None)

    def get(self, name: str) -> Decision | None:
        return next((d for d in self.decisions if d.name == name), None)


def host_name(name: str) -> str | None:
    """`name` lower-cased if it is a DNS host name a public CA can certify (LDH labels, at least
    two, an optional leading `*.`), else None."""
    host = name.strip().lower().rstrip(".")
    if not host or len(host) > 253:
        return None
    labels = host.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    if len(labels) < 2 or not all(LDH_LABEL.match(label) for label in labels):
        return None
    return host


def allowed(name: str, suffixes: Iterable[str]) -> bool:
    """Whether `name` (a host name from `host_name`) is a configured suffix or under one.
    A wildcard `*.X` is judged by X."""
    return within(name, tuple(suffixes))


def orders_in_last_hour(times: Iterable[datetime], now: datetime) -> tuple[datetime, ...]:
    return tuple(sorted(t for t in times if now - HOUR < t <= now))


def reserve_order(times: Iterable[datetime], now: datetime, cap: int) -> tuple[datetime, ...] | None:
    """The fleet's order times with one more at `now`, or None when `cap` orders were already
    made in the last hour. (The issuer stores the result with a CAS write.)"""
    recent = orders_in_last_hour(times, now)
    if len(recent) >= cap:
        return None
    return (*recent, now)


def next_slot(times: Iterable[datetime], now: datetime, cap: int) -> datetime | None:
    """When an order slot frees up under the hourly cap, or None when one is free now."""
    recent = orders_in_last_hour(times, now)
    if len(recent) < cap:
        return None
    return recent[len(recent) - cap] + HOUR if cap > 0 else None


def after_failure(previous: Failure | None, error: str, now: datetime, first: float, cap: float) -> Failure:
    """The failure state after one more failed order: the wait doubles each time, from `first`
    seconds up to `cap` seconds."""
    failures = (previous.failures if previous else 0) + 1
    delay = min(cap, first * 2 ** (failures - 1))
    return Failure(failures=failures, retry_at=now + timedelta(seconds=delay), error=error)


def best_cover(certs: CertSet, name: str) -> Certificate | None:
    """Of the certificates that cover `name`, the one valid longest. (Not yet valid counts:
    another host's clock may run a little ahead of ours.)"""
    return max(certs.candidates(name), key=lambda c: (c.not_after, c.name), default=None)


def renewal_due(cert: Certificate, fraction: float) -> datetime:
    """When `fraction` of the certificate's lifetime remains."""
    return cert.not_after - (cert.not_after - cert.not_before) * fraction


def plan(wanted: Iterable[str], certs: CertSet, failures: Mapping[str, Failure], order_times: Iterable[datetime],
         *, suffixes: Iterable[str], max_per_hour: int, renew_fraction: float, now: datetime,
         held: Mapping[str, datetime] | None = None, busy: Iterable[str] = (), wildcards: bool = True) -> AcmePlan:
    """Decide every wanted name.

    `held`: names another edge is ordering (its lock was taken) with when to look again;
    `busy`: names this issuer is ordering right now. Both wait. Names that need an order beyond
    the hourly budget wait for the next free slot. `wildcards`: whether `*.x` names can be
    proved (DNS-01 is configured); if not they are refused rather than ordered to fail.
    """
    suffixes = tuple(suffixes)
    held = held or {}
    busy = frozenset(busy)
    decisions: list[Decision] = []
    needed: list[Decision] = []
    for raw in sorted(set(wanted)):
        name = host_name(raw)
        if name is None:
            decisions.append(Decision(raw, REFUSED, "not a DNS host name a CA can certify"))
            continue
        if not allowed(name, suffixes):
            decisions.append(Decision(name, REFUSED, "not under a configured domain or allowed suffix"))
            continue
        if name.startswith("*.") and not wildcards:
            decisions.append(Decision(name, REFUSED, "a wildcard needs DNS-01 (--acme-dns-rfc2136)"))
            continue
        cert = best_cover(certs, name)
        due = renewal_due(cert, renew_fraction) if cert else None
        if cert is not None and due is not None and now < due:
            decisions.append(Decision(name, VALID, f"{cert.name} valid until {cert.not_after:%Y-%m-%d %H:%M:%S}",
                                      due))
            continue
        if name in busy:
            decisions.append(Decision(name, WAIT, "being ordered by this edge"))
            continue
        if name in held and now < held[name]:
            decisions.append(Decision(name, WAIT, "being ordered by another edge", held[name]))
            continue
        failure = failures.get(name)
        if failure is not None and now < failure.retry_at:
            decisions.append(Decision(name, WAIT, f"backing off after {failure.failures} failed order(s): "
                                                  f"{failure.error}", failure.retry_at))
            continue
        if cert is None:
            needed.append(Decision(name, NEW, "no certificate covers it"))
        else:
            state = "expired" if now >= cert.not_after else "expires"
            needed.append(Decision(name, RENEW, f"{cert.name} {state} {cert.not_after:%Y-%m-%d %H:%M:%S}",
                                   cert.not_after))
    # Names being ordered may not have counted their order yet: they count as orders made now, so a
    # round that runs while they reserve cannot give their slot to another name.
    order_times = (*order_times, *[now] * len(busy))
    budget = max(0, max_per_hour - len(orders_in_last_hour(order_times, now)))
    ordered = AcmePlan(tuple(needed)).to_order
    decisions.extend(ordered[:budget])
    # The rest wait for the slot that frees once this round's orders are counted too; the plan
    # made then orders the next name in line.
    slot = next_slot((*order_times, *[now] * budget), now, max_per_hour) if ordered[budget:] else None
    for d in ordered[budget:]:
        decisions.append(Decision(d.name, WAIT, f"hourly order cap ({max_per_hour}) reached; {d.reason}", slot))
    return AcmePlan(tuple(sorted(decisions)))
