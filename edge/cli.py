"""`haproxy-consul edge [routes] [options]`: wiring of settings, watcher, loop and HAProxy.

This is the only module of the edge that decides exit codes: 0 done, 1 runtime failure
(Consul or HAProxy unusable for a one-shot command, the state dir or a listener address taken
by someone else), 2 bad input (options or templates).

Signals: SIGINT stops the edge and its HAProxy (gracefully). SIGTERM does the same with
`--handover-timeout 0`; otherwise the edge exits at once and leaves HAProxy serving for a new
edge to adopt (`edge.haproxy.ownership`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from edge import templates_source
from edge.acme.issuer import Issuer
from edge.consul.fleet import Member
from edge.consul.fleetstore import Store, endpoint
from edge.consul.kv import ConsulKV
from edge.consul.nodes import CatalogReader, NodesWatcher
from edge.consul.watch import CONSUL_ERRORS, ConsulWatcher, Reader, Snapshot, Stats
from edge.control import Edge
from edge.haproxy.ownership import Busy, StateLock, check_free, hand_over
from edge.haproxy.process import HAProxy, HAProxyError, Paths
from edge.metrics import METRICS_SOCKET, EdgeMetrics, MetricsServer
from edge.routing.render import REQUIRED_TEMPLATES, ConsulUi, Listeners, TemplateError, render, validate
from edge.routing.spares import SparePool
from edge.routing.table import RouteTable, TagRules, build_table
from edge.settings import Settings, parse
from edge.tls.ocsp import Stapler
from edge.tls.sources import DirSource, KVSource
from edge.tls.stage import CertPaths, CertStage
from haproxy_consul import __version__, consul_api, logs

log = logging.getLogger("edge")


# glibc's mallopt: M_MMAP_THRESHOLD, and the value it has by default before glibc moves it.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def _large_blocks_go_back() -> None:
    """glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, so the
    next renders of haproxy.cfg (8 MB of text at 10,000 routes, and its bytes) come from the heap,
    fragment it and stay in the RSS: 50-60 MB more after a few changes. A fixed threshold keeps
    large blocks mapped on their own, given back to the system when freed. Elsewhere (musl, not
    Linux) there is nothing to set."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    settings = parse(argv, environ)
    logs.setup(settings.log_level)
    _large_blocks_go_back()
    for warning in settings.consul.warnings():
        log.warning("%s", warning)
    template_dir = settings.templates or templates_source.bundled()
    try:
        templates = templates_source.load(template_dir)
    except OSError as exc:
        log.error("cannot read templates in %s: %s", template_dir, exc)
        return 2
    missing = [t for t in REQUIRED_TEMPLATES if t not in templates]
    if missing:
        log.error("template directory %s lacks %s", template_dir, ", ".join(missing))
        return 2
    paths = Paths(settings.state_dir)
    cert_paths = CertPaths(settings.state_dir / "certs")
    metrics_socket = settings.state_dir / METRICS_SOCKET
    listeners = Listeners(settings.bind, settings.admin_bind, str(paths.runtime_socket), settings.domains,
                          timeout_tunnel=settings.timeout_tunnel, hard_stop_after=settings.hard_stop_after,
                          max_reloads=settings.worker_max_reloads,
                          https=cert_paths.https(settings.https_bind, settings.https_redirect, settings.hsts)
                          if settings.https_bind else None,
                          metrics_socket=str(metrics_socket) if not (settings.once or settings.dry_run) else "",
                          trusted_proxies=settings.trusted_proxies, proxy_protocol=settings.proxy_protocol,
                          landing_list_from=settings.landing_list_from,
                          consul_ui=ConsulUi(settings.consul_ui_bind, settings.consul_ui_server)
                          if settings.consul_ui_bind else None,
                          # --apply reload is the baseline of a reload per change: no spares there.
                          spares=SparePool(settings.spare_backends if settings.apply == "runtime" else 0,
                                           settings.min_slots))
    stop = threading.Event()

    if settings.command == "routes":
        return _routes(settings, stop)
    try:
        validate(listeners, templates)
    except TemplateError as exc:
        log.error("templates in %s do not render: %s", template_dir, exc)
        return 2
    if settings.dry_run:
        return _dry_run(settings, listeners, templates, stop)
    try:
        paths.check_socket_lengths()
        _state_dir(settings.state_dir)
    except (ValueError, OSError) as exc:
        log.error("state dir: %s", exc)
        return 2
    lock = StateLock(settings.state_dir)
    try:
        lock.acquire()
    except Busy as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("state dir %s: cannot take its lock: %s", settings.state_dir, exc)
        return 1
    haproxy = HAProxy(settings.haproxy, paths)
    certs = (CertStage(haproxy, cert_paths, settings.domains, wake=lambda: None, redirect=settings.https_redirect,
                       suffixes=settings.cert_suffixes)
             if settings.https_bind else None)
    try:
        if certs is not None:
            try:
                certs.prepare()
            except OSError as exc:
                log.error("certificates in %s: %s", cert_paths.directory, exc)
                return 1
        if settings.once:
            return _once(settings, haproxy, listeners, templates, stop)
        return _serve(settings, haproxy, listeners, templates, template_dir, stop, lock, certs)
    finally:
        lock.release()


