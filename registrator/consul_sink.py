"""The Consul shell: the local agent's services and checks, register, deregister, TTL pass and
update, maintenance mode.

Transient failures (connection refused, timeouts, 5xx) are retried with tenacity; what still
fails raises `ConsulUnavailable` and the next reconciliation repairs it. A 4xx answer is not
transient: it is never retried and raises `ConsulRejected`, so one registration the agent refuses
does not hold up the others. So is a 500 whose text says the agent will not run script checks:
no retry changes that.
A refused read of the service list stops the whole pass instead (`ConsulUnavailable`):
nothing can be compared without it.

The client (address, TLS, token) comes from the shared `haproxy_consul.consul_api` settings.
An ACL refusal or a failed TLS handshake is remembered as `trouble`; the first request that
works after it sets `recovered`, and the loop then registers everything again: a service the
agent holds may have been registered with a token that was revoked since, and the agent keeps
failing to sync it to the catalog until it is registered again with a working token.
"""

from __future__ import annotations

import json
import logging

import consul
import consul.exceptions
import requests
from consul.callback import CB
from tenacity import (
    retry,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from haproxy_consul.consul_api import ConsulSettings, client
from registrator.mapping import Check, Health, Registration
from registrator.reconcile import AgentCheck

log = logging.getLogger("registrator.consul")

TRANSIENT = (requests.ConnectionError, requests.Timeout, consul.ConsulException)
# py-consul raises these subclasses of ConsulException for 4xx answers; the plain class means 5xx.
REFUSED = (consul.exceptions.BadRequest, consul.exceptions.ClientError, consul.exceptions.ACLDisabled,
           consul.exceptions.ACLPermissionDenied, consul.exceptions.NotFound)


class ScriptsDisabled(consul.ConsulException):
    """The agent answered 500 because it does not take script checks (`enable_script_checks`)."""


retrying = retry(retry=retry_if_exception_type(TRANSIENT) & retry_if_not_exception_type((*REFUSED, ScriptsDisabled)),
                 stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.1, max=2), reraise=True)


class ConsulUnavailable(Exception):
    """The agent did not take a request after retries."""


class ConsulRejected(Exception):
    """The agent answered 4xx: this request is wrong (or not allowed), retrying will not help."""


def _check_body(reg: Registration, c: Check) -> dict:
    body = {"CheckID": c.check_id(reg.id), "Notes": c.notes}
    if c.kind == "docker":
        # Registered with Docker's current status, so a re-registration never flashes critical.
        body.update(Name="Docker HEALTHCHECK", TTL=c.ttl, Status=reg.health.status if reg.health else "critical")
    elif c.consul_type == "ttl":
        body["TTL"] = c.ttl
    else:
        body["Interval"] = c.interval
        if c.timeout:
            body["Timeout"] = c.timeout
        if c.kind == "script":
            body["Args"] = ["/bin/sh", "-c", c.target]    # as Consul's old `Script`: the docs' pipes work
        else:
            body[{"http": "HTTP", "tcp": "TCP", "grpc": "GRPC"}[c.kind]] = c.target
    for key, value in (("Method", c.method), ("TLSSkipVerify", c.tls_skip_verify), ("GRPCUseTLS", c.grpc_use_tls),
                       ("Status", c.initial_status), ("DeregisterCriticalServiceAfter", c.deregister_after)):
        if value:
            body[key] = value
    return body


class ConsulSink:
    def __init__(self, consul: ConsulSettings):
        self.c = client(consul)
        self.address = consul.address
        self.trouble: str | None = None   # an ACL or TLS failure not yet followed by a success
        self.recovered = False            # a success came after `trouble`: register everything again

    def _call(self, what: str, fn, *args, whole: bool = False):
        """`whole`: a refusal means no request can work (a read the loop needs), not just this one."""
        try:
            result = retrying(_scripts_disabled(fn))(*args)
        except (*REFUSED, ScriptsDisabled) as exc:
            if isinstance(exc, consul.exceptions.ACLPermissionDenied):
                self._trouble(f"ACL: {what}: {exc}")
            if whole:
                raise ConsulUnavailable(f"{what}: refused: {exc}") from exc
            raise ConsulRejected(f"{what}: {exc}") from exc
        except requests.exceptions.SSLError as exc:
            self._trouble(f"TLS: {exc}")
            raise ConsulUnavailable(f"{what}: TLS handshake failed: {exc}") from exc
        except (*TRANSIENT, ValueError) as exc:
            raise ConsulUnavailable(f"{what}: {exc}") from exc
        if self.trouble is not None:
            log.info("Consul accepts our requests again (after %s); registering every service again",
                     self.trouble)
            self.trouble, self.recovered = None, True
        return result

    def _trouble(self, reason: str) -> None:
        if self.trouble is None:
            log.error("Consul at %s refuses us: %s", self.address, reason)
        self.trouble = reason

    def agent_address(self) -> str:
        me = self._call("agent self", self.c.agent.self, whole=True)
        return (me.get("Member") or {}).get("Addr") or (me.get("Config") or {}).get("AdvertiseAddr") or ""

    def registered(self) -> dict[str, Registration]:
        """The agent's services, as Registrations (checks are not part of that list)."""
        services = self._call("list services", self.c.agent.services, whole=True)
        out = {}
        for sid, s in services.items():
            out[sid] = Registration(sid, s.get("Service", ""), s.get("Address", ""), int(s.get("Port") or 0),
                                    tuple(sorted(s.get("Tags") or ())), tuple(sorted((s.get("Meta") or {}).items())))
        return out

    def checks(self) -> list[AgentCheck]:
        """The agent's checks: ID, service, type and notes (Consul 1.8 shows no definition)."""
        found = self._call("list checks", self.c.agent.checks)
        return [AgentCheck(str(cid), str(c.get("ServiceID") or ""), str(c.get("Type") or ""), str(c.get("Notes") or ""),
                           str(c.get("Status") or ""), str(c.get("Output") or "")) for cid, c in found.items()]

    def register(self, reg: Registration) -> None:
        checks = [_check_body(reg, c) for c in reg.checks]
        self._call(f"register {reg.id}", lambda: self.c.agent.service.register(
            reg.name, service_id=reg.id, address=reg.address, port=reg.port, tags=list(reg.tags),
            meta=dict(reg.meta), check=checks[0] if checks else None, extra_checks=checks[1:],
            replace_existing_checks=True))

    def deregister(self, sid: str) -> None:
        self._call(f"deregister {sid}", self.c.agent.service.deregister, sid)

    def ttl_pass(self, sid: str) -> None:
        self._call(f"ttl pass {sid}", self.c.agent.check.ttl_pass, f"service:{sid}")

    def update_check(self, check_id: str, health: Health) -> None:
        """Set a TTL check's status and output (and restart its TTL)."""
        body = json.dumps({"Status": health.status, "Output": health.output})
        self._call(f"update check {check_id}", lambda: self.c.http.put(
            CB.boolean(), f"/v1/agent/check/update/{check_id}", data=body, headers=self.c.prepare_headers()))

    def maintenance(self, sid: str, enable: bool, reason: str = "") -> None:
        self._call(f"maintenance {'on' if enable else 'off'} {sid}", self.c.agent.service.maintenance,
                   sid, "true" if enable else "false", reason or None)


def _scripts_disabled(fn):
    """Turn the agent's 500 for a refused script check into ScriptsDisabled (never retried)."""
    def call(*args):
        try:
            return fn(*args)
        except consul.ConsulException as exc:
            if type(exc) is consul.ConsulException and "Scripts are disabled" in str(exc):
                raise ScriptsDisabled(str(exc)) from exc
            raise
    return call
