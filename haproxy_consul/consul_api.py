"""Consul client factory: parses the address forms Consul's own tools accept.

`CONSUL_HTTP_ADDR` may be `host:port`, `http://host:port` or `https://host:port`. The token is
set after construction because py-consul would otherwise let `CONSUL_HTTP_TOKEN` from the
environment override the `--token` flag.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

import consul


@dataclass(frozen=True)
class ConsulAddress:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_address(url: str) -> ConsulAddress:
    text = url.strip()
    if "//" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"Consul address {url!r}: scheme must be http or https")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"Consul address {url!r}: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"Consul address {url!r} has no host")
    default = 443 if parts.scheme == "https" else 8500
    return ConsulAddress(parts.scheme, parts.hostname, port or default)


def client(address: ConsulAddress, token: str | None = None, datacenter: str | None = None,
           timeout: float = 10.0) -> consul.Consul:
    """A new client (one per thread: a requests session is not shared between threads)."""
    c = consul.Consul(host=address.host, port=address.port, scheme=address.scheme, dc=datacenter or None)
    c.token = token or None
    c.http.connections_timeout = timeout
    return c
