"""The configuration writer: haproxy.cfg (and its maps) follow runtime changes, off the control loop.

A runtime change is live at once; the files on disk must follow, so that a later reload or a
restarted HAProxy serves the same state. Rendering them costs more than the change (0.3 s at
10,000 routes), so the control loop hands the writer its newest table (`changed`, latest wins)
and goes on; the writer's thread renders it once inputs were quiet for a few renders' time
(QUIET_RENDERS, at most MAX_RENDERS late) and writes it. A change arriving meanwhile is applied
by the control loop without waiting for the render (Python's interpreter is shared, so it runs
slower while one is in progress, but it never queues behind a whole one).

Every write to the state dir goes through one lock and carries a generation: the control loop's
own installs (a reload's validated file set, `install`) take the next one, and the writer never
writes a render older than what is on disk, so a background write can never replace a newer
reload's files. `write_now()` renders and writes on the caller's thread (before HAProxy is
restarted from the files, at stop). A state dir that refuses a write is GuardedWrites': one log
line, the write tried again every `retry` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edge.haproxy.process import GuardedWrites, HAProxy
from edge.routing.render import Listeners, TemplateError, render
from edge.routing.table import RouteTable

log = logging.getLogger("edge")

QUIET = 0.05          # the file waits until inputs were quiet this long...
MAX_DELAY = 1.0       # ...but never longer than this after the first change it has not written
QUIET_RENDERS = 4     # both longer when a render is slow: this many renders' time of quiet...
MAX_RENDERS = 20      # ...and at most this many renders' time late
STOP_CHECK = 1.0      # the thread notices `stop` within this many seconds


@dataclass(frozen=True)
class Job:
    """What the files should hold: the table HAProxy runs now, with the templates it runs."""

    generation: int
    table: RouteTable
    templates: Mapping[str, str]


class ConfigWriter:
    def __init__(self, haproxy: HAProxy, listeners: Listeners, guard: GuardedWrites, stop: threading.Event):
        self.haproxy, self.listeners, self.guard, self.stop = haproxy, listeners, guard, stop
        self.render_s = 0.0                  # how long the last render took
        self._lock = threading.Lock()        # the fields below
        self._files = threading.Lock()       # every write to the state dir, and `_on_disk`
        self._wake = threading.Event()
        self._generation = 0
        self._on_disk = 0                    # the generation the files hold
        self._pending: Job | None = None
        self._dirty_since: float | None = None
        self._last_input = 0.0

    # --- from the control loop --------------------------------------------------------------
    def changed(self, table: RouteTable, templates: Mapping[str, str]) -> None:
        """HAProxy runs `table` now (changed at runtime): the files are to follow."""
        now = time.monotonic()
        with self._lock:
            self._generation += 1
            self._pending = Job(self._generation, table, templates)
            self._dirty_since = self._dirty_since or now
            self._last_input = now
        self._wake.set()

    def install(self, write: Callable[[], None]) -> bool:
        """Run a validated install of a whole file set (`write`, e.g. before a reload) as the
        newest generation; False when the state dir refused it (GuardedWrites logged it)."""
        with self._files:
            with self._lock:
                self._generation += 1
                generation = self._generation
            if not self.guard(write):
                return False
            self._on_disk = generation
            with self._lock:
                if self._pending is not None and self._pending.generation < generation:
                    self._pending, self._dirty_since = None, None
        return True

    @property
    def dirty(self) -> bool:
        """Runtime changes the files do not hold yet."""
        with self._lock:
            return self._pending is not None

    # --- writing ------------------------------------------------------------------------------
    def due_in(self, now: float) -> float | None:
        """Seconds until the pending job is to be written (0: now); None when nothing is pending."""
        with self._lock:
            if self._pending is None:
                return None
            quiet = max(QUIET, QUIET_RENDERS * self.render_s)
            longest = max(MAX_DELAY, MAX_RENDERS * self.render_s)
            due = min(self._last_input + quiet, self._dirty_since + longest)
        return max(0.0, due - now, self.guard.retry_at - now)

    def step(self) -> None:
        """Write the pending job if it is due."""
        if self.due_in(time.monotonic()) == 0.0:
            self.write_now()

    def write_now(self) -> bool:
        """Render and write the pending job on this thread, whatever the quiet period (before
        HAProxy is restarted from the files, at stop); True when the files hold the newest table."""
        with self._lock:
            job = self._pending
        if job is None:
            return True
        try:
            t0 = time.perf_counter()
            rendered = render(job.table, self.listeners, job.templates)
            self.render_s = time.perf_counter() - t0
        except TemplateError as exc:
            log.error("could not render %s: %s", self.haproxy.paths.config, exc)
            self._done(job)
            return False
        with self._files:
            if job.generation <= self._on_disk:          # a newer install went first
                return True
            if not self.guard(lambda: self.haproxy.write_config(rendered)):
                return False
            self._on_disk = job.generation
        self._done(job)
        return True

    def _done(self, job: Job) -> None:
        with self._lock:
            if self._pending is job:
                self._pending, self._dirty_since = None, None

    def run(self) -> None:
        """The writer's thread, until `stop`."""
        while not self.stop.is_set():
            wait = self.due_in(time.monotonic())
            if wait is None or wait > 0:
                self._wake.wait(min(wait if wait is not None else STOP_CHECK, STOP_CHECK))
                self._wake.clear()
                continue
            self.write_now()
