"""The etcd shell: small clients for etcd's v3 JSON gateway and its v2 keys API, over httpx.

Both offer what the supervisor needs, with lease semantics: `grant(ttl)`, `put(key, value,
lease)`, `keepalive(lease)` (the TTL left, 0 once the lease is gone), `revoke(lease)`, `get(key)`
and `get_prefix(prefix)`, in plain strings.

- `Etcd` speaks v3 (etcd ≥ 3.4's `/v3/...` gateway; keys and values base64 on the wire).
- `EtcdV2` speaks the v2 keys API (`/v2/keys/...`), which the seed's CoreOS etcd2 fleets used and
  etcd 3.x serves with `--enable-v2` (a keyspace separate from v3's). v2 has no leases: a "lease"
  here is a TTL plus the keys written under it; keepalive refreshes their TTLs
  (`refresh=true&prevExist=true`), revoke deletes them while they still hold our value.
- `Detecting` asks `/version` on first use and then behaves as one of the two (`--etcd-api auto`).

Several endpoints fail over in order; transient failures are retried (tenacity) and what still
fails raises `EtcdUnavailable`. Chosen over the `etcd3` package, whose last release (2020) does
not import with today's protobuf.
"""

from __future__ import annotations

import base64
import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Protocol

import httpx
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

log = logging.getLogger("bootstrap.etcd")
API_CHOICES = ("auto", "v2", "v3")
V2_KEY_NOT_FOUND, V2_COMPARE_FAILED = 100, 101


class EtcdUnavailable(Exception):
    """No endpoint answered."""


class EtcdError(Exception):
    """An endpoint answered with an error (e.g. the lease is gone)."""


class Store(Protocol):
    def grant(self, ttl: int) -> str: ...
    def keepalive(self, lease: str) -> int: ...
    def revoke(self, lease: str) -> None: ...
    def put(self, key: str, value: str, lease: str | None = None) -> None: ...
    def get(self, key: str) -> str | None: ...
    def get_prefix(self, prefix: str) -> dict[str, str]: ...
    def close(self) -> None: ...


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _text(b64: str) -> str:
    return base64.b64decode(b64).decode(errors="replace")


def prefix_end(prefix: str) -> str:
    """The key just past every key starting with `prefix` (etcd's range_end convention)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode(errors="surrogateescape")


def api_from_version(answer: object) -> str:
    """`/version`'s answer → "v3" for etcd 3.x and later, "v2" for etcd 2.x (which has no v3 API)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("etcdserver"), str):
        raise EtcdError(f"/version answered {str(answer)[:80]!r}, not an etcd version")
    major = answer["etcdserver"].split(".", 1)[0]
    if not major.isdigit():
        raise EtcdError(f"unknown etcd version {answer['etcdserver']!r}")
    return "v3" if int(major) >= 3 else "v2"


class _Endpoints:
    """The endpoints in order: the first that answers with JSON wins; none → EtcdUnavailable."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0, transport: httpx.BaseTransport | None = None):
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.http = httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def _answers(self, method: str, path: str, **kwargs) -> Iterator[tuple[int, object]]:
        """(status, JSON) from each endpoint in turn that answers with JSON; the caller stops when satisfied."""
        errors = []
        for endpoint in self.endpoints:
            try:
                response = self.http.request(method, f"{endpoint}{path}", **kwargs)
            except httpx.HTTPError as exc:
                errors.append(f"{endpoint}: {exc}")
                continue
            try:
                data = response.json()
            except ValueError:      # e.g. etcd2's "404 page not found" for a /v3 path
                errors.append(f"{endpoint}: HTTP {response.status_code} {response.text[:40]!r} is not JSON")
                continue
            yield response.status_code, data
            errors.append(f"{endpoint}: HTTP {response.status_code}")
        raise EtcdUnavailable("; ".join(errors))


_retried = retry(retry=retry_if_exception_type(EtcdUnavailable), stop=stop_after_attempt(3),
                 wait=wait_exponential(multiplier=0.2, max=1), reraise=True)


class Etcd(_Endpoints):
    """etcd's v3 JSON gateway."""

    api = "v3"

    @_retried
    def _post(self, path: str, body: dict) -> dict:
        for status, data in self._answers("POST", path, json=body):
            if not isinstance(data, dict):
                continue
            if "error" in data:
                raise EtcdError(data.get("message") or data["error"])
            if status < 400:
                return data
        raise AssertionError("unreachable: _answers raises when no endpoint is left")

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


