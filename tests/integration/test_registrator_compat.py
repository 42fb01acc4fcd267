"""gliderlabs/registrator's SERVICE_* contract, Docker HEALTHCHECK as a Consul check, drain on
stop and cleanup under an older host name: real dockerd, Consul, registrator and edge on loopback.

One dockerd, one Consul agent, one registrator and one set of containers serve the module; a
test that needs other registrator flags starts its own under another `--hostname`, so it never
touches the module's services. Each test names the gliderlabs source line it mirrors (or
departs from). Checks are read back from the agent's own record of them (`data_dir/checks`):
Consul 1.8's HTTP API lists a check's type and status but not its definition.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import pytest

from tests.support.docker_engine import IMAGE, running_engine
from tests.support.edge import EdgeProcess
from tests.support.procs import LoggedProcess, consul_agent, require, wait_until

pytestmark = pytest.mark.integration
HOST = "g13"
DOMAIN = "g13.example"
LOOPBACK = ("127.0.0.1", None)
# A backend that keeps serving for 2 s after SIGTERM, then exits: what a graceful server does.
GRACEFUL = 'httpd -f -p 80 -h /www & pid=$!; trap "sleep 2; kill $pid; exit 0" TERM; wait $pid'
HEALTHCHECK = {"test": ["CMD-SHELL", "cat /tmp/ok"], "interval": 200_000_000, "timeout": 1_000_000_000, "retries": 1}


class Registrator(LoggedProcess):
    def __init__(self, dockerd, consul, log_path, hostname, *extra):
        super().__init__([sys.executable, "-m", "haproxy_consul", "registrator", "--docker", dockerd.url,
                          "--consul", consul.url, "--hostname", hostname, "--log-level", "DEBUG", *extra], log_path)


@pytest.fixture(scope="module")
def dockerd():
    with running_engine() as eng:
        yield eng


@pytest.fixture(scope="module")
def consul(tmp_path_factory):
    data = tmp_path_factory.mktemp("consul-data")
    with consul_agent(tmp_path_factory.mktemp("consul"),
                      extra_config={"data_dir": str(data), "enable_script_checks": True}) as agent:
        agent.data_dir = data
        yield agent


CONTAINERS = {
    "ports2": dict(ports={"80/tcp": LOOPBACK, "8080/tcp": LOOPBACK},
                   environment={"SERVICE_TAGS": "a\\,b,c", "SERVICE_8080_TAGS": "admin", "SERVICE_8080_NAME": "admin",
                        "SERVICE_REGION": "us", "SERVICE_8080_REGION": "eu", "SERVICE_CONTAINER_PORT": "9",
                        "SERVICE_CHECK_HTTP": "/index.html", "SERVICE_8080_CHECK_HTTP": "/other",
                        "SERVICE_8080_CHECK_INTERVAL": "3s"}),
    "udp": dict(ports={"53/udp": LOOPBACK}),
    "https": dict(environment={"SERVICE_NAME": "secure", "SERVICE_CHECK_HTTPS": "/health",
                               "SERVICE_CHECK_TLS_SKIP_VERIFY": "1", "SERVICE_CHECK_HTTPS_METHOD": "HEAD",
                               "SERVICE_CHECK_INTERVAL": "7s", "SERVICE_CHECK_TIMEOUT": "2s",
                               "SERVICE_CHECK_DEREGISTER_AFTER": "3m", "SERVICE_CHECK_INITIAL_STATUS": "warning"}),
    "ttl": dict(labels={"SERVICE_CHECK_TTL": "45s", "SERVICE_CHECK_INITIAL_STATUS": "passing"}),
    "grpc": dict(environment={"SERVICE_CHECK_GRPC": "true", "SERVICE_CHECK_GRPC_USE_TLS": "true",
                      "SERVICE_CHECK_TLS_SKIP_VERIFY": "true", "SERVICE_CHECK_INTERVAL": "30s"}),
    "script": dict(environment={"SERVICE_CHECK_SCRIPT": "test $SERVICE_PORT -gt 0 && echo port $SERVICE_PORT",
                        "SERVICE_CHECK_INTERVAL": "1s"}),
}


@pytest.fixture(scope="module")
def setup(dockerd, consul, tmp_path_factory):
    """The module's registrator and containers, all registered."""
    log_dir = tmp_path_factory.mktemp("logs")
    r = Registrator(dockerd, consul, log_dir / "registrator.log", HOST, "--resync", "2", "--script-checks",
                    "--tags", "fleet").start()
    client = dockerd.client()
    made = {}
    for name, spec in CONTAINERS.items():
        spec = dict(spec)
        publish_all = spec.pop("publish_all", not spec.get("ports"))
        made[name] = client.containers.run(IMAGE, detach=True, name=name, publish_all_ports=publish_all, **spec)
    # Host networking: an exposed port and no binding (docker-py's `run` refuses ports with it).
    hostnet = client.api.create_container(IMAGE, ["sleep", "600"], name="hostnet", ports=[18099],
                                          host_config=client.api.create_host_config(network_mode="host"))
    client.api.start(hostnet)
    wanted = {f"{HOST}:ports2:80", f"{HOST}:ports2:8080", f"{HOST}:udp:53:udp", f"{HOST}:https:80", f"{HOST}:ttl:80",
              f"{HOST}:grpc:80", f"{HOST}:script:80", f"{HOST}:hostnet:18099"}
    wait_until(lambda: wanted <= set(services(consul)), 15, what="the module's registrations")
    yield r, made
    r.stop()
    print(r.log()[-4000:])


