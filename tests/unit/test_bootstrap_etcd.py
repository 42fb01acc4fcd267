"""bootstrap's etcd client against a scripted transport: failover, typed errors, base64 both ways."""

import base64
import json

import httpx
import pytest

from bootstrap.etcd import Etcd, EtcdError, EtcdUnavailable, EtcdV2, api_from_version, connect


def b64(text):
    return base64.b64encode(text.encode()).decode()


def client(answers):
    """An Etcd over two endpoints whose answers come from `answers[host]` (a response or an exception)."""
    seen = []

    def handler(request):
        seen.append((request.url.host, request.url.path, json.loads(request.content)))
        answer = answers[request.url.host]
        if isinstance(answer, Exception):
            raise answer
        return answer

    etcd = Etcd(["http://e1:2379", "http://e2:2379/"], transport=httpx.MockTransport(handler))
    return etcd, seen


KVS = {"kvs": [{"key": b64("/p/machines/a"), "value": b64("10.0.0.1")}]}
REFUSED = httpx.ConnectError("connection refused")


@pytest.mark.parametrize("e1, e2, hosts", [
    (httpx.Response(200, json=KVS), REFUSED, ["e1"]),                                    # first answers
    (REFUSED, httpx.Response(200, json=KVS), ["e1", "e2"]),                              # fails over
    (httpx.Response(503, text="<html>"), httpx.Response(200, json=KVS), ["e1", "e2"]),  # not JSON
    (httpx.Response(500, json=["x"]), httpx.Response(200, json=KVS), ["e1", "e2"]),     # not an etcd answer
])
def test_get_prefix_fails_over_to_the_next_endpoint(e1, e2, hosts):
    etcd, seen = client({"e1": e1, "e2": e2})
    assert etcd.get_prefix("/p/machines/") == {"/p/machines/a": "10.0.0.1"}
    assert [h for h, _, _ in seen] == hosts
    assert seen[0][1:] == ("/v3/kv/range", {"key": b64("/p/machines/"), "range_end": b64("/p/machines0")})


def test_every_endpoint_down_is_unavailable_after_retries():
    etcd, seen = client({"e1": REFUSED, "e2": REFUSED})
    with pytest.raises(EtcdUnavailable, match="e2:2379"):
        etcd.get("/p/k")
    assert len(seen) == 6                     # 3 attempts x 2 endpoints


@pytest.mark.parametrize("call, status, answer", [
    (lambda e: e.keepalive("7"), 404, {"error": "lease not found", "code": 5, "message": "lease not found"}),
    (lambda e: e.grant(5), 200, {"header": {}}),                                 # no lease ID
])
def test_an_answered_error_is_etcd_error_not_retried(call, status, answer):
    etcd, seen = client({"e1": httpx.Response(status, json=answer), "e2": REFUSED})
    with pytest.raises(EtcdError):
        call(etcd)
    assert len(seen) == 1


@pytest.mark.parametrize("call, path, body, answer, result", [
    (lambda e: e.grant(5), "/v3/lease/grant", {"TTL": 5}, {"ID": "42", "TTL": "5"}, "42"),
    (lambda e: e.keepalive("42"), "/v3/lease/keepalive", {"ID": "42"}, {"result": {"ID": "42", "TTL": "5"}}, 5),
    (lambda e: e.keepalive("42"), "/v3/lease/keepalive", {"ID": "42"}, {"result": {"ID": "42"}}, 0),  # gone
    (lambda e: e.put("/k", "v", "42"), "/v3/kv/put", {"key": b64("/k"), "value": b64("v"), "lease": "42"}, {}, None),
    (lambda e: e.get("/k"), "/v3/kv/range", {"key": b64("/k")}, {"kvs": [{"key": b64("/k"), "value": b64("v")}]},
     "v"),
    (lambda e: e.get("/k"), "/v3/kv/range", {"key": b64("/k")}, {"header": {}}, None),
])
def test_requests_and_answers(call, path, body, answer, result):
    etcd, seen = client({"e1": httpx.Response(200, json=answer), "e2": REFUSED})
    assert call(etcd) == result
    assert seen == [("e1", path, body)]


# --- the v2 keys API (etcd2, or etcd 3 with --enable-v2) -----------------------------------------
def v2_client(answers):
    """An EtcdV2 on one endpoint answering `answers` in order; records (method, path, query, form)."""
    seen, queue = [], list(answers)

    def handler(request):
        form = dict(httpx.QueryParams(request.content.decode())) if request.content else {}
        seen.append((request.method, request.url.path, dict(request.url.params), form))
        return queue.pop(0)

    return EtcdV2(["http://e1:2379"], transport=httpx.MockTransport(handler)), seen


def node(key, value):
    return {"action": "set", "node": {"key": key, "value": value, "ttl": 5}}


NOT_FOUND = httpx.Response(404, json={"errorCode": 100, "message": "Key not found", "cause": "/k"})
KEY = "/consul.io/bootstrap/machines/m1"


