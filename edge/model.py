"""Consul data as frozen values, and the naming rules that turn a service into a route.

Everything from Consul is untrusted text: names, tags, IDs and meta may hold newlines, quotes,
`#` or unicode. This module converts raw JSON into `Instance` values at the boundary and
decides which names can be routed; nothing else in the edge looks at raw Consul data.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# A route name is one DNS-style label: it is the first label of the vhost and part of the
# HAProxy backend name, so it may only hold characters that are safe in both.
ROUTE_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?$")
HOST_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
EDGE_HOST_TAG = "edge.host="
# Services never published through the edge: Consul's own server RPC port is not HTTP.
EXCLUDED_SERVICES = frozenset({"consul"})


@dataclass(frozen=True, order=True)
class Instance:
    """One registered instance of a service, as the edge needs it."""

    service: str
    node: str
    service_id: str
    address: str
    port: int
    container_port: int
    healthy: bool
    tags: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        """Identity across changes: the same instance keeps its server slot."""
        return (self.node, self.service_id)


@dataclass(frozen=True, order=True)
class ServiceSummary:
    """What `/v1/internal/ui/services` says of a service; a change here means: refetch it."""

    name: str
    tags: tuple[str, ...]
    nodes: tuple[str, ...]
    instances: int
    passing: int
    warning: int
    critical: int


@dataclass(frozen=True, order=True)
class Problem:
    """Something in Consul's data that the edge skipped, with the reason (logged by the shell)."""

    subject: str
    reason: str

    def __str__(self) -> str:
        return f"{self.subject!r}: {self.reason}"


def routable_service(name: str) -> bool:
    """Whether a service name can become a route at all (checked before fetching it)."""
    return name.lower() not in EXCLUDED_SERVICES and ROUTE_RE.match(name.lower()) is not None


def valid_port(value: object) -> int | None:
    try:
        port = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        return None
    return port if port is not None and 0 < port < 65536 else None


def valid_address(value: object) -> str | None:
    """An IP address literal that can carry traffic, else None.

    DNS names are refused on purpose: HAProxy resolves `server` lines when it loads its
    configuration, so one unresolvable name would make every later reload fail.
    """
    if not isinstance(value, str) or not value:
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    return None if ip.is_unspecified or ip.is_multicast else str(ip)


def valid_host(value: str) -> str | None:
    """A lower-cased FQDN usable as an exact-host route key, else None."""
    host = value.strip().lower().rstrip(".")
    if not host or len(host) > 253 or ":" in host:
        return None
    if not all(HOST_LABEL_RE.match(label) for label in host.split(".")):
        return None
    return host


def container_port(service_id: str, meta: Mapping[str, object], port: int) -> int:
    """The container's private port: meta `container_port`, else the last numeric field of a
    gliderlabs-style ID `host:container:port`, else the registered port."""
    from_meta = valid_port(meta.get("container_port")) if "container_port" in meta else None
    if from_meta:
        return from_meta
    last = service_id.rsplit(":", 1)[-1] if ":" in service_id else ""
    return valid_port(last) or port


def route_name(service: str, port: int) -> str | None:
    """`<service>-<port>`, not suffixed twice; None when the result is not a safe label."""
    base = service.lower()
    name = base if base.endswith(f"-{port}") else f"{base}-{port}"
    return name if ROUTE_RE.match(name) else None


