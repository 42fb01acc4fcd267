"""New and removed vhosts without a reload on every supported HAProxy: spare backends (issue 16).

A real Consul and the edge on each release (the `haproxy` parameter): new services registered
under keep-alive load take spare backends live (0 reloads, every new vhost answers), removed ones
leave them (0 reloads, 404); the files written after those live changes reproduce the live state
(HAProxy's master reloads from them and routes the same); an edge reload for another reason puts
every route on its own backend and routes the same again, and vhosts removed from their own
backends then cost no reload either. 0 failed requests throughout.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time

import pytest

from tests.integration.edge_helpers import (
    answers,
    config_text,
    deregister,
    logged,
    register,
    reloads,
    set_ttl,
    status_of,
)
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import consul_agent, require, wait_until

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


def master_reload(edge: EdgeProcess) -> None:
    """HAProxy's master reloads from the files on disk, as a restart or an operator would."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(edge.state_dir / "master.sock"))
        s.sendall(b"reload\n")
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass


class Load:
    """wrk with keep-alive on one vhost for the whole test."""

    def __init__(self, edge: EdgeProcess, host: str, seconds: int):
        self.argv = [require("wrk"), "-t", "2", "-c", "8", "-d", f"{seconds}s", "--timeout", "5s",
                     "-H", f"Host: {host}", f"http://127.0.0.1:{edge.port}/"]
        self.out = ""
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        self.out = subprocess.run(self.argv, capture_output=True, text=True, timeout=120).stdout

    def __enter__(self):
        self.thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.thread.join()


def test_new_and_removed_vhosts_take_and_leave_spares_with_no_reload(consul, edge):
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
            logged(edge, "+ new0-80 on be_spare_")
            # The files declare what HAProxy runs: each spare with its route's servers and name.
            wait_until(lambda: all(f"description route new{i}-80" in config_text(edge) for i in range(NEW)), 3,
                       what="haproxy.cfg naming each spare's route")
            hosts_map = (edge.state_dir / "hosts.map").read_text()
            assert all(re.search(rf"^new{i}-80\.{DOMAIN} be_spare_\d+$", hosts_map, re.M) for i in range(NEW))

            for i in range(3):                                            # removed: maps first, no reload
                deregister(consul, f"new{i}-1")
                status_of(edge, f"new{i}-80.{DOMAIN}", 404)
            assert reloads(edge.log()) == before, "a removed vhost on a spare must not reload HAProxy"
            logged(edge, "- new0-80 off be_spare_")
            wait_until(lambda: "description route new0-80" not in config_text(edge), 3, what="haproxy.cfg updated")

            master_reload(edge)                         # HAProxy from the files on disk: the same routing
            time.sleep(1.0)
            for i in range(3, NEW):
                answers(edge, f"new{i}-80.{DOMAIN}", {f"new{i}"})
            for i in range(3):
                status_of(edge, f"new{i}-80.{DOMAIN}", 404)
            time.sleep(1.5)                             # a reconcile has compared HAProxy with the table
            assert "does not serve the table" not in edge.log()

            # A reload for another reason (a vhost with its own options): every route on its own
            # backend, routing the same.
            register(consul, "sticky", "sticky-1", base, tags=("edge.sticky=SID",))
            logged(edge, "because vhost added: sticky-80")
            assert reloads(edge.log()) == before + 1
            config = config_text(edge)
            assert "description route" not in config and "backend be_new5-80\n" in config
            for i in range(3, NEW):
                answers(edge, f"new{i}-80.{DOMAIN}", {f"new{i}"})
            for i in range(3):
                status_of(edge, f"new{i}-80.{DOMAIN}", 404)

            for i in range(3, NEW):                      # removed from their own backends: no reload either
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


def test_a_new_vhost_with_two_hosts_is_swapped_into_the_host_map_at_once(consul, edge):
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
        assert re.search(rf" twin-80\.{DOMAIN} be_spare_\d+$", served, re.M), served
        assert re.search(rf" twin\.{DOMAIN} be_spare_\d+$", served, re.M), served
    finally:
        deregister(consul, "twin-1")
        backend.close()


def test_an_exhausted_pool_is_one_reload_that_refills_it(consul, edge):
    backend = Backend("burst")
    try:
        before = reloads(edge.log())
        for i in range(POOL + 2):
            register(consul, f"burst{i}", f"burst{i}-1", backend)
        for i in range(POOL + 2):
            answers(edge, f"burst{i}-80.{DOMAIN}", {"burst"})
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
            assert "No healthy instance of late-80 could" in page, "the spare's 503 names the route it took"
            assert f'<tr data-route="late-80"><td><a href="http://late-80.{DOMAIN}' in landing, landing
            assert reloads(proc.log()) == 1, "a new vhost must take a spare, not reload HAProxy"
            assert "late-80.test.example be_spare_1" in (proc.state_dir / "hosts.map").read_text()
        finally:
            proc.stop()
            print(proc.log()[-5000:])
            backend.close()


def test_a_pool_running_low_is_refilled_by_one_reload_once_consul_is_quiet(tmp_path, haproxy):
    """Issue 16: three of four spares taken live (one left: the low-water mark of a pool of 4) is one
    reload, 2 s after the last change, logged with its reason; every route on its own backend then,
    answering as before, the whole pool free again, no reload for "spare backends exhausted"."""
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
