"""The edge's control loop: newest snapshot (+ templates) → table → plan → apply, one at a time.

Inputs arrive from other threads (the Consul watcher, the template watcher) and only replace a
"latest" value and wake the loop, so bursts coalesce: latest wins. Runtime-only plans are
applied at once; a plan that needs a reload waits for a short quiet period (bounded) so a burst
of new vhosts costs one reload. Each reload is logged with its reasons; a refused configuration
or a failed reload leaves the running HAProxy as it was, and the files on disk as it runs them.
A state dir that cannot be written (full, read-only) is the same: HAProxy keeps serving, runtime
changes still apply, the error is logged once and the write is retried every RETRY seconds.
After runtime changes the files follow through `edge.haproxy.writer` on its own thread, so a
change never waits for the render of the one before it.

What HAProxy serves (its server slots and maps) is compared with the table the edge applied
(`reconcile`): every `reconcile_every` seconds, after every full sync of Consul (cold start, back
from an outage, a sweep) and after HAProxy was restarted; the reading and comparing run on a
thread of their own (`edge.haproxy.checker`), the putting back here. Nothing should ever differ;
whatever does (a runtime change lost, a worker started from an older file, a hand on the runtime
socket) is logged and put back, so no divergence outlasts the next check. When the spare
backends run low, edge.refill says when one reload refills them (inputs quiet), and the loop
does it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace

from edge.consul.watch import Snapshot
from edge.haproxy.checker import Checked, Checker, check
from edge.haproxy.process import (
    ConfigInvalid,
    GuardedWrites,
    HAProxy,
    HAProxyError,
    NotRunning,
    ReloadFailed,
    RuntimeFailed,
)
from edge.haproxy.writer import ConfigWriter
from edge.metrics import NoMetrics
from edge.refill import Refill
from edge.routing.dynamic import forget, kept_backends, loaded, mark
from edge.routing.model import Problem
from edge.routing.plan import Plan, make_plan, runtime_part
from edge.routing.render import Listeners, TemplateError, render
from edge.routing.spares import NO_POOL, assign, low_water, release, retire
from edge.routing.table import DEFAULT_RULES, RouteTable, TagRules, build_table, update_table

log = logging.getLogger("edge")

QUIET = 0.05        # a reload waits until inputs have been quiet this long...
MAX_DELAY = 1.0     # ...but never longer than this after the first change that needs it
SUPERVISE_EVERY = 1.0
RETRY = 5.0         # seconds between attempts to write a state dir that refused a write
RECONCILE_EVERY = 10.0


class Edge:
    def __init__(self, haproxy: HAProxy, listeners: Listeners, templates: Mapping[str, str],
                 stop: threading.Event, min_slots: int = 4, apply: str = "runtime", certs=None,
                 metrics=None, rules: TagRules = DEFAULT_RULES, reconcile_every: float = RECONCILE_EVERY):
        self.metrics = metrics or NoMetrics()   # edge.metrics: what was applied, how and why
        self.haproxy = haproxy
        self.certs = certs                         # edge.tls.stage.CertStage, with HTTPS
        self.listeners = listeners
        self.templates = templates
        self.stop = stop
        self.min_slots = min_slots
        self.rules = rules                         # tag grammars and exposure (--tag-grammar, --expose)
        self.reload_always = apply == "reload"   # the baseline: no runtime API at all
        self.live: RouteTable | None = None       # what HAProxy runs now (None: not known yet)
        self.reloads = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._snapshot: Snapshot | None = None
        self._new_templates: Mapping[str, str] | None = None
        self._last_input = 0.0
        self._reload_pending_since: float | None = None
        self._logged_problems: frozenset[Problem] = frozenset()
        self._refused: tuple[RouteTable, Mapping[str, str]] | None = None  # retried only once changed
        self._base: Snapshot | None = None        # the snapshot `live` was built from
        # The services changed between `_base` and the newest snapshot, and between the one `step`
        # last took and the newest (None: not known, compare them all), from the snapshots' own sets.
        self._since_base: frozenset[str] | None = None
        self._since_taken: frozenset[str] | None = None
        self._write = GuardedWrites("configuration", "HAProxy keeps serving (changes still apply live)", RETRY)
        self.writer = ConfigWriter(haproxy, listeners, self._write, stop)   # the files after runtime changes
        self.checker = Checker(haproxy, listeners, stop, self._wake)        # HAProxy compared with `live`
        self._start_error: str | None = None       # why HAProxy last failed to restart; logged once
        self.reconcile_every = reconcile_every
        self.refill = Refill(NO_POOL if self.reload_always else listeners.spares)   # edge.refill
        self._reconcile_due: str | None = None     # why HAProxy's servers are to be checked now
        self._add_backend_refused = False          # HAProxy refused `add backend`: spares from then on

    # --- inputs, from other threads ----------------------------------------------------------
    def on_snapshot(self, snapshot: Snapshot) -> None:
        with self._lock:
            follows = (snapshot.changed is not None and self._snapshot is not None
                       and snapshot.after == self._snapshot.serial)
            self._since_base = (self._since_base | snapshot.changed
                                if follows and self._since_base is not None else None)
            self._since_taken = (self._since_taken | snapshot.changed
                                 if follows and self._since_taken is not None else None)
            self._snapshot = snapshot
            self._last_input = time.monotonic()
            if snapshot.full:
                self._reconcile_due = "after a full sync of Consul"
        self._wake.set()

    def on_templates(self, templates: Mapping[str, str]) -> None:
        with self._lock:
            self._new_templates = templates
        self._wake.set()

    def wake(self) -> None:
        """Something beside the routes changed (certificates): come round now."""
        self._wake.set()

    # --- start-up ----------------------------------------------------------------------------
    def start(self) -> None:
        """Bring HAProxy up before the first sync: the one a previous edge left serving (adopted
        by the caller), else the previous configuration if it is still valid (a restart keeps
        serving what it served), else an empty table."""
        paths = self.haproxy.paths
        self.haproxy.clean_staging()
        if self.haproxy.running():
            log.info("took over the HAProxy (pid %d) a previous edge left serving; it serves %s until "
                     "Consul answers", self.haproxy.pid, paths.config)
            return
        if paths.config.is_file():
            try:
                self.haproxy.check(paths.state_dir)
                self.haproxy.start()
                log.info("HAProxy serves the previous %s until Consul answers", paths.config)
                return
            except HAProxyError as exc:
                log.warning("previous %s not usable (%s); starting with no routes", paths.config, exc)
                self.haproxy.stop()
        rendered = render(RouteTable(), self.listeners, self.templates)
        while not self.writer.install(lambda: self.haproxy.install(rendered)):
            if self.stop.wait(RETRY):
                return
        self.haproxy.start()
        log.info("HAProxy started with no routes; waiting for Consul")

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        self.start()
        if self.stop.is_set():
            return
        self.step_certs()          # certificates need no routes: serve them before the first sync
        threading.Thread(target=self.writer.run, name="config-writer", daemon=True).start()
        threading.Thread(target=self.checker.run, name="haproxy-checker", daemon=True).start()
        next_supervise = time.monotonic() + SUPERVISE_EVERY
        next_reconcile = time.monotonic() + self.reconcile_every
        while not self.stop.is_set():
            self._wake.wait(QUIET if self._reload_pending_since is not None else SUPERVISE_EVERY)
            self._wake.clear()
            if self.stop.is_set():
                break
            if time.monotonic() >= next_supervise:
                self.supervise()
                next_supervise = time.monotonic() + SUPERVISE_EVERY
            self.step()
            with self._lock:
                why, self._reconcile_due = self._reconcile_due, None
            if why is None and time.monotonic() >= next_reconcile:
                why = "periodic check"
            if why is not None and self.live is not None:
                # Backends added live whose deletion HAProxy refused are tried again first; the
                # comparison itself runs on the checker's thread (edge.haproxy.checker).
                self._delete_backends(kept_backends(self.live, self._caps()), again=True)
                self.checker.request(self.live, why)
                next_reconcile = time.monotonic() + self.reconcile_every
            if (checked := self.checker.take()) is not None:
                self._put_back(checked)
            if (low := self.refill.due(self.live, self._last_input)) is not None:
                self._reload(self.live, (low,), (), self.templates)
            self.step_certs()
        self.flush()

    def step(self) -> None:
        with self._lock:
            snapshot, templates, since = self._snapshot, self._new_templates, self._since_base
            self._new_templates, self._since_taken = None, frozenset()
        if templates is not None:
            self._try_templates(templates)
        if snapshot is None or snapshot is self._base:
            return
        table = self._table(snapshot, since)
        self._log_problems(snapshot.problems + table.problems)
        caps, pool = self._caps(), self.listeners.spares
        if not self.reload_always:
            table = assign(self.live, mark(self.live, retire(self.live, table, pool), caps, pool), pool)
        plan = make_plan(self.live, table, self.listeners.domains, pool, caps)
        if plan.reload or self.reload_always:
            table = release(table)   # a reload gives every route its own backend again
        if plan.empty:
            self.live = table
            self._based_on(snapshot)
            self._reload_pending_since = None
            return
        self._apply(table, plan)
        if self.live is table:
            self._based_on(snapshot)
            if snapshot.full:
                # A full sync built the whole table (at 10,000 services, a heap of ~1 M objects):
                # the collector scans it no more, or each full collection takes 0.1-0.7 s of the
                # interpreter while changes wait. Replaced parts are still freed (they hold no cycles).
                gc.freeze()
            how = "reload" if plan.reload or self.reload_always else "live"
            self.metrics.change_applied(how, plan.reasons, snapshot.seen_at, len(table.routes),
                                        lambda: sum(r.healthy for r in table.routes))
            self._delete_backends(plan.deletions)

    def _caps(self):
        """What the running HAProxy accepts (its probe), less `add backend` once it refused one."""
        caps = self.haproxy.caps
        return replace(caps, commands=caps.commands - {"add backend"}) if self._add_backend_refused else caps

    def step_certs(self) -> None:
        """The certificate stage, beside the routes; a runtime failure there is a reload (the
        stage wrote its files first, so the reload loads the new certificates)."""
        if self.certs is not None and not self.certs.step(self.live) and self.live is not None:
            self._reload(self.live, ("certificate change through the runtime API failed",), (), self.templates)

    def _table(self, snapshot: Snapshot, since: frozenset[str] | None) -> RouteTable:
        """The desired table: only the routes of services that changed since `live` was built
        (`since`, as the snapshots said; compared one by one when they could not say)."""
        if self.live is None or self._base is None:
            return build_table(snapshot.services, self.live, self.min_slots, self.rules)
        old, new = self._base.services, snapshot.services
        changed = set(since) if since is not None else \
            {n for n in old.keys() | new.keys() if old.get(n) is not new.get(n) and old.get(n) != new.get(n)}
        return update_table(self.live, new, changed, self.min_slots, self.rules)

    def _based_on(self, snapshot: Snapshot) -> None:
        """`live` is built from `snapshot` now: what changed since is what arrived after it."""
        self._base = snapshot
        with self._lock:
            self._since_base = self._since_taken

    def flush(self) -> None:
        """The files hold the live state now, written on this thread (before HAProxy restarts from
        them, at stop); otherwise the writer's thread writes them once inputs are quiet."""
        self.writer.write_now()

    def _apply(self, table: RouteTable, plan: Plan) -> None:
        reasons = plan.reasons
        if not plan.reload and not self.reload_always:
            self._runtime(table, plan)
            return
        if not plan.reload:
            reasons = (f"--apply reload: {len(plan.changes)} server change(s)",)
        now = time.monotonic()
        # Held back: already refused and logged (wait for Consul or the templates to change), or
        # the state dir refused the last write (wait before trying again)...
        if self._refused == (table, self.templates) or self._write.waiting:
            self._meanwhile(table)
            return
        first = self._reload_pending_since = self._reload_pending_since or now
        if now - self._last_input < QUIET and now - first < MAX_DELAY:
            self._meanwhile(table)
            return  # ...or a burst still settling; the loop comes back after QUIET
        self._reload_pending_since = None
        if not self._reload(table, reasons, plan.changes, self.templates):
            self._meanwhile(table)

    def _meanwhile(self, table: RouteTable) -> None:
        """While a reload waits, instance changes of the routes HAProxy has still go live."""
        if self.reload_always or self.live is None:
            return
        partial = runtime_part(self.live, table)
        plan = make_plan(self.live, partial)
        if plan.commands:
            self._runtime(partial, plan)

    def supervise(self) -> None:
        """HAProxy must be up with a current worker; the file on disk is what it ran."""
        if not self.haproxy.running():
            log.error("HAProxy exited (status %s); restarting it from %s", self.haproxy.exit_status(),
                      self.haproxy.paths.config)
            self.flush()  # the file must hold the live state before HAProxy reads it
            try:
                self.haproxy.start()
                if self.live is not None:
                    self.live = loaded(self.live)   # every backend now from the files, none added live
                log.info("HAProxy restarted with the last applied configuration")
                self._start_error = None
                with self._lock:
                    self._reconcile_due = "after HAProxy restarted"
            except HAProxyError as exc:
                (log.debug if str(exc) == self._start_error else log.error)("HAProxy does not start: %s", exc)
                self._start_error = str(exc)
            return
        if self.haproxy.current_worker() is None:
            log.error("HAProxy has no current worker; reloading")
            try:
                self.haproxy.reload()
            except HAProxyError as exc:
                log.error("reload to replace the lost worker failed: %s", exc)

    def reconcile(self, why: str) -> None:
        """Compare the server slots and maps HAProxy serves with the table the edge applied, and
        put back whatever differs, here and now (the loop runs the comparison on the checker's
        thread instead). Backends added live whose deletion HAProxy refused (a client still
        holding a connection to a server) are tried again first."""
        if self.live is None:
            return
        self._delete_backends(kept_backends(self.live, self._caps()), again=True)
        if (checked := check(self.haproxy, self.listeners, self.live, why)) is not None:
            self._put_back(checked)

    def _put_back(self, checked: Checked) -> None:
        """What differs, put back: runtime commands, or a reload when backends or maps differ. A
        comparison with a table that is no longer the live one is dropped (the next check)."""
        plan = checked.plan
        if plan.empty or checked.table is not self.live:
            return
        log.warning("HAProxy does not serve the table the edge applied (%s): %s", checked.why,
                    "; ".join(plan.reasons + plan.changes))
        if plan.reload or self.reload_always:
            self._reload(self.live, plan.reasons or ("HAProxy's servers differed from the applied table",),
                         plan.changes, self.templates)
        else:
            self._runtime(self.live, plan)

    # --- applying ----------------------------------------------------------------------------
    def _runtime(self, table: RouteTable, plan: Plan) -> None:
        t0 = time.perf_counter()
        try:
            self.haproxy.runtime(plan.commands)
        except RuntimeFailed as exc:
            log.warning("runtime API failed (%s); applying by reload instead", exc)
            if any(c.startswith("add backend ") for c in exc.commands) and not self._add_backend_refused:
                self._add_backend_refused = True
                log.warning("HAProxy refused add backend: new vhosts take spare backends from now on")
            self._reload(table, (f"runtime API failed: {exc}",), plan.changes, self.templates)
            return
        applied_ms = (time.perf_counter() - t0) * 1000
        pool = self.listeners.spares
        if pool.size and self.live is not None:
            free, before = len(pool.free(table)), len(pool.free(self.live))
            if free < before and free <= low_water(pool):      # once per spare taken, not per change
                log.warning("spare backends running low: %d of %d free (a reload refills the pool once "
                            "Consul is quiet)", free, pool.size)
        self.live = table
        self._spares_taken()
        self.writer.changed(table, self.templates)
        log.info("applied %d server change(s) live in %.1f ms, no reload: %s",
                 len(plan.changes), applied_ms, "; ".join(plan.changes) or "slots only")

    def _delete_backends(self, deletions: tuple[tuple[str, tuple[str, ...]], ...], again: bool = False) -> None:
        """Delete the backends added live of routes just removed (edge.routing.dynamic); one HAProxy
        refuses (a connection still attached to a server, the configuration naming it) stays
        retired, and is tried again at each reconcile until a reload drops it."""
        for name, commands in deletions:
            try:
                self.haproxy.runtime(commands)
            except RuntimeFailed as exc:
                (log.debug if again else log.warning)(
                    "kept the empty backend of removed route %s (tried again later; a reload drops it): %s", name, exc)
                continue
            self.live = forget(self.live, name)
            self.writer.changed(self.live, self.templates)
            log.info("deleted the backend of removed route %s live (del backend)", name)

    def _reload(self, table: RouteTable, reasons: tuple[str, ...], changes: tuple[str, ...],
                templates: Mapping[str, str]) -> bool:
        t0 = time.perf_counter()
        table = release(table)      # every route on its own backend; the whole spare pool free again
        try:
            rendered = render(table, self.listeners, templates)
            if not self.writer.install(lambda: self.haproxy.install(rendered)):
                return False
        except (TemplateError, ConfigInvalid) as exc:
            log.error("new configuration refused (%s): %s; HAProxy keeps serving the current one",
                      "; ".join(reasons), exc)
            self._refused = (table, templates)
            self.metrics.config_rejected()
            return False
        try:
            if self.haproxy.running():
                worker = self.haproxy.reload()
            else:
                self.haproxy.start()
                worker = self.haproxy.current_worker()
        except (ReloadFailed, NotRunning) as exc:
            log.error("reload failed (%s): %s; the previous worker keeps serving", "; ".join(reasons), exc)
            if self.live is not None:
                self._restore_files()
            return False
        self.live = table
        self._spares_taken()
        self._refused = None
        self.reloads += 1
        servers = sum(r.healthy for r in table.routes)
        log.info("reloaded HAProxy in %.0f ms (worker %s) because %s: %d routes, %d servers%s",
                 (time.perf_counter() - t0) * 1000, worker, "; ".join(reasons), len(table.routes), servers,
                 (": " + "; ".join(changes)) if changes and len(changes) <= 20 else "")
        return True

    def _spares_taken(self) -> None:
        if self.listeners.spares.size:
            self.metrics.spares_taken({self.live.backend_of(name): name for name in self.live.spares.values()})

    def _restore_files(self) -> None:
        """The files of the configuration the previous worker runs, back in place."""
        try:
            rendered = render(self.live, self.listeners, self.templates)
            self.writer.install(lambda: self.haproxy.install(rendered))
        except (HAProxyError, TemplateError) as exc:
            log.error("could not restore the running configuration's files: %s", exc)

    def _try_templates(self, templates: Mapping[str, str]) -> None:
        if templates == self.templates:
            return
        if self.live is None:
            self.templates = templates
            return
        if self._reload(self.live, ("templates changed",), (), templates):
            self.templates = templates
        else:
            log.error("template change not applied; the previous templates stay in use until the next edit")

    def _log_problems(self, problems: tuple[Problem, ...]) -> None:
        current = frozenset(problems)
        for problem in sorted(current - self._logged_problems):
            log.warning("skipped %s", problem)
        self._logged_problems = current
