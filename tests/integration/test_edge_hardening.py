"""The edge under a careless operator and a hostile client: a full or read-only state dir, a
second edge, a hostile Host header, a broken template, WebSockets across reloads, and the
papercuts around them (issue 11). Real HAProxy and Consul on loopback; every test that starts an
edge runs on every supported HAProxy (tests/integration/conftest.py)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import serve

from tests.integration.edge_helpers import answers, deregister, logged, register, reloads
from tests.integration.test_browser import chromium
from tests.support.edge import REPO, EdgeProcess
from tests.support.http import Backend, get
from tests.support.procs import consul_per_module, free_ports, require, wait_until
from tests.unit.test_edge_render import page_markup

pytestmark = pytest.mark.integration
DOMAIN = "hard.example"
HOSTILE = 'x:"><img src=x onerror=alert(1)>'
# Only characters HAProxy 3.x still accepts in a Host (RFC 3986 sub-delims): what an attribute
# injection would need if the page quoted its attributes with single quotes.
HOSTILE_SUBDELIMS = "x'onmouseover=alert(1)+'.hard.example:80'"


consul = consul_per_module()


@pytest.fixture(scope="module")
def backends():
    made = {name: Backend(name) for name in ("alpha", "beta", "gamma")}
    yield made
    for b in made.values():
        b.close()


@pytest.fixture(scope="module")
def edge(consul, backends, haproxy):
    """One shared edge for the request-level checks, with one route."""
    register(consul, "page", "page-1", backends["alpha"])
    e = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path).start()
    answers(e, f"page-80.{DOMAIN}", {"alpha"})
    yield e
    e.stop()
    deregister(consul, "page-1")


def raw_get(port: int, host: str) -> bytes:
    """A request with any Host bytes at all (http.client would refuse some)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: " + host.encode("latin-1") + b"\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# --- 1. a full or read-only state dir ---------------------------------------------------------
@pytest.fixture
def small_state_dir(tmp_path):
    mount = tmp_path / "state"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0750", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of the file system under `directory`."""
    filler = directory / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
    return filler


def test_a_full_state_dir_keeps_routing_and_catches_up_when_space_returns(consul, backends, small_state_dir, haproxy):
    register(consul, "disk", "disk-1", backends["alpha"])
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path, state_dir=small_state_dir).start()
    try:
        answers(edge, f"disk-80.{DOMAIN}", {"alpha"})
        filler = fill(small_state_dir)
        register(consul, "later", "later-1", backends["beta"])          # a new vhost: a reload that cannot be written
        logged(edge, "No space left on device")
        register(consul, "disk", "disk-2", backends["gamma"])           # churn still goes live
        answers(edge, f"disk-80.{DOMAIN}", {"alpha", "gamma"})
        assert edge.get(f"later-80.{DOMAIN}")[0] == 404
        assert not (small_state_dir / "next").exists()                 # nothing staged is left behind
        assert edge.proc.poll() is None
        assert edge.log().count("No space left on device") == 1         # said once, not on every retry
        filler.unlink()
        answers(edge, f"later-80.{DOMAIN}", {"beta"}, timeout=15)      # retried once space is back
        logged(edge, "takes writes again")

        # A restart on a full disk, with a staged set left behind, still serves (the stage is dropped).
        edge.proc.send_signal(signal.SIGINT)
        edge.proc.wait(15)
        (small_state_dir / "next").mkdir(exist_ok=True)
        (small_state_dir / "next" / "haproxy.cfg").write_text("x" * 200_000)
        filler = fill(small_state_dir)
        again = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path, state_dir=small_state_dir,
                            port=edge.port, admin_port=edge.admin_port)
        again.log_path = edge.log_path.with_suffix(".again.log")
        again.start()
        try:
            answers(again, f"later-80.{DOMAIN}", {"beta"})
            # Dropping the stage freed room: the first sync's install may succeed, or meet the full
            # disk again. Either way it is over before looking (an install under way has a `next/`
            # while `haproxy -c` runs, longer on the chrooted 3.x binaries).
            wait_until(lambda: re.search(r"because initial sync|No space left on device", again.log()), 10,
                       what="the restarted edge's first install")
            assert not (small_state_dir / "next").exists()
        finally:
            again.stop()
    finally:
        edge.stop()
        for sid in ("disk-1", "disk-2", "later-1"):
            deregister(consul, sid)


