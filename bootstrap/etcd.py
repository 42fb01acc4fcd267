"""The etcd shell: a small client for etcd 3.4's v3 JSON gateway over httpx.

Keys and values are base64 on the wire; this module speaks plain strings. Several endpoints
fail over in order; transient failures are retried (tenacity) and what still fails raises
`EtcdUnavailable`. Chosen over the `etcd3` package, whose last release (2020) does not import
with today's protobuf.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence

import httpx
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

log = logging.getLogger("bootstrap.etcd")


class EtcdUnavailable(Exception):
    """No endpoint answered."""


class EtcdError(Exception):
    """An endpoint answered with an error (e.g. the lease is gone)."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(b64: str) -> str:
    return base64.b64decode(b64).decode(errors="replace")


def prefix_end(prefix: str) -> str:
    """The key just past every key starting with `prefix` (etcd's range_end convention)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode(errors="surrogateescape")


class Etcd:
    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0, transport: httpx.BaseTransport | None = None):
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.http = httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    @retry(retry=retry_if_exception_type(EtcdUnavailable), stop=stop_after_attempt(3),
           wait=wait_exponential(multiplier=0.2, max=1), reraise=True)
    def _post(self, path: str, body: dict) -> dict:
        errors = []
        for endpoint in self.endpoints:
            try:
                response = self.http.post(f"{endpoint}{path}", json=body)
                data = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                errors.append(f"{endpoint}: {exc}")
                continue
            if not isinstance(data, dict):
                errors.append(f"{endpoint}: not an etcd answer")
                continue
            if "error" in data:
                raise EtcdError(data.get("message") or data["error"])
            if response.status_code >= 400:
                errors.append(f"{endpoint}: HTTP {response.status_code}")
                continue
            return data
        raise EtcdUnavailable("; ".join(errors))

    def grant(self, ttl: int) -> str:
        lease = self._post("/v3/lease/grant", {"TTL": ttl}).get("ID")
        if not lease:
            raise EtcdError("lease grant answered without a lease ID")
        return str(lease)

    def keepalive(self, lease: str) -> int:
        """The lease's remaining TTL; 0 when it is gone."""
        result = self._post("/v3/lease/keepalive", {"ID": lease}).get("result") or {}
        return int(result.get("TTL") or 0)

    def revoke(self, lease: str) -> None:
        try:
            self._post("/v3/lease/revoke", {"ID": lease})
        except EtcdError as exc:
            log.debug("revoke %s: %s", lease, exc)

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        self._post("/v3/kv/put", body)

    def get(self, key: str) -> str | None:
        data = self._post("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or ()
        return _text(kvs[0].get("value", "")) if kvs else None

    def get_prefix(self, prefix: str) -> dict[str, str]:
        data = self._post("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return {_text(kv["key"]): _text(kv.get("value", "")) for kv in data.get("kvs") or ()}
