"""The `--acme-*` options, the TSIG key file format, and how ACME errors are classified."""

from pathlib import Path

import pytest
import requests
from acme import errors, messages

from edge.acme.client import AcmeUnavailable, OrderFailed, _classify
from edge.acme.dns import challenge_name, parse_key_file
from edge.acme.settings import AcmeSettings, DnsSettings, add_options, from_args
from haproxy_consul.options import EnvParser

KEY = 'key "acme-update" {\n\talgorithm hmac-sha256;\n\tsecret "0A90BhrI8fQ6ME/Ap6uxHC0fBQ5GDqEaCjyC68eYHCI=";\n};\n'
DIR = "https://acme.example/dir"


def parse(argv, env=None, domains=("apps.example.com",)) -> AcmeSettings | None:
    p = EnvParser(prog="t", environ=env or {})
    add_options(p)
    return from_args(p.parse_args(argv), p, domains, "haproxy-consul/certs")


@pytest.fixture
def keyfile(tmp_path) -> Path:
    path = tmp_path / "tsig.key"
    path.write_text(KEY)
    return path


def test_no_directory_no_acme():
    assert parse([]) is None


def test_defaults_and_flags_over_environment(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = parse(["--acme-directory", DIR, "--acme-allow", "example.org,.Other.NET"],
              {"EDGE_ACME_EMAIL": "ops@example.com", "EDGE_ACME_CA_BUNDLE": str(ca),
               "EDGE_ACME_MAX_ORDERS_PER_HOUR": "3", "EDGE_ACME_DIRECTORY": "https://ignored/dir",
               "EDGE_ACME_ALLOW": "ignored.example"})
    assert s == AcmeSettings(directory=DIR, suffixes=("apps.example.com", "example.org", "other.net"),
                             email="ops@example.com", ca_bundle=ca, prefix="haproxy-consul/certs",
                             max_orders_per_hour=3)
    assert s.renew_fraction == pytest.approx(1 / 3) and s.dns is None


def test_environment_alone(keyfile):
    s = parse([], {"EDGE_ACME_DIRECTORY": DIR, "EDGE_ACME_ALLOW": "example.org",
                   "EDGE_ACME_DNS_RFC2136": "127.0.0.1:5353", "EDGE_ACME_DNS_TSIG_KEY_FILE": str(keyfile),
                   "EDGE_ACME_PROPAGATION_WAIT": "0.5"})
    assert s.suffixes == ("apps.example.com", "example.org")
    assert s.dns == DnsSettings("127.0.0.1", 5353, keyfile)
    assert s.http_propagation_wait == 0.5 and s.max_orders_per_hour == 10


@pytest.mark.parametrize("argv, domains", [
    (["--acme-directory", "http://acme.example/dir"], ("a.example",)),      # RFC 8555: HTTPS only
    (["--acme-directory", "acme.example/dir"], ("a.example",)),
    (["--acme-directory", DIR], ()),                                        # nothing it may order
    (["--acme-directory", DIR, "--acme-allow", "bad name"], ("a.example",)),
    (["--acme-directory", DIR, "--acme-allow", "*.example.org"], ("a.example",)),
    (["--acme-directory", DIR, "--acme-email", "nobody"], ("a.example",)),
    (["--acme-directory", DIR, "--acme-ca-bundle", "/nonexistent/ca.pem"], ("a.example",)),
    (["--acme-directory", DIR, "--acme-max-orders-per-hour", "0"], ("a.example",)),
    (["--acme-directory", DIR, "--acme-dns-rfc2136", "127.0.0.1:53"], ("a.example",)),   # no key file
    (["--acme-directory", DIR, "--acme-dns-rfc2136", "127.0.0.1:53",
      "--acme-dns-tsig-key-file", "/nonexistent"], ("a.example",)),
    (["--acme-directory", DIR, "--acme-dns-rfc2136", ":53", "--acme-dns-tsig-key-file", "KEY"], ("a.example",)),
    (["--acme-dns-rfc2136", "127.0.0.1:53", "--acme-dns-tsig-key-file", "KEY"], ("a.example",)),  # no ACME
])
def test_bad_input_exits_2(argv, domains, keyfile, capsys):
    argv = [str(keyfile) if a == "KEY" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        parse(argv, domains=domains)
    assert exc.value.code == 2
    assert capsys.readouterr().err


@pytest.mark.parametrize("text, name, algorithm", [
    (KEY, "acme-update", "hmac-sha256"),
    ('# comment\nkey acme { algorithm HMAC-SHA512; secret "c2VjcmV0c2VjcmV0"; };', "acme", "hmac-sha512"),
    ('key "k" {\n  secret "c2Vj\n  cmV0";\n  algorithm hmac-sha1;\n};', "k", "hmac-sha1"),
])
def test_tsig_key_file(text, name, algorithm):
    key = parse_key_file(text)
    assert (key.name, key.algorithm) == (name, algorithm)
    assert key.secret not in repr(key)


@pytest.mark.parametrize("text", [
    "",
    'key "k" { algorithm hmac-sha256; };',
    'key "k" { secret "c2VjcmV0"; };',
    'key "k" { algorithm hmac-nope; secret "c2VjcmV0"; };',
    'key "k" { algorithm hmac-sha256; secret ""; };',
])
def test_bad_tsig_key_file(text):
    with pytest.raises(ValueError):
        parse_key_file(text)


@pytest.mark.parametrize("domain, record", [
    ("apps.example.com", "_acme-challenge.apps.example.com."),
    ("*.apps.example.com", "_acme-challenge.apps.example.com."),
])
def test_challenge_name(domain, record):
    assert challenge_name(domain) == record


def response(status: int) -> requests.Response:
    r = requests.Response()
    r.status_code, r.url = status, "https://acme.example/x"
    r.request = requests.Request("POST", r.url).prepare()
    return r


@pytest.mark.parametrize("exc, kind", [
    (requests.ConnectionError("refused"), AcmeUnavailable),
    (requests.Timeout("slow"), AcmeUnavailable),
    (messages.Error.with_code("badNonce"), AcmeUnavailable),
    (messages.Error.with_code("serverInternal"), AcmeUnavailable),
    (messages.Error.with_code("accountDoesNotExist"), AcmeUnavailable),
    (errors.ClientError(response(503)), AcmeUnavailable),
    (errors.MissingNonce(response(200)), AcmeUnavailable),
    (messages.Error.with_code("rateLimited", detail="too many"), OrderFailed),
    (messages.Error.with_code("rejectedIdentifier"), OrderFailed),
    (messages.Error.with_code("unauthorized"), OrderFailed),
    (errors.ClientError(response(404)), OrderFailed),
    (errors.ValidationError([]), OrderFailed),
    (errors.TimeoutError(), OrderFailed),
    (ValueError("bad json"), OrderFailed),
    (KeyError("bug"), type(None)),        # our own bug: raised as it is, not blamed on the CA
])
def test_error_classes(exc, kind):
    assert isinstance(_classify(exc), kind)
