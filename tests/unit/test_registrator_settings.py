"""Registrator settings: flags over environment over defaults; bad values exit 2."""

import pytest

from registrator.settings import parse


@pytest.mark.parametrize("argv, env, attr, expected", [
    ([], {}, "docker", "unix:///var/run/docker.sock"),
    ([], {"DOCKER_HOST": "unix:///tmp/d.sock"}, "docker", "unix:///tmp/d.sock"),
    (["--docker", "tcp://127.0.0.1:2375"], {"DOCKER_HOST": "unix:///x"}, "docker", "tcp://127.0.0.1:2375"),
    ([], {"REGISTRATOR_HOSTNAME": "t2"}, "hostname", "t2"),
    (["--hostname", "t1"], {"REGISTRATOR_HOSTNAME": "t2"}, "hostname", "t1"),
    ([], {}, "ip", None),
    (["--ip", "10.0.0.9"], {}, "ip", "10.0.0.9"),
    (["--tags", "a,b", "--tags", "c"], {}, "tags", ("a", "b", "c")),
    ([], {"REGISTRATOR_TAGS": "x, y"}, "tags", ("x", "y")),
    (["--ttl", "30"], {}, "ttl_refresh", 10.0),
    (["--ttl", "30", "--ttl-refresh", "5"], {}, "ttl_refresh", 5.0),
    ([], {"REGISTRATOR_INTERNAL": "true"}, "internal", True),
    ([], {"REGISTRATOR_CLEANUP": "1"}, "cleanup", True),
    ([], {}, "cleanup", False),
    (["--resync", "5"], {}, "resync", 5.0),
    ([], {}, "explicit", False),
    (["--explicit"], {}, "explicit", True),
    ([], {"REGISTRATOR_EXPLICIT": "yes"}, "explicit", True),
    ([], {}, "script_checks", False),
    (["--script-checks"], {}, "script_checks", True),
    ([], {"REGISTRATOR_SCRIPT_CHECKS": "1"}, "script_checks", True),
    ([], {}, "drain", True),
    (["--no-drain"], {}, "drain", False),
    ([], {"REGISTRATOR_NO_DRAIN": "true"}, "drain", False),
])
def test_precedence(argv, env, attr, expected):
    assert getattr(parse(argv, env), attr) == expected


@pytest.mark.parametrize("argv", [
    ["--ip", "not-an-ip"], ["--hostname", "a:b"], ["--hostname", " "], ["--resync", "0"], ["--ttl", "0"],
    ["--ttl", "10", "--ttl-refresh", "10"], ["--consul", "ftp://x"], ["--ip", ""],
])
def test_bad_input_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv, {})
    assert exc.value.code == 2 and capsys.readouterr().err


def test_token_is_never_in_repr():
    assert "s3cr3t" not in repr(parse(["--token", "s3cr3t"], {}))
