"""Long-lived connections held through a benchmark run: a WebSocket and an HTTP/2 connection
(h2c, prior knowledge, on the edge's HTTP listener), each opened before the run and asked again
during and after it (a WS echo; an h2 PING and a GET on a new stream of the same connection).
Which HAProxy process holds each one is read with `ss` from its server-side socket.

A minimal HTTP/2 client on a plain socket (no h2 library in the project): it sends the preface,
acknowledges SETTINGS, and reads only what it asked for; HPACK is reduced to what a GET needs
(static-table indices and one literal `:authority`), and the answer's status is read from the
first header byte HAProxy sends for `:status 200` (static index 8).
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess

from websockets.sync.client import connect

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


class H2:
    """One HTTP/2 connection to the edge: `ping()`, `get()`; each raises OSError when it is gone."""

    def __init__(self, port: int, host: str, timeout: float = 5.0):
        self.host = host
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self._buf = b""
        self._stream = 1
        self.ping()

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    def _frame(self) -> tuple[int, int, int, bytes]:
        while True:
            if len(self._buf) >= 9:
                length = int.from_bytes(self._buf[:3], "big")
                if len(self._buf) >= 9 + length:
                    head, payload = self._buf[:9], self._buf[9:9 + length]
                    self._buf = self._buf[9 + length:]
                    kind, flags, stream = head[3], head[4], struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
                    if kind == SETTINGS and not flags & ACK:
                        self.sock.sendall(frame(SETTINGS, ACK, 0))
                    if kind == GOAWAY:
                        raise ConnectionError("GOAWAY from the edge")
                    return kind, flags, stream, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the edge")
            self._buf += chunk

    def ping(self) -> None:
        token = b"edge-ok!"
        self.sock.sendall(frame(PING, 0, 0, token))
        while True:
            kind, flags, _, payload = self._frame()
            if kind == PING and flags & ACK and payload == token:
                return

    def get(self) -> tuple[int, bytes]:
        """A GET / on a new stream: (status, body). Only 200 is decoded; any other is 0."""
        stream, self._stream = self._stream, self._stream + 2
        authority = self.host.encode()
        block = b"\x82\x86\x84\x01" + bytes((len(authority),)) + authority  # GET, http, /, :authority
        self.sock.sendall(frame(HEADERS, END_STREAM | END_HEADERS, stream, block))
        status, body = 0, b""
        while True:
            kind, flags, sid, payload = self._frame()
            if sid != stream:
                continue
            if kind == HEADERS and not status:
                status = 200 if payload[:1] == b"\x88" else -1
            elif kind == DATA:
                body += payload
            if kind in (DATA, HEADERS) and flags & END_STREAM:
                return status, body

    def close(self) -> None:
        self.sock.close()


class WS:
    """One WebSocket through the edge to the farm's echo server."""

    def __init__(self, port: int, host: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.local_port = self.sock.getsockname()[1]
        self.ws = connect(f"ws://{host}/", sock=self.sock, open_timeout=5, close_timeout=1)

    def echo(self, text: str) -> None:
        self.ws.send(text)
        answer = self.ws.recv(timeout=5)
        if answer != text:
            raise ConnectionError(f"echo answered {answer!r}")

    def close(self) -> None:
        self.ws.close()


def holder(edge_port: int, client_port: int) -> int | None:
    """The pid of the process holding the edge's side of the connection from `client_port`."""
    query = f"( sport = :{edge_port} and dport = :{client_port} )"
    out = subprocess.run(["ss", "-tnpH", "state", "established", query], capture_output=True, text=True,
                         timeout=10).stdout
    m = re.search(r"pid=(\d+)", out)
    return int(m.group(1)) if m else None
