"""The edge's own metrics in Prometheus text, served on a unix socket in the state dir.

HAProxy's admin listener serves its own `/metrics`; its `/edge/metrics` is routed to this socket
(templates/haproxy.cfg.j2), so one scrape target gives both. Narrow interfaces: the watcher tells
of Consul requests, stale retries and full refreshes; the control loop of what it applied (live or
by reload, and why), of refused configurations, of the table it serves and of the route each spare
backend taken live serves (HAProxy's own labels cannot change without a reload); the HTTPS work sets
certificate expiry and counts the certificates it refuses. Each recorder keeps its own registry (no
global state), so tests can run several.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

METRICS_SOCKET = "edge-metrics.sock"   # in the state dir, next to HAProxy's sockets

# Reload reasons as the plan words them, reduced to a few label values.
REASONS = (("initial sync", "initial_sync"), ("vhost added", "vhost_added"), ("vhost removed", "vhost_removed"),
           ("hosts of", "hosts_changed"), ("grew from", "slots_grown"), ("--apply reload", "apply_reload"),
           ("runtime API failed", "runtime_failed"), ("templates changed", "templates"),
           ("spare backends", "spares_refill"))


def reason_labels(reasons: tuple[str, ...]) -> tuple[str, ...]:
    """The label of each kind of reason a reload has, once each, in the plan's order: a reload
    that adds a vhost and removes another is both."""
    labels = (next((label for words, label in REASONS if words in reason), "other") for reason in reasons)
    return tuple(dict.fromkeys(labels))


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edge_consul_requests", "Requests to Consul, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.stale = Counter("edge_consul_stale_retries", "Stale answers read again consistently", registry=r)
        self.refreshes = Counter("edge_consul_full_refreshes", "Full reads of every service, by reason",
                                 ["reason"], registry=r)
        self.latency = Histogram("edge_change_apply_seconds",
                                 "From the Consul answer that moved the index to the change applied in HAProxy",
                                 ["how"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.applied = Counter("edge_changes_applied",
                               "Changes applied: live (runtime API) or by reload, by reason (a reload with "
                               "reasons of several kinds counts under each)", ["how", "reason"], registry=r)
        self.rejected = Counter("edge_config_rejected", "Rendered configurations HAProxy refused", registry=r)
        self.routes = Gauge("edge_routes", "Routes (vhosts) served", registry=r)
        self.servers = Gauge("edge_servers", "Healthy servers across all routes", registry=r)
        self.spare_route = Gauge("edge_spare_route",
                                 "1 for each spare backend a route took live: HAProxy's own metrics name it "
                                 "be_spare_K until the next reload; join on proxy=backend for the route",
                                 ["backend", "route"], registry=r)
        self.cert_expiry = Gauge("edge_certificate_expiry_timestamp_seconds",
                                 "When each served certificate expires (Unix time)", ["name"], registry=r)
        self.cert_refused = Gauge("edge_certificates_refused",
                                  "Certificates offered but not served, by reason (expired, not_yet_valid, "
                                  "outside_domains, invalid)", ["reason"], registry=r)

    # --- the watcher's interface -------------------------------------------------------------
    def consul_request(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint, outcome).inc()

    def full_refresh(self, reason: str) -> None:
        self.refreshes.labels(reason).inc()

    def stale_retry(self) -> None:
        self.stale.inc()

    # --- the control loop's interface ----------------------------------------------------------
    def change_applied(self, how: str, reasons: tuple[str, ...], seen_at: float, routes: int,
                       servers: Callable[[], int]) -> None:
        """`how`: live or reload; `seen_at`: time.monotonic() when Consul's answer arrived (0: unknown);
        `servers` counts the healthy servers when the metrics are read (at 10,000 routes the count
        costs more than the change)."""
        for reason in ("instances",) if how == "live" else reason_labels(reasons):
            self.applied.labels(how, reason).inc()
        if seen_at:
            self.latency.labels(how).observe(max(0.0, time.monotonic() - seen_at))
        self.routes.set(routes)
        self.servers.set_function(servers)

    def spares_taken(self, routes: Mapping[str, str]) -> None:
        """Spare backend → the route that took it live; every spare not named is free."""
        self.spare_route.clear()
        for backend, route in routes.items():
            self.spare_route.labels(backend, route).set(1)

    def config_rejected(self) -> None:
        self.rejected.inc()

    # --- certificates (the HTTPS work) -----------------------------------------------------------
    def certificate_expires(self, name: str, not_after: float | None) -> None:
        """Set (a Unix time) or forget (None) the expiry of the certificate served for `name`."""
        if not_after is None:
            with contextlib.suppress(KeyError):
                self.cert_expiry.remove(name)
        else:
            self.cert_expiry.labels(name).set(not_after)

    def certificates_refused(self, counts: dict[str, int]) -> None:
        """How many offered certificates are not served now, by reason."""
        for reason, count in counts.items():
            self.cert_refused.labels(reason).set(count)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class NoMetrics:
    """For code run without a recorder (one-shot commands, tests)."""

    def consul_request(self, endpoint: str, outcome: str) -> None: ...
    def full_refresh(self, reason: str) -> None: ...
    def stale_retry(self) -> None: ...
    def change_applied(self, how, reasons, seen_at, routes, servers) -> None: ...
    def spares_taken(self, routes) -> None: ...
    def config_rejected(self) -> None: ...
    def certificate_expires(self, name: str, not_after: float | None) -> None: ...
    def certificates_refused(self, counts: dict[str, int]) -> None: ...


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        request, _ = super().get_request()
        return request, ("unix", 0)      # http.server logs a client address; a unix peer has none


class MetricsServer:
    """`GET /edge/metrics` (any path) on a unix socket (mode 0600) that HAProxy's admin frontend proxies to."""

    def __init__(self, metrics: EdgeMetrics, path: Path):
        self.metrics, self.path = metrics, path

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805 - the handler instance; `self` is the server's owner
                body = metrics.text()
                handler.send_response(200)
                handler.send_header("Content-Type", CONTENT_TYPE_LATEST)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):  # noqa: N805
                pass
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o177)
        try:
            self.server = _Server(str(path), Handler)
        finally:
            os.umask(old)
        self.thread = threading.Thread(target=self.server.serve_forever, name="edge-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