@pytest.fixture
def registrator(dockerd, consul, tmp_path):
    made = []

    def make(hostname, *extra, agent=None):
        made.append(Registrator(dockerd, agent or consul, tmp_path / f"registrator{len(made)}.log", hostname,
                                *extra).start())
        return made[-1]
    yield make
    for r in made:
        r.stop()
        print(r.log()[-3000:])


@pytest.fixture(scope="module")
def edge(consul):
    e = EdgeProcess(consul.url, domains=(DOMAIN,)).start()
    yield e
    e.stop()


def services(consul, prefix=HOST):
    return {sid: s for sid, s in consul.api("GET", "/v1/agent/services").items() if sid.startswith(f"{prefix}:")}


def live_checks(consul):
    return consul.api("GET", "/v1/agent/checks")


def persisted(consul, check_id):
    """The agent's own record of a check's definition; durations in seconds."""
    for f in (consul.data_dir / "checks").iterdir():
        if not f.is_file():                                    # checks/state: TTL checks' last status
            continue
        record = json.loads(f.read_text())
        if record["Check"]["CheckID"] == check_id:
            d = dict(record["ChkType"])
            for key in ("Interval", "Timeout", "TTL", "DeregisterCriticalServiceAfter"):
                d[key] = d[key] / 1e9
            return {**d, "Type": record["Check"]["Type"]}
    return None


def host_port(container, port="80/tcp"):
    container.reload()
    return int(container.attrs["NetworkSettings"]["Ports"][port][0]["HostPort"])


# --- the SERVICE_* contract -----------------------------------------------------------------
def test_per_port_settings_replace_the_container_wide_ones(setup, consul):
    # bridge/util.go serviceMetaData: `metadata[portkey[1]] = kvp[1]; metadataFromPort[...] = true`
    s = services(consul)
    assert s[f"{HOST}:ports2:8080"]["Service"] == "admin" and s[f"{HOST}:ports2:80"]["Service"] == "nginx-80"
    assert s[f"{HOST}:ports2:8080"]["Tags"] == ["admin", "fleet"]
    assert s[f"{HOST}:ports2:8080"]["Meta"]["region"] == "eu"


