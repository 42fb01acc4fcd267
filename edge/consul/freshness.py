"""Whether a Consul answer is at least as new as what the edge already applied: the rules, pure.

A Consul server restarted without a recent raft snapshot rebuilds its state by replaying its
log. Measured on 1.8.7 (tests/integration/test_consul_restart.py): before its first contact with
the leader it forwards `?stale` reads to the leader (the current state, the current index); from
then on it answers them from its own state store while that replays, hundreds of writes behind,
its index going back and forward again, all the while saying `X-Consul-KnownLeader: true` and
`X-Consul-LastContact` of a few milliseconds (its raft applied index is already current: the
state store lags behind it). Only the index shows it, and only compared with what was seen.

So the watcher (edge.consul.watch) keeps:
- `Clocks`: the highest `X-Consul-Index` each endpoint answered with, across outages and full
  syncs (never restarted from 0). An answer below it is behind; so is one from a server that knows
  no leader or last heard from it more than `--max-stale` ago. A behind answer is read again from
  the leader (consistent), never applied as it is; a leader below it too means Consul's state
  itself went back (a cluster rebuilt, a snapshot restored): the clocks start over.
- trust: reads that are not long-polls go to the leader until the server the edge reads has shown,
  in a stale long-poll answered from its own state, that it holds everything the edge has seen
  (`proves_caught_up`). Trust ends with every outage (a restarted server replays) and every
  behind answer. Long-polls stay stale: a blocking query at an index the server has not reached
  waits until it has, so a replaying server's older states never reach them.
Pure: no I/O.
"""

from __future__ import annotations

import threading


def behind(index: int, floor: int, known_leader: bool, last_contact_ms: int, max_stale_ms: float) -> str | None:
    """Why an answer must not be applied as it is (None: it may): its index is below `floor`
    (what the edge has seen of that endpoint), its server knows no leader, or heard from it too
    long ago."""
    if index < floor:
        return f"index {index}, below {floor} already seen"
    if not known_leader:
        return "its server knows no leader"
    if last_contact_ms > max_stale_ms:
        return f"its server last heard from the leader {last_contact_ms} ms ago (more than {max_stale_ms:g})"
    return None


def proves_caught_up(index: int, highest: int, last_contact_ms: int) -> bool:
    """Whether a stale answer shows that the server the edge reads holds everything the edge has
    seen: its index reaches the highest one seen of any endpoint (the catalog's own index does:
    every table's index is at most the catalog's), and it comes from the server's own state. A
    follower says how long ago it heard from the leader; an answer made by the leader (the leader
    itself, or a read forwarded to it before the server's first contact) says 0 and shows nothing
    of the server's own state."""
    return index >= highest and last_contact_ms > 0


class Clocks:
    """The highest index each endpoint (path) answered with; shared by the watcher's threads."""

    def __init__(self) -> None:
        self._high: dict[str, int] = {}
        self._lock = threading.Lock()

    def floor(self, path: str) -> int:
        return self._high.get(path, 0)

    def highest(self) -> int:
        with self._lock:
            return max(self._high.values(), default=0)

    def advance(self, path: str, index: int) -> None:
        with self._lock:
            if index > self._high.get(path, 0):
                self._high[path] = index

    def clear(self) -> None:
        with self._lock:
            self._high.clear()