def test_a_read_only_state_dir_keeps_routing_and_catches_up_when_writable(consul, backends, small_state_dir, haproxy):
    register(consul, "ro", "ro-1", backends["alpha"])
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path, state_dir=small_state_dir).start()
    try:
        answers(edge, f"ro-80.{DOMAIN}", {"alpha"})
        # HAProxy's master re-executes once more after a reload's new worker answers, and binds its
        # socket again: a read-only dir at that very moment would stop it. Remount once it is done.
        time.sleep(1)
        subprocess.run(["mount", "-o", "remount,ro", str(small_state_dir)], check=True)
        register(consul, "rolater", "rolater-1", backends["beta"])
        logged(edge, "Read-only file system")
        register(consul, "ro", "ro-2", backends["gamma"])
        answers(edge, f"ro-80.{DOMAIN}", {"alpha", "gamma"})
        subprocess.run(["mount", "-o", "remount,rw", str(small_state_dir)], check=True)
        answers(edge, f"rolater-80.{DOMAIN}", {"beta"}, timeout=15)
        assert f"server s2 127.0.0.1:{backends['gamma'].port}" in (small_state_dir / "haproxy.cfg").read_text()
    finally:
        edge.stop()
        for sid in ("ro-1", "ro-2", "rolater-1"):
            deregister(consul, sid)


# --- 2. the landing page reflects nothing a client sends as markup -------------------------------
def refused_by_haproxy(page: str) -> bool:
    """HAProxy 3.0+ answers a Host with characters no host name has (quotes, angle brackets,
    spaces) with its own 400 before any rule runs: nothing of it reaches the landing page. 2.6
    lets it through to the page, which must then reflect none of it."""
    return page.startswith("HTTP/1.1 400") and "Your browser sent an invalid request" in page


def hostile_hosts(haproxy, refused: str, accepted: str) -> tuple[str, ...]:
    """The hostile Hosts that reach the landing page on this release: `refused` (markup) only on
    2.6, and on every release `accepted`, made of the characters 3.x still lets through."""
    return (refused, accepted) if haproxy.release < (3, 0) else (accepted,)


def test_a_hostile_host_is_not_reflected_in_the_bytes_nor_in_chromium(edge, tmp_path, haproxy):
    if haproxy.release >= (3, 0):
        assert refused_by_haproxy(raw_get(edge.port, HOSTILE).decode(errors="replace"))
    for n, host in enumerate(hostile_hosts(haproxy, HOSTILE, HOSTILE_SUBDELIMS)):
        page = raw_get(edge.port, host).decode(errors="replace")
        assert page.startswith("HTTP/1.1 404"), page[:300]
        assert "<img" not in page and "onerror" not in page and "onmouseover" not in page and '"><' not in page
        assert f'href="http://page-80.{DOMAIN}/"' in page                   # no port: the bogus one is dropped
        body = page.split("\r\n\r\n", 1)[1]
        saved = tmp_path / f"landing-{n}.html"
        saved.write_text(body)
        dom = chromium(tmp_path, "--dump-dom", saved.as_uri())
        assert "page-80.hard.example" in dom and "<img" not in dom and "onmouseover" not in dom


def test_a_hostile_host_without_domains_is_not_reflected(consul, backends, tmp_path, haproxy):
    register(consul, "nodom", "nodom-1", backends["alpha"])
    edge = EdgeProcess(consul.url, domains=(), haproxy=haproxy.path).start()
    markup = 'evil"<b>.example:80"><script>x</script>'
    try:
        answers(edge, "nodom-80.anything", {"alpha"})
        if haproxy.release >= (3, 0):
            assert refused_by_haproxy(raw_get(edge.port, markup).decode(errors="replace"))
        for host in hostile_hosts(haproxy, markup, "evil'(b).example:80'+alert(1)"):
            page = raw_get(edge.port, host).decode(errors="replace")
            assert "<script" not in page and "<b>" not in page and "'(b)" not in page and "alert" not in page
            assert re.search(r'href="http://nodom-80\.[a-z0-9.-]*/"', page), page
    finally:
        edge.stop()
        deregister(consul, "nodom-1")


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=80)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(host=HEADER_TEXT)
def test_random_host_headers_never_add_markup(edge, host):
    shapes = {(t, tuple(n for n, _ in a)) for t, a in page_markup(
        raw_get(edge.port, "nobody.invalid").decode().split("\r\n\r\n", 1)[1])}
    assert ("a", ("href",)) in shapes                                  # the page lists the route
    response = raw_get(edge.port, host).decode(errors="replace")
    status = response.split(" ", 2)[1]
    if status != "404":
        assert status in ("200", "400", "503"), response[:200]    # routed, refused, or a known vhost
        return
    tags = page_markup(response.split("\r\n\r\n", 1)[1])
    assert {(t, tuple(n for n, _ in a)) for t, a in tags} <= shapes  # no tag or attribute the page lacks
    for _, attrs in tags:
        for name, value in attrs:
            if name == "href":
                assert re.fullmatch(r"http://[a-z0-9.-]+(:[0-9]+)?/", value), value


