"""The ACME plan: which wanted names to order, renew, leave alone, make wait or refuse, and why."""

from datetime import UTC, datetime, timedelta

import pytest

from edge.acme.plan import (
    NEW,
    REFUSED,
    RENEW,
    VALID,
    WAIT,
    Failure,
    after_failure,
    allowed,
    host_name,
    next_slot,
    plan,
    renewal_due,
    reserve_order,
)
from edge.tls.certs import Certificate, CertSet

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SUFFIXES = ("apps.example.com", "example.org")


def cert(name, *names, issued=NOW - 10 * DAY, days=90):
    return Certificate(name=name, names=tuple(sorted(names)), not_before=issued,
                       not_after=issued + days * DAY, fingerprint="0" * 64, pem="")


def decide(wanted, certs=(), failures=None, orders=(), cap=10, held=None, busy=(), now=NOW):
    p = plan(wanted, CertSet(tuple(certs)), failures or {}, orders, suffixes=SUFFIXES, max_per_hour=cap,
             renew_fraction=1 / 3, now=now, held=held, busy=busy)
    return p, {d.name: d.kind for d in p.decisions}


@pytest.mark.parametrize("raw, expected", [
    ("nginx-80.apps.example.com", "nginx-80.apps.example.com"),
    ("NGINX-80.Apps.Example.COM.", "nginx-80.apps.example.com"),
    ("*.apps.example.com", "*.apps.example.com"),
    ("xn--bcher-kva.example.org", "xn--bcher-kva.example.org"),
    ("localhost", None),                        # one label: no public CA certifies it
    ("a..example.com", None),
    ("-a.example.com", None),
    ("a-.example.com", None),
    ("under_score.example.com", None),          # not LDH
    ("*.*.example.com", None),
    ("a.*.example.com", None),
    ("evil.com/x", None),
    ("evil.com\nx.example.com", None),
    ("a b.example.com", None),
    ("127.0.0.1", "127.0.0.1"),                 # syntactically LDH; the suffix check refuses it
    ("x" * 64 + ".example.com", None),
    (".".join(["a" * 63] * 4) + ".com", None),  # longer than 253
    ("", None),
])
def test_host_name(raw, expected):
    assert host_name(raw) == expected


@pytest.mark.parametrize("name, ok", [
    ("nginx-80.apps.example.com", True),
    ("apps.example.com", True),
    ("*.apps.example.com", True),
    ("a.b.apps.example.com", True),
    ("www.example.org", True),
    ("evilapps.example.com", False),            # a suffix match must fall on a label boundary
    ("apps.example.com.evil.net", False),
    ("*.example.com", False),
    ("example.com", False),
    ("127.0.0.1", False),
])
def test_allowed_is_a_label_boundary_suffix_match(name, ok):
    assert allowed(name, SUFFIXES) is ok


def test_new_names_are_ordered_and_foreign_or_malformed_names_refused():
    p, kinds = decide({"a.apps.example.com", "evil.com", "b.apps.example.com.evil.net", "bad_name.example.org"})
    assert kinds == {"a.apps.example.com": NEW, "evil.com": REFUSED, "b.apps.example.com.evil.net": REFUSED,
                     "bad_name.example.org": REFUSED}
    assert [d.name for d in p.to_order] == ["a.apps.example.com"]
    assert "not under a configured domain" in p.get("evil.com").reason
    assert "not a DNS host name" in p.get("bad_name.example.org").reason


@pytest.mark.parametrize("issued_days_ago, days, kind", [
    (10, 90, VALID),     # 80 of 90 days left
    (59, 90, VALID),     # 31 days left > 30
    (60, 90, RENEW),     # exactly a third left
    (80, 90, RENEW),
    (100, 90, RENEW),    # expired
    (-1, 90, VALID),     # issued "tomorrow" (another host's clock ahead): still covers
])
def test_renewal_when_a_third_of_the_lifetime_remains(issued_days_ago, days, kind):
    c = cert("kv/a.apps.example.com", "a.apps.example.com", issued=NOW - issued_days_ago * DAY, days=days)
    p, kinds = decide({"a.apps.example.com"}, [c])
    assert kinds == {"a.apps.example.com": kind}
    if kind == VALID:
        assert p.get("a.apps.example.com").at == renewal_due(c, 1 / 3)
        assert p.next_check == renewal_due(c, 1 / 3)


@pytest.mark.parametrize("wildcards, kind", [(True, NEW), (False, REFUSED)])
def test_wildcards_only_with_dns01(wildcards, kind):
    p = plan({"*.apps.example.com"}, CertSet(), {}, (), suffixes=SUFFIXES, max_per_hour=10, renew_fraction=1 / 3,
             now=NOW, wildcards=wildcards)
    assert p.get("*.apps.example.com").kind == kind


def test_the_longest_valid_cover_decides_and_a_wildcard_covers_one_label():
    old = cert("kv/a.apps.example.com", "a.apps.example.com", issued=NOW - 80 * DAY)
    wild = cert("dir/wild", "*.apps.example.com", issued=NOW - DAY)
    _, kinds = decide({"a.apps.example.com", "x.y.apps.example.com"}, [old, wild])
    assert kinds == {"a.apps.example.com": VALID, "x.y.apps.example.com": NEW}


