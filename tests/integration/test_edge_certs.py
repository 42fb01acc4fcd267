"""Certificates at scale, and the ones the edge refuses, through a real edge, HAProxy and Consul on
loopback (issue 20, items 4, 5 and 8): 2,000 certificates in KV leave route and certificate changes
as quick as without them; expired, not yet valid and out-of-domain certificates are logged once
each and counted; a chain out of order is served in order; OCSP responses from a responder on
127.0.0.1 (OpenSSL's) are stapled."""

from __future__ import annotations

import datetime as dt
import re
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.integration.edge_helpers import (
    deregister,
    https_bodies,
    leaf_fingerprint,
    logged,
    presented_fingerprint,
    put_kv_many,
    register,
)
from tests.integration.test_edge_https import metrics, presented, put_kv
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.ocsp import ocsp_responder
from tests.support.procs import consul_per_module, free_ports, require, wait_until
from tests.support.tlsgen import make_ca

pytestmark = pytest.mark.integration
DOMAIN = "apps.test"
CA = make_ca("certs test CA")

consul = consul_per_module()


def https_edge(consul, *extra: str) -> EdgeProcess:
    http, https = free_ports(2)
    return EdgeProcess(consul.url, domains=(DOMAIN,), port=http, https_port=https, extra=extra).start()


def loaded(edge: EdgeProcess) -> int:
    """Certificates in the edge's crt-list (what HAProxy loads)."""
    path = edge.state_dir / "certs" / "crt-list"
    return len(path.read_text().splitlines()) if path.is_file() else 0


VERIFY = ssl.create_default_context(cadata=CA.pem)


def https_answers(edge: EdgeProcess, host: str, expected: set[str]) -> None:
    wait_until(lambda: https_bodies(edge, host, VERIFY) == expected, 60, interval=0.01,
               what=f"{host} answering {sorted(expected)} over HTTPS")


def timed(action, until, what: str) -> float:
    t0 = time.monotonic()
    action()
    until()
    took = time.monotonic() - t0
    print(f"{what}: {took * 1000:.0f} ms")
    return took


def test_2000_certificates_in_kv_leave_route_and_certificate_changes_quick(consul):
    n = 2000
    put_kv_many(consul, {f"scale/certs/site{i}": CA.bundle([f"site{i}-80.{DOMAIN}"]) for i in range(n)})
    edge = https_edge(consul, "--certs-kv", "scale/certs")
    backends = [Backend("one"), Backend("two")]
    host = f"site1-80.{DOMAIN}"
    try:
        t0 = time.monotonic()
        wait_until(lambda: loaded(edge) == n, 180, interval=0.2, what=f"{n} certificates loaded")
        print(f"{n} certificates from KV loaded in {time.monotonic() - t0:.1f} s")
        new_vhost = timed(lambda: register(consul, "site1", "site1-1", backends[0]),
                          lambda: https_answers(edge, host, {"one"}), "a new vhost (a reload)")
        reload = float(wait_until(lambda: re.search(r"reloaded HAProxy in (\d+) ms .*vhost added", edge.log()), 60,
                                  what="the reload's log line").group(1)) / 1000
        changes = []
        for _ in range(3):                 # one after the other: each waits for whatever the one before set off
            changes.append(timed(lambda: register(consul, "site1", "site1-2", backends[1]),
                                 lambda: https_answers(edge, host, {"one", "two"}), "an instance added"))
            changes.append(timed(lambda: deregister(consul, "site1-2"),
                                 lambda: https_answers(edge, host, {"one"}), "an instance removed"))
        renewed = CA.bundle([host], days=60)
        want = leaf_fingerprint(renewed)
        cert_change = timed(lambda: put_kv(consul, "scale/certs/site1", renewed),
                            lambda: wait_until(lambda: presented_fingerprint(edge, host) == want, 60, interval=0.01,
                                               what="the renewed certificate"), "a certificate renewed in KV")
        assert max(changes) < 1.0, changes
        # A reload loads every certificate in HAProxy (its own cost, printed); the edge adds little to it.
        print(f"of which HAProxy's reload (its check and new worker loading {n} certificates): {reload:.1f} s")
        assert new_vhost - reload < 1.0 and cert_change < 1.0, (new_vhost, reload, cert_change)
        assert "certificate change through the runtime API failed" not in edge.log()
    finally:
        edge.stop()
        deregister(consul, "site1-1")
        for backend in backends:
            backend.close()


