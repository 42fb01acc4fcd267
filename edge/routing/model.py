"""Consul data as frozen values, and the naming rules that turn a service into a route.

Everything from Consul is untrusted text: names, tags, IDs and meta may hold newlines, quotes,
`#` or unicode. This module converts raw JSON into `Instance` values at the boundary and
decides which names can be routed; nothing else in the edge looks at raw Consul data.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

# A route name is one DNS-style label: it is the first label of the vhost and part of the
# HAProxy backend name, so it may only hold characters that are safe in both.
ROUTE_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?$")
HOST_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
EDGE_META = "edge-"
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
    meta: tuple[tuple[str, str], ...] = ()   # the `edge-` keys of the service meta (the edge grammar's)

    @property
    def key(self) -> tuple[str, str]:
        """Identity across changes: the same instance keeps its server slot."""
        return (self.node, self.service_id)


class ServiceSummary(msgspec.Struct, frozen=True, gc=False):
    """What a services list says of a service; a change here means: refetch it. Decoded straight
    from `/v1/internal/ui/services` (field names as Consul's JSON), which is the edge's largest
    answer per change: 3 MB at 10,000 services. Untracked by the garbage collector (no cycles):
    10,000 of them per answer would make it scan everything the edge holds."""

    name: str = msgspec.field(name="Name")
    tags: tuple[str, ...] | None = msgspec.field(default=(), name="Tags")
    nodes: tuple[str, ...] | None = msgspec.field(default=(), name="Nodes")
    instances: int = msgspec.field(default=0, name="InstanceCount")
    passing: int = msgspec.field(default=0, name="ChecksPassing")
    warning: int = msgspec.field(default=0, name="ChecksWarning")
    critical: int = msgspec.field(default=0, name="ChecksCritical")
    kind: str = msgspec.field(default="", name="Kind")
    peer: str = msgspec.field(default="", name="PeerName")


UI_ROWS = msgspec.json.Decoder(list[ServiceSummary])


class ShapeError(ValueError):
    """An answer of Consul's internal API is not shaped as the edge expects (it changed in 1.9,
    1.13 and 1.17 and is not a public contract): the watcher falls back to the public API."""


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


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def peered(*parts: object) -> bool:
    """Whether an entry comes from a cluster peer (Consul >= 1.13 sets `PeerName` on imported
    nodes, services and checks). A peer's service is not a local one of the same name."""
    return any(isinstance(p, dict) and p.get("PeerName") for p in parts)


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
        if peered(node, svc):
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
        edge_meta = tuple(sorted((k, v) for k, v in meta.items()
                                 if isinstance(k, str) and k.startswith(EDGE_META) and isinstance(v, str)))
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
            meta=edge_meta,
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
        if not isinstance(node, dict) or peered(node):   # 1.14+: the dump includes peers' nodes
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
    """`/v1/internal/ui/services` → summary per local service name (garbage rows are ignored).

    Shapes across versions: 1.8 lists `Nodes` once per instance and `Tags` as null when empty;
    1.9 renamed `ProxyFor` to `ConnectedWithProxy`; 1.13+ gives one row per cluster peer with
    `PeerName` (skipped: not local); 1.17 de-duplicates `Nodes`. Raises ShapeError when the answer
    is not a list of such rows at all.
    """
    if not isinstance(entries, list):
        raise ShapeError(f"/v1/internal/ui/services answered a {type(entries).__name__}, not a list")
    out = {}
    shaped = 0
    for row in entries:
        if not isinstance(row, dict) or not isinstance(row.get("Name"), str):
            continue
        shaped += "InstanceCount" in row
        if row.get("Kind") or row.get("PeerName"):  # proxies and gateways are not HTTP routes; peers not local
            continue
        out[row["Name"]] = ServiceSummary(
            name=row["Name"],
            tags=tuple(sorted(t for t in (row.get("Tags") or []) if isinstance(t, str))),
            nodes=tuple(sorted({n for n in (row.get("Nodes") or []) if isinstance(n, str)})),
            instances=_count(row, "InstanceCount"),
            passing=_count(row, "ChecksPassing"),
            warning=_count(row, "ChecksWarning"),
            critical=_count(row, "ChecksCritical"),
        )
    if entries and not shaped:
        raise ShapeError("/v1/internal/ui/services rows have no InstanceCount: an unknown shape")
    return out


def decode_typed(decoder: msgspec.json.Decoder, raw: bytes, what: str):
    """An answer's bytes straight into the typed values `decoder` makes, or None when a field is
    not of the type Consul gives it (the caller then takes the tolerant path, `decode_json`,
    which also refuses bytes that are not JSON past the point the typed decoding stopped).
    Bytes that are not JSON are a ShapeError naming `what`."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError:
        return None
    except msgspec.DecodeError as exc:
        raise ShapeError(f"{what}: {exc}") from None


def decode_json(raw: bytes, what: str) -> object:
    """An answer's bytes as plain JSON (dicts and lists), for the tolerant readers."""
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ShapeError(f"{what}: {exc}") from None


