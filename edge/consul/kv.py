"""The Consul KV shell: read and watch a prefix, write with CAS, session locks, transactions.

The certificate sources (`edge.tls.sources`) watch the prefix's keys with a blocking query and
read its values when it changed; the ACME issuer writes certificates, challenges and its account
here and orders a name only while it holds that name's session lock, so one edge of the fleet
orders and every edge serves the result.
The fleet's publisher (`edge.consul.fleet`) writes the route table here in transactions that hold
only while its session holds the lock.

Narrow on purpose: values are text, keys are full paths, errors are two types. `KVUnavailable`
(Consul down, timeouts, 5xx: retry later) and `KVDenied` (403: an ACL forbids it, retrying will
not help until an operator acts). A fake with the same methods lives in tests/support/fake_kv.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence

import consul
import consul.exceptions
import requests

KV_ERRORS = (consul.ConsulException, requests.RequestException, ValueError)


class KVUnavailable(Exception):
    """Consul did not answer usefully; try again later."""


class KVDenied(KVUnavailable):
    """Consul refused the request (ACL): an operator has to grant access."""


class ConsulKV:
    """KV and sessions over a Consul client made by `factory` (one client per thread)."""

    def __init__(self, factory: Callable[[], consul.Consul]):
        self._factory = factory
        self._local = threading.local()

    def _c(self) -> consul.Consul:
        if not hasattr(self._local, "client"):
            self._local.client = self._factory()
        return self._local.client

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except consul.exceptions.ACLPermissionDenied as exc:
            raise KVDenied(f"{what}: permission denied by Consul ACLs ({exc})") from exc
        except KV_ERRORS as exc:
            raise KVUnavailable(f"{what}: {exc}") from exc

    # --- keys ----------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[int, str] | None:
        """(ModifyIndex, value) of one key, or None when it does not exist."""
        _, entry = self._call(f"get {key}", self._c().kv.get, key)
        if not entry:
            return None
        return int(entry.get("ModifyIndex") or 0), _text(entry.get("Value"))

    def list(self, prefix: str, index: int = 0, wait: float | None = None) -> tuple[int, dict[str, str]]:
        """Every key under `prefix` with its value; with `index`, a blocking query that returns
        when something under the prefix changed (or after `wait` seconds)."""
        kwargs = {"recurse": True}
        if index:
            kwargs.update(index=str(index), wait=f"{wait or 30:g}s")
        raw_index, entries = self._call(f"list {prefix}", self._c().kv.get, prefix, **kwargs)
        return int(raw_index or 0), {e["Key"]: _text(e.get("Value")) for e in entries or () if "Key" in e}

    def keys(self, prefix: str, index: int = 0, wait: float | None = None) -> tuple[int, tuple[str, ...]]:
        """The keys under `prefix`, without their values: a blocking query as cheap to repeat as
        the prefix is large (its index moves as `list`'s does)."""
        kwargs = {"keys": True}
        if index:
            kwargs.update(index=str(index), wait=f"{wait or 30:g}s")
        raw_index, keys = self._call(f"keys {prefix}", self._c().kv.get, prefix, **kwargs)
        return int(raw_index or 0), tuple(keys or ())

    def put(self, key: str, value: str, cas: int | None = None, acquire: str | None = None,
            release: str | None = None) -> bool:
        """Write `key`; False when a CAS index or a lock did not hold."""
        return bool(self._call(f"put {key}", self._c().kv.put, key, value, cas=cas, acquire=acquire, release=release))

    def delete(self, key: str, cas: int | None = None) -> bool:
        return bool(self._call(f"delete {key}", self._c().kv.delete, key, cas=cas))

    def txn(self, ops: Sequence[dict]) -> bool:
        """Consul's `/v1/txn` with KV operations, applied together or not at all: False when Consul
        rolled them back (409: a `lock`, `check-session` or `check-index` did not hold)."""
        client = self._c()

        def outcome(response) -> bool:
            if response.code == 409:
                return False
            if response.code == 403:
                raise consul.exceptions.ACLPermissionDenied(response.body)
            if response.code != 200:
                raise consul.ConsulException(f"{response.code} {str(response.body)[:200]}")
            return True
        params = [("dc", client.dc)] if client.dc else []
        return self._call("txn", client.http.put, outcome, "/v1/txn", params=params, data=json.dumps(list(ops)),
                          headers=client.prepare_headers())

    # --- sessions (locks) ------------------------------------------------------------------------
    def session(self, name: str, ttl: int) -> str:
        """A new session; its locks are released (keys kept) when it is destroyed or expires."""
        return self._call(f"session {name}", self._c().session.create, name=name, ttl=ttl,
                          behavior="release", lock_delay=0)

    def renew(self, session: str) -> bool:
        """False when the session is gone (expired: its locks are lost)."""
        try:
            self._call("renew session", self._c().session.renew, session)
        except KVUnavailable as exc:
            if isinstance(exc.__cause__, consul.exceptions.NotFound):
                return False
            raise
        return True

    def destroy(self, session: str) -> None:
        self._call("destroy session", self._c().session.destroy, session)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else ""