def test_expired_early_and_outside_certificates_are_logged_once_each_and_counted(consul, tmp_path):
    now = dt.datetime.now(dt.UTC)
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "expired.pem").write_text(CA.bundle([f"old-80.{DOMAIN}"], days=1, not_before=now - dt.timedelta(days=9)))
    (certs / "early.pem").write_text(CA.bundle([f"early-80.{DOMAIN}"], not_before=now + dt.timedelta(days=1)))
    (certs / "victim.pem").write_text(CA.bundle(["www.victim.example.org"]))
    (certs / "com.pem").write_text(CA.bundle(["*.com"]))
    (certs / "good.pem").write_text(CA.bundle([f"good-80.{DOMAIN}"]))
    put_kv(consul, "refused/certs/lapsed", CA.bundle([f"lapsed-80.{DOMAIN}"], days=2,
                                                      not_before=now - dt.timedelta(days=5)))
    edge = https_edge(consul, "--certs", str(certs), "--certs-kv", "refused/certs")
    backend = Backend("good")
    try:
        wait_until(lambda: "CN = good-80" in presented(edge, f"good-80.{DOMAIN}"), 10, what="the good certificate")
        expected = {"dir/expired.pem": "expired", "kv/lapsed": "expired", "dir/early.pem": "not valid before",
                    "dir/victim.pem": "www.victim.example.org is outside the configured domains (apps.test)",
                    "dir/com.pem": "*.com is outside the configured domains"}
        for name, why in expected.items():
            logged(edge, f"certificate {name} (", 10)
            line = next(li for li in edge.log().splitlines() if f"certificate {name} (" in li)
            assert "WARNING" in line and why in line, line
        # More steps: a route, a KV write under the prefix, the KV watch's timeouts, a file touched.
        register(consul, "good", "good-1", backend)
        https_answers(edge, f"good-80.{DOMAIN}", {"good"})
        put_kv(consul, "refused/certs/_acme/other", "x")
        (certs / "good.pem").write_text((certs / "good.pem").read_text())
        time.sleep(6)
        for name in expected:
            assert edge.log().count(f"certificate {name} (") == 1, name
        text = metrics(edge)
        for reason, count in (("expired", 2), ("not_yet_valid", 1), ("outside_domains", 2), ("invalid", 0)):
            assert f'edge_certificates_refused{{reason="{reason}"}} {count}.0' in text, text
        for host in ("www.victim.example.org", "x.com", f"old-80.{DOMAIN}", f"early-80.{DOMAIN}"):
            assert "CN = haproxy-consul.invalid" in presented(edge, host), host
    finally:
        edge.stop()
        deregister(consul, "good-1")
        backend.close()


def served_chain(edge: EdgeProcess, host: str, cafile: Path) -> tuple[list[str], str]:
    """(the subjects of the chain the edge sends for `host`, in order; the verify result)."""
    out = subprocess.run([require("openssl"), "s_client", "-connect", f"{edge.address}:{edge.https_port}",
                          "-servername", host, "-showcerts", "-CAfile", str(cafile)],
                         input="", capture_output=True, text=True, timeout=10).stdout
    verify = re.search(r"Verify return code: (.*)", out)
    return re.findall(r"^\s*\d+ s:(.*)$", out, re.M), verify.group(1) if verify else ""


def test_a_chain_out_of_order_is_served_in_order_and_a_stray_certificate_is_named(consul, tmp_path):
    root = make_ca("order root")
    inter = root.intermediate("order intermediate")
    cafile = tmp_path / "root.pem"
    cafile.write_text(root.pem)
    certs = tmp_path / "certs"
    certs.mkdir()
    host = f"chain-80.{DOMAIN}"
    cert, key = inter.issue([host])
    (certs / "chain.pem").write_text(root.pem + inter.pem + cert + key)           # top down, as some CAs hand it
    edge = https_edge(consul, "--certs", str(certs), "--certs-kv", "chain/certs")
    try:
        wait_until(lambda: served_chain(edge, host, cafile)[0][:1] == [f"CN = {host}"], 10, what="the chain served")
        subjects, verify = served_chain(edge, host, cafile)
        assert subjects == [f"CN = {host}", "CN = order intermediate", "CN = order root"], subjects
        assert verify == "0 (ok)"
        other, other_key = inter.issue([f"stray-80.{DOMAIN}"])
        (certs / "stray.pem").write_text(other + inter.pem + make_ca("unrelated CA").pem + other_key)
        logged(edge, "stray.pem refused: the certificate CN=unrelated CA in it is not in the leaf's chain")
    finally:
        edge.stop()


