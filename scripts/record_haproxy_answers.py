"""Records what each supported HAProxy answers to the runtime commands the edge sends.

    .venv/bin/python scripts/record_haproxy_answers.py [VERSION...]   (default: 2.6 3.0 3.2 3.4)

For each version it starts `$HAPROXY_CONSUL_CACHE/bin/haproxy-X.Y` (scripts/haproxy-rootfs.sh)
with a small configuration in /tmp/haproxy-answers-X.Y (fixed, so paths inside answers are the
same at every recording), sends the start-up probes of edge.haproxy.capabilities and one command
for each case the edge meets (an address changed or not, a server weight, a missing server, slots
added with `add server`, map and certificate commands, a `;`-joined batch), and writes the raw
answers to
tests/unit/recorded/haproxy-X.Y.json. The unit tests classify those answers: re-record when a
supported release changes, and read the diff.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from edge.haproxy.capabilities import PROBES, cookie_probe, init_state_probe

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "unit" / "recorded"
CACHE = Path(os.environ.get("HAPROXY_CONSUL_CACHE", "/var/cache/haproxy-consul"))

CONFIG = """\
global
    default-path config
    stats socket {d}/haproxy.sock mode 600 level admin expose-fd listeners
defaults routes
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend http
    bind 127.0.0.1:{http}
    bind 127.0.0.1:{https} ssl crt {d}/default.pem crt-list {d}/crt-list alpn h2,http/1.1
    http-request set-var(txn.backend) req.hdr(host),map_str({d}/hosts.map)
    use_backend be_web
backend be_web
    balance roundrobin
    server s1 127.0.0.1:1
    server s2 0.0.0.0:0 disabled
backend be_listed
    balance roundrobin
    server s1 0.0.0.0:0 disabled
backend landing
    http-request return status 404 content-type text/plain lf-file {d}/landing.lf
