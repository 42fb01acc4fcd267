"""fabio's `urlprefix-` tags, table-driven: the examples of fabio's documentation, and refusals."""

import pytest

from edge.routing.grammars import fabio
from tests.unit.grammar_cases import options, routes, warnings


@pytest.mark.parametrize("tag, expected, backend", [
    # fabio's quickstart examples
    ("urlprefix-/css", ["*/css"], {}),
    ("urlprefix-i.com/static", ["i.com/static"], {}),
    ("urlprefix-mysite.com/", ["mysite.com"], {}),
    ("urlprefix-/foo/bar strip=/foo", ["*/foo/bar strip=/foo"], {}),
    ("urlprefix-/foo/bar proto=https", ["*/foo/bar"], {"protocol": "https"}),
    ("urlprefix-/foo/bar proto=https tlsskipverify=true", ["*/foo/bar"], {"protocol": "https", "verify": False}),
    ("urlprefix-:3306 proto=tcp", ["tcp :3306"], {}),
    ("urlprefix-:3306 proto=tcp pxyproto=true", ["tcp :3306"], {"send_proxy": True}),
    ("urlprefix-/my.service/Method proto=grpc", ["*/my.service/Method"], {"protocol": "h2c"}),
    ("urlprefix-/my.service proto=grpcs", ["*/my.service"], {"protocol": "h2"}),
    # the redirect, access-control and traffic-shaping pages
    ("urlprefix-/path redirect=301,https://www.google.com/", ["*/path redirect=301,https://www.google.com/"], {}),
    ("urlprefix-/path redirect=303,https://www.foo.com$path", ["*/path redirect=303,https://www.foo.com+path"], {}),
    ("urlprefix-/ allow=ip:192.168.1.0/24,ip:fe80::/10", ["* allow=192.168.1.0/24,fe80::/10"], {}),
    ("urlprefix-/ deny=ip:fe80::1234,100.123.0.0/16", ["* deny=100.123.0.0/16,fe80::1234/128"], {}),
    ("urlprefix-www.kjca.dev/auth/ weight=0.05", ["www.kjca.dev/auth/ share=5%"], {}),
    ("urlprefix-vault.company.com/ weight=1.00", ["vault.company.com share=100%"], {}),
    ("urlprefix-*.example.com/", ["*.example.com"], {}),
    ("urlprefix-MySite.COM/Path", ["mysite.com/Path"], {}),          # fabio lower-cases the host, not the path
    ("  urlprefix-/trimmed  ", ["*/trimmed"], {}),
    ("urlprefix-:6379 proto=tcp allow=127.0.0.1", ["tcp :6379 allow=127.0.0.1/32"], {}),
])
def test_documented_tags(tag, expected, backend):
    parsed = fabio.parse("svc", [tag])
    assert routes(parsed) == expected
    assert options(parsed) == backend
    assert warnings(parsed) == []


@pytest.mark.parametrize("tag, warning", [
    ("urlprefix-mysite.com", "router refused: 'mysite.com' has no path"),
    ("urlprefix-:3306", "names a port without proto=tcp"),
    ("urlprefix-/db proto=tcp", "proto=tcp needs :<port>"),
    ("urlprefix-:99999 proto=tcp", "port '99999' is not 1-65535"),
    ("urlprefix-/x proto=udp", "proto='udp' is not one of"),
    ("urlprefix-/bar prepend=/foo", "prepend= is not supported"),
    ("urlprefix-/x auth=basic", "names a scheme of fabio's own configuration"),
    ("urlprefix-/x weight=5", "is not a fraction from 0 to 1"),
    ("urlprefix-/x redirect=301", "is not http(s)://host"),
    ("urlprefix-/x redirect=200,https://x.org/", "is not 300-399"),
    ("urlprefix-/x allow=ip:not-an-ip", "is not an address or a network"),
    ("urlprefix-$HOST/x", "is not a host name"),                   # fabio's env expansion: not ours to guess
    ("urlprefix-*.*.example.com/", "is not a wildcard host"),
    ("urlprefix-a.com/x\nbackend x", "is not usable"),
    ("urlprefix-/a strip=/a/b", "applies to some requests of '/a' only"),
    ("urlprefix-:3306 proto=tcp strip=/x", "strip do not apply to proto=tcp"),
])
def test_refused_routers(tag, warning):
    parsed = fabio.parse("svc", [tag])
    assert parsed.routers == ()
    (message,) = warnings(parsed)
    assert message.startswith(f"'svc': tag {tag!r}: router refused: ") and warning in message


@pytest.mark.parametrize("tag, route, warning", [
    ("urlprefix-/x host=dst", "*/x", "option host='dst' is not supported; ignored"),
    ("urlprefix-/x host=upstream.example.org", "*/x host=upstream.example.org", None),
    ("urlprefix-a.com/ register=a", "a.com", "option register='a' is not supported; ignored"),
    ("urlprefix-/x frobnicate=1", "*/x", "option frobnicate='1' is not supported; ignored"),
    ("urlprefix-/x strip=/y", "*/x", "strip=/y never applies to '/x'; ignored"),
])
def test_options_that_keep_the_router_ignored_ones_with_one_warning(tag, route, warning):
    parsed = fabio.parse("svc", [tag])
    assert routes(parsed) == [route]
    assert warnings(parsed) == ([f"'svc': tag {tag!r}: {warning}"] if warning else [])


def test_other_tags_are_not_read():
    assert fabio.parse("svc", ["edge.host=a.example.com", "traefik.enable=true", "urlprefix"]) == fabio.parse("svc", [])