def test_renewal_reason_names_the_certificate_and_new_names_come_first():
    soon = cert("kv/s.apps.example.com", "s.apps.example.com", issued=NOW - 85 * DAY)
    later = cert("kv/l.apps.example.com", "l.apps.example.com", issued=NOW - 70 * DAY)
    p, _ = decide({"s.apps.example.com", "l.apps.example.com", "n.apps.example.com"}, [later, soon])
    assert [(d.name, d.kind) for d in p.to_order] == [
        ("n.apps.example.com", NEW), ("s.apps.example.com", RENEW), ("l.apps.example.com", RENEW)]
    assert "kv/s.apps.example.com expires" in p.get("s.apps.example.com").reason


def test_backoff_makes_one_name_wait_and_never_the_others():
    failures = {"a.apps.example.com": Failure(3, NOW + timedelta(minutes=20), "connection refused")}
    p, kinds = decide({"a.apps.example.com", "b.apps.example.com"}, failures=failures)
    assert kinds == {"a.apps.example.com": WAIT, "b.apps.example.com": NEW}
    d = p.get("a.apps.example.com")
    assert d.at == NOW + timedelta(minutes=20) and "3 failed" in d.reason and "connection refused" in d.reason
    assert p.next_check == NOW + timedelta(minutes=20)


def test_an_expired_backoff_orders_again():
    failures = {"a.apps.example.com": Failure(3, NOW, "x")}
    _, kinds = decide({"a.apps.example.com"}, failures=failures)
    assert kinds == {"a.apps.example.com": NEW}


def test_a_valid_certificate_wins_over_a_backoff():
    failures = {"a.apps.example.com": Failure(1, NOW + DAY, "x")}
    _, kinds = decide({"a.apps.example.com"}, [cert("kv/a", "a.apps.example.com")], failures=failures)
    assert kinds == {"a.apps.example.com": VALID}


def test_names_held_by_another_edge_or_busy_here_wait():
    p, kinds = decide({"a.apps.example.com", "b.apps.example.com", "c.apps.example.com"},
                      held={"a.apps.example.com": NOW + timedelta(seconds=5), "c.apps.example.com": NOW},
                      busy={"b.apps.example.com"})
    assert kinds == {"a.apps.example.com": WAIT, "b.apps.example.com": WAIT, "c.apps.example.com": NEW}
    assert p.get("a.apps.example.com").at == NOW + timedelta(seconds=5)
    assert p.get("b.apps.example.com").at is None


@pytest.mark.parametrize("recent, cap, ordered", [
    (0, 10, 3),
    (8, 10, 2),
    (9, 10, 1),
    (10, 10, 0),
    (12, 10, 0),   # another edge overshot: still nothing, never negative
])
def test_the_hourly_cap_limits_orders_fleet_wide(recent, cap, ordered):
    orders = [NOW - timedelta(minutes=50) + timedelta(minutes=i) for i in range(recent)]
    orders += [NOW - timedelta(hours=2)] * 5         # older than an hour: not counted
    wanted = {"a.apps.example.com", "b.apps.example.com", "c.apps.example.com"}
    p, kinds = decide(wanted, orders=orders, cap=cap)
    assert [d.name for d in p.to_order] == sorted(wanted)[:ordered]
    waiting = p.of_kind(WAIT)
    assert len(waiting) == 3 - ordered
    for d in waiting:
        assert "hourly order cap (10)" in d.reason
        # when the oldest order still counted (this round's included) ages out
        assert d.at == NOW + timedelta(minutes=10 + max(0, recent - cap))


@pytest.mark.parametrize("recent, ordered", [(7, ["b", "c"]), (8, ["b"]), (9, [])])
def test_a_name_being_ordered_holds_its_slot_until_its_order_is_counted(recent, ordered):
    """Its worker reserves the slot in KV a moment later: a round in between must not give it away."""
    orders = [NOW - timedelta(minutes=30)] * recent
    p, kinds = decide({"a.apps.example.com", "b.apps.example.com", "c.apps.example.com"}, orders=orders, cap=10,
                      busy={"a.apps.example.com"})
    assert [d.name for d in p.to_order] == [f"{n}.apps.example.com" for n in ordered]
    assert all(d.at == NOW + timedelta(minutes=30) for d in p.of_kind(WAIT) if d.name != "a.apps.example.com")


@pytest.mark.parametrize("times, cap, ok", [
    ((), 1, True),
    ((NOW - timedelta(minutes=59),), 1, False),
    ((NOW - timedelta(minutes=61),), 1, True),
    ((NOW - timedelta(minutes=1),) * 2, 3, True),
])
def test_reserve_order(times, cap, ok):
    result = reserve_order(times, NOW, cap)
    if ok:
        assert result is not None and result[-1] == NOW and all(NOW - timedelta(hours=1) < t for t in result)
        assert next_slot(times, NOW, cap) is None
    else:
        assert result is None
        assert next_slot(times, NOW, cap) == min(times) + timedelta(hours=1)


@pytest.mark.parametrize("previous, failures, delay", [
    (None, 1, 300),
    (Failure(1, NOW, ""), 2, 600),
    (Failure(4, NOW, ""), 5, 4800),
    (Failure(20, NOW, ""), 21, 86400),   # capped
])
def test_backoff_doubles_up_to_the_cap(previous, failures, delay):
    f = after_failure(previous, "boom", NOW, first=300, cap=86400)
    assert f == Failure(failures, NOW + timedelta(seconds=delay), "boom")


def test_nothing_wanted_nothing_to_do():
    p, kinds = decide(set())
    assert kinds == {} and p.to_order == () and p.next_check is None
