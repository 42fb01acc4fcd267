"""Edge settings: flags win over the environment, the environment over defaults."""

from pathlib import Path

import pytest

from edge.settings import parse

ENV = {
    "CONSUL_HTTP_ADDR": "consul.service:8501",
    "CONSUL_HTTP_TOKEN": "env-secret",
    "EDGE_DOMAIN": "a.example, B.example",
    "EDGE_BIND": "127.0.0.1:8080",
    "EDGE_STATE_DIR": "/tmp/from-env",
}


@pytest.mark.parametrize("argv, env, attr, expected", [
    ([], {}, "consul", "http://127.0.0.1:8500"),
    ([], ENV, "consul", "http://consul.service:8501"),
    (["--consul", "https://c:8443"], ENV, "consul", "https://c:8443"),
    ([], {}, "domains", ()),
    ([], ENV, "domains", ("a.example", "b.example")),
    (["--domain", "x.org", "--domain", "y.org,z.org"], ENV, "domains", ("x.org", "y.org", "z.org")),
    ([], {}, "bind", ":80"),
    ([], ENV, "bind", "127.0.0.1:8080"),
    (["--bind", ":9090"], ENV, "bind", ":9090"),
    ([], ENV, "state_dir", Path("/tmp/from-env")),
    ([], ENV, "token", "env-secret"),
    (["--token", "flag-secret"], ENV, "token", "flag-secret"),
    ([], {}, "command", "run"),
    (["routes"], {}, "command", "routes"),
    (["--once", "--dry-run"], {}, "once", True),
    ([], {"EDGE_MIN_SLOTS": "8"}, "min_slots", 8),
    ([], {}, "apply", "runtime"),
    ([], {"EDGE_APPLY": "reload"}, "apply", "reload"),
    (["--apply", "runtime"], {"EDGE_APPLY": "reload"}, "apply", "runtime"),
])
def test_precedence(argv, env, attr, expected):
    value = getattr(parse(argv, env), attr)
    assert (str(value) if attr == "consul" else value) == expected


@pytest.mark.parametrize("argv, env", [
    (["--bind", "nonsense"], {}),
    (["--bind", ":0"], {}),
    (["--admin-bind", "1.2.3.4:99999"], {}),
    (["--domain", "bad domain"], {}),
    (["--consul", "ftp://x"], {}),
    (["--min-slots", "0"], {}),
    ([], {"EDGE_MIN_SLOTS": "many"}),
    ([], {"EDGE_APPLY": "sometimes"}),
    (["--apply", "sometimes"], {}),
])
def test_bad_input_exits_2(argv, env, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv, env)
    assert exc.value.code == 2
    assert capsys.readouterr().err  # argparse says why


def test_token_is_never_in_repr():
    settings = parse(["--token", "s3cr3t"], {})
    assert "s3cr3t" not in repr(settings)
