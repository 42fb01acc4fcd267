"""New and removed vhosts without a reload on every supported HAProxy: spare backends (issue 16).

A real Consul and the edge on each release (the `haproxy` parameter): new services registered
under keep-alive load take spare backends live (0 reloads, every new vhost answers), removed ones
leave them (0 reloads, 404); on 3.4 the same through their own backends, added (`add backend`) and
deleted live, or kept retired when the loaded configuration names them; the files written after
those live changes reproduce the live state (HAProxy's master reloads from them and routes the
same); an edge reload for another reason puts every route on its own backend and routes the same
again, and vhosts removed from their own backends then cost no reload either. 0 failed requests
throughout.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.integration.edge_helpers import (
    Load,
    answers,
    config_text,
    deregister,
    logged,
    master_reload,
    register,
    reloads,
    set_ttl,
    status_of,
)
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import consul_agent, wait_until

pytestmark = pytest.mark.integration
DOMAIN = "test.example"
NEW = 6          # new vhosts registered one after the other
POOL = 12        # 6 taken at most by one test: above the refill's low-water mark (3)


@pytest.fixture(scope="module")
def consul(tmp_path_factory, haproxy):
    with consul_agent(tmp_path_factory.mktemp("consul")) as agent:
        yield agent


@pytest.fixture(scope="module")
def edge(consul, haproxy):
    proc = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path, spares=POOL,
                       extra=("--reconcile-every", "1")).start()
    try:
        logged(proc, "because initial sync", 10)
        yield proc
    finally:
        proc.stop()
        print(proc.log()[-5000:])


def test_new_and_removed_vhosts_take_and_leave_spares_with_no_reload(consul, edge, haproxy):
    """On 3.4 the same, through their own backends added and deleted live (`add backend`)."""
    own = haproxy.release >= (3, 4)
    base = Backend("base")
    news = [Backend(f"new{i}") for i in range(NEW)]
    try:
        register(consul, "base", "base-1", base)
        answers(edge, f"base-80.{DOMAIN}", {"base"})
        wait_until(lambda: re.search(r"base-80", edge.log()), 5, what="base-80 applied")
        time.sleep(0.3)
        before = reloads(edge.log())
        with Load(edge, f"base-80.{DOMAIN}", 12) as load:
            for i, backend in enumerate(news):
                register(consul, f"new{i}", f"new{i}-1", backend)
                answers(edge, f"new{i}-80.{DOMAIN}", {f"new{i}"})
            assert reloads(edge.log()) == before, "a new vhost must take a spare, not reload HAProxy"
            logged(edge, "+ new0-80 on be_new0-80, added live" if own else "+ new0-80 on be_spare_")
            # The files declare what HAProxy runs: each spare with its route's servers and name (3.4:
            # each route's own backend).
            declared = "backend be_new{}-80\n" if own else "description route new{}-80"
            wait_until(lambda: all(declared.format(i) in config_text(edge) for i in range(NEW)), 3,
                       what="haproxy.cfg declaring each route's backend")
            hosts_map = (edge.state_dir / "hosts.map").read_text()
            assert all(re.search(rf"^new{i}-80\.{DOMAIN} {f'be_new{i}-80' if own else 'be_spare_[0-9]+'}$",
                                 hosts_map, re.M) for i in range(NEW)), hosts_map

            for i in range(3):                                            # removed: maps first, no reload
                deregister(consul, f"new{i}-1")
                status_of(edge, f"new{i}-80.{DOMAIN}", 404)
            assert reloads(edge.log()) == before, "a removed vhost on a spare must not reload HAProxy"
            logged(edge, "deleted the backend of removed route new0-80 live" if own else "- new0-80 off be_spare_")
            wait_until(lambda: declared.format(0) not in config_text(edge), 3, what="haproxy.cfg updated")

            master_reload(edge)                         # HAProxy from the files on disk: the same routing
            time.sleep(1.0)
            for i in range(3, NEW):
                answers(edge, f"new{i}-80.{DOMAIN}", {f"new{i}"})
            for i in range(3):
                status_of(edge, f"new{i}-80.{DOMAIN}", 404)
            time.sleep(1.5)                             # a reconcile has compared HAProxy with the table
            assert "does not serve the table" not in edge.log()
            # Loaded from the files now, the landing page names new3-80's backend: on 3.4 HAProxy
            # will not delete it, and it stays retired (empty, unmapped) until the next reload.
            deregister(consul, "new3-1")
            status_of(edge, f"new3-80.{DOMAIN}", 404)
            if own:
                logged(edge, "kept the empty backend of removed route new3-80")
            assert reloads(edge.log()) == before

            # A reload for another reason (a vhost with its own options): every route on its own
            # backend, routing the same.
            register(consul, "sticky", "sticky-1", base, tags=("edge.sticky=SID",))
            logged(edge, "because vhost added: sticky-80")
            assert reloads(edge.log()) == before + 1
            config = config_text(edge)
            assert "description route" not in config and "backend be_new5-80\n" in config
            assert "backend be_new3-80\n" not in config
            for i in range(4, NEW):
                answers(edge, f"new{i}-80.{DOMAIN}", {f"new{i}"})
            for i in range(4):
                status_of(edge, f"new{i}-80.{DOMAIN}", 404)

            for i in range(4, NEW):                      # removed from their own backends: no reload either
                deregister(consul, f"new{i}-1")
                status_of(edge, f"new{i}-80.{DOMAIN}", 404)
            assert reloads(edge.log()) == before + 1, "a removed vhost must not reload HAProxy"
            wait_until(lambda: "description removed route new5-80" in config_text(edge), 3,
                       what="haproxy.cfg keeping the removed route's empty backend")
            assert "new5-80" not in (edge.state_dir / "hosts.map").read_text()
        out = load.out
        assert int(re.search(r"(\d+) requests in", out).group(1)) > 500, out
        assert "Socket errors" not in out and "Non-2xx" not in out, out
    finally:
        for i in range(NEW):
            deregister(consul, f"new{i}-1")
        deregister(consul, "sticky-1")
        for b in (base, *news):
            b.close()


def runtime(edge: EdgeProcess, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(edge.state_dir / "haproxy.sock"))
        s.sendall(command.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: s.recv(65536), b"")).decode()


def test_a_host_haproxy_maps_to_a_spare_behind_the_edges_back_is_unmapped_by_the_next_reconcile(consul, edge):
    """What a runtime step that failed midway (and a failed fallback reload) can leave: HAProxy maps
    a host to a spare the edge thinks free. The next reconcile (every second here) deletes it, and
    empties the spare, with no reload."""
    backend = Backend("stray")
    try:
        register(consul, "kept", "kept-1", backend)
        answers(edge, f"kept-80.{DOMAIN}", {"stray"})
        before = reloads(edge.log())
        spare = f"be_spare_{POOL}"
        runtime(edge, f"set server {spare}/s1 addr {backend.host} port {backend.port}; "
                      f"set server {spare}/s1 state ready; add map hosts.map ghost.{DOMAIN} {spare}")
        wait_until(lambda: f"ghost.{DOMAIN} " not in runtime(edge, "show map hosts.map"), 5,
                   what="the stray map entry deleted")
        status_of(edge, f"ghost.{DOMAIN}", 404)
        logged(edge, f"hosts.map: ghost.{DOMAIN} -> {spare} in HAProxy, (none) in the table")
        assert reloads(edge.log()) == before
        answers(edge, f"kept-80.{DOMAIN}", {"stray"})
    finally:
        deregister(consul, "kept-1")
        backend.close()


def test_a_new_vhost_with_two_hosts_is_swapped_into_the_host_map_at_once(consul, edge, haproxy):
    """Two host entries change together: one `prepare map` / `commit map` swap (every release has
    it), both hosts answering, no reload."""
    backend = Backend("twin")
    try:
        before = reloads(edge.log())
        register(consul, "twin", "twin-1", backend, tags=(f"edge.host=twin.{DOMAIN}",))
        answers(edge, f"twin-80.{DOMAIN}", {"twin"})
        answers(edge, f"twin.{DOMAIN}", {"twin"})
        assert reloads(edge.log()) == before
        served = runtime(edge, "show map hosts.map")
        backend_re = r"be_twin-80" if haproxy.release >= (3, 4) else r"be_spare_\d+"   # 3.4: its own, added live
        assert re.search(rf" twin-80\.{DOMAIN} {backend_re}$", served, re.M), served
        assert re.search(rf" twin\.{DOMAIN} {backend_re}$", served, re.M), served
    finally:
        deregister(consul, "twin-1")
        backend.close()


def test_an_exhausted_pool_is_one_reload_that_refills_it(consul, edge, haproxy):
    """On 3.4 there is no pool to exhaust: a burst of new vhosts gets its own backends live."""
    backend = Backend("burst")
    try:
        before = reloads(edge.log())
        for i in range(POOL + 2):
            register(consul, f"burst{i}", f"burst{i}-1", backend)
        for i in range(POOL + 2):
            answers(edge, f"burst{i}-80.{DOMAIN}", {"burst"})
        if haproxy.release >= (3, 4):
            assert reloads(edge.log()) == before and "spare backends exhausted" not in edge.log()
            return
        logged(edge, "spare backends exhausted", 10)
        assert reloads(edge.log()) >= before + 1
    finally:
        for i in range(POOL + 2):
            deregister(consul, f"burst{i}-1")
        backend.close()


def test_a_vhost_registered_critical_after_an_empty_initial_sync_answers_once_its_check_passes(tmp_path, haproxy):
    """Issue 16, seen in the image test: the edge's initial sync had no route; the service came
    with its health check critical (a new route with no healthy instance: it takes a spare, and its
    map entry must be added then, with nothing to fill), and its check passed a second later (the
    slot is filled). The vhost must answer 200 then, with no reload after the initial sync."""
    backend = Backend("late")
    with consul_agent(tmp_path / "consul") as agent:
        proc = EdgeProcess(agent.url, domains=(DOMAIN,), haproxy=haproxy.path, spares=32).start()
        try:
            logged(proc, "because initial sync", 10)
            time.sleep(0.3)
            assert reloads(proc.log()) == 1
            agent.api("PUT", "/v1/agent/service/register", {
                "Name": "late", "ID": "late-1", "Address": backend.host, "Port": backend.port,
                "Meta": {"container_port": "80"},
                "Check": {"CheckID": "ttl-late-1", "TTL": "600s", "Status": "critical"}})
            time.sleep(1.0)                        # the edge sees it with no healthy instance
            waiting, page = proc.get(f"late-80.{DOMAIN}")
            landing = proc.get(f"nosuch.{DOMAIN}")[1]
            set_ttl(agent, "late-1", "passing")
            answers(proc, f"late-80.{DOMAIN}", {"late"}, 5)
            assert waiting == 503, "mapped to its spare with no server ready: the spare's 503, not the landing page"
            if haproxy.release < (3, 4):
                assert "No healthy instance of late-80 could" in page, "the spare's 503 names the route it took"
                assert f'<tr data-route="late-80"><td><a href="http://late-80.{DOMAIN}' in landing, landing
            else:   # a backend added live has HAProxy's own 503 and no landing row until the next reload
                assert "503 Service Unavailable" in page, page
            assert reloads(proc.log()) == 1, "a new vhost must take a spare, not reload HAProxy"
            serving = "be_late-80" if haproxy.release >= (3, 4) else "be_spare_1"    # 3.4: its own, added live
            assert f"late-80.test.example {serving}" in (proc.state_dir / "hosts.map").read_text()
        finally:
            proc.stop()
            print(proc.log()[-5000:])
            backend.close()


def test_a_pool_running_low_is_refilled_by_one_reload_once_consul_is_quiet(tmp_path, haproxy):
    """Issue 16: three of four spares taken live (one left: the low-water mark of a pool of 4) is one
    reload, 2 s after the last change, logged with its reason; every route on its own backend then,
    answering as before, the whole pool free again, no reload for "spare backends exhausted". On 3.4 the
    three get their own backends live and the pool is never touched."""
    backend = Backend("low")
    with consul_agent(tmp_path / "consul") as agent:
        proc = EdgeProcess(agent.url, domains=(DOMAIN,), haproxy=haproxy.path, spares=4).start()
        try:
            logged(proc, "because initial sync", 10)
            for i in range(3):
                register(agent, f"low{i}", f"low{i}-1", backend)
            for i in range(3):
                answers(proc, f"low{i}-80.{DOMAIN}", {"low"})
            assert reloads(proc.log()) == 1, "new vhosts take spares live"
            if haproxy.release >= (3, 4):     # their own backends, added live: the pool stays whole
                time.sleep(2.5)
                assert reloads(proc.log()) == 1 and "running low" not in proc.log()
                assert all(f"backend be_low{i}-80\n" in config_text(proc) for i in range(3))
                return
            logged(proc, "spare backends running low: 1 of 4 free (a reload refills")
            logged(proc, "because spare backends running low: 1 of 4 free", 10)
            assert reloads(proc.log()) == 2
            wait_until(lambda: "description spare backend, free at the last reload" in config_text(proc), 3,
                       what="the refilled pool in the file")
            config = config_text(proc)
            assert all(f"backend be_low{i}-80\n" in config for i in range(3)) and "description route" not in config
            for i in range(3):
                answers(proc, f"low{i}-80.{DOMAIN}", {"low"})
            time.sleep(2.5)
            assert reloads(proc.log()) == 2 and "exhausted" not in proc.log()
        finally:
            proc.stop()
            print(proc.log()[-3000:])
            backend.close()


def test_a_new_vhost_grows_its_spare_live_and_keeps_it_until_a_reload(consul, edge, haproxy):
    """Its 5th instance: `add server` in the spare (3.4: in its own backend added live), no reload;
    removed, the grown spare stays out of the pool, empty, until the next reload."""
    backends = [Backend(f"spread{i}") for i in range(5)]
    host = f"spread-80.{DOMAIN}"
    try:
        before = reloads(edge.log())
        for i, backend in enumerate(backends):
            register(consul, "spread", f"spread-{i}", backend)
            answers(edge, host, {f"spread{k}" for k in range(i + 1)})
        assert reloads(edge.log()) == before, "a route on a spare must grow the spare, not reload HAProxy"
        for i in range(5):
            deregister(consul, f"spread-{i}")
        status_of(edge, host, 404)
        assert reloads(edge.log()) == before
        if haproxy.release < (3, 4):
            logged(edge, "- spread-80: be_spare_")
            wait_until(lambda: "description removed route spread-80" in config_text(edge), 3,
                       what="haproxy.cfg keeping the grown spare retired")
    finally:
        for i in range(5):
            deregister(consul, f"spread-{i}")
        for b in backends:
            b.close()
