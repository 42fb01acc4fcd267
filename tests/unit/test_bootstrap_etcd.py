"""bootstrap's etcd client against a scripted transport: failover, typed errors, base64 both ways."""

import base64
import json

import httpx
import pytest

from bootstrap.etcd import Etcd, EtcdError, EtcdUnavailable


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
