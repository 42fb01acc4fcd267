"""The certificate stage against a recording fake HAProxy: sources merged, files before runtime
commands, what the last run left served again, failures retried or handed to a reload."""

from __future__ import annotations

import datetime as dt

import pytest

from edge.haproxy.process import RuntimeFailed
from edge.routing.model import Instance
from edge.routing.table import build_table
from edge.tls import stage as cert_stage
from edge.tls.certs import CertSet, file_name, parse_bundle
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


def test_expired_certificates_go_at_the_next_check_without_any_input(stage, monkeypatch):
    now = [dt.datetime.now(dt.UTC)]
    stage.clock = lambda: now[0]
    clock = [1000.0]
    monkeypatch.setattr(cert_stage.time, "monotonic", lambda: clock[0])
    stage.on_certs("kv", CertSet((cert("kv/short", "web-80.a.example", days=1),)))
    stage.step(None)
    assert stage.live
    now[0] += dt.timedelta(days=2)
    clock[0] += cert_stage.RECHECK
    stage.step(None)
    assert stage.live == {}


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