def ocsp_status(edge: EdgeProcess, host: str) -> str:
    """What `openssl s_client -status` says of the OCSP response stapled for `host`."""
    return subprocess.run([require("openssl"), "s_client", "-connect", f"{edge.address}:{edge.https_port}",
                           "-servername", host, "-status"], input="", capture_output=True, text=True,
                          timeout=10).stdout


def stapled_serial(edge: EdgeProcess, host: str) -> int | None:
    """The serial number of a good stapled response for `host`, or None. A number, not the text:
    OpenSSL prints a serial byte by byte, so one whose hex has an odd number of digits (1 random
    serial in 8) reads `0ED0…`, where Python's `:X` gives `ED0…`."""
    out = ocsp_status(edge, host)
    if "OCSP Response Status: successful" not in out or "Cert Status: good" not in out:
        return None
    return int(re.search(r"Serial Number: ([0-9A-Fa-f]+)", out).group(1), 16)


def serial_of(cert_pem: str) -> int:
    return x509.load_pem_x509_certificate(cert_pem.encode()).serial_number


def test_ocsp_responses_are_stapled_follow_their_certificate_and_outlive_a_restart(consul, tmp_path):
    ca = make_ca("ocsp test CA")
    with ocsp_responder(tmp_path / "ocsp", ca) as responder:
        certs = tmp_path / "certs"
        certs.mkdir()
        host, plain = f"stapled-80.{DOMAIN}", f"plain-80.{DOMAIN}"
        cert, key = ca.issue([host], ocsp_url=responder.url)
        responder.know(cert)
        (certs / "stapled.pem").write_text(cert + ca.pem + key)
        (certs / "plain.pem").write_text(ca.bundle([plain]))                  # no responder named: no staple
        edge = https_edge(consul, "--certs", str(certs), "--certs-kv", "ocsp/certs")
        try:
            t0 = time.monotonic()
            wait_until(lambda: stapled_serial(edge, host) == serial_of(cert), 15, what="a good stapled response")
            print(f"certificate file written -> response stapled: {time.monotonic() - t0:.2f} s")
            assert "OCSP response: no response sent" in ocsp_status(edge, plain)
            staple = Path(f"{next((edge.state_dir / 'certs').glob('dir_stapled*.pem'))}.ocsp")   # beside it
            assert staple.stat().st_size > 0 and oct(staple.stat().st_mode)[-3:] == "600"
            renewed, key2 = ca.issue([host], ocsp_url=responder.url, days=60)
            responder.know(renewed)
            (certs / "stapled.pem").write_text(renewed + ca.pem + key2)          # a renewal: its own response
            wait_until(lambda: stapled_serial(edge, host) == serial_of(renewed), 15, what="the renewal's response")
            revoked, key3 = ca.issue([host], ocsp_url=responder.url, days=90)
            responder.know(revoked, revoked=True)
            (certs / "stapled.pem").write_text(revoked + ca.pem + key3)
            logged(edge, "is revoked at", 15)
            assert "OCSP response: no response sent" in ocsp_status(edge, host)  # never a staple of the old one
            assert not staple.exists()
            (certs / "stapled.pem").write_text(renewed + ca.pem + key2)
            wait_until(lambda: stapled_serial(edge, host) == serial_of(renewed), 15, what="the renewal again")
            asked = responder.requests
        finally:
            edge.stop()
        responder.down = True
        again = EdgeProcess(consul.url, domains=(DOMAIN,), port=edge.port, https_port=edge.https_port,
                            state_dir=edge.state_dir, extra=("--certs", str(certs), "--certs-kv", "ocsp/certs"))
        again.log_path = tmp_path / "again.log"
        again.start()
        try:      # the response the last run left is stapled from the start, and not asked for again yet
            assert stapled_serial(again, host) == serial_of(renewed)
            time.sleep(2)
            assert responder.requests == asked and "OCSP for" not in again.log()
        finally:
            again.stop()