def summaries_from_ui_raw(raw: bytes) -> dict[str, ServiceSummary]:
    """`summaries_from_ui` from the answer's bytes: decoded into summaries in one pass (about ten
    times faster than JSON into dicts, then dicts into values), and through the tolerant path when
    a row is not shaped as expected."""
    rows = decode_typed(UI_ROWS, raw, "/v1/internal/ui/services")
    if rows is None:
        return summaries_from_ui(decode_json(raw, "/v1/internal/ui/services"))
    if rows and not any(r.instances or r.passing or r.nodes for r in rows):
        # Every count zero and no node: not a summary (e.g. `InstanceCount` renamed): let the
        # tolerant path decide.
        return summaries_from_ui(msgspec.json.decode(raw))
    return {r.name: r for r in rows if not r.kind and not r.peer}


# --- the public API ---------------------------------------------------------------------------
def services_from_catalog(body: object) -> dict[str, ServiceSummary]:
    """`/v1/catalog/services` (name → tags; local services only, documented) as summaries that
    carry names and tags only: the public watch attributes a change to a service from these."""
    if not isinstance(body, dict):
        raise ShapeError(f"/v1/catalog/services answered a {type(body).__name__}, not an object")
    return {name: ServiceSummary(name, tuple(sorted({t for t in tags or () if isinstance(t, str)})), (), 0, 0, 0, 0)
            for name, tags in body.items() if isinstance(name, str) and isinstance(tags, (list, type(None)))}


@dataclass(frozen=True, order=True)
class CheckState:
    """A check that is not passing (from `/v1/health/state/any?filter=Status != "passing"`)."""

    status: str
    service_id: str
    service_name: str


def nonpassing_checks(body: object) -> dict[tuple[str, str], CheckState]:
    """(node, check ID) → state of every local check that is not passing. Only the status counts:
    an output change (a TTL note, `check_update_interval` syncs) moves ModifyIndex, not this."""
    out = {}
    for c in body if isinstance(body, list) else []:
        if not isinstance(c, dict) or peered(c) or not isinstance(c.get("Node"), str):
            continue
        out[(c["Node"], _text(c.get("CheckID")))] = CheckState(
            _text(c.get("Status")), _text(c.get("ServiceID")), _text(c.get("ServiceName")))
    return out


def node_addresses(body: object) -> dict[str, str]:
    """`/v1/catalog/nodes` → node → address (local nodes). Node meta is left out on purpose: a
    meta-only change (ModifyIndex moves) changes no route."""
    return {n["Node"]: _text(n.get("Address")) for n in body if isinstance(n, dict) and isinstance(n.get("Node"), str)
            and not peered(n)} if isinstance(body, list) else {}


def entries_from_node_services(answers: Mapping[str, object], nonpassing: Mapping[tuple[str, str], CheckState]
                               ) -> dict[str, list[dict]]:
    """`/v1/catalog/node-services/<node>` answers (node → answer) and the non-passing checks →
    health entries per service, shaped as `/v1/health/service/<name>` returns them: the public
    full sync, one request per node instead of one per service."""
    by_node: dict[str, list[CheckState]] = {}
    for (node_name, _), state in nonpassing.items():
        by_node.setdefault(node_name, []).append(state)
    entries: dict[str, list[dict]] = {}
    for name, answer in answers.items():
        if not isinstance(answer, dict) or not isinstance(answer.get("Node"), dict) or peered(answer["Node"]):
            continue
        node, checks = answer["Node"], by_node.get(name, [])
        node_checks = [{"Status": c.status} for c in checks if not c.service_id]
        for svc in answer.get("Services") or ():
            if not isinstance(svc, dict) or svc.get("Kind") or peered(svc) or not isinstance(svc.get("Service"), str):
                continue
            own = [{"Status": c.status} for c in checks if c.service_id and c.service_id == svc.get("ID")]
            entries.setdefault(svc["Service"], []).append(
                {"Node": {"Node": node.get("Node"), "Address": node.get("Address")}, "Service": svc,
                 "Checks": node_checks + own})
    return entries


# --- what changed -----------------------------------------------------------------------------
def changed_summaries(old: Mapping[str, ServiceSummary], new: Mapping[str, ServiceSummary]
                      ) -> tuple[set[str], set[str]]:
    """(services whose summary differs or that are new, services gone)."""
    return {n for n, s in new.items() if old.get(n) != s}, set(old) - set(new)


def changed_checks(old: Mapping[tuple[str, str], CheckState], new: Mapping[tuple[str, str], CheckState]
                   ) -> tuple[set[str], set[str]]:
    """(services, nodes) whose health may have changed: a check entering, leaving or changing its
    non-passing status. A node-level check (no service) concerns every instance on its node."""
    services, nodes = set(), set()
    for key in old.keys() | new.keys():
        before, after = old.get(key), new.get(key)
        if before is not None and after is not None and before.status == after.status:
            continue
        for state in (before, after):
            if state is None:
                continue
            if state.service_id:
                services.add(state.service_name)
            else:
                nodes.add(key[0])
    return services, nodes


def changed_nodes(old: Mapping[str, str], new: Mapping[str, str]) -> set[str]:
    """Nodes added, removed or with a new address (instances without their own address use it)."""
    return {n for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
