"""The certificate stage against a recording fake HAProxy: sources merged, files before runtime
commands, what the last run left served again, failures retried or handed to a reload, refusals
logged once and counted, large changes applied in chunks, and a step without news doing nothing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from edge.haproxy.process import RuntimeFailed
from edge.routing.model import Instance
from edge.routing.table import build_table
from edge.tls import stage as cert_stage
from edge.tls.certs import Certificate, CertSet, file_name, parse_bundle
from edge.tls.stage import CertPaths, CertStage
from tests.support.tlsgen import make_ca

CA = make_ca()


class FakeHAProxy:
    def __init__(self):
        self.calls = []
        self.fail = False

    def ssl(self, commands):
        if self.fail:
            raise RuntimeFailed("Unknown command")
        self.calls.append(("ssl", tuple(cmd for cmd, _ in commands)))

    def runtime(self, commands):
        self.calls.append(("map", commands))


@pytest.fixture
def stage(tmp_path):
    s = CertStage(FakeHAProxy(), CertPaths(tmp_path / "certs"), ("a.example",), wake=lambda: None)
    s.prepare()
    return s


def table(*names):
    return build_table({n: (Instance(n, "node", f"{n}-1", "10.0.0.1", 8080, 80, True),) for n in names})


def cert(name, host, **kwargs):
    return parse_bundle(name, CA.bundle([host], **kwargs))


def test_prepare_makes_a_private_default_certificate_once(stage, tmp_path):
    default = tmp_path / "certs" / "default.pem"
    assert oct(default.stat().st_mode)[-3:] == "600" and oct((tmp_path / "certs").stat().st_mode)[-3:] == "700"
    text = default.read_text()
    stage.prepare()
    assert default.read_text() == text


def test_sources_are_merged_written_first_then_applied_and_hosts_with_a_certificate_redirect(stage, tmp_path):
    web = cert("kv/web", "web-80.a.example")
    stage.on_certs("kv", CertSet((web,)))
    assert stage.step(table("web", "api"))
    f = file_name("kv/web")
    path = f"{tmp_path}/certs/{f}"
    assert stage.haproxy.calls[0] == ("ssl", (f"new ssl cert {path}", f"set ssl cert {path}", f"commit ssl cert {path}",
                                              f"add ssl crt-list {tmp_path}/certs/crt-list {path}"))
    assert stage.haproxy.calls[1] == ("map", (f"add map {tmp_path}/certs/tls-hosts.map web-80.a.example 1",))
    assert (tmp_path / "certs" / f).read_text().endswith(web.pem)
    assert (tmp_path / "certs" / "crt-list").read_text() == f"{tmp_path}/certs/{f}\n"
    assert (tmp_path / "certs" / "tls-hosts.map").read_text() == "web-80.a.example 1\n"
    stage.haproxy.calls.clear()
    assert stage.step(stage._table) and stage.haproxy.calls == []          # nothing new: nothing sent


def test_a_restart_serves_what_the_last_run_left_until_its_source_answers(stage, tmp_path):
    stage.on_certs("kv", CertSet((cert("kv/web", "web-80.a.example"),)))
    stage.on_certs("dir", CertSet((cert("dir/api", "api-80.a.example"),)))
    stage.step(table("web", "api"))
    again = CertStage(FakeHAProxy(), CertPaths(tmp_path / "certs"), ("a.example",), wake=lambda: None)
    again.prepare()
    assert set(again.live) == {file_name("kv/web"), file_name("dir/api")}
    assert again.host_map.entries == {"web-80.a.example": "1", "api-80.a.example": "1"}
    again.on_certs("dir", CertSet())                                       # the directory answered: empty
    again.step(table("web", "api"))
    assert set(again.live) == {file_name("kv/web")}                       # KV has not answered yet: kept


def test_expired_certificates_go_when_they_expire_without_any_input(stage, caplog):
    now = [dt.datetime.now(dt.UTC)]
    stage.clock = lambda: now[0]
    stage.on_certs("kv", CertSet((cert("kv/short", "web-80.a.example", days=1),)))
    stage.step(None)
    assert stage.live
    now[0] += dt.timedelta(days=2)
    stage.step(None)
    stage.step(None)
    assert stage.live == {}
    expired = [r for r in caplog.records if "not served: expired" in r.getMessage()]
    assert len(expired) == 1 and expired[0].levelname == "WARNING" and "kv/short" in expired[0].getMessage()


def test_a_runtime_failure_asks_for_a_reload_with_the_files_already_written(stage, tmp_path):
    stage.haproxy.fail = True
    stage.on_certs("kv", CertSet((cert("kv/web", "web-80.a.example"),)))
    assert stage.step(None) is False
    assert (tmp_path / "certs" / file_name("kv/web")).is_file() and stage.live


def test_a_full_disk_is_logged_once_retried_and_nothing_is_applied_meanwhile(stage, monkeypatch, caplog):
    clock = [1000.0]
    monkeypatch.setattr(cert_stage.time, "monotonic", lambda: clock[0])
    real_write = cert_stage.atomic_write

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cert_stage, "atomic_write", full)
    stage.on_certs("kv", CertSet((cert("kv/web", "web-80.a.example"),)))
    stage.step(None)
    clock[0] += 1
    stage.step(None)                                        # before RETRY: not even tried
    assert stage.haproxy.calls == [] and stage.live == {}
    assert len([r for r in caplog.records if "No space left" in r.getMessage()]) == 1
    monkeypatch.setattr(cert_stage, "atomic_write", real_write)
    clock[0] += cert_stage.RETRY
    stage.step(None)
    assert stage.live and stage.haproxy.calls[0][0] == "ssl"


def test_the_issuer_is_told_the_routed_names_or_the_wildcards(tmp_path):
    wanted = []

    class Issuer:
        def want(self, names, certs):
            wanted.append(set(names))

    s = CertStage(FakeHAProxy(), CertPaths(tmp_path / "c"), ("a.example",), wake=lambda: None, issuer=Issuer())
    s.prepare()
    s.step(table("web", "api"))
    s.step(table("web", "api"))           # an equal table and certificates: not told again
    assert wanted == [{"web-80.a.example", "api-80.a.example"}]
    w = CertStage(FakeHAProxy(), CertPaths(tmp_path / "w"), ("a.example",), wake=lambda: None, issuer=Issuer(),
                  wildcards=True)
    w.prepare()
    w.step(table("web"))
    assert wanted[-1] == {"*.a.example"}


class Metrics:
    def __init__(self):
        self.expiry, self.refused = {}, []

    def certificate_expires(self, name, not_after):
        self.expiry[name] = not_after

    def certificates_refused(self, counts):
        self.refused.append(dict(counts))


def test_refused_certificates_are_logged_once_each_and_counted_by_reason(tmp_path, caplog):
    s = CertStage(FakeHAProxy(), CertPaths(tmp_path / "certs"), ("a.example",), wake=lambda: None,
                  suffixes=("a.example",))
    s.prepare()
    s.metrics = Metrics()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    offered = CertSet((cert("kv/old", "old-80.a.example", days=1, not_before=past),
                       cert("kv/victim", "www.victim.example.org"), cert("kv/com", "*.com"),
                       cert("kv/good", "good-80.a.example")), refused=("kv/broken",))
    for _ in range(3):                                      # the same set again, and again: nothing new to say
        s.on_certs("kv", CertSet(offered.certs, offered.refused))
        s.step(table("good"))
    assert {c.name for c in s.live.values()} == {"kv/good"}
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 3, lines
    assert sum("kv/old" in line and "expired" in line for line in lines) == 1
    assert sum("kv/victim" in line and "www.victim.example.org is outside the configured domains" in line
               for line in lines) == 1
    assert sum("kv/com" in line and "*.com is outside" in line and "--certs-any-name" in line for line in lines) == 1
    assert s.metrics.refused == [{"expired": 1, "not_yet_valid": 0, "outside_domains": 2, "invalid": 1}]
    assert s.metrics.expiry.keys() == {"kv/good"}


def fake(name, host, days=30):
    """A certificate as the stage handles it, without the crypto (the fake HAProxy reads nothing)."""
    now = dt.datetime.now(dt.UTC)
    return Certificate(name, (host,), now - dt.timedelta(days=1), now + dt.timedelta(days=days), name * 2,
                       f"PEM of {name} {days}")


def test_a_large_change_goes_in_chunks_new_ones_first_with_the_routes_in_between(stage, monkeypatch):
    monkeypatch.setattr(cert_stage, "BUDGET", 0)            # one chunk a step
    woken = []
    stage.wake = lambda: woken.append(1)
    stage.on_certs("kv", CertSet(tuple(fake(f"kv/old{i}", f"old{i}.a.example") for i in range(10))))
    stage.step(None)
    stage.haproxy.calls.clear()
    n = 2 * cert_stage.CHUNK + 10
    stage.on_certs("kv", CertSet(tuple(fake(f"kv/new{i}", f"new{i}-80.a.example") for i in range(n))))
    woken.clear()
    steps = settle(stage, table(*(f"new{i}" for i in range(n))))
    ssl = [cmd for kind, cmds in stage.haproxy.calls if kind == "ssl" for cmd in cmds]
    batches = [cmds for kind, cmds in stage.haproxy.calls if kind == "ssl"]
    assert steps == 4 and len(woken) == 3                  # three chunks of additions, then the removals
    assert len(batches) == 4
    assert all(len([c for c in b if c.startswith("new ssl cert")]) <= cert_stage.CHUNK for b in batches)
    first_del = next(i for i, c in enumerate(ssl) if c.startswith("del "))
    assert all(not c.startswith("new ") for c in ssl[first_del:])       # every addition before any removal
    maps = [cmds for kind, cmds in stage.haproxy.calls if kind == "map"]
    assert len(maps) == 1 and len(maps[0]) == n            # the HTTPS hosts once every certificate is in
    assert len(stage.live) == n


def settle(stage, routes) -> int:
    """Step until every pending certificate is applied; the number of steps."""
    steps = 0
    while stage._pending or steps == 0:
        stage.step(routes)
        steps += 1
        assert steps < 100
    return steps


def test_a_step_without_news_does_no_work(stage, monkeypatch):
    stage.on_certs("kv", CertSet(tuple(fake(f"kv/c{i}", f"c{i}-80.a.example") for i in range(500))))
    settle(stage, table(*(f"c{i}" for i in range(300))))
    assert len(stage.host_map.entries) == 300
    stage.haproxy.calls.clear()
    work = []
    for name in ("served_hosts", "tls_hosts", "cert_plan", "map_commands"):
        real = getattr(cert_stage, name)
        monkeypatch.setattr(cert_stage, name, lambda *a, _f=real, _name=name: work.append(_name) or _f(*a))
    monkeypatch.setattr(stage.served, "update", lambda *a: work.append("update"))
    same = stage._table
    for _ in range(100):                                   # the loop's idle rounds, the 60 s tick among them
        stage.step(same)
    instances = build_table({n: (Instance(n, "node", f"{n}-1", "10.0.0.2", 8080, 80, True),)
                             for n in (f"c{i}" for i in range(300))}, same)
    assert instances is not same
    stage.step(instances)                                  # an instance change: the same host names
    assert stage.haproxy.calls == [] and set(work) <= {"map_commands"}, work
    assert work.count("map_commands") <= 101               # the challenge map's (empty) comparison only


class Stapler:
    def __init__(self):
        self.told = []

    def serve(self, changes, known=None):
        self.told.append((dict(changes), dict(known or {})))


def test_ocsp_responses_are_stapled_beside_their_certificate_and_go_with_it(tmp_path):
    s = CertStage(FakeHAProxy(), CertPaths(tmp_path / "certs"), ("a.example",), wake=lambda: None)
    s.prepare()
    s.stapler = Stapler()
    old = CertSet((fake("kv/web", "web-80.a.example"),))
    s.on_certs("kv", old)
    s.step(None)
    f = old.certs[0].file
    assert s.stapler.told[-1] == ({f: old.certs[0]}, {})
    s.haproxy.calls.clear()
    s.on_ocsp(f, old.certs[0], b"\x30\x82der")
    s.step(None)
    path = tmp_path / "certs" / f
    assert Path(f"{path}.ocsp").read_bytes() == b"\x30\x82der"
    assert s.haproxy.calls == [("ssl", (f"set ssl cert {path}.ocsp", f"commit ssl cert {path}"))]
    new = fake("kv/web", "web-80.a.example", days=60)
    s.haproxy.calls.clear()
    s.on_ocsp(f, old.certs[0], b"late")                  # a response for the certificate being replaced...
    s.on_certs("kv", CertSet((new,)))
    s.step(None)
    assert not Path(f"{path}.ocsp").exists()             # ...is never stapled to its successor
    assert all(".ocsp" not in c for _, cmds in s.haproxy.calls for c in cmds)
    assert s.stapler.told[-1] == ({f: new}, {})
    s.on_certs("kv", CertSet())
    s.step(None)
    assert s.stapler.told[-1] == ({f: None}, {})


def test_a_restart_hands_the_stapler_the_responses_the_last_run_left(tmp_path):
    s = CertStage(FakeHAProxy(), CertPaths(tmp_path / "certs"), ("a.example",), wake=lambda: None)
    s.prepare()
    c = parse_bundle("kv/web", CA.bundle(["web-80.a.example"], ocsp_url="http://127.0.0.1:9/"))
    s.on_certs("kv", CertSet((c,)))
    s.step(None)
    (tmp_path / "certs" / f"{c.file}.ocsp").write_bytes(b"response")
    again = CertStage(FakeHAProxy(), CertPaths(tmp_path / "certs"), ("a.example",), wake=lambda: None)
    again.prepare()
    again.stapler = Stapler()
    again.step(None)
    assert again.stapler.told == [({c.file: again.live[c.file]}, {c.file: b"response"})]
