"""Container → registrations (gliderlabs-compatible SERVICE_* rules) and reconciliation.

Where a case mirrors gliderlabs/registrator, the comment names the file and function it follows.
"""

import pytest

from registrator.mapping import (
    Check,
    Health,
    Params,
    Registration,
    container_from_inspect,
    docker_health,
    image_base,
    registrations,
    service_name,
    split_tags,
    stopping_signal,
)
from registrator.reconcile import (
    DRAIN_REASON,
    ENGINE_REASON,
    AgentCheck,
    Held,
    agent_reset,
    diff,
    engine_gone,
    health_updates,
    held,
    maintenance,
    older_hostnames,
)

P = Params(hostname="t2", ip=None, agent_ip="10.0.0.2")
CID = "c0ffee" * 10 + "beef"
HTTP = "http://10.0.0.2:32768"


def inspect(image="nginx:1.25", name="/silly_wright", ports=None, env=(), labels=None, running=True, paused=False,
            health=None, ip="172.17.0.5", probes=None, network_mode="default", exposed=None, stop_signal=None,
            stop_timeout=None):
    ports = {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}]} if ports is None else ports
    state = {"Running": running, "Paused": paused}
    if health:
        state["Health"] = {"Status": health, "Log": probes or []}
    config = {"Image": image, "Env": list(env), "Labels": labels or {}, "ExposedPorts": exposed or {}}
    if stop_signal:
        config["StopSignal"] = stop_signal
    if stop_timeout is not None:
        config["StopTimeout"] = stop_timeout
    return {"Id": CID, "Name": name, "Config": config, "State": state, "HostConfig": {"NetworkMode": network_mode},
            "NetworkSettings": {"Ports": ports, "IPAddress": ip}}


def regs(params=P, **kw):
    return registrations(container_from_inspect(inspect(**kw)), params)


def one(params=P, **kw):
    (r,), problems = regs(params, **kw)
    return r, problems


TWO_PORTS = {"80/tcp": [{"HostIp": "", "HostPort": "1"}], "8080/tcp": [{"HostIp": "", "HostPort": "2"}]}


@pytest.mark.parametrize("image, base", [
    ("nginx", "nginx"), ("nginx:1.25", "nginx"), ("quay.io/acme/nginx:1.25", "nginx"),
    ("localhost:5000/x/redis@sha256:abc", "redis"), ("registry:5000/app", "app"),
])
def test_image_base(image, base):
    assert image_base(image) == base


@pytest.mark.parametrize("raw, name", [
    ("My_App", "my-app"), ("a b\nc", "a-b-c"), ("--x--", "x"), ("ünï", "n"), ("x" * 100, "x" * 63), ("###", ""),
])
def test_service_name(raw, name):
    assert service_name(raw) == name


# bridge/util_test.go TestEscapedComma, case by case, plus our stripping and cleaning.
@pytest.mark.parametrize("raw, tags", [
    ("", []), ("foobar", ["foobar"]), ("foo,bar", ["foo", "bar"]), ("foo\\,bar", ["foo,bar"]),
    ("foo,bar\\,baz", ["foo", "bar,baz"]), ("\\,foobar\\,", [",foobar,"]), (",,,,foo,,,bar,,,", ["foo", "bar"]),
    (",,,,", []), (",,\\,,", [","]), ("a\\,b,c", ["a,b", "c"]), (" a , b\n", ["a", "b"]), ("a\\b", ["a\\b"]),
])
def test_split_tags(raw, tags):
    assert split_tags(raw) == tags


def test_one_published_port():
    r, problems = one()
    assert (r.id, r.name, r.address, r.port) == ("t2:silly_wright:80", "nginx", "10.0.0.2", 32768)
    meta = dict(r.meta)
    assert meta["container_port"] == "80" and meta["container_name"] == "silly_wright" and meta["host"] == "t2"
    assert meta["image"] == "nginx:1.25" and meta["container_id"] == CID
    assert r.checks == () and problems == ()


def test_several_ports_get_suffixes_udp_ids_and_the_udp_tag():
    # bridge.go newService: `-<port>` for groups; udp: ID suffix `:udp` and tag `udp`.
    ports = {"80/tcp": [{"HostIp": "", "HostPort": "1"}], "443/tcp": [{"HostIp": "", "HostPort": "2"}],
             "53/udp": [{"HostIp": "", "HostPort": "3"}], "9000/tcp": None}
    rs, _ = regs(ports=ports)
    assert [(r.name, r.id, r.tags) for r in rs] == [
        ("nginx-443", "t2:silly_wright:443", ()), ("nginx-53", "t2:silly_wright:53:udp", ("udp",)),
        ("nginx-80", "t2:silly_wright:80", ())]