def test_escaped_comma_in_tags(setup, consul):
    # bridge/util.go recParseEscapedComma, as bridge/util_test.go TestEscapedComma
    assert services(consul)[f"{HOST}:ports2:80"]["Tags"] == ["a,b", "c", "fleet"]


def test_other_settings_become_meta_and_ours_stay(setup, consul):
    # bridge.go newService `service.Attrs = metadata`; consul/consul.go Register `registration.Meta = service.Attrs`
    meta = services(consul)[f"{HOST}:ports2:80"]["Meta"]
    assert meta["region"] == "us" and meta["container_port"] == "80" and meta["host"] == HOST
    assert "check_http" not in meta and "tags" not in meta


def test_udp_port_gets_the_udp_tag_and_id_suffix(setup, consul):
    # bridge.go newService `if port.PortType == "udp" { ... combineTags(..., "udp"); service.ID + ":udp" }`
    s = services(consul)[f"{HOST}:udp:53:udp"]
    assert s["Tags"] == ["fleet", "udp"] and s["Service"] == "nginx"


def test_host_network_registers_exposed_ports(setup, consul):
    # bridge.go add: "Extract configured host port mappings, relevant when using --net=host"
    s = services(consul)[f"{HOST}:hostnet:18099"]
    assert (s["Address"], s["Port"]) == ("127.0.0.1", 18099)


def test_https_check_with_method_skip_verify_status_and_deregister_after(setup, consul):
    # consul/consul.go buildCheck: check_https, check_https_method, check_timeout, check_interval,
    # check_initial_status, check_deregister_after (skip-verify for HTTPS is ours: gliderlabs has it for gRPC only)
    port = host_port(setup[1]["https"])
    d = persisted(consul, f"service:{HOST}:https:80")
    assert (d["Type"], d["HTTP"], d["Method"], d["TLSSkipVerify"]) == (
        "http", f"https://127.0.0.1:{port}/health", "HEAD", True)
    assert (d["Interval"], d["Timeout"], d["Status"], d["DeregisterCriticalServiceAfter"]) == (7, 2, "warning", 180)


def test_ttl_check_with_initial_status(setup, consul):
    # consul/consul.go buildCheck: `check.TTL = ttl`, `check.Status = status`
    d = persisted(consul, f"service:{HOST}:ttl:80")
    assert (d["Type"], d["TTL"], d["Status"], d["Interval"]) == ("ttl", 45, "passing", 0)
    assert live_checks(consul)[f"service:{HOST}:ttl:80"]["Status"] == "passing"


def test_grpc_check_with_tls(setup, consul):
    # consul/consul.go buildCheck: check_grpc, check_grpc_use_tls, check_tls_skip_verify
    port = host_port(setup[1]["grpc"])
    d = persisted(consul, f"service:{HOST}:grpc:80")
    assert (d["Type"], d["GRPC"], d["GRPCUseTLS"], d["TLSSkipVerify"], d["Interval"], d["Timeout"]) == (
        "grpc", f"127.0.0.1:{port}", True, True, 30, 5)


def test_per_port_check_settings(setup, consul):
    # bridge/util.go serviceMetaData feeds consul.go buildCheck per port: SERVICE_8080_CHECK_* for 8080 only
    c = setup[1]["ports2"]
    d80, d8080 = persisted(consul, f"service:{HOST}:ports2:80"), persisted(consul, f"service:{HOST}:ports2:8080")
    assert (d80["HTTP"], d80["Interval"]) == (f"http://127.0.0.1:{host_port(c)}/index.html", 10)
    assert (d8080["HTTP"], d8080["Interval"]) == (f"http://127.0.0.1:{host_port(c, '8080/tcp')}/other", 3)
    wait_until(lambda: live_checks(consul)[f"service:{HOST}:ports2:80"]["Status"] == "passing", 15,
               what="HTTP check on port 80 passing")