def test_a_trailing_dot_is_the_same_host(edge):
    assert edge.get(f"page-80.{DOMAIN}.") == (200, "alpha")
    assert edge.get(f"PAGE-80.{DOMAIN.upper()}.:80") == (200, "alpha")


# --- 3. one edge per port and per state dir ------------------------------------------------------
def test_a_second_edge_on_the_same_port_is_refused_and_the_first_keeps_all_traffic(consul, edge):
    second = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=edge.haproxy, port=edge.port,
                         admin_port=free_ports(1)[0])                  # a free admin port: only --bind clashes
    result = subprocess.run(second.argv(), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert f"--bind 127.0.0.1:{edge.port} is already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert all(edge.get(f"page-80.{DOMAIN}") == (200, "alpha") for _ in range(40))


def test_a_second_edge_on_the_same_state_dir_is_refused_with_the_holder(consul, edge):
    other = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=edge.haproxy, state_dir=edge.state_dir)   # own ports
    result = subprocess.run(other.argv(), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert f"state dir {edge.state_dir} is in use by another edge (pid {edge.proc.pid})" in result.stderr
    once = subprocess.run([*other.argv(), "--once"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert once.returncode == 1 and "in use by another edge" in once.stderr
    time.sleep(1.5)                                                         # the first edge is left alone
    assert edge.proc.poll() is None and edge.get(f"page-80.{DOMAIN}") == (200, "alpha")
    assert "soft-stop" not in edge.log() and "HAProxy exited" not in edge.log()


# --- 4. broken templates at start ----------------------------------------------------------------
@pytest.mark.parametrize(("source", "what"), [
    ("{% for %}", "TemplateSyntaxError"),
    ("{% for route in routes %}{{ route.no_such_field }}{% endfor %}", "UndefinedError"),
    ("{{ undefined_name }}", "UndefinedError"),
])
@pytest.mark.parametrize("mode", [(), ("--once",)])
def test_a_broken_template_at_start_is_one_clear_line_and_exit_2(consul, tmp_path, source, what, mode):
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    (templates / "haproxy.cfg.j2").write_text(source)
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), extra=("--templates", str(templates), *mode))
    result = subprocess.run(edge.argv(), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "do not render" in errors[0] and what in errors[0], result.stderr


# --- papercuts ---------------------------------------------------------------------------------
def test_haproxy_check_of_the_live_file_works_from_any_directory(edge, haproxy):
    result = subprocess.run([haproxy.path, "-c", "-f", str(edge.state_dir / "haproxy.cfg")],
                            capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr


def test_the_log_has_one_line_per_reload_and_no_haproxy_chatter(consul, backends, haproxy):
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path, extra=("--log-level", "INFO")).start()
    try:
        for i in range(6):
            for j in range(15):
                register(consul, f"chat{i}x{j}", f"chat{i}x{j}", backends["alpha"])
            wait_until(lambda i=i: reloads(edge.log()) >= i + 1, 20, what=f"reload {i + 1}")
        answers(edge, f"chat5x14-80.{DOMAIN}", {"alpha"})
        log = edge.log()
        assert reloads(log) >= 6
        assert "Proxy be_" not in log and "cumulated conns" not in log and "is UP/READY" not in log
        chatter = [line for line in log.splitlines() if "edge.haproxy: haproxy: " in line]
        if haproxy.release >= (3, 4) and os.geteuid() == 0:
            # HAProxy 3.4 started as root advises a `chroot` and dropping privileges, again at every
            # reload: its own warnings, kept in the log once per start (not once per reload).
            advice = [line.split(" WARNING ", 1)[1] for line in chatter if "HAProxy was started as" in line]
            assert len(advice) == len(set(advice)) == 2, advice
            chatter = [line for line in chatter if "HAProxy was started as" not in line]
        assert chatter == []                                              # nothing worth a warning happened
        assert len(log.splitlines()) < 40, log                             # a few lines per reload, not one per backend
    finally:
        edge.stop()
        for i in range(6):
            for j in range(15):
                deregister(consul, f"chat{i}x{j}")


def test_the_consul_service_is_reserved_not_a_skipped_name(consul):
    out = subprocess.run([sys.executable, "-m", "haproxy_consul", "edge", "routes", "--consul", consul.url,
                          "--domain", DOMAIN], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0
    assert "consul" not in out.stderr.replace(consul.url, "")


def test_an_existing_group_shared_state_dir_is_used_as_it_is(consul, tmp_path, haproxy):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, 65534, 0)
    shared.chmod(0o2770)
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path, state_dir=shared).start()
    try:
        assert stat.S_IMODE(shared.stat().st_mode) == 0o2770 and shared.stat().st_uid == 65534
    finally:
        edge.stop()


# --- WebSockets across reloads -------------------------------------------------------------------
@pytest.fixture(scope="module")
def echo_server():
    def echo(ws):
        for message in ws:
            ws.send(message)
    server = serve(echo, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.socket.getsockname()[1]
    server.shutdown()


def ws_connect(edge, host: str):
    sock = socket.create_connection(("127.0.0.1", edge.port), timeout=5)
    return connect(f"ws://{host}/", sock=sock, open_timeout=5, close_timeout=1)


def register_ws(consul, port: int) -> None:
    consul.api("PUT", "/v1/agent/service/register", {"Name": "ws", "ID": "ws-1", "Address": "127.0.0.1",
                                                      "Port": port, "Meta": {"container_port": "80"}})


@pytest.mark.parametrize("max_reloads", [25, 2])
def test_a_websocket_survives_20_reloads_and_old_workers_are_bounded(consul, backends, echo_server, max_reloads,
                                                                     haproxy):
    register_ws(consul, echo_server)
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path,
                       extra=("--worker-max-reloads", str(max_reloads))).start()
    try:
        wait_until(lambda: edge.get(f"ws-80.{DOMAIN}")[0] in (400, 426, 200), 10, what="the ws vhost")
        survived = 0
        with ws_connect(edge, f"ws-80.{DOMAIN}") as ws:
            for i in range(20):
                before = reloads(edge.log())
                register(consul, f"wsr{i}", f"wsr{i}", backends["alpha"])   # a new vhost: one reload
                wait_until(lambda b=before: reloads(edge.log()) > b, 20, what=f"reload {i + 1}")
                try:
                    ws.send(f"ping {i}")
                    assert ws.recv(timeout=5) == f"ping {i}"
                    survived += 1
                except (ConnectionClosed, TimeoutError):
                    break
        if max_reloads == 25:
            assert survived == 20                                          # never cut by a reload
        else:
            assert 1 <= survived <= max_reloads + 1                        # then its old worker was stopped
    finally:
        edge.stop()
        deregister(consul, "ws-1")
        for i in range(20):
            deregister(consul, f"wsr{i}")


def test_an_idle_websocket_lives_until_the_tunnel_timeout(consul, echo_server, haproxy):
    register_ws(consul, echo_server)
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path, extra=("--timeout-tunnel", "2")).start()
    try:
        wait_until(lambda: edge.get(f"ws-80.{DOMAIN}")[0] in (400, 426, 200), 10, what="the ws vhost")
        with ws_connect(edge, f"ws-80.{DOMAIN}") as ws:
            time.sleep(1)
            ws.send("still here")
            assert ws.recv(timeout=5) == "still here"
            time.sleep(3.5)                                                # idle past --timeout-tunnel
            with pytest.raises((ConnectionClosed, TimeoutError, OSError)):
                ws.send("gone")
                ws.recv(timeout=3)
    finally:
        edge.stop()
        deregister(consul, "ws-1")


