"""Refill: one reload to free the spare backends when the pool runs low, once inputs are quiet.

Beside the control loop (edge.control), which asks `due()` once per round. A route that takes a
spare keeps it until a reload gives it its own backend (edge.routing.spares); without other
reloads the pool only shrinks, and a new vhost finding it empty reloads in the middle of a burst
("spare backends exhausted"). So when the free spares fall to the low-water mark
(`spares.running_low`: a quarter of the pool), a reload is due once Consul has been quiet for
QUIET seconds (a burst of new services is over), or at the latest MAX_WAIT seconds after the pool
ran low, whichever comes first. A reload that fails is not tried again for the same table: the
next change (or the reload of the next new vhost) tries again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge.routing.spares import SparePool, running_low
from edge.routing.table import RouteTable

QUIET = 2.0        # seconds without a change from Consul before the refill reloads
MAX_WAIT = 30.0    # ...and at most this long after the pool ran low


class Refill:
    def __init__(self, pool: SparePool, quiet: float = QUIET, max_wait: float = MAX_WAIT,
                 clock: Callable[[], float] = time.monotonic):
        self.pool, self.quiet, self.max_wait, self.clock = pool, quiet, max_wait, clock
        self._low_since: float | None = None
        self._tried: RouteTable | None = None       # the table a refill was last due for

    def due(self, live: RouteTable | None, last_input: float) -> str | None:
        """The reason to reload now, or None. `last_input`: time.monotonic() of the last input."""
        reason = running_low(self.pool, live)
        if reason is None:
            self._low_since = None
            return None
        now = self.clock()
        self._low_since = self._low_since if self._low_since is not None else now
        if live is self._tried or (now - last_input < self.quiet and now - self._low_since < self.max_wait):
            return None
        self._tried = live
        return reason
