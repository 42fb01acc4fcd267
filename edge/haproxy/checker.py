"""The checker: what HAProxy serves, read and compared with the applied table off the control loop.

The control loop (edge.control) checks now and then that HAProxy serves the table it applied
(`edge.routing.plan.reconcile`: server slots and the maps the runtime API changes). At 10,000
routes that is 40,000 server states and 10,000 map entries to read, parse and compare: ~0.3 s of
the interpreter, which a change arriving meanwhile used to wait for (the p99 of "a change routed"
and a second of cold start, measured with bench/scale.py). So the loop only asks (`request`, the
table it applied and why), this thread reads and compares, and the loop takes the result
(`take`) at its next round and puts back what differs, on its own thread, as before. A result
for a table the loop has replaced meanwhile is dropped by the loop (the state read may already
be the newer table's, half applied): the next check compares again. Reads that fail are logged
at debug level and count as nothing found; the next check tries again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from edge.haproxy.process import HAProxy, HAProxyError
from edge.routing.maps import table_maps
from edge.routing.plan import Plan, reconcile
from edge.routing.render import Listeners
from edge.routing.table import RouteTable

log = logging.getLogger("edge")

STOP_CHECK = 1.0      # the thread notices `stop` within this many seconds


@dataclass(frozen=True)
class Checked:
    """A check's result: `plan` puts HAProxy back to `table`, compared for `why`."""

    table: RouteTable
    plan: Plan
    why: str


def check(haproxy: HAProxy, listeners: Listeners, table: RouteTable, why: str) -> Checked | None:
    """Read HAProxy's server states and maps and compare them with `table`; None if it could not
    be read."""
    domains = listeners.domains
    try:
        served = haproxy.served()
        maps = haproxy.maps(tuple(table_maps(table, domains)))
    except HAProxyError as exc:
        log.debug("could not read HAProxy's server states and maps (%s): %s", why, exc)
        return None
    return Checked(table, reconcile(table, served, listeners.spares, maps, domains), why)


class Checker:
    def __init__(self, haproxy: HAProxy, listeners: Listeners, stop: threading.Event,
                 done: threading.Event):
        self.haproxy, self.listeners, self.stop = haproxy, listeners, stop
        self.done = done                     # set when a result is ready (the control loop's wake)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._request: tuple[RouteTable, str] | None = None
        self._result: Checked | None = None

    def request(self, table: RouteTable, why: str) -> None:
        """Check HAProxy against `table` (latest request wins)."""
        with self._lock:
            self._request = (table, why)
        self._wake.set()

    def take(self) -> Checked | None:
        with self._lock:
            result, self._result = self._result, None
        return result

    def run(self) -> None:
        while not self.stop.is_set():
            if not self._wake.wait(STOP_CHECK):
                continue
            self._wake.clear()
            with self._lock:
                request, self._request = self._request, None
            if request is None:
                continue
            result = check(self.haproxy, self.listeners, *request)
            if result is not None:
                with self._lock:
                    self._result = result
                self.done.set()
