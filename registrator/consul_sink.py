"""The Consul shell: the local agent's service list, register, deregister, TTL pass.

Transient failures (connection refused, timeouts, 5xx) are retried with tenacity; what still
fails raises `ConsulUnavailable` and the next reconciliation repairs it. A 4xx answer is not
transient: it is never retried and raises `ConsulRejected`, so one registration the agent refuses
does not hold up the others.
"""

from __future__ import annotations

import logging

import consul
import consul.exceptions
import requests
from tenacity import (
    retry,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from haproxy_consul.consul_api import ConsulAddress, client
from registrator.mapping import Check, Registration

log = logging.getLogger("registrator.consul")

TRANSIENT = (requests.ConnectionError, requests.Timeout, consul.ConsulException)
# py-consul raises these subclasses of ConsulException for 4xx answers; the plain class means 5xx.
REFUSED = (consul.exceptions.BadRequest, consul.exceptions.ClientError, consul.exceptions.ACLDisabled,
           consul.exceptions.ACLPermissionDenied, consul.exceptions.NotFound)
retrying = retry(retry=retry_if_exception_type(TRANSIENT) & retry_if_not_exception_type(REFUSED),
                 stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.1, max=2), reraise=True)


class ConsulUnavailable(Exception):
    """The agent did not take a request after retries."""


class ConsulRejected(Exception):
    """The agent answered 4xx: this request is wrong (or not allowed), retrying will not help."""


def _check_body(reg: Registration) -> dict | None:
    c: Check | None = reg.check
    if c is None:
        return None
    if c.kind == "ttl":
        # A registrator that died stops passing: the service goes critical, and away after 10 min.
        return {"CheckID": f"service:{reg.id}", "TTL": c.target, "Status": "passing",
                "DeregisterCriticalServiceAfter": "10m"}
    body = {"CheckID": f"service:{reg.id}", "Interval": c.interval, "Timeout": c.timeout}
    body["HTTP" if c.kind == "http" else "TCP"] = c.target
    return body


class ConsulSink:
    def __init__(self, address: ConsulAddress, token: str | None):
        self.c = client(address, token)
        self.address = address

    def _call(self, what: str, fn, *args):
        try:
            return retrying(fn)(*args)
        except REFUSED as exc:
            raise ConsulRejected(f"{what}: {exc}") from exc
        except (*TRANSIENT, ValueError) as exc:
            raise ConsulUnavailable(f"{what}: {exc}") from exc

    def agent_address(self) -> str:
        me = self._call("agent self", self.c.agent.self)
        return (me.get("Member") or {}).get("Addr") or (me.get("Config") or {}).get("AdvertiseAddr") or ""

    def registered(self) -> dict[str, Registration]:
        """The agent's services, as Registrations (checks are not part of that list)."""
        services = self._call("list services", self.c.agent.services)
        out = {}
        for sid, s in services.items():
            out[sid] = Registration(sid, s.get("Service", ""), s.get("Address", ""), int(s.get("Port") or 0),
                                    tuple(sorted(s.get("Tags") or ())), tuple(sorted((s.get("Meta") or {}).items())))
        return out

    def register(self, reg: Registration) -> None:
        self._call(f"register {reg.id}", lambda: self.c.agent.service.register(
            reg.name, service_id=reg.id, address=reg.address, port=reg.port, tags=list(reg.tags),
            meta=dict(reg.meta), check=_check_body(reg), replace_existing_checks=True))

    def deregister(self, sid: str) -> None:
        self._call(f"deregister {sid}", self.c.agent.service.deregister, sid)

    def ttl_pass(self, sid: str) -> None:
        self._call(f"ttl pass {sid}", self.c.agent.check.ttl_pass, f"service:{sid}")

