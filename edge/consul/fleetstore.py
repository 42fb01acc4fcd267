"""The fleet's KV shell: reads of head, shards and problems (stale by default, through the
watcher's `Reader`), and the publisher's fenced writes (Consul transactions), under one prefix.

Propagation: a stale read on a server that is not the leader sees a write only once that server
learns the write is committed, which Consul 1.8's raft tells it with the next append or heartbeat
(measured here: 52-137 ms after the write returned, against 2-20 ms when another write follows
at once). So every publication is followed by a one-byte write to `P/nudge`, which nobody watches:
it carries the commit of the publication to every server, and followers read it within ms.

Fencing: every write of the publisher is a transaction that holds only while its session holds
head (`lock` on head itself, or `check-session` on head before shard writes), so a publisher that
lost its session (expired, deposed, partitioned) cannot write anything, whatever it believes.
Transactions stay under Consul's limits (64 operations, 512 KB per request); a large write is
several transactions, shards first and head last, so a follower never reads a head whose shards
are missing. The layout and encodings are `edge.consul.fleetplan`'s.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from edge.consul.fleetplan import (
    SHARDS,
    VALUE_MAX,
    FormatError,
    Head,
    Shard,
    Write,
    decode_problems,
    decode_shard,
    encode_head,
    encode_problems,
    encode_shard,
    from_kv,
    kv_value,
)
from edge.consul.kv import ConsulKV, KVUnavailable
from edge.consul.watch import Reader
from edge.consul.watch import endpoint as watch_endpoint
from edge.routing.model import Problem
from haproxy_consul.consul_api import ConsulRefused

TXN_OPS = 64                  # Consul's limit of operations per transaction
TXN_BYTES = 384 * 1024        # our budget per transaction request (Consul's limit: 512 KB)
SESSION_TTL = 10              # seconds, Consul's minimum; the lock goes 2 x TTL after the last renewal


def endpoint(path: str) -> str:
    """A path as a metric label: the shards collapse to one label, the rest as the watcher's."""
    head, sep, _ = path.rpartition("/shard/")
    return f"{head}/shard/<n>" if sep else watch_endpoint(path)


@dataclass(frozen=True)
class HeadRead:
    """One read of head: the Consul index of the answer, and the key if it exists."""

    index: int
    value: bytes | None = None
    session: str = ""
    modify_index: int = 0
    seen_at: float = 0.0


