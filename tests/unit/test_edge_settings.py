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
    ([], {}, "command", "run"),
    (["routes"], {}, "command", "routes"),
    (["--once", "--dry-run"], {}, "once", True),
    ([], {"EDGE_MIN_SLOTS": "8"}, "min_slots", 8),
    ([], {}, "apply", "runtime"),
    ([], {"EDGE_APPLY": "reload"}, "apply", "reload"),
    (["--apply", "runtime"], {"EDGE_APPLY": "reload"}, "apply", "runtime"),
    # HTTPS: off until a certificate source or a TLS listener is configured, then :443.
    ([], {}, "https_bind", None),
    (["--certs", "/tmp"], {}, "https_bind", ":443"),
    ([], {"EDGE_CERTS_KV": "fleet/certs"}, "https_bind", ":443"),
    ([], {"EDGE_CERTS_KV": "/fleet/certs/"}, "certs_kv", "fleet/certs"),
    ([], {}, "certs_kv", "haproxy-consul/certs"),
    (["--https-bind", "127.0.0.1:8443"], {"EDGE_HTTPS_BIND": ":9443"}, "https_bind", "127.0.0.1:8443"),
    ([], {"EDGE_HTTPS_BIND": ":9443"}, "https_bind", ":9443"),
    (["--domain", "a.example", "--acme-directory", "https://acme.test/dir"], {}, "https_bind", ":443"),
    ([], {}, "https_redirect", True),
    (["--no-https-redirect"], {}, "https_redirect", False),
    ([], {"EDGE_HTTPS_REDIRECT": "0"}, "https_redirect", False),
    (["--https-redirect"], {"EDGE_HTTPS_REDIRECT": "0"}, "https_redirect", True),
    ([], {"EDGE_HSTS": "31536000"}, "hsts", 31536000),
    ([], {}, "acme", None),
    # Certificates served: names under the domains and --acme-allow, or any with --certs-any-name or no domain.
    ([], ENV, "cert_suffixes", ("a.example", "b.example")),
    (["--acme-allow", "other.org"], ENV, "cert_suffixes", ("a.example", "b.example", "other.org")),
    ([], {"EDGE_ACME_ALLOW": ".Other.org"}, "cert_suffixes", ("other.org",)),
    (["--certs-any-name"], ENV, "cert_suffixes", ()),
    ([], {**ENV, "EDGE_CERTS_ANY_NAME": "1"}, "cert_suffixes", ()),
    ([], {}, "cert_suffixes", ()),
    ([], {}, "ocsp_stapling", True),
    (["--no-ocsp-stapling"], {}, "ocsp_stapling", False),
    ([], {"EDGE_OCSP_STAPLING": "0"}, "ocsp_stapling", False),
    ([], {}, "handover_timeout", 10.0),
    ([], {"EDGE_HANDOVER_TIMEOUT": "0"}, "handover_timeout", 0.0),
    ([], {"EDGE_TIMEOUT_TUNNEL": "120"}, "timeout_tunnel", 120),
    # Forwarding headers: nobody's are trusted unless named; CIDRs as HAProxy reads them.
    ([], {}, "trusted_proxies", ()),
    ([], {"EDGE_TRUSTED_PROXIES": "10.1.2.3/8, 192.168.1.5"}, "trusted_proxies", ("10.0.0.0/8", "192.168.1.5/32")),
    (["--trusted-proxies", "2001:db8::/32", "--trusted-proxies", "127.0.0.2,127.0.0.2"],
     {"EDGE_TRUSTED_PROXIES": "10.0.0.0/8"}, "trusted_proxies", ("2001:db8::/32", "127.0.0.2/32")),
    ([], {}, "proxy_protocol", False),
    ([], {"EDGE_PROXY_PROTOCOL": "1"}, "proxy_protocol", True),
    (["--proxy-protocol"], {}, "proxy_protocol", True),
    ([], {}, "tag_grammars", ("edge",)),
    (["--tag-grammar", "edge,fabio,traefik"], {}, "tag_grammars", ("edge", "fabio", "traefik")),
    ([], {"EDGE_TAG_GRAMMAR": "Traefik, fabio,fabio"}, "tag_grammars", ("traefik", "fabio")),
    ([], {}, "expose", "all"),
    ([], {"EDGE_EXPOSE": "tagged"}, "expose", "tagged"),
    ([], {}, "reconcile_every", 10.0),
    (["--reconcile-every", "2"], {"EDGE_RECONCILE_EVERY": "30"}, "reconcile_every", 2.0),
    # Who sees the route list on an unknown host: loopback and private ranges unless told.
    ([], {}, "landing_list_from", ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                   "fc00::/7")),
    (["--landing-list-from", "10.1.2.3,192.168.7.0/24"], {}, "landing_list_from", ("10.1.2.3/32", "192.168.7.0/24")),
    ([], {"EDGE_LANDING_LIST_FROM": "10.9.0.0/16"}, "landing_list_from", ("10.9.0.0/16",)),
    (["--landing-list-from", "none"], {"EDGE_LANDING_LIST_FROM": "10.9.0.0/16"}, "landing_list_from", ()),
    (["--landing-list-from", "0.0.0.0/0,::/0"], {}, "landing_list_from", ("0.0.0.0/0", "::/0")),
    ([], {}, "consul_ui_bind", None),
    (["--consul-ui-bind", "10.0.0.1:8500"], {}, "consul_ui_bind", "10.0.0.1:8500"),
    ([], {"EDGE_CONSUL_UI_BIND": "10.0.0.1:8500", "CONSUL_HTTP_ADDR": "127.0.0.1:8501"}, "consul_ui_server",
     "127.0.0.1:8501"),
    ([], {}, "fleet", False),
    ([], {"EDGE_FLEET": "1"}, "fleet", True),
    ([], {}, "fleet_prefix", "haproxy-consul/fleet"),
    (["--fleet-prefix", "/dc1/edges/"], {"EDGE_FLEET_PREFIX": "other"}, "fleet_prefix", "dc1/edges"),
    ([], {}, "max_node_watches", 64),
    ([], {"EDGE_MAX_NODE_WATCHES": "0"}, "max_node_watches", 0),
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
    (["--https-bind", "443"], {}),
    (["--certs", "/no/such/dir"], {}),
    (["--hsts", "-1"], {}),
    (["--acme-directory", "http://plain.test/dir", "--domain", "a.example"], {}),   # RFC 8555: https only
    (["--acme-directory", "https://acme.test/dir"], {}),                            # no domain to order under
    (["--timeout-tunnel", "0"], {}),
    (["--handover-timeout", "-1"], {}),
    (["--trusted-proxies", "10.0.0.0/33"], {}),
    ([], {"EDGE_TRUSTED_PROXIES": "lb.example"}),
    (["--tag-grammar", "nginx"], {}),
    (["--tag-grammar", ","], {}),
    ([], {"EDGE_EXPOSE": "some"}),
    (["--reconcile-every", "0"], {}),
    (["--landing-list-from", "the office"], {}),
    ([], {"EDGE_LANDING_LIST_FROM": "10.0.0.0/33"}),
    (["--consul-ui-bind", "8500"], {}),
    (["--consul-ui-bind", ":8500"], {}),                                           # every address: no
    (["--consul-ui-bind", "0.0.0.0:8500"], {}),
    (["--consul-ui-bind", "10.0.0.1:8500", "--consul", "consul.service:8500"], {}),     # HAProxy needs an IP
    (["--consul-ui-bind", "10.0.0.1:8500", "--consul", "https://127.0.0.1:8501"], {}),  # the plain HTTP one
    (["--fleet-prefix", "/"], {}),
    (["--max-node-watches", "-1"], {}),
    ([], {"EDGE_MAX_NODE_WATCHES": "190"}),       # near Consul's 200 connections per client
])
def test_bad_input_exits_2(argv, env, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv, env)
    assert exc.value.code == 2
    assert capsys.readouterr().err  # argparse says why


def test_token_is_never_in_repr():
    settings = parse(["--token", "s3cr3t"], {})
    assert "s3cr3t" not in repr(settings)
