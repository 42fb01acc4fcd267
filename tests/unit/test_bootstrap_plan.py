"""bootstrap's pure decisions: members from etcd, when to start, the agent's argv, settings."""

from pathlib import Path

import pytest

from bootstrap.etcd import prefix_end
from bootstrap.plan import (
    ExpectMismatch,
    Member,
    agent_argv,
    announcement,
    decide,
    dns_address,
    http_address,
    members_from_kv,
)
from bootstrap.settings import parse

P = "/consul.io/bootstrap"


def test_members_from_kv_accepts_json_and_bare_addresses_and_reports_garbage():
    kvs = {
        f"{P}/machines/a": announcement("10.0.0.1", 3),
        f"{P}/machines/b": "10.0.0.2",
        f"{P}/machines/c": "not-an-ip",
        f"{P}/machines/d/e": "10.0.0.4",
        f"{P}/machines/f": "{broken json",
        f"{P}/machines/g": '{"address": "10.0.0.7", "expect": 0}',
        f"{P}/other": "10.0.0.9",
    }
    members, problems = members_from_kv(kvs, P)
    assert members == (Member("a", "10.0.0.1", 3), Member("b", "10.0.0.2"))
    assert len(problems) == 5


ME = Member("a", "10.0.0.1", 3)


@pytest.mark.parametrize("members, has_data, waited, start, reason", [
    ([ME], False, 0, False, "1 of 3"),
    ([ME, Member("b", "10.0.0.2", 3)], False, 5, False, "2 of 3"),
    ([ME, Member("b", "10.0.0.2", 3), Member("c", "10.0.0.3")], False, 0, True, "3 of 3"),
    ([Member("b", "10.0.0.2"), Member("c", "10.0.0.3")], False, 0, True, "3 of 3"),   # we count ourselves
    ([ME], True, 0, True, "rejoining"),                                                 # existing raft data
    ([ME], False, 121, True, "starting anyway"),                                        # bounded wait
])
def test_decide(members, has_data, waited, start, reason):
    d = decide(ME, members, 3, has_data, waited, 120)
    assert d.start is start and reason in d.reason


def test_disagreeing_expect_is_an_error():
    with pytest.raises(ExpectMismatch, match="disagrees"):
        decide(ME, [ME, Member("b", "10.0.0.2", 5)], 3, False, 0, 120)


def test_agent_argv_joins_every_other_server_once():
    members = [ME, Member("b", "10.0.0.2"), Member("c", "10.0.0.3"), Member("dup", "10.0.0.2")]
    argv = agent_argv("consul", ME, members, 3, "/data", "dc1", ["-bind=10.0.0.1"])
    assert argv == ["consul", "agent", "-server", "-bootstrap-expect=3", "-advertise=10.0.0.1", "-data-dir=/data",
                    "-datacenter=dc1", "-retry-join=10.0.0.2", "-retry-join=10.0.0.3", "-bind=10.0.0.1"]


@pytest.mark.parametrize("extra, address", [
    ([], "127.0.0.1:8500"), (["-client=127.0.0.2", "-http-port=9500"], "127.0.0.2:9500"),
    (["-client=0.0.0.0"], "127.0.0.1:8500"), (["-client=::1"], "[::1]:8500"),
])
def test_http_address(extra, address):
    assert http_address(extra) == address


@pytest.mark.parametrize("extra, address", [
    ([], ("127.0.0.1", 8600)),
    (["-bind=10.0.0.1", "-client=127.0.0.1"], ("127.0.0.1", 8600)),        # where DNS listens, never -bind
    (["-client=0.0.0.0", "-dns-port=53"], ("127.0.0.1", 53)),
    (["-client=127.0.0.1 10.0.0.1"], ("127.0.0.1", 8600)),                  # a list: the first
    (["-client=::"], ("::1", 8600)),
    (["-dns-port=-1"], None),                                               # DNS off
])
def test_dns_address(extra, address):
    assert dns_address(extra) == address


@pytest.mark.parametrize("extra, error", [
    (["-dns-port=-1"], "-dns-port=-1 turns off"), (["-dns-port=x"], "not a number"), (["-dns-port=70000"], "port"),
])
def test_dns_resolved_needs_a_dns_interface(extra, error, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--machine-id", "m", "--advertise", "10.0.0.1", "--dns-resolved", "--", *extra], {})
    assert exc.value.code == 2 and error in capsys.readouterr().err


def test_the_dropin_goes_under_run_and_names_the_client_address():
    s = parse(["--machine-id", "m", "--advertise", "10.0.0.1", "--dns-resolved", "--", "-bind=10.0.0.1",
               "-client=127.0.0.1"], {})
    assert s.resolved_dir == Path("/run/systemd/resolved.conf.d") and s.dns_target == ("127.0.0.1", 8600)
    assert parse(["--machine-id", "m", "--advertise", "10.0.0.1", "--dns-port", "5353"], {}).dns_target == \
        ("127.0.0.1", 5353)


def test_prefix_end():
    assert prefix_end("/a/b/") == "/a/b0"


def test_settings_split_agent_args_and_validate(tmp_path):
    idfile = tmp_path / "machine-id"
    idfile.write_text("abc123\n")
    s = parse(["--machine-id", str(idfile), "--advertise", "10.0.0.1", "--etcd", "http://e1:2379,http://e2:2379",
               "--", "-bind=10.0.0.1", "-ui"], {"BOOTSTRAP_EXPECT": "5"})
    assert (s.machine_id, s.expect, s.etcd, s.agent_args) == (
        "abc123", 5, ("http://e1:2379", "http://e2:2379"), ("-bind=10.0.0.1", "-ui"))
    assert parse(["--machine-id", "literal-id", "--advertise", "::1"], {}).machine_id == "literal-id"


@pytest.mark.parametrize("argv, environ, api", [
    ([], {}, "auto"),
    (["--etcd-api", "v2"], {}, "v2"),
    ([], {"BOOTSTRAP_ETCD_API": "v3"}, "v3"),
    (["--etcd-api", "v2"], {"BOOTSTRAP_ETCD_API": "v3"}, "v2"),          # the flag wins
])
def test_etcd_api(argv, environ, api):
    assert parse(["--machine-id", "x", "--advertise", "10.0.0.1", *argv], environ).etcd_api == api


@pytest.mark.parametrize("argv", [
    ["--machine-id", "x", "--advertise", "10.0.0.1", "--expect", "0"],
    ["--machine-id", "x"],                                           # no advertise address
    ["--machine-id", "x", "--advertise", "nope"],
    ["--machine-id", "bad id!", "--advertise", "10.0.0.1"],
    ["--machine-id", "/nonexistent/machine-id", "--advertise", "10.0.0.1"],
    ["--machine-id", "x", "--advertise", "10.0.0.1", "--prefix", "relative"],
    ["--machine-id", "x", "--advertise", "10.0.0.1", "--etcd-api", "v4"],
])
def test_bad_settings_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv, {})
    assert exc.value.code == 2 and capsys.readouterr().err