class Store:
    def __init__(self, reader: Reader, kv: ConsulKV, prefix: str):
        self.reader, self.kv = reader, kv
        self.prefix = prefix.strip("/")
        self.head_key = f"{self.prefix}/head"
        self.problems_key = f"{self.prefix}/problems"
        self.nudge_key = f"{self.prefix}/nudge"

    def shard_key(self, number: int) -> str:
        return f"{self.prefix}/shard/{number:02d}"

    # --- reads -----------------------------------------------------------------------------------
    def _get(self, key: str, params=(), index: int = 0, wait: float | None = None, consistency: str | None = None):
        """(answer, entries): entries is None when the key (or prefix) does not exist. Stale reads
        go through the watcher's `Reader` (an answer behind what was seen is read again from the
        leader); `consistent` ones (elections, a shard behind head) straight to the leader."""
        path = f"/v1/kv/{key}"
        try:
            if consistency == "consistent":
                answer = self.reader.http.get(path, [*params, ("consistent", "")])
            else:
                answer = self.reader.read(path, params, index, wait)
        except ConsulRefused as exc:
            if exc.status == 404:
                return None, None
            raise
        entries = answer.body if isinstance(answer.body, list) else None
        if entries is None or not all(isinstance(e, dict) for e in entries):
            raise FormatError(f"{key}: Consul's KV answered {type(answer.body).__name__}")
        return answer, entries

    def head(self, index: int = 0, wait: float | None = None, consistency: str | None = None) -> HeadRead:
        answer, entries = self._get(self.head_key, (), index, wait, consistency)
        now = time.monotonic()
        if not entries:
            return HeadRead(0, seen_at=now)
        entry = entries[0]
        return HeadRead(answer.index, from_kv(entry.get("Value")), str(entry.get("Session") or ""),
                        int(entry.get("ModifyIndex") or 0), now)

    def shards(self, numbers: Iterable[int], consistency: str | None = None) -> dict[int, Shard]:
        """The shards asked for that exist, decoded; all of them in one read when many are asked."""
        wanted = set(numbers)
        out: dict[int, Shard] = {}
        if len(wanted) > 4:
            _, entries = self._get(f"{self.prefix}/shard/", (("recurse", ""),), consistency=consistency)
            by_key = {e.get("Key"): e for e in entries or ()}
            found = {k: by_key.get(self.shard_key(k)) for k in wanted}
        else:
            found = {}
            for k in sorted(wanted):
                _, entries = self._get(self.shard_key(k), consistency=consistency)
                found[k] = entries[0] if entries else None
        for k, entry in found.items():
            if entry is not None:
                out[k] = decode_shard(k, from_kv(entry.get("Value")))
        return out

    def problems(self, consistency: str | None = None) -> tuple[str, int, tuple[Problem, ...]] | None:
        _, entries = self._get(self.problems_key, consistency=consistency)
        return decode_problems(from_kv(entries[0].get("Value"))) if entries else None

    # --- writes ----------------------------------------------------------------------------------
    def session(self, name: str) -> str:
        return self.kv.session(name, SESSION_TTL)

    def renew(self, session: str) -> bool:
        return self.kv.renew(session)

    def destroy(self, session: str) -> None:
        self.kv.destroy(session)

    def acquire(self, session: str, value: bytes, modify_index: int) -> bool:
        """Take head's lock, keeping its `value` as read, only if head is still what was read
        (`modify_index`; 0: it did not exist, and `value` is the new chain's first head)."""
        value = kv_value(value)
        check = ({"KV": {"Verb": "cas", "Key": self.head_key, "Index": 0, "Value": value}} if not modify_index
                 else {"KV": {"Verb": "check-index", "Key": self.head_key, "Index": modify_index}})
        return self.kv.txn([check, {"KV": {"Verb": "lock", "Key": self.head_key, "Value": value,
                                           "Session": session}}])

    def beat(self, session: str, head: Head) -> bool:
        return self.kv.txn([self._lock(session, head)])

    def publish(self, session: str, write: Write) -> bool:
        """Shards (and problems) first, head last, each transaction fenced by the session's lock.
        False as soon as one is rolled back: the lock is not ours any more."""
        values = [(self.shard_key(k), encode_shard(s)) for k, s in write.shards.items()]
        if write.problems is not None:
            values.append((self.problems_key, encode_problems(write.head.chain, write.head.seq, write.problems)))
        for key, raw in values:
            if len(raw) > VALUE_MAX:
                raise FormatError(f"{key}: {len(raw)} bytes encoded, over Consul's 512 KB per value; "
                                  f"more than {SHARDS} shards would be needed")
        fence = {"KV": {"Verb": "check-session", "Key": self.head_key, "Session": session}}
        head = self._lock(session, write.head)
        batch: list[dict] = []
        size = len(str(head))
        for key, raw in values:
            op = {"KV": {"Verb": "set", "Key": key, "Value": kv_value(raw)}}
            cost = len(op["KV"]["Value"]) + len(key) + 64
            if batch and (len(batch) + 2 > TXN_OPS or size + cost > TXN_BYTES):
                if not self.kv.txn([fence, *batch]):
                    return False
                batch, size = [], len(str(head))
            batch.append(op)
            size += cost
        if not self.kv.txn([*batch, head]):
            return False
        try:
            self.kv.put(self.nudge_key, "")
        except KVUnavailable:
            pass        # only a delay: followers on other servers see the publication at the next heartbeat
        return True

    def _lock(self, session: str, head: Head) -> dict:
        return {"KV": {"Verb": "lock", "Key": self.head_key, "Value": kv_value(encode_head(head)), "Session": session}}