# --- issue 20: a hand-over whose state dir goes away, and ports it still holds --------------------
def master_of(edge: EdgeProcess) -> int:
    return int((edge.state_dir / "haproxy.pid").read_text().split()[0])


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("how", ["deleted", "renamed"])
def test_a_state_dir_gone_during_a_hand_over_stops_haproxy_and_frees_its_ports(consul, tmp_path, how, haproxy):
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), extra=("--handover-timeout", "60"), haproxy=haproxy.path).start()
    master = master_of(edge)
    edge.proc.send_signal(signal.SIGTERM)
    assert edge.proc.wait(10) == 0
    assert alive(master) and edge.get("nobody.invalid")[0] == 404              # handed over: still serving
    if how == "deleted":
        shutil.rmtree(edge.state_dir)
    else:
        edge.state_dir.rename(tmp_path / "moved")
    try:
        # Long before the 60 s hand-over ends: nobody can adopt an HAProxy whose state dir is gone.
        wait_until(lambda: not alive(master), 10, what="the caretaker to stop HAProxy")
        logged(edge, f"state dir {edge.state_dir} is gone (deleted or renamed): no edge can take over HAProxy "
                     f"(pid {master}); stopping it")
        successor = EdgeProcess(consul.url, domains=(DOMAIN,), port=edge.port, admin_port=edge.admin_port,
                                haproxy=haproxy.path)
        try:
            successor.start()                                                  # the ports are free again
        finally:
            successor.stop()
    finally:
        if alive(master):
            os.kill(master, signal.SIGTERM)


