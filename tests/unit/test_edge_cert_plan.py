"""edge.tls.plan: the served set kept change by change (checked against the plain definition),
refusals reported once, and the runtime commands and maps that get HAProxy there."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import time

import pytest

from edge.tls.certs import Certificate, file_name, file_text, parse_bundle, within
from edge.tls.plan import (
    EXPIRED,
    NOT_YET_VALID,
    OUTSIDE,
    Served,
    cert_plan,
    challenges,
    crt_list,
    map_commands,
    tls_hosts,
)
from tests.support.tlsgen import make_ca

CA = make_ca()
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def fake(name: str, *names: str, start: float = -1, end: float = 30, version: str = "",
         at: dt.datetime = NOW) -> Certificate:
    """A certificate as the plan sees it (no crypto: the plan only reads names and dates);
    `start`/`end` in days from `at`."""
    pem = f"PEM {name} {names} {start} {end} {version}"
    return Certificate(name=name, names=tuple(sorted(names)), not_before=at + start * DAY,
                       not_after=at + end * DAY, fingerprint=hashlib.sha256(pem.encode()).hexdigest(), pem=pem)


def reference(offered, now, suffixes=()) -> dict[str, Certificate]:
    """The served set by its plain definition (every certificate against every other: O(n²))."""
    valid = [c for c in offered if c.not_before <= now < c.not_after
             and (not suffixes or all(within(n, suffixes) for n in c.names))]

    def best(host):
        fits = [c for c in valid if c.covers(host)]
        return max(fits, key=lambda c: (host in c.names, c.not_after, c.name), default=None)
    return {c.file: c for c in valid if any(best(n) is c for n in c.names)}


def served_names(served: Served) -> set[str]:
    return {c.name for c in served.files.values()}


SITE_10, SITE_20 = fake("kv/site", "a.example", end=10), fake("dir/site", "a.example", end=20)
BOTH = fake("kv/both", "a.example", "b.example", end=5)
WILD, EXACT = fake("kv/wild", "*.a.example", end=90), fake("kv/one", "x.a.example", end=10)


@pytest.mark.parametrize("steps", [
    pytest.param([({"kv/site": SITE_10}, {"kv/site"}),
                  ({"dir/site": SITE_20}, {"dir/site"}),                    # the longer-lived one shadows it
                  ({"kv/both": BOTH}, {"dir/site", "kv/both"}),             # still the best for b.example
                  ({"dir/site": None}, {"kv/site", "kv/both"}),             # withdrawn: the shadowed one is back
                  ({"kv/site": None, "kv/both": None}, set())], id="shadowing"),
    pytest.param([({"kv/wild": WILD, "kv/one": EXACT}, {"kv/wild", "kv/one"}),   # a wildcard never shadows an
                  ({"kv/one": None}, {"kv/wild"})], id="wildcard"),                 # exact name, nor the reverse
    pytest.param([({"kv/site": SITE_10}, {"kv/site"}),
                  ({"kv/site": fake("kv/site", "b.example", end=10)}, {"kv/site"}),   # replaced under its name
                  ({"kv/site": fake("kv/site", "b.example", end=10)}, {"kv/site"})], id="replaced"),
])
def test_the_served_set_follows_each_change(steps):
    served = Served()
    for changes, expected in steps:
        served.update(changes, NOW)
        assert served_names(served) == expected
        assert served.files == {c.file: c for c in served.files.values()}


@pytest.mark.parametrize(("names", "start", "end", "suffixes", "reason"), [
    (("a.apps.example",), -1, 30, ("apps.example",), None),
    (("*.apps.example", "apps.example"), -1, 30, ("apps.example",), None),
    (("www.victim.example.org",), -1, 30, ("apps.example",), OUTSIDE),
    (("*.com",), -1, 30, ("apps.example.com",), OUTSIDE),
    (("evilapps.example",), -1, 30, ("apps.example",), OUTSIDE),
    (("a.apps.example", "www.victim.example.org"), -1, 30, ("apps.example",), OUTSIDE),   # one name is enough
    (("www.other.org",), -1, 30, ("apps.example", "other.org"), None),                   # --acme-allow other.org
    (("anything.at.all",), -1, 30, (), None),                                            # no domains: any name
    (("a.apps.example",), -10, -1, ("apps.example",), EXPIRED),
    (("a.apps.example",), 1, 30, ("apps.example",), NOT_YET_VALID),
])
def test_what_is_refused_and_why(names, start, end, suffixes, reason):
    served = Served(suffixes)
    delta = served.update({"kv/c": fake("kv/c", *names, start=start, end=end)}, NOW)
    assert [r.reason for r in delta.refused] == ([reason] if reason else [])
    assert served_names(served) == (set() if reason else {"kv/c"})
    assert +served.refused == ({reason: 1} if reason else {})
    if reason == OUTSIDE:
        line = delta.refused[0].line()
        assert "kv/c" in line and "--acme-allow" in line and "--certs-any-name" in line
        assert all(n in line for n in names if not within(n, suffixes))


def test_validity_changes_with_time_alone_each_reported_once():
    served = Served()
    soon, short = fake("kv/soon", "s.example", start=1, end=30), fake("kv/short", "t.example", end=2)
    first = served.update({"kv/soon": soon, "kv/short": short}, NOW)
    assert [(r.cert.name, r.reason) for r in first.refused] == [("kv/soon", NOT_YET_VALID)]
    assert served.next_change == NOW + DAY
    assert served.advance(NOW + DAY / 2).files == ()                        # nothing due yet
    assert served.advance(NOW + DAY).files == ((soon.file, soon),)          # valid from its start
    later = served.advance(NOW + 3 * DAY)
    assert later.files == ((short.file, None),) and [r.reason for r in later.refused] == [EXPIRED]
    assert served.advance(NOW + 4 * DAY) == served.advance(NOW + 4 * DAY)   # nothing more to say
    again = served.update({"kv/short": fake("kv/short", "t.example", end=2)}, NOW + 4 * DAY)   # the same, re-read
    assert again.refused == () and again.files == ()
    assert served_names(served) == {"kv/soon"} and +served.refused == {EXPIRED: 1}


def test_incremental_updates_equal_the_plain_definition():
    """Random offers, withdrawals and time steps: after each, the served set is what the O(n²)
    definition gives, and the deltas replayed give the same files (nothing is left out of them)."""
    rng = random.Random(20)
    hosts = ["a.x", "b.x", "*.x", "c.y", "*.y", "x", "d.z.x", "*.z.x"]
    suffixes = ("x", "y")
    served, offered, mirror, now = Served(suffixes), {}, {}, NOW
    sizes = []
    for step in range(600):
        roll = rng.random()
        name = f"kv/{rng.randrange(12)}"
        if roll < 0.6:
            picked = rng.sample(hosts + ["out.side"], rng.randint(1, 3))
            cert = fake(name, *picked, start=rng.uniform(-5, 3), end=rng.uniform(-1, 12), version=str(step), at=now)
            delta = served.update({name: cert}, now)
            offered[name] = cert
        elif roll < 0.8:
            delta = served.update({name: None}, now)
            offered.pop(name, None)
        else:
            now += rng.uniform(0, 3) * DAY
            delta = served.advance(now)
        for f, cert in delta.files:
            mirror.pop(f, None) if cert is None else mirror.__setitem__(f, cert)
        assert served.files == reference(offered.values(), now, suffixes) == mirror, step
        sizes.append(len(served.files))
    assert max(sizes) >= 5 and sum(sizes) / len(sizes) >= 2        # the walk kept several certificates served


def test_a_change_costs_its_own_names_not_the_whole_set():
    n = 10_000
    certs = {f"kv/{i}": fake(f"kv/{i}", f"svc{i}.apps.example", end=10 + i % 50) for i in range(n)}
    served = Served(("apps.example",))
    t0 = time.perf_counter()
    served.update(certs, NOW)
    build = time.perf_counter() - t0
    assert len(served.files) == n and build < 2.0, build          # the O(n²) set took minutes for this
    change = min(_timed(lambda i=i: served.update({"kv/7": fake("kv/7", "svc7.apps.example", version=str(i))}, NOW))
                 for i in range(5))
    assert change < 0.005, change
    assert min(_timed(lambda: served.advance(NOW)) for _ in range(5)) < 0.001     # the idle tick


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- the commands that get HAProxy there ------------------------------------------------------------
def test_cert_plan_adds_replaces_then_removes_and_writes_files_first():
    a1 = parse_bundle("kv/a", CA.bundle(["a.example"]))
    a2 = parse_bundle("kv/a", CA.bundle(["a.example"], days=40))
    b = parse_bundle("kv/b", CA.bundle(["b.example"]))
    c = parse_bundle("kv/c", CA.bundle(["c.example"]))
    fa, fb, fc = (file_name(x.name) for x in (a1, b, c))
    plan = cert_plan({fa: a1, fb: b}, {fa: a2, fc: c, fb: None}, "/s/certs", "/s/certs/crt-list")
    commands = [cmd for cmd, _ in plan.commands]
    replace_a = [f"set ssl cert /s/certs/{fa}", f"commit ssl cert /s/certs/{fa}"]
    add_c = [f"new ssl cert /s/certs/{fc}", f"set ssl cert /s/certs/{fc}", f"commit ssl cert /s/certs/{fc}",
             f"add ssl crt-list /s/certs/crt-list /s/certs/{fc}"]
    remove_b = [f"del ssl crt-list /s/certs/crt-list /s/certs/{fb}", f"del ssl cert /s/certs/{fb}"]
    assert commands in (replace_a + add_c + remove_b, add_c + replace_a + remove_b)   # removals last
    payloads = dict(plan.commands)
    assert payloads[f"set ssl cert /s/certs/{fa}"] == a2.pem and payloads[f"set ssl cert /s/certs/{fc}"] == c.pem
    assert dict(plan.writes) == {fa: file_text(a2), fc: file_text(c)} and plan.removes == (fb,)
    assert sorted(line[0] for line in plan.changes) == ["+", "-", "~"] and plan.changes[-1].startswith("-")
    assert "PRIVATE" not in " ".join(plan.changes)
    assert cert_plan({fa: a1}, {fa: a1}, "/d", "/d/l").empty
    assert cert_plan({fa: a1}, {fc: None}, "/d", "/d/l").empty                      # not loaded: nothing to remove
    assert crt_list("/s/certs", {fc: c, fa: a2}) == "".join(f"/s/certs/{f}\n" for f in sorted((fa, fc)))


@pytest.mark.parametrize(("live", "desired", "commands"), [
    ({}, {"t1": "t1.x"}, ("add map /m t1 t1.x",)),
    ({"t1": "t1.x"}, {"t1": "t1.y"}, ("set map /m t1 t1.y",)),
    ({"t1": "t1.x", "t2": "t2.x"}, {"t2": "t2.x"}, ("del map /m t1",)),
    ({"t1": "t1.x"}, {"t1": "t1.x"}, ()),
])
def test_map_commands(live, desired, commands):
    assert map_commands("/m", live, desired) == commands


@pytest.mark.parametrize(("raw", "good"), [
    ({"abc_DEF-1": "abc_DEF-1.thumb_print-2"}, {"abc_DEF-1": "abc_DEF-1.thumb_print-2"}),
    ({"abc": "other.thumb"}, {}),                                  # the key authorization names another token
    ({"abc": "abc.thumb\nadd map x y z"}, {}),                     # no newline reaches a map or a command
    ({"a b": "a b.x"}, {}),
    ({"abc": "abc.x y"}, {}),
    ({"abc": "abc.thumb "}, {"abc": "abc.thumb"}),
])
def test_challenges_only_pass_base64url_shapes(raw, good):
    assert challenges(raw)[0] == good
    assert len(challenges(raw)[1]) == len(raw) - len(good)


def test_tls_hosts_are_the_routed_hosts_a_served_certificate_covers():
    served = Served()
    served.update({"kv/w": fake("kv/w", "*.apps.example"), "kv/o": fake("kv/o", "www.other.example"),
                   "kv/old": fake("kv/old", "old.example", end=-1)}, NOW)
    hosts = ["nginx-80.apps.example", "www.other.example", "x.y.apps.example", "plain.example", "old.example",
             "WWW.Other.Example."]
    assert tls_hosts(hosts, served) == {"nginx-80.apps.example", "www.other.example", "WWW.Other.Example."}