def edge_hosts(tags: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Hosts named by `edge.host=<fqdn>` tags: (valid hosts sorted, invalid values sorted)."""
    good, bad = set(), set()
    for tag in tags:
        if tag.startswith(EDGE_HOST_TAG):
            raw = tag[len(EDGE_HOST_TAG):]
            host = valid_host(raw)
            (good.add(host) if host else bad.add(raw))
    return tuple(sorted(good)), tuple(sorted(bad))


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def instances_from_health(service: str, entries: object) -> tuple[tuple[Instance, ...], tuple[Problem, ...]]:
    """Entries of `/v1/health/service/<name>` → instances (sorted) and what was skipped.

    Healthy means every check of the instance and of its node is `passing` (what Consul's
    `passing` filter returns); maintenance shows up as a critical check and so is excluded.
    """
    instances, problems = [], []
    for entry in entries if isinstance(entries, list) else []:
        node = entry.get("Node") if isinstance(entry, dict) else None
        svc = entry.get("Service") if isinstance(entry, dict) else None
        if not isinstance(node, dict) or not isinstance(svc, dict):
            problems.append(Problem(service, "malformed health entry"))
            continue
        sid = _text(svc.get("ID"))
        port = valid_port(svc.get("Port"))
        address = valid_address(_text(svc.get("Address")) or _text(node.get("Address")))
        where = f"{service}/{sid}@{_text(node.get('Node'))}"
        if port is None:
            problems.append(Problem(where, f"port {svc.get('Port')!r} is not 1-65535"))
            continue
        if address is None:
            problems.append(Problem(where, "address is not a usable IP address"))
            continue
        meta = svc.get("Meta") if isinstance(svc.get("Meta"), dict) else {}
        cport = container_port(sid, meta, port)
        if route_name(service, cport) is None:
            problems.append(Problem(where, f"route name for port {cport} is not a safe host label"))
            continue
        tags = tuple(sorted({t for t in svc.get("Tags") or () if isinstance(t, str)}))
        problems.extend(Problem(where, f"edge.host tag {b!r} is not a host name") for b in edge_hosts(tags)[1])
        checks = entry.get("Checks") if isinstance(entry.get("Checks"), list) else []
        healthy = all(isinstance(c, dict) and c.get("Status") == "passing" for c in checks)
        instances.append(Instance(
            service=service,
            node=_text(node.get("Node")),
            service_id=sid,
            address=address,
            port=port,
            container_port=cport,
            healthy=healthy,
            tags=tags,
        ))
    return tuple(sorted(instances)), tuple(problems)


def instances_from_node_dump(nodes: object) -> dict[str, list[dict]]:
    """`/v1/internal/ui/nodes` (every node with its services and checks, in one answer) →
    health entries per service name, shaped as `/v1/health/service/<name>` returns them.

    Used for full syncs: one request instead of one per service. Each instance gets its node's
    checks and its own, as Consul's health endpoint would give it.
    """
    entries: dict[str, list[dict]] = {}
    for node in nodes if isinstance(nodes, list) else []:
        if not isinstance(node, dict):
            continue
        checks = [c for c in node.get("Checks") or () if isinstance(c, dict)]
        node_checks = [c for c in checks if not c.get("ServiceID")]
        for svc in node.get("Services") or ():
            if not isinstance(svc, dict) or svc.get("Kind") or not isinstance(svc.get("Service"), str):
                continue
            own = [c for c in checks if c.get("ServiceID") and c.get("ServiceID") == svc.get("ID")]
            entries.setdefault(svc["Service"], []).append({
                "Node": {"Node": node.get("Node"), "Address": node.get("Address")},
                "Service": svc,
                "Checks": node_checks + own,
            })
    return entries


def _count(row: Mapping[str, object], key: str) -> int:
    value = row.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def summaries_from_ui(entries: object) -> dict[str, ServiceSummary]:
    """`/v1/internal/ui/services` → summary per service name (non-dict rows are ignored)."""
    out = {}
    for row in entries if isinstance(entries, list) else []:
        if not isinstance(row, dict) or not isinstance(row.get("Name"), str):
            continue
        if row.get("Kind"):  # connect proxies and gateways are not HTTP routes
            continue

        out[row["Name"]] = ServiceSummary(
            name=row["Name"],
            tags=tuple(sorted(t for t in (row.get("Tags") or []) if isinstance(t, str))),
            nodes=tuple(sorted(n for n in (row.get("Nodes") or []) if isinstance(n, str))),
            instances=_count(row, "InstanceCount"),
            passing=_count(row, "ChecksPassing"),
            warning=_count(row, "ChecksWarning"),
            critical=_count(row, "ChecksCritical"),
        )
    return out