def test_a_port_held_by_a_pending_hand_over_names_the_holder_and_the_time_left(consul, haproxy):
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), extra=("--handover-timeout", "40"), haproxy=haproxy.path).start()
    master = master_of(edge)
    edge.proc.send_signal(signal.SIGTERM)
    assert edge.proc.wait(10) == 0
    try:
        other = EdgeProcess(consul.url, domains=(DOMAIN,), port=edge.port, admin_port=edge.admin_port,
                            haproxy=haproxy.path)
        result = subprocess.run(other.argv(), capture_output=True, text=True, timeout=60, cwd=REPO)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        m = re.search(rf"--bind 127\.0\.0\.1:{edge.port} is already in use by HAProxy \(pid {master}\), handed over "
                      rf"by the edge on {re.escape(str(edge.state_dir))}: it is stopped in (\d+)s unless an edge "
                      rf"started on {re.escape(str(edge.state_dir))} takes it over first", result.stderr)
        assert m, result.stderr
        assert 30 <= int(m.group(1)) <= 40
    finally:
        os.kill(master, signal.SIGTERM)          # the caretaker sees it gone and exits
    wait_until(lambda: not alive(master), 10, what="HAProxy to stop")


def test_a_port_held_by_another_program_names_it(consul):
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        other = EdgeProcess(consul.url, domains=(DOMAIN,), port=holder.getsockname()[1])
        result = subprocess.run(other.argv(), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    me = Path("/proc/self/comm").read_text().strip()
    assert f"--bind 127.0.0.1:{other.port} is already in use by {me} (pid {os.getpid()})" in result.stderr


# --- issue 20: forwarding headers, set by the edge ------------------------------------------------
FORGED_FOR = "203.0.113.7"


def forged(scheme: str) -> dict[str, str]:
    """What a client may claim: another address, the other scheme, another host and port."""
    return {"X-Forwarded-For": FORGED_FOR, "X-Forwarded-Proto": "http" if scheme == "https" else "https",
            "X-Forwarded-Host": "forged.example", "X-Forwarded-Port": "1", "X-Real-IP": FORGED_FOR,
            "Forwarded": f"for={FORGED_FOR};proto=https;host=forged.example"}


def seen_by_backend(edge: EdgeProcess, scheme: str, source: str, host: str,
                    headers: dict[str, str]) -> dict[str, list[str]]:
    """The header lines the echo backend got for a request from `source` (a loopback address)."""
    if scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(edge.address, edge.https_port, timeout=5, source_address=(source, 0),
                                           context=context)
    else:
        conn = http.client.HTTPConnection(edge.address, edge.port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", "/", headers={"Host": host, "Connection": "close", **headers})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200, body
    seen: dict[str, list[str]] = {}
    for name, value in json.loads(body):
        seen.setdefault(name.lower(), []).append(value)
    return seen


TRUSTED = "10.9.0.0/16,127.0.0.2"


def echo_edge(consul, haproxy, extra=()) -> EdgeProcess:
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), https_port=free_ports(1)[0], extra=extra,
                       haproxy=haproxy.path).start()
    try:
        wait_until(lambda: edge.get(f"echo-80.{DOMAIN}")[0] == 200, 10, what="the echo route")
    except BaseException:
        edge.stop()
        raise
    return edge


