"""The shared Consul client settings: Consul CLI precedence, validation, child environment, token file."""

from __future__ import annotations

import os
import re

import pytest

from haproxy_consul import consul_api
from haproxy_consul.consul_api import TokenSource
from haproxy_consul.options import EnvParser
from tests.support.tlsgen import make_ca


def settings(argv, env):
    p = EnvParser(prog="t", environ=env)
    consul_api.add_options(p)
    return consul_api.from_args(p, p.parse_args(argv), argv)


def in_pki(pki, text: str) -> str:
    """`{name}` in a test row stands for that file of the test PKI directory."""
    return re.sub(r"\{([^}]+)\}", lambda m: str(pki / m.group(1)), text)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a client pair and a CA directory of two files, on disk."""
    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca("consul CA"), make_ca("other CA")
    (d / "ca.pem").write_text(ca.pem)
    cert, key = ca.issue(["client.dc1.consul"])
    (d / "cert.pem").write_text(cert)
    (d / "key.pem").write_text(key)
    (d / "cas").mkdir()
    (d / "cas" / "a.crt").write_text(ca.pem)
    (d / "cas" / "b.pem").write_text(other.pem)
    (d / "bad").mkdir()
    (d / "bad" / "notes.txt").write_text("not a certificate")
    (d / "token").write_text("file-secret\n")
    (d / "empty-token").write_text("\n")
    return d


@pytest.mark.parametrize("argv, env, expected", [
    ([], {}, "http://127.0.0.1:8500"),
    ([], {"CONSUL_HTTP_ADDR": "10.0.0.1:8500"}, "http://10.0.0.1:8500"),
    ([], {"CONSUL_HTTP_ADDR": "https://c.example:8501"}, "https://c.example:8501"),
    (["--consul", "127.0.0.2:9500"], {"CONSUL_HTTP_ADDR": "10.0.0.1:8500"}, "http://127.0.0.2:9500"),
    ([], {"CONSUL_HTTP_SSL": "true"}, "https://127.0.0.1:8500"),                 # the scheme, not the port
    ([], {"CONSUL_HTTP_SSL": "1", "CONSUL_HTTP_ADDR": "http://c:8501"}, "https://c:8501"),  # never back to http
    ([], {"CONSUL_HTTP_SSL": "false", "CONSUL_HTTP_ADDR": "https://c:8501"}, "https://c:8501"),
    (["--consul-ssl"], {}, "https://127.0.0.1:8500"),
    (["--consul-ssl", "false"], {"CONSUL_HTTP_SSL": "true"}, "http://127.0.0.1:8500"),
    (["--consul", "https://c"], {}, "https://c:443"),
])
def test_address_and_scheme(argv, env, expected):
    assert str(settings(argv, env).address) == expected


def test_tls_settings_flag_over_variable(pki):
    env = {"CONSUL_HTTP_ADDR": "https://127.0.0.1:8501", "CONSUL_CACERT": str(pki / "nowhere.pem"),
           "CONSUL_CLIENT_CERT": str(pki / "cert.pem"), "CONSUL_CLIENT_KEY": str(pki / "key.pem"),
           "CONSUL_TLS_SERVER_NAME": "server.dc1.consul", "CONSUL_HTTP_SSL_VERIFY": "false"}
    s = settings(["--consul-cacert", str(pki / "ca.pem"), "--consul-ssl-verify", "true"], env)
    assert s.tls == consul_api.TLS(str(pki / "ca.pem"), None, str(pki / "cert.pem"), str(pki / "key.pem"),
                                   "server.dc1.consul", True)
    assert not settings([], {**env, "CONSUL_CACERT": str(pki / "ca.pem")}).tls.verify
    assert settings([], {"CONSUL_HTTP_ADDR": "https://c", "CONSUL_CAPATH": str(pki / "cas")}).tls.ca_path == str(
        pki / "cas")


@pytest.mark.parametrize("argv, env, expected", [
    ([], {}, None),
    ([], {"CONSUL_HTTP_TOKEN": "env-secret"}, "env-secret"),
    (["--token", "flag-secret"], {"CONSUL_HTTP_TOKEN": "env-secret"}, "flag-secret"),
    ([], {"CONSUL_HTTP_TOKEN_FILE": "{token}", "CONSUL_HTTP_TOKEN": "env-secret"}, "file-secret"),
    # As Consul's CLI: a token file, even from the environment, wins over a token flag...
    (["--token", "flag-secret"], {"CONSUL_HTTP_TOKEN_FILE": "{token}"}, "file-secret"),
    (["--token-file", "{token}"], {}, "file-secret"),
    # ...unless the file is empty.
    (["--token-file", "{empty-token}", "--token", "flag-secret"], {}, "flag-secret"),
])
def test_token_precedence(pki, argv, env, expected):
    s = settings([in_pki(pki, a) for a in argv], {k: in_pki(pki, v) for k, v in env.items()})
    assert TokenSource(s).current() == expected


@pytest.mark.parametrize("argv, env, reason", [
    (["--consul", "ftp://x"], {}, "scheme"),
    ([], {"CONSUL_HTTP_SSL": "yes please"}, "CONSUL_HTTP_SSL"),
    (["--consul-ssl-verify", "maybe"], {}, "--consul-ssl-verify"),
    (["--consul", "https://c", "--consul-client-cert", "{cert.pem}"], {}, "both"),
    (["--consul", "https://c", "--consul-cacert", "{missing.pem}"], {}, "No such file"),
    (["--consul", "https://c", "--consul-capath", "{bad}"], {}, "no PEM certificate in"),
    (["--token-file", "{missing-token}"], {}, "token file"),
])
def test_bad_settings_exit_2_with_the_reason(pki, argv, env, reason, capsys):
    argv = [in_pki(pki, a) for a in argv]
    with pytest.raises(SystemExit) as exc:
        settings(argv, env)
    assert exc.value.code == 2
    assert reason in capsys.readouterr().err


def test_the_token_is_in_no_repr_or_description_and_argv_use_is_warned():
    s = settings(["--token", "s3cr3t"], {})
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in s.describe() and "s3cr3t" not in str(s)
    assert any("--token-file" in w for w in s.warnings())
    assert not settings([], {"CONSUL_HTTP_TOKEN": "s3cr3t"}).warnings()


def test_tls_settings_on_plain_http_are_warned(pki):
    s = settings(["--consul-cacert", str(pki / "ca.pem")], {})
    assert any("ignored" in w for w in s.warnings())


def test_child_env_replaces_every_inherited_client_variable(pki):
    s = settings(["--consul", "https://127.0.0.1:8501", "--consul-cacert", str(pki / "ca.pem"),
                  "--token-file", str(pki / "token")], {})
    env = consul_api.child_env(s, {"PATH": "/bin", "CONSUL_CLIENT_CERT": "/stale.pem", "CONSUL_HTTP_TOKEN": "old"})
    assert env == {"PATH": "/bin", "CONSUL_HTTP_ADDR": "https://127.0.0.1:8501", "CONSUL_HTTP_SSL": "true",
                   "CONSUL_HTTP_SSL_VERIFY": "true", "CONSUL_CACERT": str(pki / "ca.pem"),
                   "CONSUL_HTTP_TOKEN_FILE": str(pki / "token")}


def test_a_rotated_token_file_is_read_again_and_a_vanished_one_keeps_the_last_token(tmp_path):
    path = tmp_path / "token"
    path.write_text("one")
    tokens = TokenSource(settings(["--token-file", str(path)], {}))
    assert tokens.current() == "one"
    path.write_text("second")
    os.utime(path, ns=(1, 10**18))          # a distinct mtime even within one clock tick
    assert tokens.current() == "second"
    path.unlink()
    assert tokens.current() == "second"


def test_py_consul_client_ignores_the_process_token_variable(monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-process-env")
    c = consul_api.client(settings(["--token", "ours"], {}))
    assert c.token == "ours"
    assert c.prepare_headers() == {"X-Consul-Token": "ours"}