def test_script_check_only_with_the_opt_in(setup, consul, registrator):
    # consul/consul.go buildCheck: check_script with $SERVICE_IP / $SERVICE_PORT interpolated
    port = host_port(setup[1]["script"])
    d = persisted(consul, f"service:{HOST}:script:80")
    assert (d["Type"], d["ScriptArgs"], d["Interval"]) == (
        "script", ["/bin/sh", "-c", f"test {port} -gt 0 && echo port {port}"], 1)
    wait_until(lambda: live_checks(consul)[f"service:{HOST}:script:80"]["Output"].strip() == f"port {port}", 10,
               what="the script check run by the agent")
    r = registrator("n13", "--resync", "60")                           # without --script-checks
    wait_until(lambda: "n13:script:80" in services(consul, "n13"), 10, what="registration without the script")
    assert not any(c["ServiceID"] == "n13:script:80" for c in live_checks(consul).values())
    assert "ignored unless the registrator runs with --script-checks" in r.log()


def test_explicit_registers_only_named_services(setup, consul, registrator):
    # bridge.go newService: `if serviceName == "" { if b.config.Explicit { return nil } ... }`
    r = registrator("x13", "--explicit", "--resync", "60")
    wait_until(lambda: "in sync" in r.log(), 10, what="first reconciliation")
    assert set(services(consul, "x13")) == {"x13:ports2:8080", "x13:https:80"}


def test_changed_checks_are_applied_at_the_next_reconciliation(setup, consul):
    # bridge.go Sync: "NOTE: This assumes reregistering will do the right thing" (gliderlabs re-registers
    # blindly; we compare the agent's checks and register again only what differs)
    sid = f"{HOST}:ttl:80"
    s = consul.api("GET", f"/v1/agent/service/{sid}")
    consul.api("PUT", "/v1/agent/service/register?replace-existing-checks=true",
               {"ID": sid, "Name": s["Service"], "Address": s["Address"], "Port": s["Port"], "Tags": s["Tags"],
                "Meta": s["Meta"], "Check": {"CheckID": f"service:{sid}", "TTL": "5m"}})
    assert persisted(consul, f"service:{sid}")["TTL"] == 300
    wait_until(lambda: (persisted(consul, f"service:{sid}") or {}).get("TTL") == 45, 10,
               what="the container's TTL check restored")
    wait_until(lambda: setup[0].log().count(f"registered {sid} ") >= 2, 5, what="the re-registration logged")


# --- beyond gliderlabs ----------------------------------------------------------------------
def test_docker_healthcheck_is_a_consul_check_and_the_edge_routes_only_while_healthy(setup, dockerd, consul, edge):
    # gliderlabs #578: registrator.go handles only "start" and "die"; a HEALTHCHECK is invisible to it.
    c = dockerd.client().containers.run(IMAGE, detach=True, name="hc", publish_all_ports=True,
                                        environment={"SERVICE_NAME": "hc"}, healthcheck=HEALTHCHECK)
    sid, check = f"{HOST}:hc:80", f"service:{HOST}:hc:80:docker-health"
    host = f"hc-80.{DOMAIN}"
    try:
        wait_until(lambda: check in live_checks(consul), 10, what="registered while starting, with its check")
        d = persisted(consul, check)
        assert (d["Type"], d["TTL"], d["Name"]) == ("ttl", 60, "Docker HEALTHCHECK")
        wait_until(lambda: "can't open '/tmp/ok'" in live_checks(consul)[check]["Output"], 10,
                   what="Docker's probe output in the check")
        assert live_checks(consul)[check]["Status"] == "critical"
        wait_until(lambda: edge.get(host)[0] == 503, 15, what="vhost known, nothing routable")
        c.exec_run(["sh", "-c", "echo ok > /tmp/ok"])
        wait_until(lambda: live_checks(consul)[check]["Status"] == "passing", 10, what="healthy → passing")
        assert live_checks(consul)[check]["Output"].strip() == "ok"
        wait_until(lambda: edge.get(host) == (200, "hello from busybox httpd\n"), 10, what="routed while healthy")
        c.exec_run(["sh", "-c", "rm /tmp/ok"])
        wait_until(lambda: live_checks(consul)[check]["Status"] == "critical", 10, what="unhealthy → critical")
        wait_until(lambda: edge.get(host)[0] == 503, 10, what="not routed once unhealthy")
        assert sid in services(consul)                     # registered throughout
    finally:
        c.remove(force=True)


