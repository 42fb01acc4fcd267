"""An OCSP responder on 127.0.0.1 for tests: OpenSSL's own (`openssl ocsp -index …`) answers each
request, behind a small HTTP server bound to loopback (OpenSSL 3.0's `-port` listens on every
interface and takes no address)."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509

from tests.support.procs import require
from tests.support.tlsgen import CA


@dataclass
class Responder:
    ca: CA
    workdir: Path
    url: str = ""
    requests: int = 0
    down: bool = False                       # True: every request gets a 503
    _lines: dict[int, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def know(self, cert_pem: str, revoked: bool = False) -> None:
        """Answer for this certificate: good, or revoked since now."""
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        expires = f"{cert.not_valid_after_utc:%y%m%d%H%M%S}Z"
        status, when = ("R", f"{cert.not_valid_before_utc:%y%m%d%H%M%S}Z") if revoked else ("V", "")
        with self._lock:
            self._lines[cert.serial_number] = (f"{status}\t{expires}\t{when}\t{cert.serial_number:X}\tunknown\t"
                                               f"/CN={cert.serial_number:X}\n")
            (self.workdir / "index.txt").write_text("".join(self._lines.values()))

    def answer(self, request: bytes) -> bytes | None:
        with self._lock:
            self.requests += 1
            if self.down:
                return None
            with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
                (Path(tmp) / "req.der").write_bytes(request)
                w = self.workdir
                subprocess.run([require("openssl"), "ocsp", "-index", str(w / "index.txt"), "-CA", str(w / "ca.pem"),
                                "-rsigner", str(w / "ca.pem"), "-rkey", str(w / "ca.key"), "-nmin", "10",
                                "-reqin", str(Path(tmp) / "req.der"), "-respout", str(Path(tmp) / "resp.der")],
                               check=True, capture_output=True, timeout=10)
                return (Path(tmp) / "resp.der").read_bytes()


@contextlib.contextmanager
def ocsp_responder(workdir: Path, ca: CA) -> Iterator[Responder]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "ca.pem").write_text(ca.pem)
    (workdir / "ca.key").write_text(ca.key_pem)
    (workdir / "index.txt").write_text("")
    responder = Responder(ca, workdir)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            answer = responder.answer(body)
            self.send_response(200 if answer is not None else 503)
            self.send_header("Content-Type", "application/ocsp-response")
            self.send_header("Content-Length", str(len(answer or b"")))
            self.end_headers()
            self.wfile.write(answer or b"")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    responder.url = f"http://127.0.0.1:{server.server_port}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield responder
    finally:
        server.shutdown()
        server.server_close()