def _rules(settings: Settings) -> TagRules:
    binds = (settings.bind, settings.admin_bind, settings.https_bind or "")
    return TagRules(settings.tag_grammars, settings.expose == "all",
                    frozenset(int(b.rsplit(":", 1)[1]) for b in binds if b), settings.https_bind is not None)


def _state_dir(path) -> None:
    """Create the state dir (0750) if missing; an existing one is used as it is (e.g. a 2770 dir of
    another owner shared through its group) as long as we can create and remove files in it."""
    if not path.exists():
        path.mkdir(mode=0o750, parents=True)
    if not path.is_dir():
        raise OSError(f"{path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OSError(f"{path}: this user (uid {os.getuid()}) cannot create files in it")


def _watcher(settings: Settings, stop: threading.Event, publish=lambda s: None, metrics=None) -> ConsulWatcher:
    return ConsulWatcher(settings.consul, settings.datacenter, publish, stop, wait=settings.consul_wait,
                         api=settings.consul_api, consistency=settings.consistency, max_stale=settings.max_stale,
                         metrics=metrics)


def fleet_member(settings: Settings, stop: threading.Event, deliver, metrics) -> Member:
    """The fleet member (`--fleet`): its KV store, its catalog reader (per node while the catalog
    has at most --max-node-watches nodes, else the summary watcher) and its ACL guard."""
    http = consul_api.ConsulHTTP(settings.consul, settings.datacenter, timeout=10.0,
                                 on_request=lambda path, outcome: metrics.consul_request(endpoint(path), outcome))
    store = Store(Reader(http, settings.consistency, settings.max_stale, Stats(), metrics),
                  ConsulKV(consul_api.factory(settings.consul, settings.datacenter)), settings.fleet_prefix)

    def make_reader(publish, reader_stop: threading.Event, publishing: bool) -> CatalogReader:
        # The publisher is one reader for the whole fleet: nothing to spread over the servers, and the
        # leader answers a heartbeat sooner than a stale server would (see edge.consul.fleetstore).
        reads = replace(settings, consistency="default") if publishing and settings.consistency == "stale" \
            else settings
        per_node = None
        if settings.max_node_watches:
            def per_node():
                return NodesWatcher(reads.consul, reads.datacenter, publish, reader_stop, wait=reads.consul_wait,
                                    consistency=reads.consistency, max_stale=reads.max_stale,
                                    max_nodes=reads.max_node_watches, metrics=metrics)
        return CatalogReader(per_node, lambda: _watcher(reads, reader_stop, publish, metrics), reader_stop)

    return Member(store, deliver, stop, make_reader, lambda accepted: _watcher(settings, stop, accepted, metrics),
                  f"{socket.gethostname()}:{os.getpid()}")


def _snapshot_now(settings: Settings, stop: threading.Event) -> Snapshot | None:
    try:
        return _watcher(settings, stop).sync_once()
    except CONSUL_ERRORS as exc:
        log.error("consul at %s: %s", settings.consul, exc)
        return None


def _routes(settings: Settings, stop: threading.Event) -> int:
    snapshot = _snapshot_now(settings, stop)
    if snapshot is None:
        return 1
    table = build_table(snapshot.services, rules=_rules(settings))
    for problem in snapshot.problems + table.problems:
        log.warning("skipped %s", problem)
    sys.stdout.write(format_routes(table, settings.domains))
    return 0


def format_routes(table: RouteTable, domains: tuple[str, ...]) -> str:
    """The vhosts with their health, then every router: its match, backend, options and origin."""
    rows = [("VHOST", "HEALTHY", "SERVERS")]
    for route in table.routes:
        hosts = ([f"{route.name}.{d}" for d in domains] or [f"{route.name}.*"]) if route.vhost else []
        servers = ", ".join(f"{s.address}:{s.port}" for s in route.servers) or "-"
        for host in hosts + list(route.hosts):
            rows.append((host, f"{route.healthy}/{route.instances}", servers))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]}".rstrip() for r in rows]
    text = "\n".join(lines) + f"\n{len(table.routes)} route(s)\n"
    if not table.routers:
        return text
    rows = [("ROUTER", "BACKEND", "OPTIONS", "ORIGIN")]
    for router in table.routers:
        route = table.get(router.backend)
        options = " ".join(router.options() + (route.options.words() if route else ())) or "-"
        backend = f"{'be' if router.kind == 'http' else 'tcp'}_{router.backend}"
        rows.append((router.describe(), backend, options, str(router.origin)))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]:<{width[2]}}  {r[3]}" for r in rows]
    return text + "\n" + "\n".join(lines) + f"\n{len(table.routers)} router(s)\n"


