"""HTTP backends and a Host-header client for tests, all on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Backend:
    """A real HTTP server on a free loopback port answering `<name>` with status 200; with
    `echo`, the request's header lines instead, as JSON `[[name, value], ...]` in arrival order
    (a repeated header shows as many times as it came); with `echo_path`, `<name> <path as
    received>`. It answers after `delay` seconds; over HTTPS with `tls` (certificate file, key file)."""

    def __init__(self, name: str, host: str = "127.0.0.1", echo: bool = False, echo_path: bool = False,
                 delay: float = 0.0, tls: tuple[str, str] | None = None):
        self.name = name
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # Headers and body go out as two writes; without this, Nagle + delayed ACK add 40 ms.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self):  # noqa: N802 - http.server's naming
                time.sleep(delay)
                body = (json.dumps(self.headers.items()) if echo
                        else f"{backend.name} {self.path}" if echo_path else backend.name).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json" if echo else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default 5 drops connections under load tests
            def handle_error(self, request, client_address):
                pass  # a proxy closing idle keep-alive connections is not a test failure

        self.server = Server((host, 0), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.host, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def get(port: int, host_header: str, path: str = "/", timeout: float = 5.0,
        address: str = "127.0.0.1", source: str | None = None) -> tuple[int, str]:
    """GET through the edge with a given Host header, from `source` if given: (status, body)."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", path, headers={"Host": host_header, "Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()