def test_v2_put_under_a_lease_writes_a_ttl_key_and_keepalive_refreshes_it():
    etcd, seen = v2_client([httpx.Response(201, json=node(KEY, "v")), httpx.Response(200, json=node(KEY, "v"))])
    lease = etcd.grant(5)
    etcd.put(KEY, "v", lease)
    assert etcd.keepalive(lease) == 5
    assert seen == [("PUT", f"/v2/keys{KEY}", {}, {"value": "v", "ttl": "5"}),
                    ("PUT", f"/v2/keys{KEY}", {}, {"ttl": "5", "refresh": "true", "prevExist": "true"})]


def test_v2_keepalive_of_an_expired_key_is_zero_and_revoke_deletes_only_our_value():
    etcd, seen = v2_client([httpx.Response(201, json=node(KEY, "v")), NOT_FOUND,
                            httpx.Response(200, json={"action": "compareAndDelete"})])
    lease = etcd.grant(5)
    etcd.put(KEY, "v", lease)
    assert etcd.keepalive(lease) == 0
    etcd.revoke(lease)
    assert seen[2] == ("DELETE", f"/v2/keys{KEY}", {"prevValue": "v"}, {})
    assert etcd.leases == {}


@pytest.mark.parametrize("answer, value", [
    (httpx.Response(200, json=node(KEY, '{"address": "10.0.0.1"}')), '{"address": "10.0.0.1"}'),
    (NOT_FOUND, None),
    (httpx.Response(200, json={"node": {"key": KEY, "dir": True}}), None),
])
def test_v2_get(answer, value):
    etcd, seen = v2_client([answer])
    assert etcd.get(KEY) == value
    assert seen == [("GET", f"/v2/keys{KEY}", {}, {})]


def test_v2_get_prefix_flattens_the_directory_and_keeps_nested_keys_for_the_plan_to_reject():
    tree = {"node": {"key": "/p/machines", "dir": True, "nodes": [
        {"key": "/p/machines/a", "value": "10.0.0.1"},
        {"key": "/p/machines/d", "dir": True, "nodes": [{"key": "/p/machines/d/e", "value": "10.0.0.4"}]},
    ]}}
    etcd, seen = v2_client([httpx.Response(200, json=tree)])
    assert etcd.get_prefix("/p/machines/") == {"/p/machines/a": "10.0.0.1", "/p/machines/d/e": "10.0.0.4"}
    assert seen == [("GET", "/v2/keys/p/machines", {"recursive": "true"}, {})]
    etcd, _ = v2_client([NOT_FOUND])
    assert etcd.get_prefix("/p/machines/") == {}             # nobody announced yet


def test_v2_unexpected_error_is_etcd_error():
    etcd, _ = v2_client([httpx.Response(403, json={"errorCode": 110, "message": "The request requires user "
                                                   "authentication", "cause": "Insufficient credentials"})])
    with pytest.raises(EtcdError, match="110"):
        etcd.put(KEY, "v")


# --- which API: --etcd-api auto asks /version ---------------------------------------------------
@pytest.mark.parametrize("answer, api", [
    ({"etcdserver": "3.4.23", "etcdcluster": "3.4.0"}, "v3"),
    ({"etcdserver": "2.3.8", "etcdcluster": "2.3.0"}, "v2"),
    ({"etcdserver": "3.5.0-pre", "etcdcluster": "not_decided"}, "v3"),
])
def test_api_from_version(answer, api):
    assert api_from_version(answer) == api


@pytest.mark.parametrize("answer", [["3.4"], {"etcdcluster": "3.4.0"}, {"etcdserver": "x.y"}])
def test_api_from_version_refuses_what_is_not_etcd(answer):
    with pytest.raises(EtcdError):
        api_from_version(answer)


@pytest.mark.parametrize("version, paths", [
    ("2.3.8", ["/version", "/v2/keys/p/machines"]),
    ("3.4.23", ["/version", "/v3/kv/range"]),
])
def test_auto_detects_once_and_then_speaks_that_api(version, paths):
    seen = []

    def handler(request):
        seen.append(request.url.path)
        if request.url.path == "/version":
            return httpx.Response(200, json={"etcdserver": version, "etcdcluster": version})
        return httpx.Response(200, json={"node": {"dir": True}} if "/v2/" in request.url.path else {})

    etcd = connect(["http://e1:2379"], "auto", transport=httpx.MockTransport(handler))
    assert etcd.get_prefix("/p/machines/") == {}
    assert etcd.get_prefix("/p/machines/") == {}
    assert seen == paths + paths[1:]
    etcd.close()


def test_a_v2_only_etcd_asked_for_v3_says_why_it_is_unavailable():
    etcd, _ = client({"e1": httpx.Response(404, text="404 page not found\n"), "e2": REFUSED})
    with pytest.raises(EtcdUnavailable, match="404 page not found"):
        etcd.get("/k")