def test_binding_on_a_specific_host_ip_registers_that_ip():
    r, _ = one(ports={"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "5"}]})
    assert r.address == "127.0.0.1"
    r, _ = one(Params("t2", "192.0.2.9", "10.0.0.2"), ports={"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "5"}]})
    assert r.address == "192.0.2.9"                       # --ip wins


def test_internal_registers_container_ip_and_private_port():
    r, _ = one(Params("t2", None, "10.0.0.2", internal=True), ports={"80/tcp": None})
    assert (r.address, r.port) == ("172.17.0.5", 80)


def test_host_network_registers_exposed_ports_as_host_ports():
    # bridge.go add: "Extract configured host port mappings, relevant when using --net=host".
    r, _ = one(ports={}, network_mode="host", exposed={"8080/tcp": {}}, ip="")
    assert (r.id, r.address, r.port) == ("t2:silly_wright:8080", "10.0.0.2", 8080)


@pytest.mark.parametrize("kw, expect_names", [
    ({"env": ["SERVICE_NAME=web"]}, ["web"]),
    ({"env": ["SERVICE_NAME=web"], "labels": {"SERVICE_NAME": "api"}}, ["api"]),         # labels win
    ({"env": ["SERVICE_80_NAME=front"]}, ["front"]),
    ({"env": ["SERVICE_NAME="]}, ["nginx"]),                                             # empty = unset
    ({"env": ["SERVICE_IGNORE=true"]}, []),
    ({"env": ["SERVICE_IGNORE=false"]}, ["nginx"]),
    ({"labels": {"SERVICE_80_IGNORE": "1"}}, []),
    ({"env": ["SERVICE_IGNORE=1", "SERVICE_80_IGNORE=0"]}, ["nginx"]),                   # the port's replaces
    ({"env": ["SERVICE_81_IGNORE=1"]}, ["nginx"]),                                       # another port's
    ({"running": False}, []),
    ({"paused": True}, []),
    ({"ports": {"80/tcp": None}}, []),                                                   # exposed, not published
])
def test_settings_and_states(kw, expect_names):
    rs, _ = regs(**kw)
    assert [r.name for r in rs] == expect_names


@pytest.mark.parametrize("health, env, registered, status", [
    (None, [], True, None),
    ("starting", [], True, "critical"),
    ("healthy", [], True, "passing"),
    ("unhealthy", [], True, "critical"),
    ("starting", ["SERVICE_CHECK_DOCKER_HEALTH=false"], False, None),      # opted out: the old gate
    ("unhealthy", ["SERVICE_CHECK_DOCKER_HEALTH=false"], False, None),
    ("healthy", ["SERVICE_CHECK_DOCKER_HEALTH=false"], True, None),
    ("starting", ["SERVICE_CHECK_DOCKER_HEALTH=false", "SERVICE_80_CHECK_DOCKER_HEALTH=true"], True, "critical"),
])
def test_docker_health_becomes_a_ttl_check(health, env, registered, status):
    rs, _ = regs(health=health, env=env, probes=[{"Output": "probe 1"}, {"Output": "ok\n\x00"}])
    assert bool(rs) is registered
    if status:
        (r,) = rs
        assert r.checks == (Check("docker", ttl="60s"),) and r.health == Health(status, "ok\n")
        assert r.checks[0].check_id(r.id) == "service:t2:silly_wright:80:docker-health"
    elif rs:
        assert rs[0].health is None and rs[0].checks == ()


def test_docker_health_without_a_probe_yet_says_so():
    c = container_from_inspect(inspect(health="starting"))
    assert docker_health(c) == Health("critical", "Docker health status: starting (no probe has finished yet)")


def test_docker_health_check_sits_beside_the_containers_own_and_replaces_the_heartbeat():
    r, _ = one(Params("t2", None, "10.0.0.2", ttl=30, health_ttl="30s"), health="healthy",
               env=["SERVICE_CHECK_TCP=true"])
    assert [c.kind for c in r.checks] == ["docker", "tcp"]


def test_tags_ids_and_meta():
    r, problems = one(Params("t2", None, "10.0.0.2", tags=("edge",)),
                      env=["SERVICE_TAGS=a, b", "SERVICE_ID=custom", "SERVICE_META_OWNER=team x",
                           "SERVICE_META_bad key=1", "SERVICE_META_CONTAINER_PORT=9"])
    assert r.tags == ("a", "b", "edge")
    assert r.id == "t2:custom:80"
    meta = dict(r.meta)
    assert meta["owner"] == "team x" and meta["container_port"] == "80"    # ours are not overridden
    assert len(problems) == 2


@pytest.mark.parametrize("env, port80, port8080", [
    # bridge/util.go serviceMetaData: SERVICE_<port>_<KEY> replaces SERVICE_<KEY> for that port.
    (["SERVICE_TAGS=a,b", "SERVICE_8080_TAGS=x"], ("a", "b"), ("x",)),
    (["SERVICE_8080_TAGS=x", "SERVICE_TAGS=a"], ("a",), ("x",)),                          # order does not matter
    (["SERVICE_TAGS=a", "SERVICE_8080_TAGS="], ("a",), ()),                              # an empty one replaces too
    (["SERVICE_TAGS=a\\,b,c"], ("a,b", "c"), ("a,b", "c")),
])
def test_per_port_settings_replace_container_wide_ones(env, port80, port8080):
    rs, _ = regs(ports=TWO_PORTS, env=env)
    assert {r.name: r.tags for r in rs} == {"nginx-80": port80, "nginx-8080": port8080}


@pytest.mark.parametrize("env, labels, meta80, meta8080", [
    # docs/user/services.md: "The Attrs field is populated by metadata using any other field names".
    (["SERVICE_REGION=us"], {}, {"region": "us"}, {"region": "us"}),
    (["SERVICE_REGION=us", "SERVICE_8080_REGION=eu"], {}, {"region": "us"}, {"region": "eu"}),
    (["SERVICE_REGION=us"], {"SERVICE_REGION": "eu"}, {"region": "eu"}, {"region": "eu"}),   # label wins
    (["SERVICE_8080_SNI=enabled"], {}, {}, {"sni": "enabled"}),
    (["SERVICE_REGION=us", "SERVICE_META_REGION=eu"], {}, {"region": "eu"}, {"region": "eu"}),
    (["SERVICE_CHECK_INTERVAL=5s", "SERVICE_NAME=x", "SERVICE_TAGS=t", "SERVICE_IGNORE=no", "SERVICE_ID=i"], {},
     {}, {}),
    (["SERVICE_HOST=evil", "SERVICE_CONTAINER_ID=evil"], {}, {}, {}),                   # ours stay
    (["service_region=us", "SERVICE_=x", "XSERVICE_A=1"], {}, {}, {}),
])
def test_other_settings_become_meta(env, labels, meta80, meta8080):
    rs, _ = regs(ports=TWO_PORTS, env=env, labels=labels)
    ours = {"container_port", "container_name", "container_id", "image", "host"}
    got = {r.id.rsplit(":", 1)[1]: {k: v for k, v in r.meta if k not in ours} for r in rs}
    assert got == {"80": meta80, "8080": meta8080}
    assert all(dict(r.meta)["host"] == "t2" and dict(r.meta)["container_id"] == CID for r in rs)


def test_meta_is_bounded_to_what_consul_takes():
    env = [f"SERVICE_K{i:03d}=v" for i in range(100)] + ["SERVICE_CONSUL-X=1", "SERVICE_A.B=1"]
    r, problems = one(env=env)
    assert len(r.meta) == 64 and len(problems) == 3


@pytest.mark.parametrize("kw, names", [
    ({}, []),                                                                  # bridge.go: config.Explicit
    ({"env": ["SERVICE_NAME=web"]}, ["web-80", "web-8080"]),
    ({"env": ["SERVICE_8080_NAME=admin"]}, ["admin"]),
    ({"labels": {"SERVICE_NAME": "###"}}, []),
])
def test_explicit_registers_only_named_ports(kw, names):
    rs, _ = regs(Params("t2", None, "10.0.0.2", explicit=True), ports=TWO_PORTS, **kw)
    assert [r.name for r in rs] == names


# consul/consul.go buildCheck, one case per setting; our own defaults are interval 10s, timeout 5s.
@pytest.mark.parametrize("env, check, problem", [
    (["SERVICE_CHECK_HTTP=/health"], Check("http", f"{HTTP}/health", "10s", "5s"), False),
    (["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_INTERVAL=2s", "SERVICE_CHECK_TIMEOUT=1s"],
     Check("http", f"{HTTP}/h", "2s", "1s"), False),
    (["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_HTTP_METHOD=head"],
     Check("http", f"{HTTP}/h", "10s", "5s", method="HEAD"), False),
    (["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_METHOD=POST"], Check("http", f"{HTTP}/h", "10s", "5s", method="POST"),
     False),
    (["SERVICE_CHECK_HTTPS=/h", "SERVICE_CHECK_TLS_SKIP_VERIFY=true", "SERVICE_CHECK_HTTPS_METHOD=HEAD"],
     Check("http", "https://10.0.0.2:32768/h", "10s", "5s", method="HEAD", tls_skip_verify=True), False),
    (["SERVICE_CHECK_HTTPS=/h"], Check("http", "https://10.0.0.2:32768/h", "10s", "5s"), False),
    (["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_HTTPS=/s"], Check("http", f"{HTTP}/h", "10s", "5s"), False),  # HTTP 1st
    (["SERVICE_CHECK_TCP=true"], Check("tcp", "10.0.0.2:32768", "10s", "5s"), False),
    (["SERVICE_CHECK_TCP=false"], None, False),
    (["SERVICE_CHECK_TTL=30s"], Check("ttl", ttl="30s"), False),
    (["SERVICE_CHECK_TTL=30s", "SERVICE_CHECK_TCP=true"], Check("ttl", ttl="30s"), False),                 # TTL first
    (["SERVICE_CHECK_TTL=1m30s", "SERVICE_CHECK_INITIAL_STATUS=passing", "SERVICE_CHECK_DEREGISTER_AFTER=10m"],
     Check("ttl", ttl="1m30s", initial_status="passing", deregister_after="10m"), False),
    (["SERVICE_CHECK_GRPC=true"], Check("grpc", "10.0.0.2:32768", "10s", "5s"), False),
    (["SERVICE_CHECK_GRPC=true", "SERVICE_CHECK_GRPC_USE_TLS=true", "SERVICE_CHECK_TLS_SKIP_VERIFY=true"],
     Check("grpc", "10.0.0.2:32768", "10s", "5s", grpc_use_tls=True, tls_skip_verify=True), False),
    (["SERVICE_CHECK_GRPC=true", "SERVICE_CHECK_TLS_SKIP_VERIFY=true"], Check("grpc", "10.0.0.2:32768", "10s", "5s"),
     False),                                                                   # skip-verify only with TLS
    (["SERVICE_CHECK_SCRIPT=true"], None, True),                               # not without --script-checks
    (["SERVICE_CHECK_CMD=/bin/check"], None, True),                           # needs gliderlabs' check-cmd
    (["SERVICE_CHECK_HTTP=no-slash"], None, True),
    (["SERVICE_CHECK_TCP=maybe"], None, True),
    (["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_INTERVAL=often"], Check("http", f"{HTTP}/h", "10s", "5s"), True),
    (["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_METHOD=G E T"], Check("http", f"{HTTP}/h", "10s", "5s"), True),
    (["SERVICE_CHECK_TTL=30s", "SERVICE_CHECK_INITIAL_STATUS=great"], Check("ttl", ttl="30s"), True),
    (["SERVICE_CHECK_TTL=soon"], None, True),
    (["SERVICE_CHECK_HTTP=/h", "SERVICE_80_CHECK_TCP=true"], Check("http", f"{HTTP}/h", "10s", "5s"), False),
    (["SERVICE_80_CHECK_TCP=true", "SERVICE_80_CHECK_INTERVAL=3s"], Check("tcp", "10.0.0.2:32768", "3s", "5s"), False),
])
def test_checks(env, check, problem):
    r, problems = one(env=env)
    assert r.checks == ((check,) if check else ())
    assert bool(problems) is problem, problems


def test_script_checks_only_when_the_registrator_allows_them():
    env = ["SERVICE_CHECK_SCRIPT=nc -z $SERVICE_IP $SERVICE_PORT | grep -q .", "SERVICE_CHECK_INTERVAL=3s"]
    r, _ = one(Params("t2", None, "10.0.0.2", script_checks=True), env=env)
    assert r.checks == (Check("script", "nc -z 10.0.0.2 32768 | grep -q .", "3s"),)


def test_checks_on_a_udp_port_are_refused_but_ttl_works():
    ports = {"53/udp": [{"HostIp": "", "HostPort": "3"}]}
    r, problems = one(ports=ports, env=["SERVICE_CHECK_HTTP=/h"])
    assert r.checks == () and problems
    r, problems = one(ports=ports, env=["SERVICE_CHECK_TTL=9s"])
    assert r.checks == (Check("ttl", ttl="9s"),) and not problems


def test_heartbeat_when_asked_and_nothing_else_checks():
    r, _ = one(Params("t2", None, "10.0.0.2", ttl=30))
    assert r.checks == (Check("heartbeat", ttl="30s", deregister_after="10m"),)
    r, _ = one(Params("t2", None, "10.0.0.2", ttl=30), env=["SERVICE_CHECK_TCP=1"])
    assert [c.kind for c in r.checks] == ["tcp"]


def test_notes_describe_the_definition_so_a_change_shows():
    a = Check("http", f"{HTTP}/h", "10s", "5s", method="HEAD", tls_skip_verify=True, deregister_after="1m")
    assert a.notes == (f"haproxy-consul registrator: http method=HEAD target={HTTP}/h interval=10s timeout=5s "
                       "deregister-after=1m tls-skip-verify")
    assert len({a.notes, Check("http", f"{HTTP}/h", "11s", "5s").notes, Check("tcp", "x").notes}) == 3


def test_hostile_names_and_values_stay_clean():
    r, _ = one(image="evil\nimage:1", name="/x\ny", env=["SERVICE_TAGS=ok,\n,bad\ttag", "SERVICE_NAME=\n",
                                                          "SERVICE_CHECK_SCRIPT=a\nb"])
    assert "\n" not in r.id and "\n" not in "".join(r.tags) and r.name == "evil-image"
    assert "\t" not in "".join(r.tags)


def test_garbage_inspect_data_does_not_crash():
    c = container_from_inspect({"Id": 5, "NetworkSettings": {"Ports": {"x/tcp": None, "99999/tcp": None}},
                                "State": {"Health": {"Status": 3, "Log": "x"}}, "Config": {"StopTimeout": "y"}})
    assert c.ports == () and c.health is None and c.stop_timeout == 10 and registrations(c, P) == ((), ())


@pytest.mark.parametrize("sig, stop_signal, stops", [
    ("15", "", True), ("9", "", True), ("2", "", True), ("3", "", True), ("1", "", False), ("10", "", False),
    ("1", "SIGHUP", True), ("28", "SIGWINCH", True), ("28", "WINCH", True), ("12", "12", True), ("", "", False),
    ("x", "SIGBOGUS", False),
])
def test_stopping_signal(sig, stop_signal, stops):
    assert stopping_signal(sig, stop_signal) is stops


# --- reconcile --------------------------------------------------------------------------------
def reg(sid, port=1, cid="c1", checks=(), meta=()):
    return Registration(sid, "web", "10.0.0.1", port, (), (("container_id", cid), *meta), checks)


def agent_checks(r):
    return [AgentCheck(cid, r.id, typ, notes) for cid, typ, notes in r.check_signature()]


def test_diff_registers_missing_and_changed_and_removes_only_ours():
    registered = {"t2:a:80": reg("t2:a:80"), "t2:b:80": reg("t2:b:80", port=5), "t2:gone:80": reg("t2:gone:80"),
                  "t3:other:80": reg("t3:other:80"), "manual": reg("manual")}
    desired = [reg("t2:a:80"), reg("t2:b:80", port=6), reg("t2:new:80")]
    changes = diff(desired, registered, [], "t2")
    assert [r.id for r in changes.register] == ["t2:b:80", "t2:new:80"]
    assert changes.deregister == ("t2:gone:80",)


def test_diff_scoped_to_one_container():
    registered = {"t2:a:80": reg("t2:a:80", cid="c1"), "t2:b:80": reg("t2:b:80", cid="c2")}
    changes = diff([], registered, [], "t2", scope={"c1"})
    assert changes.deregister == ("t2:a:80",)


HTTP_CHECK = Check("http", f"{HTTP}/h", "10s", "5s")


@pytest.mark.parametrize("agent, changed", [
    (lambda r: agent_checks(r), False),
    (lambda r: agent_checks(r) + [AgentCheck("_service_maintenance:t2:a:80", "t2:a:80", "maintenance", "x")], False),
    (lambda r: [], True),                                                     # the check was removed by hand
    (lambda r: [AgentCheck("service:t2:a:80", "t2:a:80", "http", "older notes")], True),
    (lambda r: agent_checks(r) + [AgentCheck("service:t2:a:80:2", "t2:a:80", "tcp", "")], True),   # one too many
])
def test_changed_checks_are_registered_again(agent, changed):
    desired = reg("t2:a:80", checks=(HTTP_CHECK,))
    current = reg("t2:a:80")
    changes = diff([desired], {"t2:a:80": current}, agent(desired), "t2")
    assert [r.id for r in changes.register] == (["t2:a:80"] if changed else [])


def test_older_hostnames_are_ours_by_meta_only():
    def ours(sid, host, cid="a" * 64):
        return reg(sid, cid=cid, meta=(("container_name", "x"), ("container_port", "80"), ("host", host),
                                       ("image", "i")))
    registered = {"old:x:80": ours("old:x:80", "old"), "t2:x:80": ours("t2:x:80", "t2"),
                  "t3:elsewhere:80": reg("t3:elsewhere:80"),                 # no meta of ours: a human's
                  "odd:x:80": ours("odd:x:80", "odd", cid="not-a-docker-id"), "x": ours("x", "older")}
    assert older_hostnames(registered, "t2") == ("old:x:80", "x")


def test_health_updates_only_what_differs_unless_forced():
    docker = Check("docker", ttl="60s")
    r = Registration("t2:a:80", "web", "1.2.3.4", 1, checks=(docker,), health=Health("passing", "ok"))
    plain = reg("t2:b:80", checks=(HTTP_CHECK,))
    same = [AgentCheck("service:t2:a:80:docker-health", "t2:a:80", "ttl", docker.notes, "passing", "ok")]
    other = [AgentCheck("service:t2:a:80:docker-health", "t2:a:80", "ttl", docker.notes, "critical", "ok")]
    assert health_updates([r, plain], same) == ()
    assert health_updates([r, plain], same, force=True) == (("service:t2:a:80:docker-health", r.health),)
    assert health_updates([r], other) == (("service:t2:a:80:docker-health", r.health),)
    assert health_updates([r], []) == (("service:t2:a:80:docker-health", r.health),)


def m(sid, reason):
    return AgentCheck(f"_service_maintenance:{sid}", sid, "maintenance", reason, "critical")


DRAINED, HUMAN = f"{DRAIN_REASON} (signal 15)", "human: disk swap"


@pytest.mark.parametrize("reason, running, draining, kept", [
    (DRAINED, True, False, False),     # the stop did not come: lifted
    (DRAINED, True, True, True),       # the stop is under way
    (DRAINED, False, False, True),     # not running: deregistered, not lifted
    (ENGINE_REASON, True, False, False),   # the engine answers again and the container runs
    (ENGINE_REASON, False, False, True),
    (HUMAN, True, False, True),        # a human's is never lifted
    (f"x {DRAIN_REASON}", True, False, True),
])
def test_held_lifts_only_our_maintenance_of_running_containers_not_draining(reason, running, draining, kept):
    checks = [m("t2:a:80", reason), AgentCheck("service:t2:a:80", "t2:a:80", "http", "n")]
    plan = held(checks, running=["t2:a:80"] if running else [], draining=["t2:a:80"] if draining else [])
    assert plan == (Held(keep=(("t2:a:80", reason),)) if kept else Held(lift=("t2:a:80",)))
    assert maintenance(checks) == {"t2:a:80": reason}


def test_engine_gone_holds_this_hosts_services_not_already_in_maintenance():
    registered = {sid: reg(sid) for sid in ("t2:a:80", "t2:b:80", "t2:c:80", "t3:a:80", "by-hand")}
    checks = [m("t2:b:80", HUMAN), m("t2:c:80", DRAINED)]
    assert engine_gone(registered, checks, "t2") == ("t2:a:80",)
    assert engine_gone(registered, [], "t2") == ("t2:a:80", "t2:b:80", "t2:c:80")
    assert engine_gone({}, [], "t2") == ()


@pytest.mark.parametrize("last, index, after_failure, why", [
    (0, 12, False, ""),                # the first answer
    (12, 15, False, ""),               # a change of this node's services
    (12, 12, False, ""),               # the wait ran out
    (12, 4, False, "its index went back from 12 to 4"),
    (0, 3, True, "it answers again after failing"),
    (12, 40, True, "it answers again after failing"),
])
def test_agent_reset(last, index, after_failure, why):
    assert agent_reset(last, index, after_failure) == why