class EtcdV2(_Endpoints):
    """etcd's v2 keys API, with leases emulated by TTL'd keys (see the module docstring)."""

    api = "v2"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.leases: dict[str, tuple[int, dict[str, str]]] = {}
        self._ids = itertools.count(1)

    @_retried
    def _keys(self, method: str, key: str, ok: tuple[int, ...] = (), **kwargs) -> dict:
        """A /v2/keys request; an etcd error whose code is in `ok` is returned, any other raised."""
        for status, data in self._answers(method, f"/v2/keys{key}", **kwargs):
            if not isinstance(data, dict):
                continue
            if "errorCode" in data:
                if data["errorCode"] in ok:
                    return data
                raise EtcdError(f"{data.get('message', 'error')} ({data['errorCode']}): {data.get('cause', key)}")
            if status < 400:
                return data
        raise AssertionError("unreachable: _answers raises when no endpoint is left")

    def grant(self, ttl: int) -> str:
        lease = f"v2-{next(self._ids)}"
        self.leases[lease] = (ttl, {})
        return lease

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        form = {"value": value}
        if lease:
            ttl, keys = self.leases[lease]
            form["ttl"] = str(ttl)
            keys[key] = value
        self._keys("PUT", key, data=form)

    def keepalive(self, lease: str) -> int:
        """Refresh the TTL of every key of the lease; 0 if one of them is gone (expired or deleted)."""
        ttl, keys = self.leases.get(lease, (0, {}))
        for key in keys:
            data = self._keys("PUT", key, ok=(V2_KEY_NOT_FOUND,),
                              data={"ttl": str(ttl), "refresh": "true", "prevExist": "true"})
            if data.get("errorCode") == V2_KEY_NOT_FOUND:
                return 0
        return ttl

    def revoke(self, lease: str) -> None:
        _ttl, keys = self.leases.pop(lease, (0, {}))
        for key, value in keys.items():
            self._keys("DELETE", key, ok=(V2_KEY_NOT_FOUND, V2_COMPARE_FAILED), params={"prevValue": value})

    def get(self, key: str) -> str | None:
        node = self._keys("GET", key, ok=(V2_KEY_NOT_FOUND,)).get("node") or {}
        return None if node.get("dir") else node.get("value")

    def get_prefix(self, prefix: str) -> dict[str, str]:
        """Every key under the directory holding `prefix` whose name starts with it (nested keys included)."""
        directory = prefix.rsplit("/", 1)[0] or "/"
        root = self._keys("GET", directory, ok=(V2_KEY_NOT_FOUND,), params={"recursive": "true"}).get("node") or {}
        out, stack = {}, [root]
        while stack:
            node = stack.pop()
            if node.get("dir"):
                stack.extend(node.get("nodes") or ())
            elif str(node.get("key", "")).startswith(prefix):
                out[node["key"]] = str(node.get("value", ""))
        return out


class Detecting:
    """`--etcd-api auto`: the first call asks `/version` and picks v3 (etcd ≥ 3) or v2 (etcd 2.x)."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 5.0, transport: httpx.BaseTransport | None = None):
        self.args = (endpoints, timeout, transport)
        self.probe = _Endpoints(endpoints, timeout, transport)
        self.store: Etcd | EtcdV2 | None = None

    @_retried
    def _detect(self) -> Etcd | EtcdV2:
        for _status, data in self.probe._answers("GET", "/version"):
            api = api_from_version(data)
            log.info("etcd %s at %s: using its %s API", data["etcdserver"], ",".join(self.probe.endpoints), api)
            return (Etcd if api == "v3" else EtcdV2)(*self.args)
        raise AssertionError("unreachable: _answers raises when no endpoint is left")

    def _chosen(self) -> Etcd | EtcdV2:
        if self.store is None:
            self.store = self._detect()
            self.probe.close()
        return self.store

    def grant(self, ttl: int) -> str:
        return self._chosen().grant(ttl)

    def keepalive(self, lease: str) -> int:
        return self._chosen().keepalive(lease)

    def revoke(self, lease: str) -> None:
        self._chosen().revoke(lease)

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        self._chosen().put(key, value, lease)

    def get(self, key: str) -> str | None:
        return self._chosen().get(key)

    def get_prefix(self, prefix: str) -> dict[str, str]:
        return self._chosen().get_prefix(prefix)

    def close(self) -> None:
        self.probe.close()
        if self.store is not None:
            self.store.close()


def connect(endpoints: Sequence[str], api: str = "auto", timeout: float = 5.0,
            transport: httpx.BaseTransport | None = None) -> Store:
    """The client for `--etcd-api`: v2, v3, or auto (detected on first use)."""
    kinds = {"v3": Etcd, "v2": EtcdV2, "auto": Detecting}
    return kinds[api](endpoints, timeout, transport)
