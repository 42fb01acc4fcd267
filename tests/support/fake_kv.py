"""An in-memory stand-in for `edge.consul.kv.ConsulKV`, recording every write, for unit tests."""

from __future__ import annotations

import itertools
import threading

from edge.consul.kv import KVUnavailable


class FakeKV:
    def __init__(self):
        self.data: dict[str, tuple[int, str]] = {}   # key -> (ModifyIndex, value)
        self.locks: dict[str, str] = {}               # key -> session
        self.sessions: set[str] = set()
        self.writes: list[tuple[str, str]] = []       # ("put"/"delete", key), in order
        self.down = False
        self.lists = self.key_reads = 0               # reads with values, reads of keys only
        self._index = itertools.count(1)
        self.index = 0
        self._changed = threading.Condition()

    def _up(self):
        if self.down:
            raise KVUnavailable("fake consul is down")

    def _bump(self) -> int:
        with self._changed:
            self.index = next(self._index)
            self._changed.notify_all()
        return self.index

    def get(self, key):
        self._up()
        return self.data.get(key)

    def list(self, prefix, index=0, wait=None):
        self._up()
        self.lists += 1
        if index:
            with self._changed:
                self._changed.wait_for(lambda: self.index != index, timeout=wait or 0.1)
        return self.index, {k: v for k, (_, v) in self.data.items() if k.startswith(prefix)}

    def keys(self, prefix, index=0, wait=None):
        self._up()
        self.key_reads += 1
        if index:
            with self._changed:
                self._changed.wait_for(lambda: self.index != index, timeout=wait or 0.1)
        return self.index, tuple(k for k in self.data if k.startswith(prefix))

    def put(self, key, value, cas=None, acquire=None, release=None):
        self._up()
        if cas is not None and self.data.get(key, (0, ""))[0] != cas:
            return False
        if acquire is not None:
            if acquire not in self.sessions or self.locks.get(key, acquire) != acquire:
                return False
            self.locks[key] = acquire
        if release is not None:
            if self.locks.get(key) != release:
                return False
            del self.locks[key]
        self.data[key] = (self._bump(), value)
        self.writes.append(("put", key))
        return True

    def delete(self, key, cas=None):
        self._up()
        if cas is not None and self.data.get(key, (0, ""))[0] != cas:
            return False
        self.data.pop(key, None)
        self._bump()
        self.writes.append(("delete", key))
        return True

    def session(self, name, ttl):
        self._up()
        sid = f"session-{len(self.sessions) + 1}-{name}"
        self.sessions.add(sid)
        return sid

    def renew(self, session):
        self._up()
        return session in self.sessions

    def destroy(self, session):
        self._up()
        self.sessions.discard(session)
        for key in [k for k, s in self.locks.items() if s == session]:
            del self.locks[key]
