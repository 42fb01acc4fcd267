"""Container → registrations (gliderlabs-compatible SERVICE_* rules) and reconciliation."""

import pytest

from registrator.mapping import (
    Check,
    Params,
    Registration,
    container_from_inspect,
    image_base,
    registrations,
    service_name,
)
from registrator.reconcile import diff

P = Params(hostname="t2", ip=None, agent_ip="10.0.0.2")


def inspect(image="nginx:1.25", name="/silly_wright", ports=None, env=(), labels=None, running=True, paused=False,
            health=None, ip="172.17.0.5"):
    ports = {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}]} if ports is None else ports
    state = {"Running": running, "Paused": paused}
    if health:
        state["Health"] = {"Status": health}
    return {"Id": "c0ffee" * 10, "Name": name, "Config": {"Image": image, "Env": list(env), "Labels": labels or {}},
            "State": state, "NetworkSettings": {"Ports": ports, "IPAddress": ip}}


def regs(params=P, **kw):
    return registrations(container_from_inspect(inspect(**kw)), params)


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


def test_one_published_port():
    (r,), problems = regs()
    assert (r.id, r.name, r.address, r.port) == ("t2:silly_wright:80", "nginx", "10.0.0.2", 32768)
    meta = dict(r.meta)
    assert meta["container_port"] == "80" and meta["container_name"] == "silly_wright" and meta["host"] == "t2"
    assert meta["image"] == "nginx:1.25" and meta["container_id"] == "c0ffee" * 10
    assert problems == ()


def test_several_ports_get_suffixes_and_udp_ids():
    ports = {"80/tcp": [{"HostIp": "", "HostPort": "1"}], "443/tcp": [{"HostIp": "", "HostPort": "2"}],
             "53/udp": [{"HostIp": "", "HostPort": "3"}], "9000/tcp": None}
    rs, _ = regs(ports=ports)
    assert [(r.name, r.id) for r in rs] == [
        ("nginx-443", "t2:silly_wright:443"), ("nginx-53", "t2:silly_wright:53:udp"),
        ("nginx-80", "t2:silly_wright:80")]


def test_binding_on_a_specific_host_ip_registers_that_ip():
    (r,), _ = regs(ports={"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "5"}]})
    assert r.address == "127.0.0.1"
    (r,), _ = regs(Params("t2", "192.0.2.9", "10.0.0.2"), ports={"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "5"}]})
    assert r.address == "192.0.2.9"                       # --ip wins


def test_internal_registers_container_ip_and_private_port():
    (r,), _ = regs(Params("t2", None, "10.0.0.2", internal=True), ports={"80/tcp": None})
    assert (r.address, r.port) == ("172.17.0.5", 80)


@pytest.mark.parametrize("kw, expect_names", [
    ({"env": ["SERVICE_NAME=web"]}, ["web"]),
    ({"env": ["SERVICE_NAME=web"], "labels": {"SERVICE_NAME": "api"}}, ["api"]),         # labels win
    ({"env": ["SERVICE_80_NAME=front"]}, ["front"]),
    ({"env": ["SERVICE_IGNORE=true"]}, []),
    ({"labels": {"SERVICE_80_IGNORE": "1"}}, []),
    ({"running": False}, []),
    ({"paused": True}, []),
    ({"health": "unhealthy"}, []),
    ({"health": "starting"}, []),
    ({"health": "healthy"}, ["nginx"]),
    ({"ports": {"80/tcp": None}}, []),                                                   # exposed, not published
])
def test_settings_and_states(kw, expect_names):
    rs, _ = regs(**kw)
    assert [r.name for r in rs] == expect_names


def test_tags_ids_and_meta():
    (r,), problems = regs(Params("t2", None, "10.0.0.2", tags=("edge",)),
                          env=["SERVICE_TAGS=a, b", "SERVICE_80_TAGS=c", "SERVICE_ID=custom",
                               "SERVICE_META_OWNER=team x", "SERVICE_META_bad key=1", "SERVICE_META_CONTAINER_PORT=9"])
    assert r.tags == ("a", "b", "c", "edge")
    assert r.id == "t2:custom:80"
    meta = dict(r.meta)
    assert meta["owner"] == "team x" and meta["container_port"] == "80"    # ours are not overridden
    assert len(problems) == 2


@pytest.mark.parametrize("env, check, problem", [
    (["SERVICE_CHECK_HTTP=/health"], Check("http", "http://10.0.0.2:32768/health"), False),
    (["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_INTERVAL=2s", "SERVICE_CHECK_TIMEOUT=1s"],
     Check("http", "http://10.0.0.2:32768/h", "2s", "1s"), False),
    (["SERVICE_CHECK_TCP=true"], Check("tcp", "10.0.0.2:32768"), False),
    (["SERVICE_CHECK_HTTP=no-slash"], None, True),
    (["SERVICE_CHECK_TCP=maybe"], None, True),
    (["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_INTERVAL=often"], Check("http", "http://10.0.0.2:32768/h"), True),
])
def test_checks(env, check, problem):
    (r,), problems = regs(env=env)
    assert r.check == check
    assert bool(problems) is problem


def test_ttl_check_when_asked():
    (r,), _ = regs(Params("t2", None, "10.0.0.2", ttl=30))
    assert r.check == Check("ttl", "30s")


def test_hostile_names_and_values_stay_clean():
    (r,), _ = regs(image="evil\nimage:1", name="/x\ny", env=["SERVICE_TAGS=ok,\n,bad\ttag", "SERVICE_NAME=\n"])
    assert "\n" not in r.id and "\n" not in "".join(r.tags) and r.name == "evil-image"
    assert "\t" not in "".join(r.tags)


def test_garbage_inspect_data_does_not_crash():
    c = container_from_inspect({"Id": 5, "NetworkSettings": {"Ports": {"x/tcp": None, "99999/tcp": None}}})
    assert c.ports == () and registrations(c, P) == ((), ())


# --- reconcile --------------------------------------------------------------------------------
def reg(sid, port=1, cid="c1"):
    return Registration(sid, "web", "10.0.0.1", port, (), (("container_id", cid),))


def test_diff_registers_missing_and_changed_and_removes_only_ours():
    registered = {"t2:a:80": reg("t2:a:80"), "t2:b:80": reg("t2:b:80", port=5), "t2:gone:80": reg("t2:gone:80"),
                  "t3:other:80": reg("t3:other:80"), "manual": reg("manual")}
    desired = [reg("t2:a:80"), reg("t2:b:80", port=6), reg("t2:new:80")]
    changes = diff(desired, registered, "t2")
    assert [r.id for r in changes.register] == ["t2:b:80", "t2:new:80"]
    assert changes.deregister == ("t2:gone:80",)


def test_diff_scoped_to_one_container():
    registered = {"t2:a:80": reg("t2:a:80", cid="c1"), "t2:b:80": reg("t2:b:80", cid="c2")}
    changes = diff([], registered, "t2", scope={"c1"})
    assert changes.deregister == ("t2:a:80",)