"""


def steps(d: str, pem: str) -> list[tuple[str, str, str | None]]:
    """(label, command, payload): the cases the unit tests classify."""
    cert, crt_list, hosts = f"{d}/a.example.pem", f"{d}/crt-list", f"{d}/hosts.map"
    return [
        ("probe.version", PROBES[0], None),
        ("probe.help", PROBES[1], None),
        ("probe.wait", PROBES[2], None),
        ("probe.backends", PROBES[3], None),
        ("probe.init-state", init_state_probe("be_web"), None),
        ("probe.cookie", cookie_probe("be_web"), None),
        ("addr.unchanged", "set server be_web/s1 addr 127.0.0.1 port 1", None),
        ("addr.ip-changed", "set server be_web/s1 addr 127.0.0.2 port 1", None),
        ("addr.port-changed", "set server be_web/s1 addr 127.0.0.2 port 2", None),
        ("addr.both-changed", "set server be_web/s1 addr 127.0.0.3 port 3", None),
        ("addr.unchanged-again", "set server be_web/s1 addr 127.0.0.3 port 3", None),
        ("addr.invalid", "set server be_web/s1 addr not-an-address port 1", None),
        ("addr.no-server", "set server be_web/s9 addr 127.0.0.1 port 1", None),
        ("addr.no-backend", "set server be_nosuch/s1 addr 127.0.0.1 port 1", None),
        ("state.ready", "set server be_web/s1 state ready", None),
        ("state.ready-again", "set server be_web/s1 state ready", None),
        ("state.maint", "set server be_web/s1 state maint", None),
        ("state.no-server", "set server be_web/s9 state maint", None),
        ("weight.set", "set server be_web/s1 weight 50", None),
        ("weight.same", "set server be_web/s1 weight 50", None),
        ("weight.zero", "set server be_web/s1 weight 0", None),
        ("weight.too-big", "set server be_web/s1 weight 300", None),
        ("weight.no-server", "set server be_web/s9 weight 1", None),
        ("add-server.free", "add server be_web/s3 0.0.0.0:0", None),
        ("add-server.keywords", "add server be_web/s4 0.0.0.0:0 weight 1 maxconn 10 proto h2 send-proxy", None),
        ("add-server.tls", "add server be_web/s5 0.0.0.0:0 ssl verify required ca-file @system-ca "
                           "sni var(txn.host) alpn h2", None),
        ("add-server.cookie", "add server be_web/s6 0.0.0.0:0 cookie s6", None),
        ("add-server.exists", "add server be_web/s3 0.0.0.0:0", None),
        ("add-server.no-backend", "add server be_nosuch/s3 0.0.0.0:0", None),
        ("add-server.fill", "set server be_web/s3 addr 127.0.0.5 port 5; set server be_web/s3 state ready", None),
        ("batch", "set server be_web/s2 addr 127.0.0.4 port 4; set server be_web/s2 state ready; "
                  "set server be_web/s2 addr 127.0.0.4 port 4; set server be_web/s9 state maint; "
                  "set server be_web/s2 state maint", None),
        ("map.add", f"add map {hosts} b.example be_web", None),
        ("map.set", f"set map {hosts} b.example be_other", None),
        ("map.del", f"del map {hosts} b.example", None),
        ("map.del-absent", f"del map {hosts} b.example", None),
        ("map.set-absent", f"set map {hosts} c.example be_web", None),
        ("map.add-split", f"add map {hosts} r1 300|be_a|1000|be_b", None),
        ("map.unknown", f"add map {d}/nosuch.map b.example be_web", None),
        ("map.show", f"show map {hosts}", None),
        ("map.show-unknown", f"show map {d}/nosuch.map", None),
        # an atomic swap: a new version filled, then committed (the first prepare gives version 1)
        ("map.prepare", f"prepare map {hosts}", None),
        ("map.add-version", f"add map @1 {hosts} d.example be_web", None),
        ("map.add-version-payload", f"add map @1 {hosts}", "e.example be_web\nf.example be_other"),
        ("map.add-version-batch", f"add map @1 {hosts} g.example be_web; add map @1 {hosts} h.example be_web", None),
        ("map.show-version", f"show map @1 {hosts}", None),
        ("map.commit", f"commit map @1 {hosts}", None),
        ("map.show-committed", f"show map {hosts}", None),
        ("map.commit-again", f"commit map @1 {hosts}", None),
        ("map.add-version-stale", f"add map @1 {hosts} i.example be_web", None),
        ("map.add-version-unknown", f"add map @9 {hosts} i.example be_web", None),
        ("map.commit-unknown", f"commit map @9 {hosts}", None),
        ("map.prepare-unknown", f"prepare map {d}/nosuch.map", None),
        ("ssl.new", f"new ssl cert {cert}", None),
        ("ssl.new-exists", f"new ssl cert {cert}", None),
        ("ssl.set", f"set ssl cert {cert}", pem),
        ("ssl.commit", f"commit ssl cert {cert}", None),
        ("ssl.crt-list-add", f"add ssl crt-list {crt_list} {cert}", None),
        ("ssl.set-again", f"set ssl cert {cert}", pem),
        ("ssl.commit-again", f"commit ssl cert {cert}", None),
        ("ssl.set-garbage", f"set ssl cert {cert}", "not a certificate"),
        ("ssl.commit-none", f"commit ssl cert {d}/nosuch.pem", None),
        ("ssl.del-in-use", f"del ssl cert {cert}", None),
        ("ssl.crt-list-del", f"del ssl crt-list {crt_list} {cert}", None),
        ("ssl.crt-list-del-absent", f"del ssl crt-list {crt_list} {cert}", None),
        ("ssl.del", f"del ssl cert {cert}", None),
        ("ssl.del-absent", f"del ssl cert {cert}", None),
        # a backend added at runtime (3.4), then removed; one the landing page names (`nbsrv`)
        ("backend.add", "add backend be_dyn from routes", None),
        ("backend.add-exists", "add backend be_dyn from routes", None),
        ("backend.add-no-defaults", "add backend be_other from nosuch", None),
        ("backend.fill", "add server be_dyn/s1 0.0.0.0:0; set server be_dyn/s1 addr 127.0.0.6 port 6; "
                         "set server be_dyn/s1 state ready", None),
        ("backend.publish", "publish backend be_dyn", None),
        ("backend.publish-again", "publish backend be_dyn", None),
        ("backend.unpublish", "unpublish backend be_dyn", None),
        ("backend.unpublish-again", "unpublish backend be_dyn", None),
        ("backend.maint", "set server be_dyn/s1 state maint", None),
        ("backend.precheck", "wait 1ms be-removable be_dyn", None),
        ("backend.wait-srv", "wait 500 srv-removable be_dyn/s1", None),
        ("backend.del-server", "del server be_dyn/s1", None),
        ("backend.wait-be", "wait 500 be-removable be_dyn", None),
        ("backend.del", "del backend be_dyn", None),
        ("backend.del-absent", "del backend be_dyn", None),
        ("backend.unpublish-listed", "unpublish backend be_listed", None),
        ("backend.precheck-listed", "wait 1ms be-removable be_listed", None),
        ("backend.wait-listed", "wait 100 be-removable be_listed", None),
        ("backend.del-listed", "del backend be_listed", None),
        ("unknown-command", "frobnicate", None),
    ]


def ask(sock: str, command: str, payload: str | None) -> str:
    text = f"{command} <<\n{payload.strip()}\n\n" if payload else f"{command}\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(text.encode())
        s.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: s.recv(65536), b"")).decode(errors="replace")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def self_signed(d: Path, name: str) -> str:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", d / "key.pem", "-out", d / "cert.pem", "-days", "3650", "-subj", f"/CN={name}"],
                   check=True, capture_output=True)
    return (d / "cert.pem").read_text() + (d / "key.pem").read_text()


def record(version: str) -> Path:
    binary = CACHE / "bin" / f"haproxy-{version}"
    d = Path(f"/tmp/haproxy-answers-{version}")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    (d / "default.pem").write_text(self_signed(d, "default.example"))
    pem = self_signed(d, "a.example")
    (d / "crt-list").write_text("")
    (d / "hosts.map").write_text("a.example be_web\n")
    (d / "landing.lf").write_text("be_listed: %[nbsrv(be_listed)] servers\n")
    http, https = free_ports(2)
    (d / "haproxy.cfg").write_text(CONFIG.format(d=d, http=http, https=https))
    sock = str(d / "haproxy.sock")
    proc = subprocess.Popen([str(binary), "-f", str(d / "haproxy.cfg")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                ask(sock, "show version", None)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{binary} did not start (status {proc.poll()})") from None
                time.sleep(0.05)
        answers = [{"label": label, "command": command, "payload": payload is not None,
                    "answer": ask(sock, command, payload)} for label, command, payload in steps(str(d), pem)]
    finally:
        proc.terminate()
        proc.wait(10)
    shutil.rmtree(d, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"haproxy-{version}.json"
    out.write_text(json.dumps({"version": version, "directory": str(d), "answers": answers}, indent=1) + "\n")
    return out


def main(argv: list[str]) -> int:
    for version in argv or ["2.6", "3.0", "3.2", "3.4"]:
        print(f"recorded {record(version)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
