"""The edge under faults: Consul outage, bad templates, HAProxy killed, restarts, reload load; on
every supported HAProxy (tests/integration/conftest.py)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import templates_source
from edge.haproxy.process import HAProxy, Paths
from edge.routing.model import instances_from_health
from edge.routing.render import Listeners, render
from edge.routing.table import build_table
from tests.integration.edge_helpers import answers, deregister, logged, register, reloads
from tests.support.edge import REPO, EdgeProcess
from tests.support.http import Backend
from tests.support.procs import ConsulAgent, free_ports, require, wait_until
from tests.unit.test_edge_render import raw_entry

pytestmark = pytest.mark.integration
DOMAIN = "fault.example"


@pytest.fixture
def backend():
    b = Backend("alpha")
    yield b
    b.close()


@pytest.fixture
def edge_factory(consul, haproxy):
    made = []

    def make(**kwargs):
        made.append(EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path, **kwargs).start())
        return made[-1]
    yield make
    for e in made:
        e.stop()


def test_consul_outage_keeps_serving_and_converges_after(tmp_path, backend, haproxy):
    agent = ConsulAgent(tmp_path / "c", http_port=free_ports(1)[0]).start()
    edge = EdgeProcess(agent.url, domains=(DOMAIN,), haproxy=haproxy.path).start()
    try:
        register(agent, "steady", "steady-1", backend)
        answers(edge, f"steady-80.{DOMAIN}", {"alpha"})
        logged(edge, "+ steady-80")
        before = reloads(edge.log())
        agent.kill()
        # 8 s without Consul (four of the watcher's capped 2 s retries) under concurrent load (hey: 4
        # connections at 50 req/s each, bounded by -z).
        load = subprocess.run([require("hey"), "-z", "8s", "-c", "4", "-q", "50", "-host", f"steady-80.{DOMAIN}",
                               f"http://127.0.0.1:{edge.port}/"], capture_output=True, text=True, timeout=60).stdout
        codes = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", load))
        assert set(codes) == {"200"} and int(codes["200"]) > 500, load
        assert "Error distribution" not in load, load
        logged(edge, "serving the last known state")
        assert reloads(edge.log()) == before, "no empty (or any) configuration applied during the outage"

        agent.start()                                  # a fresh dev agent: services come back registered
        back = time.monotonic()
        register(agent, "steady", "steady-1", backend)
        second = Backend("beta")
        try:
            register(agent, "steady", "steady-2", second)
            answers(edge, f"steady-80.{DOMAIN}", {"alpha", "beta"}, timeout=15)
            assert time.monotonic() - back < 3, "the table converges within ~2 s of Consul's return"
            logged(edge, "consul answers again")
        finally:
            second.close()
    finally:
        edge.stop()
        agent.stop()


def test_unreachable_consul_at_start_serves_the_landing_page(tmp_path, haproxy):
    edge = EdgeProcess(f"http://127.0.0.1:{free_ports(1)[0]}", domains=(DOMAIN,), haproxy=haproxy.path).start()
    try:
        assert edge.get(f"x-80.{DOMAIN}")[0] == 404
        logged(edge, "failed")
        assert edge.proc.poll() is None
    finally:
        edge.stop()


def test_template_edit_refused_then_fixed(consul, backend, tmp_path, haproxy):
    templates = tmp_path / "templates"
    shutil.copytree(templates_source.bundled(), templates)
    register(consul, "tpl", "tpl-1", backend)
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path,
                       extra=("--templates", str(templates))).start()
    try:
        answers(edge, f"tpl-80.{DOMAIN}", {"alpha"})
        cfg = templates / "haproxy.cfg.j2"
        original = cfg.read_text()
        cfg.write_text(original.replace("    stats timeout 30s", "    stats timeout 30s\n    no-such-keyword 1"))
        logged(edge, "new configuration refused (templates changed)")
        logged(edge, "unknown keyword 'no-such-keyword'")   # HAProxy's own reason is in the log
        assert edge.get(f"tpl-80.{DOMAIN}") == (200, "alpha")
        assert "no-such-keyword" not in (edge.state_dir / "haproxy.cfg").read_text()

        cfg.write_text(original.replace("    balance roundrobin",
                                        "    balance roundrobin\n    http-response set-header X-Edge-Template v2"))
        logged(edge, "because templates changed")
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=5)
        conn.request("GET", "/", headers={"Host": f"tpl-80.{DOMAIN}"})
        assert conn.getresponse().getheader("X-Edge-Template") == "v2"
        conn.close()

        cfg.write_text("{% if %}")                   # a template that does not even parse
        logged(edge, "TemplateSyntaxError")
        assert edge.get(f"tpl-80.{DOMAIN}") == (200, "alpha")
    finally:
        edge.stop()
        deregister(consul, "tpl-1")


@pytest.mark.parametrize("victim", ["master", "worker"])
def test_killed_haproxy_is_restarted_with_the_live_state(edge_factory, consul, backend, victim, haproxy):
    edge = edge_factory()
    register(consul, "phoenix", "phoenix-1", backend)
    answers(edge, f"phoenix-80.{DOMAIN}", {"alpha"})
    master = int((edge.state_dir / "haproxy.pid").read_text().split()[0])
    if victim == "master":
        os.kill(master, signal.SIGKILL)
    else:
        # The current worker (an older one may still be draining after the first sync's reload).
        # (The master re-executes itself once more after a reload: ask until it answers.)
        worker = wait_until(HAProxy(haproxy.path, Paths(edge.state_dir)).current_worker, 5, what="the current worker")
        os.kill(worker, signal.SIGKILL)
    logged(edge, "HAProxy exited", timeout=5)
    answers(edge, f"phoenix-80.{DOMAIN}", {"alpha"}, timeout=10)
    deregister(consul, "phoenix-1")


def test_restart_serves_the_previous_state_before_consul_answers(tmp_path, backend, haproxy):
    agent = ConsulAgent(tmp_path / "c", http_port=free_ports(1)[0]).start()
    edge = EdgeProcess(agent.url, domains=(DOMAIN,), haproxy=haproxy.path).start()
    register(agent, "kept", "kept-1", backend)
    answers(edge, f"kept-80.{DOMAIN}", {"alpha"})
    edge.stop()
    agent.stop()
    again = EdgeProcess(agent.url, domains=(DOMAIN,), haproxy=haproxy.path, state_dir=edge.state_dir, port=edge.port,
                        admin_port=edge.admin_port)
    again.log_path = tmp_path / "again.log"
    again.start()
    try:
        assert again.get(f"kept-80.{DOMAIN}") == (200, "alpha")
        logged(again, "serves the previous")
    finally:
        again.stop()


class Prober:
    """Requests through the edge in a loop on one thread until stopped, counting failures."""

    def __init__(self, port: int, host: str):
        self.port, self.host = port, host
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        from tests.support.http import get
        while not self._stop.is_set():
            try:
                status, _ = get(self.port, self.host, timeout=5)
                self.ok += status == 200
                if status != 200:
                    self.failed += 1
                    self.errors.append(str(status))
            except OSError as exc:
                self.failed += 1
                self.errors.append(repr(exc))
            time.sleep(0.005)

    def stop(self):
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize("how", ["kill", "sigterm"])
def test_a_successor_adopts_the_haproxy_its_predecessor_left_and_no_request_fails(consul, backend, tmp_path, how,
                                                                                 haproxy):
    """kill -9 of the edge, or SIGTERM with a hand-over window: the next edge on the same state
    dir takes over the same HAProxy master; requests never stop being answered."""
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path, extra=("--handover-timeout", "30")).start()
    register(consul, "orphan", "orphan-1", backend)
    answers(edge, f"orphan-80.{DOMAIN}", {"alpha"})
    master = int((edge.state_dir / "haproxy.pid").read_text().split()[0])
    probe = Prober(edge.port, f"orphan-80.{DOMAIN}")
    again = None
    try:
        time.sleep(0.3)
        if how == "kill":
            edge.proc.kill()
        else:
            edge.proc.send_signal(signal.SIGTERM)
        assert edge.proc.wait(10) in (0, -9)
        again = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path, state_dir=edge.state_dir,
                            port=edge.port, admin_port=edge.admin_port, extra=("--handover-timeout", "30"))
        again.log_path = tmp_path / "again.log"
        again.start()
        logged(again, f"took over the HAProxy (pid {master})")
        logged(again, "because initial sync")                # the new edge's own configuration, by reload
        time.sleep(0.5)
        probe.stop()
        assert probe.failed == 0, probe.errors[:5]
        assert probe.ok > 20
        assert int((edge.state_dir / "haproxy.pid").read_text().split()[0]) == master   # the same master
        register(consul, "orphan", "orphan-2", Backend("beta"))
        answers(again, f"orphan-80.{DOMAIN}", {"alpha", "beta"})                          # and it is driven
    finally:
        probe.stop()
        if again is not None and again.proc.poll() is None:
            again.proc.send_signal(signal.SIGINT)               # Ctrl-C: stop HAProxy too, no hand-over
            again.proc.wait(15)
        deregister(consul, "orphan-1")
        deregister(consul, "orphan-2")
    wait_until(lambda: not os.path.exists(f"/proc/{master}"), 15, what="HAProxy to stop with the last edge")


def test_sigterm_with_no_successor_stops_haproxy_after_the_handover_timeout(consul, backend, haproxy):
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path, extra=("--handover-timeout", "1.5")).start()
    master = int((edge.state_dir / "haproxy.pid").read_text().split()[0])
    edge.proc.send_signal(signal.SIGTERM)
    edge.proc.wait(10)
    assert os.path.exists(f"/proc/{master}")                   # handed over: still serving
    assert edge.get("nobody.invalid")[0] == 404
    wait_until(lambda: not os.path.exists(f"/proc/{master}"), 15, what="the caretaker to stop HAProxy")
    logged(edge, f"no edge took over HAProxy (pid {master}) within 1.5s; stopping it")


def test_keepalive_load_sees_no_error_across_reloads(edge_factory, consul, backend):
    wrk = require("wrk")
    edge = edge_factory()
    register(consul, "load", "load-1", backend)
    answers(edge, f"load-80.{DOMAIN}", {"alpha"})
    logged(edge, "+ load-80")
    before = reloads(edge.log())
    spare = Backend("spare")
    stop = threading.Event()

    def churn_vhosts():                        # each add or remove of a vhost is a reload
        i = 0
        while not stop.is_set() and i < 10:
            register(consul, f"extra{i}", f"extra-{i}", spare)
            stop.wait(0.5)
            i += 1

    churner = threading.Thread(target=churn_vhosts)
    try:
        churner.start()
        out = subprocess.run([wrk, "-t", "2", "-c", "16", "-d", "7s", "--timeout", "5s",
                              "-H", f"Host: load-80.{DOMAIN}", f"http://127.0.0.1:{edge.port}/"],
                             capture_output=True, text=True, timeout=30).stdout
    finally:
        stop.set()
        churner.join()
        spare.close()
    done = reloads(edge.log()) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    assert done >= 5, f"only {done} reloads happened under load"
    assert requests > 1000
    assert "Socket errors" not in out, out
    assert "Non-2xx" not in out, out
    for i in range(10):
        deregister(consul, f"extra-{i}")


def test_what_haproxy_serves_is_put_back_when_it_differs_from_the_table(edge_factory, consul, backend):
    edge = edge_factory(extra=("--reconcile-every", "1"))
    register(consul, "kept", "kept-1", backend)
    answers(edge, f"kept-80.{DOMAIN}", {"alpha"})
    # A hand on the runtime socket, behind the edge's back: its only server in maintenance.
    HAProxy(require("haproxy"), Paths(edge.state_dir)).runtime(("set server be_kept-80/s1 state maint",))
    assert edge.get(f"kept-80.{DOMAIN}")[0] == 503
    answers(edge, f"kept-80.{DOMAIN}", {"alpha"}, timeout=5)
    # The periodic check (every second here), or the check after a full sync if one came meanwhile.
    wait_until(lambda: re.search(r"HAProxy does not serve the table the edge applied \((periodic check|after a "
                                 r"full sync of Consul)\): be_kept-80/s1 served", edge.log()), 5,
               what="the difference logged")
    deregister(consul, "kept-1")


def run_cli(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "haproxy_consul", "edge", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})})


def test_routes_once_and_dry_run(consul, backend, tmp_path):
    register(consul, "cli", "cli-1", backend)
    routes = run_cli("routes", "--consul", consul.url, "--domain", DOMAIN)
    assert routes.returncode == 0, routes.stderr
    assert re.search(rf"cli-80\.{DOMAIN}\s+1/1\s+127\.0\.0\.1:{backend.port}", routes.stdout)

    dry = run_cli("--dry-run", "--once", "--consul", consul.url, "--state-dir", str(tmp_path / "s"))
    assert dry.returncode == 0, dry.stderr
    assert f"server s1 127.0.0.1:{backend.port}" in dry.stdout
    assert not (tmp_path / "s").exists(), "--dry-run starts and writes nothing"
    assert "backend be_cli-80" not in run_cli("--dry-run", "--consul", consul.url).stdout

    state = Path(f"/tmp/once-{os.getpid()}")
    once = run_cli("--once", "--consul", consul.url, "--state-dir", str(state))
    try:
        assert once.returncode == 0, once.stderr
        assert "backend be_cli-80" in (state / "haproxy.cfg").read_text()
        assert "not reloading" in once.stderr
    finally:
        shutil.rmtree(state, ignore_errors=True)

    down = run_cli("routes", "--consul", f"http://127.0.0.1:{free_ports(1)[0]}")
    assert down.returncode == 1 and "consul at" in down.stderr
    bad = run_cli("--bind", "nonsense")
    assert bad.returncode == 2 and "ADDR:PORT" in bad.stderr
    deregister(consul, "cli-1")


HAPROXY_CHECK_DIR = Path(f"/tmp/hostile-check-{os.getpid()}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(max_size=40), st.lists(raw_entry, max_size=3), max_size=4))
def test_hostile_renders_pass_haproxy_check(haproxy, data):
    services = {name: instances_from_health(name, entries)[0] for name, entries in data.items()}
    table = build_table(services)
    rendered = render(table, Listeners("127.0.0.1:1", "127.0.0.1:2", "/tmp/x.sock", (DOMAIN,)),
                      templates_source.load(templates_source.bundled()))
    HAPROXY_CHECK_DIR.mkdir(exist_ok=True)
    for name, text in rendered.files:
        (HAPROXY_CHECK_DIR / name).write_text(text)
    result = subprocess.run([haproxy.path, "-c", "-q", "-C", str(HAPROXY_CHECK_DIR),
                             "-f", str(HAPROXY_CHECK_DIR / "haproxy.cfg")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + rendered["haproxy.cfg"]
