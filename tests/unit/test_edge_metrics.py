"""The edge's metrics: what each interface call records, reload reasons as labels, the socket
server, and a Grafana dashboard that only asks for metrics that exist."""

import json
import re
import socket
import time
from pathlib import Path

import pytest

from edge.metrics import EdgeMetrics, MetricsServer, reason_labels

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "haproxy-consul-edge.json"


@pytest.mark.parametrize("reasons, labels", [
    (("initial sync",), ("initial_sync",)),
    (("vhost added: a-80, b-80", "vhost removed: c-80"), ("vhost_added", "vhost_removed")),
    (("hosts of a-80 changed: [] -> ['x.org']", "hosts of b-80 changed: [] -> ['y.org']"), ("hosts_changed",)),
    (("a-80 grew from 4 to 8 slots",), ("slots_grown",)),
    (("--apply reload: 3 server change(s)",), ("apply_reload",)),
    (("runtime API failed: broken pipe",), ("runtime_failed",)),
    (("templates changed",), ("templates",)),
    (("something new",), ("other",)),
])
def test_reason_labels(reasons, labels):
    assert reason_labels(reasons) == labels


def test_a_reload_with_reasons_of_two_kinds_counts_under_both():
    m = EdgeMetrics()
    m.change_applied("reload", ("vhost added: a-80", "vhost removed: b-80", "vhost removed: c-80"), 0, 1, lambda: 1)
    text = m.text().decode()
    assert 'edge_changes_applied_total{how="reload",reason="vhost_added"} 1.0' in text
    assert 'edge_changes_applied_total{how="reload",reason="vhost_removed"} 1.0' in text


def sample(m: EdgeMetrics) -> str:
    m.consul_request("/v1/internal/ui/services", "ok")
    m.consul_request("/v1/health/service/<name>", "denied")
    m.full_refresh("unattributed")
    m.stale_retry()
    m.change_applied("live", (), time.monotonic() - 0.02, 3, lambda: 7)
    m.change_applied("reload", ("vhost added: x-80",), time.monotonic() - 0.3, 4, lambda: 8)
    m.config_rejected()
    m.certificate_expires("www.example.org", 1_900_000_000)
    return m.text().decode()


def test_every_interface_call_shows_in_the_text():
    text = sample(EdgeMetrics())
    for line in ['edge_consul_requests_total{endpoint="/v1/health/service/<name>",outcome="denied"} 1.0',
                 'edge_consul_full_refreshes_total{reason="unattributed"} 1.0',
                 "edge_consul_stale_retries_total 1.0",
                 'edge_changes_applied_total{how="live",reason="instances"} 1.0',
                 'edge_changes_applied_total{how="reload",reason="vhost_added"} 1.0',
                 'edge_change_apply_seconds_bucket{how="live",le="0.025"} 1.0',
                 "edge_routes 4.0", "edge_servers 8.0", "edge_config_rejected_total 1.0",
                 'edge_certificate_expiry_timestamp_seconds{name="www.example.org"} 1.9e+09']:
        assert line in text, line


def test_a_forgotten_certificate_leaves_the_gauge():
    m = EdgeMetrics()
    m.certificate_expires("a.org", 1.0)
    m.certificate_expires("a.org", None)
    assert 'name="a.org"' not in m.text().decode()


def test_served_on_a_private_unix_socket(tmp_path):
    m = EdgeMetrics()
    m.stale_retry()
    path = tmp_path / "m.sock"
    server = MetricsServer(m, path).start()
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(b"GET /edge/metrics HTTP/1.0\r\n\r\n")
            reply = b"".join(iter(lambda: s.recv(65536), b""))
        assert reply.startswith(b"HTTP/1.0 200") and b"edge_consul_stale_retries_total 1.0" in reply
    finally:
        server.stop()
    assert not path.exists()


def test_the_dashboard_asks_only_for_metrics_that_exist():
    names = set(re.findall(r"^(\w+?)(?:\{| )", sample(EdgeMetrics()), re.M))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b(edge_\w+)", e)}
    assert used and used <= names, used - names
