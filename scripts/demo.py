"""`make demo`: a local haproxy-consul edge on loopback, with real Consul and real HAProxy.

Starts a Consul dev agent, a few HTTP backends registered as `nginx` (container port 80) and
`whoami` (container port 8080) with HTTP health checks, and the edge on 127.0.0.1:8080 (HTTP) and
127.0.0.1:8443 (HTTPS) with domain `localhost`. HTTPS uses a local CA made for the demo
(state/demo/ca.pem) whose certificates for each route sit in the edge's `--certs` directory.
Prints working URLs and `curl` lines, runs two of them itself, and stays up until Ctrl-C (or
DEMO_SECONDS, for tests). Everything stays on 127.0.0.1; state and logs go to ./state/demo.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.http import Backend, get  # noqa: E402 - the repo's own loopback helpers
from tests.support.procs import ConsulAgent, free_ports, stop_process, wait_until  # noqa: E402
from tests.support.tlsgen import make_ca  # noqa: E402

EDGE_PORT = int(os.environ.get("DEMO_PORT", "8080"))
HTTPS_PORT = int(os.environ.get("DEMO_HTTPS_PORT", "8443"))
ADMIN_PORT = int(os.environ.get("DEMO_ADMIN_PORT", "8404"))
DOMAIN = "localhost"


def register(consul: ConsulAgent, name: str, sid: str, backend: Backend, container_port: int) -> None:
    consul.api("PUT", "/v1/agent/service/register", {
        "Name": name, "ID": sid, "Address": "127.0.0.1", "Port": backend.port,
        "Meta": {"container_port": str(container_port)},
        "Check": {"HTTP": f"http://127.0.0.1:{backend.port}/", "Interval": "2s", "Timeout": "1s",
                  "Status": "passing"},
    })


def main() -> int:
    state = REPO / "state" / "demo"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    consul_port = 8500 if port_free(8500) else free_ports(1)[0]
    consul = ConsulAgent(state / "consul", http_port=consul_port, node_name="demo").start()
    backends = []
    edge = None
    try:
        for i in range(1, 4):
            backends.append(Backend(f"hello from nginx instance {i}\n"))
            register(consul, "nginx", f"demo:nginx{i}:80", backends[-1], 80)
        for i in range(1, 3):
            backends.append(Backend(f"whoami instance {i}\n"))
            register(consul, "whoami", f"demo:whoami{i}:8080", backends[-1], 8080)
        certs, ca_file = demo_certificates(state)
        log = open(state / "edge.log", "ab")
        edge = subprocess.Popen(
            [sys.executable, "-m", "haproxy_consul", "edge", "--consul", consul.url, "--domain", DOMAIN,
             "--bind", f"127.0.0.1:{EDGE_PORT}", "--https-bind", f"127.0.0.1:{HTTPS_PORT}", "--certs", str(certs),
             "--no-https-redirect", "--admin-bind", f"127.0.0.1:{ADMIN_PORT}",
             "--state-dir", str(state / "edge"), "--handover-timeout", "0"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        https_curl = f"curl -s --cacert {ca_file.relative_to(REPO)} https://nginx-80.{DOMAIN}:{HTTPS_PORT}/"

        def https_answer() -> str:
            out = subprocess.run(shlex.split(https_curl), cwd=REPO, capture_output=True, text=True, timeout=10)
            return out.stdout.strip()

        wait_until(lambda: edge.poll() is None and get(EDGE_PORT, f"nginx-80.{DOMAIN}")[0] == 200
                   and https_answer(), 30, what="the edge routing nginx-80 over HTTP and HTTPS")
        print(f"""
haproxy-consul demo is up (Consul {consul.url}, logs in {state}).

  http://nginx-80.{DOMAIN}:{EDGE_PORT}/        3 instances, round-robin
  https://nginx-80.{DOMAIN}:{HTTPS_PORT}/      the same over HTTPS (HTTP/2; trust {ca_file.relative_to(REPO)})
  http://whoami-8080.{DOMAIN}:{EDGE_PORT}/     2 instances
  http://nothing.{DOMAIN}:{EDGE_PORT}/         404 landing page listing every route
  http://127.0.0.1:{ADMIN_PORT}/               HAProxy stats (/metrics: Prometheus)

  curl -s -H 'Host: nginx-80.{DOMAIN}' http://127.0.0.1:{EDGE_PORT}/
  {https_curl}
  .venv/bin/haproxy-consul edge routes --consul {consul.url} --domain {DOMAIN}

Press Ctrl-C to stop.""", flush=True)
        for _ in range(3):
            print("  ->", get(EDGE_PORT, f"nginx-80.{DOMAIN}")[1].strip(), flush=True)
        print("  -> https:", https_answer(), flush=True)
        seconds = float(os.environ.get("DEMO_SECONDS", "0"))
        deadline = time.monotonic() + seconds if seconds > 0 else None
        signal.signal(signal.SIGTERM, interrupt)
        while deadline is None or time.monotonic() < deadline:
            if edge.poll() is not None:
                print(f"the edge exited ({edge.returncode}); see {state / 'edge.log'}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if edge is not None:
            stop_process(edge)
        for b in backends:
            b.close()
        consul.stop()
    print("demo stopped")
    return 0


def demo_certificates(state: Path) -> tuple[Path, Path]:
    """A local CA and a certificate per demo route, in the edge's --certs directory."""
    ca = make_ca("haproxy-consul demo CA")
    certs = state / "certs"
    certs.mkdir()
    for route in ("nginx-80", "whoami-8080"):
        (certs / f"{route}.pem").write_text(ca.bundle([f"{route}.{DOMAIN}"]))
    ca_file = state / "ca.pem"
    ca_file.write_text(ca.pem)
    return certs, ca_file


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def interrupt(_signum, _frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