@pytest.fixture(scope="module")
def echo_backend(consul):
    backend = Backend("echo", echo=True)
    register(consul, "echo", "echo-1", backend)
    yield backend
    deregister(consul, "echo-1")
    backend.close()


@pytest.fixture(scope="module")
def https_edge(consul, echo_backend, haproxy):
    """An edge with an HTTPS listener that trusts nobody's forwarding headers."""
    edge = echo_edge(consul, haproxy)
    yield edge
    edge.stop()


@pytest.fixture(scope="module")
def trusting_edge(consul, echo_backend, haproxy):
    """An edge with an HTTPS listener behind a load balancer on 127.0.0.2."""
    edge = echo_edge(consul, haproxy, ("--trusted-proxies", TRUSTED))
    yield edge
    edge.stop()


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize(("which", "source"), [("https_edge", "127.0.0.1"), ("https_edge", "127.0.0.2"),
                                               ("trusting_edge", "127.0.0.1")])
def test_a_client_s_forwarding_headers_are_replaced_by_the_edge_s(request, which, source, scheme, haproxy):
    edge = request.getfixturevalue(which)     # asks for `haproxy` too: its fixtures need the release
    host = f"echo-80.{DOMAIN}"
    seen = seen_by_backend(edge, scheme, source, host, forged(scheme))
    assert seen["x-forwarded-for"] == [source]                                 # one line: the client's address
    assert seen["x-forwarded-proto"] == [scheme]
    assert seen["x-forwarded-host"] == [host]
    assert seen["x-forwarded-port"] == [str(edge.https_port if scheme == "https" else edge.port)]
    assert "forwarded" not in seen and "x-real-ip" not in seen


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_trusted_proxy_s_forwarding_headers_are_kept_and_extended(trusting_edge, scheme):
    seen = seen_by_backend(trusting_edge, scheme, "127.0.0.2", f"echo-80.{DOMAIN}", forged(scheme))
    assert seen["x-forwarded-for"] == [f"{FORGED_FOR}, 127.0.0.2"]          # its chain, then the hop to the edge
    assert seen["x-forwarded-proto"] == [forged(scheme)["X-Forwarded-Proto"]]
    assert seen["x-forwarded-host"] == ["forged.example"]
    assert seen["x-forwarded-port"] == ["1"]
    assert seen["x-real-ip"] == [FORGED_FOR]
    assert "forwarded" not in seen                                             # never passed on (README)
    # What it leaves out, the edge fills in.
    seen = seen_by_backend(trusting_edge, scheme, "127.0.0.2", f"echo-80.{DOMAIN}", {})
    assert seen["x-forwarded-for"] == ["127.0.0.2"] and seen["x-forwarded-proto"] == [scheme]


def proxied_get(edge: EdgeProcess, host: str, client: str, headers: dict[str, str]) -> tuple[int, str]:
    """A request as a load balancer speaking the PROXY protocol (v1) passes it on for `client`."""
    lines = [f"PROXY TCP4 {client} {edge.address} 40000 {edge.port}", "GET / HTTP/1.1", f"Host: {host}",
             *(f"{k}: {v}" for k, v in headers.items()), "Connection: close", "", ""]
    with socket.create_connection((edge.address, edge.port), timeout=5) as s:
        s.sendall("\r\n".join(lines).encode())
        response = b"".join(iter(lambda: s.recv(65536), b"")).decode(errors="replace")
    head, _, body = response.partition("\r\n\r\n")
    return int(head.split()[1]), body


