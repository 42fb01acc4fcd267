"""BIND 9 (`named`) on a free loopback port, authoritative for one test zone that takes RFC 2136
updates signed with a TSIG key: the DNS-01 side of the ACME tests (pebble resolves through it).

`bind_server(workdir, zone)` yields a `Bind` with `port`, `key_file` (BIND's own `key { … };`
format, as `--acme-dns-tsig-key-file` reads it), `txt(name)` to look at what is published and
`log()` (updates and, with `querylog`, every query: who asked what).
Every other name in the zone answers A 127.0.0.1, so HTTP-01 names resolve through it as well.
The zone file lives in the workdir, with its journal: nothing outside it is touched.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.support.procs import free_ports, require, stop_process, wait_until

KEY_NAME = "acme-test-key"


def udp_free_port() -> int:
    """A port free for TCP (free_ports) that is also free for UDP, as named binds both."""
    for _ in range(20):
        port = free_ports(1)[0]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port for both TCP and UDP")


@dataclass
class Bind:
    workdir: Path
    zone: str
    port: int
    key_file: Path
    proc: subprocess.Popen | None = None

    def query(self, name: str, rdtype: str) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype)
        return dns.query.tcp(q, "127.0.0.1", port=self.port, timeout=2)

    def txt(self, name: str) -> list[str]:
        answer = self.query(name, "TXT")
        return [b"".join(r.strings).decode() for rrset in answer.answer if rrset.rdtype == dns.rdatatype.TXT
                for r in rrset]

    def log(self) -> str:
        """named's log: updates applied (with the key that signed them) and every query."""
        path = self.workdir / "named.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"named exited with {self.proc.returncode}; see {self.workdir}/named.log")
        try:
            return self.query(self.zone, "SOA").rcode() == dns.rcode.NOERROR
        except (dns.exception.DNSException, OSError):
            return False


def _config(workdir: Path, zone: str, port: int, secret: str) -> str:
    return textwrap.dedent(f"""\
        options {{
            directory "{workdir}";
            pid-file "{workdir}/named.pid";
            session-keyfile "{workdir}/session.key";
            managed-keys-directory "{workdir}";
            listen-on port {port} {{ 127.0.0.1; }};
            listen-on-v6 {{ none; }};
            recursion no;
            dnssec-validation no;
            notify no;
            allow-query {{ any; }};
            querylog yes;
        }};
        controls {{ }};
        key "{KEY_NAME}" {{
            algorithm hmac-sha256;
            secret "{secret}";
        }};
        zone "{zone}" {{
            type primary;
            file "{workdir}/{zone}.zone";
            allow-update {{ key "{KEY_NAME}"; }};
        }};
        """)


def _zone(zone: str) -> str:
    return textwrap.dedent(f"""\
        $TTL 60
        @   IN SOA ns.{zone}. hostmaster.{zone}. ( 1 60 60 600 60 )
            IN NS  ns.{zone}.
        ns  IN A   127.0.0.1
        *   IN A   127.0.0.1
        """)


@contextlib.contextmanager
def bind_server(workdir: Path, zone: str) -> Iterator[Bind]:
    named = require("named")
    keygen = require("tsig-keygen")
    workdir.mkdir(parents=True, exist_ok=True)
    key_text = subprocess.run([keygen, "-a", "hmac-sha256", KEY_NAME], check=True, capture_output=True,
                              text=True).stdout
    key_file = workdir / "tsig.key"
    key_file.write_text(key_text)
    secret = key_text.split('secret "', 1)[1].split('"', 1)[0]
    port = udp_free_port()
    (workdir / "named.conf").write_text(_config(workdir, zone, port, secret))
    (workdir / f"{zone}.zone").write_text(_zone(zone))
    bind = Bind(workdir, zone, port, key_file)
    log = open(workdir / "named.log", "ab")
    # -g: foreground, log to stderr; -n 1: one worker thread is plenty on a 2-core machine.
    bind.proc = subprocess.Popen([named, "-g", "-n", "1", "-c", str(workdir / "named.conf")],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(bind._ready, 15, what=f"named on 127.0.0.1:{port}")
        yield bind
    finally:
        stop_process(bind.proc)