def test_stop_under_load_with_drain_loses_no_request(setup, dockerd, consul, edge, tmp_path):
    # gliderlabs #685: registrator.go `case "die": go b.RemoveOnExit(msg.ID)` acts only once the process is gone.
    wrk = require("wrk")
    client = dockerd.client()
    backends = [client.containers.run(IMAGE, detach=True, name=f"drain{i}", publish_all_ports=True,
                                      environment={"SERVICE_NAME": "drainme"}, command=["sh", "-c", GRACEFUL])
                for i in range(2)]
    host = f"drainme-80.{DOMAIN}"
    try:
        wait_until(lambda: {f"{HOST}:drain0:80", f"{HOST}:drain1:80"} <= set(services(consul)), 10,
                   what="both backends registered")
        wait_until(lambda: all(edge.get(host)[0] == 200 for _ in range(4)), 10, what="both routed")
        stopper = threading.Timer(1.5, lambda: backends[0].stop(timeout=10))
        stopper.start()
        pace = tmp_path / "pace.lua"          # a steady rate, not saturation: the machine is shared
        pace.write_text("function delay() return 10 end\n")
        out = subprocess.run([wrk, "-t", "1", "-c", "4", "-d", "6s", "--timeout", "5s", "-s", str(pace),
                              "-H", f"Host: {host}", f"http://127.0.0.1:{edge.port}/"],
                             capture_output=True, text=True, timeout=60).stdout
        stopper.join()
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        assert requests > 100, out
        assert "Non-2xx" not in out and "Socket errors" not in out, out
        log = setup[0].log()
        drained = log.index(f"{HOST}:drain0:80 in maintenance until it exits")
        assert drained < log.index(f"deregistered {HOST}:drain0:80"), "maintenance came after the deregistration"
    finally:
        for b in backends:
            b.remove(force=True)


def test_cleanup_removes_services_of_an_older_hostname(dockerd, registrator, tmp_path):
    # bridge.go Sync (cleanup): `if serviceHostname != Hostname { continue }` leaves them; gliderlabs #181, #622
    client = dockerd.client()
    keep, gone = (client.containers.run(IMAGE, detach=True, name=n, publish_all_ports=True)
                  for n in ("keepme", "goner"))
    try:
        with consul_agent(tmp_path / "consul") as agent:
            old = registrator("old13", "--resync", "60", agent=agent)
            wait_until(lambda: {"old13:keepme:80", "old13:goner:80"} <= set(agent.api("GET", "/v1/agent/services")),
                       10, what="registered under the old name")
            old.kill()
            gone.remove(force=True)
            agent.api("PUT", "/v1/agent/service/register", {"ID": "t3:elsewhere:80", "Name": "nginx", "Port": 1})
            registrator("new13", "--resync", "60", "--cleanup", agent=agent)

            def cleaned():
                sids = set(agent.api("GET", "/v1/agent/services"))
                return not any(s.startswith("old13:") for s in sids) and "new13:keepme:80" in sids and sids
            sids = wait_until(cleaned, 10, what="nothing left under the old name")
            assert "t3:elsewhere:80" in sids and not any(":goner:" in s for s in sids)     # not ours: kept
    finally:
        for c in (keep, gone):
            try:
                c.remove(force=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass


def test_the_module_registrator_was_never_refused(setup):
    # Every setting the module's containers use is valid: Consul took each registration as it was.
    assert "Consul refused" not in setup[0].log() and "Traceback" not in setup[0].log()