def _dry_run(settings: Settings, listeners: Listeners, templates, stop) -> int:
    table = RouteTable()
    if settings.once:
        snapshot = _snapshot_now(settings, stop)
        if snapshot is None:
            return 1
        table = build_table(snapshot.services, None, settings.min_slots, _rules(settings))
    try:
        sys.stdout.write(render(table, listeners, templates)["haproxy.cfg"])
    except TemplateError as exc:
        log.error("templates: %s", exc)
        return 2
    return 0


def _once(settings: Settings, haproxy: HAProxy, listeners: Listeners, templates, stop) -> int:
    snapshot = _snapshot_now(settings, stop)
    if snapshot is None:
        return 1
    table = build_table(snapshot.services, None, settings.min_slots, _rules(settings))
    for problem in snapshot.problems + table.problems:
        log.warning("skipped %s", problem)
    try:
        haproxy.install(render(table, listeners, templates))
    except TemplateError as exc:
        log.error("templates do not render for the current table, nothing written: %s", exc)
        return 2
    except HAProxyError as exc:
        log.error("configuration refused, nothing written: %s", exc)
        return 1
    log.info("wrote %s: %d routes", haproxy.paths.config, len(table.routes))
    if haproxy.current_worker() is None:
        log.info("no HAProxy master answers on %s; not reloading", haproxy.paths.master_socket)
        return 0
    try:
        worker = haproxy.reload()
    except HAProxyError as exc:
        log.error("reload failed: %s", exc)
        return 1
    log.info("reloaded HAProxy (worker %s) because --once", worker)
    return 0


def _cert_sources(settings: Settings) -> list[str]:
    return ([f"files in {settings.certs}"] if settings.certs else []) + [f"consul kv {settings.certs_kv}"] + (
        [f"acme {settings.acme.directory}" + (" dns-01" if settings.acme.dns else " http-01")]
        if settings.acme else [])


def _haproxy_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not runnable ({exc})"