def test_behind_a_proxy_protocol_load_balancer_the_address_it_reports_is_the_client(consul, echo_backend, haproxy):
    class ProxiedEdge(EdgeProcess):
        def get(self, host: str, path: str = "/") -> tuple[int, str]:
            return proxied_get(self, host, "198.51.100.9", {})

    edge = ProxiedEdge(consul.url, domains=(DOMAIN,), extra=("--proxy-protocol",), haproxy=haproxy.path).start()
    try:
        wait_until(lambda: edge.get(f"echo-80.{DOMAIN}")[0] == 200, 10, what="the echo route")
        status, body = proxied_get(edge, f"echo-80.{DOMAIN}", "198.51.100.9", forged("http"))
        assert status == 200
        seen = dict((name.lower(), value) for name, value in json.loads(body))
        assert seen["x-forwarded-for"] == "198.51.100.9" and seen["x-forwarded-proto"] == "http"
        try:                                                                   # no PROXY header: refused
            assert not raw_get(edge.port, f"echo-80.{DOMAIN}").startswith(b"HTTP/1.1 200")
        except ConnectionResetError:
            pass
    finally:
        edge.stop()


# --- issue 20: TLS key exchange groups --------------------------------------------------------------
def s_client(edge: EdgeProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require("openssl"), "s_client", "-connect", f"{edge.address}:{edge.https_port}",
                           "-servername", f"echo-80.{DOMAIN}", *args], input="", capture_output=True, text=True,
                          timeout=10)


@pytest.mark.parametrize(("group", "offered"), [("X25519", True), ("P-256", True), ("P-384", True),
                                                ("X448", False), ("P-521", False)])
def test_tls_1_3_offers_the_intermediate_profile_s_groups_only(https_edge, group, offered):
    """Mozilla's intermediate profile: X25519, prime256v1 (P-256), secp384r1 (P-384). (With TLS 1.2
    a client must offer P-256 for the ECDSA P-256 default certificate, which the server prefers
    to X448 and P-521 anyway.)"""
    out = s_client(https_edge, "-tls1_3", "-groups", group)
    assert (out.returncode == 0 and "Cipher is (NONE)" not in out.stdout) == offered, out.stdout[-600:] + out.stderr


# --- issue 20: a removed vhost, in the metrics and the log ------------------------------------------
def catalog_txn(consul, *operations: dict) -> None:
    """Catalog writes applied atomically: one index, so the edge sees them in one snapshot."""
    consul.api("PUT", "/v1/txn", list(operations))


def on_node(verb: str, sid: str, backend: Backend | None = None) -> dict:
    service = {"ID": sid, "Service": sid.rsplit("-", 1)[0]}
    if backend is not None:
        service.update(Address=backend.host, Port=backend.port, Meta={"container_port": "80"})
    return {"Service": {"Verb": verb, "Node": "swap-node", "Service": service}}


@pytest.fixture
def swap(consul, backends, haproxy):
    """An edge that served vhost `blue`, then saw it replaced by `green` in one Consul write: one
    reload that adds a vhost and removes another."""
    consul.api("PUT", "/v1/catalog/register", {"Node": "swap-node", "Address": "127.0.0.1"})
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=haproxy.path).start()
    try:
        logged(edge, "because initial sync")
        catalog_txn(consul, on_node("set", "blue-1", backends["alpha"]))
        logged(edge, "because vhost added: blue-80")
        answers(edge, f"blue-80.{DOMAIN}", {"alpha"})
        before = reloads(edge.log())
        catalog_txn(consul, on_node("delete", "blue-1"), on_node("set", "green-1", backends["beta"]))
        logged(edge, "vhost removed: blue-80")
        answers(edge, f"green-80.{DOMAIN}", {"beta"})
        assert edge.get(f"blue-80.{DOMAIN}")[0] == 404
        assert reloads(edge.log()) == before + 1, edge.log()
        time.sleep(0.5)                                    # HAProxy's own lines about it, if any
        yield edge
    finally:
        edge.stop()
        consul.api("PUT", "/v1/catalog/deregister", {"Node": "swap-node"})


def scrape(edge: EdgeProcess) -> str:
    return get(edge.admin_port, "admin", "/edge/metrics")[1]


def test_a_reload_that_adds_and_removes_vhosts_counts_both(swap):
    text = scrape(swap)
    assert 'edge_changes_applied_total{how="reload",reason="vhost_removed"} 1.0' in text, text
    assert 'edge_changes_applied_total{how="reload",reason="vhost_added"} 2.0' in text, text    # blue, then green


def test_no_server_available_is_not_an_error(swap):
    lines = [line for line in swap.log().splitlines() if "has no server available" in line]
    assert lines                                                   # HAProxy did say it: the vhost lost its servers
    assert not [line for line in lines if " ERROR " in line or " WARNING " in line], lines
