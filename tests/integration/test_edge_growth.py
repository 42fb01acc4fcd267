"""A full backend grows with `add server`, not a reload, on every supported HAProxy (issue 16).

A real Consul and the edge on each release (the `haproxy` parameter): a route's instances outgrow
its 4 slots, then its 8 (two growths), under wrk keep-alive on that very vhost: 0 reloads, every
instance answers, the files declare the 16 slots; HAProxy's master reloading from those files
routes the same and the edge's reconcile finds nothing to put back. A sticky route grows live too
where `add server` takes a `cookie` (3.0+); on 2.6 that growth is one reload that says why.
0 failed requests throughout.
"""

from __future__ import annotations

import re
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
)
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import consul_agent

pytestmark = pytest.mark.integration
DOMAIN = "test.example"
WIDE = 9         # instances of one route: 4 slots, then 8, then 16


@pytest.fixture(scope="module")
def consul(tmp_path_factory, haproxy):
    with consul_agent(tmp_path_factory.mktemp("consul")) as agent:
        yield agent


@pytest.fixture(scope="module")
def edge(consul, haproxy):
    proc = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path,
                       extra=("--reconcile-every", "1")).start()
    try:
        logged(proc, "because initial sync", 10)
        yield proc
    finally:
        proc.stop()
        print(proc.log()[-5000:])


def slots_of(config: str, backend: str) -> int:
    return len(re.findall(r"^    server s\d+ ", config.split(f"\nbackend {backend}\n")[1].split("\nbackend ")[0],
                          re.M))


def test_a_full_backend_grows_live_under_load_and_the_files_declare_its_new_slots(consul, edge):
    backends = [Backend(f"wide{i}") for i in range(WIDE)]
    host = f"wide-80.{DOMAIN}"
    try:
        register(consul, "wide", "wide-0", backends[0])
        answers(edge, host, {"wide0"})
        logged(edge, "vhost added: wide-80")
        time.sleep(0.3)
        before = reloads(edge.log())
        with Load(edge, host, 8) as load:
            for i in range(1, WIDE):                      # 5th instance: 4 -> 8 slots; 9th: 8 -> 16
                register(consul, "wide", f"wide-{i}", backends[i])
                answers(edge, host, {f"wide{k}" for k in range(i + 1)})
            assert reloads(edge.log()) == before, "a full backend must grow with add server, not a reload"
            logged(edge, "applied")
            time.sleep(1.5)                                # the file follows once inputs are quiet
            assert slots_of(config_text(edge), "be_wide-80") == 16
            master_reload(edge)                            # HAProxy from the files: the same routing
            time.sleep(1.0)
            answers(edge, host, {f"wide{k}" for k in range(WIDE)})
            time.sleep(1.5)                                # a reconcile has compared HAProxy with the table
            assert "does not serve the table" not in edge.log()
        out = load.out
        assert int(re.search(r"(\d+) requests in", out).group(1)) > 300, out
        assert "Socket errors" not in out and "Non-2xx" not in out, out
    finally:
        for i in range(WIDE):
            deregister(consul, f"wide-{i}")
        for b in backends:
            b.close()


def test_a_sticky_backend_grows_live_where_add_server_takes_a_cookie(consul, edge, haproxy):
    backends = [Backend(f"sticky{i}") for i in range(5)]
    host = f"sticky-80.{DOMAIN}"
    tags = ("edge.sticky=SID",)
    try:
        for i in range(4):
            register(consul, "sticky", f"sticky-{i}", backends[i], tags=tags)
        answers(edge, host, {f"sticky{k}" for k in range(4)})
        time.sleep(0.3)
        before = reloads(edge.log())
        register(consul, "sticky", "sticky-4", backends[4], tags=tags)       # 4 -> 8 slots
        answers(edge, host, {f"sticky{k}" for k in range(5)})
        if haproxy.release >= (3, 0):
            assert reloads(edge.log()) == before
        else:
            logged(edge, "because sticky-80 grew from 4 to 8 slots (sticky: HAProxy 2.6")
            assert reloads(edge.log()) == before + 1
        time.sleep(1.5)
        config = config_text(edge)
        assert slots_of(config, "be_sticky-80") == 8 and "server s8 0.0.0.0:0 cookie s8 disabled" in config
    finally:
        for i in range(5):
            deregister(consul, f"sticky-{i}")
        for b in backends:
            b.close()
