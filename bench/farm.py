"""Real HTTP backends (tests.support.http.Backend) and a WebSocket echo server, served from a
child process: under wrk and h2load they answer thousands of requests a second, and in the
benchmark's own process that work would take the GIL from the Consul writer and the timing loops.
"""

from __future__ import annotations

import multiprocessing
import threading
from dataclasses import dataclass

from harness import REPO  # noqa: F401  (puts the repository on sys.path)
from websockets.sync.server import serve

from tests.support.http import Backend


@dataclass(frozen=True)
class Address:
    """Where one backend of the farm listens (what tests.integration.edge_helpers.register needs)."""

    name: str
    port: int
    host: str = "127.0.0.1"


def _serve(conn, names: list[str], delays: dict[str, float]) -> None:
    backends = [Backend(n, delay=delays.get(n, 0.0)) for n in names]

    def echo(ws):
        for message in ws:
            ws.send(message)
    ws = serve(echo, "127.0.0.1", 0)
    threading.Thread(target=ws.serve_forever, daemon=True).start()
    conn.send(([b.port for b in backends], ws.socket.getsockname()[1]))
    conn.recv()                                  # until the parent says stop (or goes away)


class Farm:
    """`names` backends answering their name, `delays` seconds late for some; `ws_port` an echo."""

    def __init__(self, names: list[str], delays: dict[str, float] | None = None):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, names, delays or {}), daemon=True)
        self._proc.start()
        ports, self.ws_port = self._conn.recv()
        self.backends = {n: Address(n, p) for n, p in zip(names, ports, strict=True)}

    def __getitem__(self, name: str) -> Address:
        return self.backends[name]

    def close(self) -> None:
        try:
            self._conn.send("stop")
        except OSError:
            pass
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