def _serve(settings: Settings, haproxy: HAProxy, listeners: Listeners, templates, template_dir, stop,
           lock: StateLock, certs: CertStage | None) -> int:
    log.info("haproxy-consul edge %s; %s; consul %s%s; domains %s; http %s; https %s; admin %s; state %s; "
             "templates %s; apply %s",
             __version__, _haproxy_version(settings.haproxy), settings.consul.describe(),
             f" dc={settings.datacenter}" if settings.datacenter else "",
             ",".join(settings.domains) or "(any)", settings.bind,
             f"{settings.https_bind} (certificates: {', '.join(_cert_sources(settings))})" if settings.https_bind
             else "off", settings.admin_bind, settings.state_dir, template_dir, settings.apply)
    if haproxy.adopt() is None:
        try:
            check_free({"--bind": settings.bind, "--admin-bind": settings.admin_bind,
                        **({"--https-bind": settings.https_bind} if settings.https_bind else {})})
        except Busy as exc:
            log.error("%s", exc)
            return 1
    metrics = EdgeMetrics()
    try:
        server = MetricsServer(metrics, Path(listeners.metrics_socket)).start()
    except OSError as exc:
        log.error("cannot serve the edge's metrics on %s: %s", listeners.metrics_socket, exc)
        return 1
    edge = Edge(haproxy, listeners, templates, stop, settings.min_slots, settings.apply, certs, metrics=metrics,
                rules=_rules(settings), reconcile_every=settings.reconcile_every)
    watcher = (fleet_member(settings, stop, edge.on_snapshot, metrics) if settings.fleet
               else _watcher(settings, stop, edge.on_snapshot, metrics))
    threads = [threading.Thread(target=watcher.run, name="consul-watch", daemon=True)]
    dir_source = None
    if certs is not None:
        certs.wake, certs.metrics = edge.wake, metrics
        for cert in certs.live.values():        # what the last run left, served from the start
            metrics.certificate_expires(cert.name, cert.not_after.timestamp())
        kv = ConsulKV(consul_api.factory(settings.consul, settings.datacenter))
        threads.append(threading.Thread(target=KVSource(kv, settings.certs_kv, certs.on_certs, certs.on_challenges,
                                                        stop, settings.consul_wait).run,
                                        name="certs-kv", daemon=True))
        if settings.ocsp_stapling:
            certs.stapler = Stapler(certs.on_ocsp, stop, certs.clock)
            threads.append(threading.Thread(target=certs.stapler.run, name="ocsp", daemon=True))
        if settings.certs is not None:
            dir_source = DirSource(settings.certs, certs.on_certs)
            dir_source.start()
        if settings.acme is not None:
            certs.issuer = Issuer(kv, settings.acme, stop)
            certs.wildcards = settings.acme.dns is not None
            threads.append(threading.Thread(target=certs.issuer.run, name="acme", daemon=True))
    handover = []

    def on_signal(signum, _frame):
        if signum == signal.SIGTERM and settings.handover_timeout > 0:
            handover.append(True)
        log.info("received %s; stopping%s", signal.Signals(signum).name,
                 " and handing HAProxy over" if handover else "")
        stop.set()
        edge._wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    observer = None
    if settings.templates is not None:
        observer = templates_source.watch(template_dir, lambda: edge.on_templates(templates_source.load(template_dir)))
    try:
        for thread in threads:
            thread.start()
        edge.run()
    except HAProxyError as exc:
        log.error("HAProxy: %s", exc)
        return 1
    finally:
        stop.set()
        if observer is not None:
            observer.stop()
        if dir_source is not None:
            dir_source.stop()
        if handover and haproxy.running():
            lock.release()     # the successor takes the lock, and HAProxy with it
            hand_over(settings.state_dir, haproxy.pid, haproxy.paths.config, settings.handover_timeout)
        else:
            haproxy.stop()
        server.stop()
        log.info("stopped after %d reload(s); consul requests: %s", edge.reloads, watcher.stats)
    return 0
