"""Pure: the catalog as per-node answers (`/v1/catalog/node-services/<node>`) and the checks that
are not passing (`/v1/health/state/critical` and `…/warning`), turned into the instances of one
service at a time. The per-node reader (`edge.consul.nodes`) keeps these and asks, per change,
only about the services a node's answer or a check touched.

Raw answers become compact rows here (what an instance needs, nothing else: a node with thousands
of services stays small in memory); `instances` rebuilds health entries shaped as
`/v1/health/service/<name>` returns them and hands them to `edge.routing.model.instances_from_health`,
so every rule about untrusted data, health and naming is the model's. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from edge.routing.model import (
    EDGE_META,
    CheckState,
    Instance,
    Problem,
    decode_json,
    decode_typed,
    instances_from_health,
    peered,
)

# One instance as a node's answer gives it: service, ID, address, port, tags, and the service meta
# the edge reads (`container_port` and the `edge-` keys), as sorted pairs.
Row = tuple[str, str, str, object, tuple[str, ...], tuple[tuple[str, object], ...]]


def _meta(meta: object) -> tuple[tuple[str, object], ...]:
    """The service meta the edge reads, as sorted pairs (the rest is not kept)."""
    if not isinstance(meta, dict):
        return ()
    return tuple(sorted((k, v) for k, v in meta.items()
                        if isinstance(k, str) and (k == "container_port" or k.startswith(EDGE_META))))


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def node_rows(body: object) -> tuple[str | None, dict[str, Row]]:
    """A `/v1/catalog/node-services/<node>` answer → (the node's address, or None when the node
    is gone; its instances by service ID). Proxies, gateways and peers' entries are left out."""
    if not isinstance(body, dict) or not isinstance(body.get("Node"), dict) or peered(body["Node"]):
        return None, {}
    rows = {}
    for svc in body.get("Services") or ():
        if not isinstance(svc, dict) or svc.get("Kind") or peered(svc) or not isinstance(svc.get("Service"), str):
            continue
        tags = tuple(sorted({t for t in svc.get("Tags") or () if isinstance(t, str)}))
        sid = _text(svc.get("ID"))
        rows[sid] = (svc["Service"], sid, _text(svc.get("Address")), svc.get("Port"), tags, _meta(svc.get("Meta")))
    return _text(body["Node"].get("Address")), rows


# Untracked by the garbage collector (`gc=False`: they hold no cycles): a node's answer is
# thousands of them per change, and tracked they made the collector scan everything the edge
# holds after each answer (50-250 ms at 10,000 services).
class _Service(msgspec.Struct, gc=False):
    ID: str = ""
    Service: str | None = None
    Tags: tuple[str, ...] | None = None
    Address: str = ""
    Port: int = 0
    Meta: dict[str, str] | None = None
    Kind: str = ""
    PeerName: str = ""


class _Node(msgspec.Struct, gc=False):
    Address: str = ""
    PeerName: str = ""


class _NodeServices(msgspec.Struct, gc=False):
    Node: _Node | None = None
    Services: list[_Service] | None = None


_NODE_SERVICES = msgspec.json.Decoder(_NodeServices)


def node_rows_raw(raw: bytes) -> tuple[str | None, dict[str, Row]]:
    """`node_rows` straight from the answer's bytes: decoded into small typed values (a node with
    10,000 services is a 6 MB answer; as dicts it would hold ten times that), through the
    tolerant path when a field is not of the type Consul gives it."""
    doc = decode_typed(_NODE_SERVICES, raw, "node services")
    if doc is None:
        return node_rows(decode_json(raw, "node services"))
    if doc.Node is None or doc.Node.PeerName:
        return None, {}
    rows = {}
    for svc in doc.Services or ():
        if svc.Kind or svc.PeerName or svc.Service is None:
            continue
        rows[svc.ID] = (svc.Service, svc.ID, svc.Address, svc.Port, tuple(sorted(set(svc.Tags or ()))),
                        _meta(svc.Meta))
    return doc.Node.Address, rows


def changed_services(old: Mapping[str, Row], new: Mapping[str, Row]) -> set[str]:
    """Services with an instance added, removed or changed between two answers of one node."""
    out = set()
    for sid in old.keys() | new.keys():
        before, after = old.get(sid), new.get(sid)
        if before != after:
            out.update(row[0] for row in (before, after) if row is not None)
    return out


def by_node(checks: Mapping[tuple[str, str], CheckState]) -> dict[str, list[CheckState]]:
    """The non-passing checks grouped by node."""
    out: dict[str, list[CheckState]] = {}
    for (node, _), state in checks.items():
        out.setdefault(node, []).append(state)
    return out


def instances(service: str, placements: Iterable[tuple[str, str, Iterable[Row]]],
              checks: Mapping[str, list[CheckState]]) -> tuple[tuple[Instance, ...], tuple[Problem, ...]]:
    """The instances of `service` from (node, node address, rows of that node) for each node that
    hosts it, with the non-passing checks per node: healthy when no check of the instance or of
    its node is failing, as Consul's `passing` filter says."""
    entries = []
    for node, address, rows in placements:
        failing = checks.get(node, ())
        node_checks = [{"Status": c.status} for c in failing if not c.service_id]
        for name, sid, svc_address, port, tags, meta in rows:
            if name != service:
                continue
            own = [{"Status": c.status} for c in failing if c.service_id and c.service_id == sid]
            entries.append({"Node": {"Node": node, "Address": address},
                            "Service": {"ID": sid, "Service": name, "Address": svc_address, "Port": port,
                                        "Tags": list(tags),
                                        "Meta": dict(meta)},
                            "Checks": node_checks + own})
    return instances_from_health(service, entries)
