"""Pure: what the fleet's publisher writes to Consul KV, what a follower reads back, and what a
member of the fleet does next. No I/O; `edge.consul.fleet` is the shell that does the reads,
writes and sessions.

The KV layout under a prefix P (`--fleet-prefix`, default `haproxy-consul/fleet`):
- `P/head`: the publisher's lock (its session holds the key) and its newest publication: the
  format, the chain, `seq`, a heartbeat counter, the Consul index it reflects, who wrote it, the
  version (a seq) of each shard and of the problems list, the delta of `seq` (the services it
  changed, each with its whole instance list, or null when removed) when that is small, and
  `ready`: false from the moment a new publisher takes the lock until its first write (it beats
  meanwhile, so nobody deposes it while it reads the catalog).
- `P/shard/NN`, SHARDS of them: every service whose name hashes to NN with its instances
  (zlib-compressed JSON, far below KV's 512 KB per value), with the chain and the seq of its write.
- `P/problems`: what the publisher skipped, for every edge's log, with its version.

Rules:
- `seq` grows by one per write that changes the table. A new publisher continues the chain it
  finds (it reads head and shards consistently first), so followers lose nothing in a failover; it
  starts a new chain only when there is none it can read.
- A delta is absolute (a service's whole instance list, or its removal): applying one twice is
  harmless, and a shard read that is newer than the head it was read for is harmless too.
- A follower applies head's delta when head is exactly its next seq; otherwise it reads the
  shards whose version moved, and every shard when it has no state or the chain changed. A lower
  seq of the same chain is a stale answer (a lagging server): ignored, the table never goes back.
- Everything decoded here is validated as Consul's own data is (`edge.routing.model`): a value
  another program wrote to KV is untrusted text, and a malformed one is a `FormatError`, never an
  empty table.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import msgspec

from edge.routing.model import EDGE_META, Instance, Problem, routable_service, route_name, valid_address, valid_port

FORMAT = 1
SHARDS = 64
DELTA_MAX = 16 * 1024          # bytes of JSON: a larger delta is left to the shards
VALUE_MAX = 512 * 1024         # Consul's limit for one KV value
BEAT = 2.0                     # the publisher rewrites head when it wrote nothing for this long
SILENCE = 3 * BEAT             # a head unchanged this long: the publisher is gone (checked consistently)
FALLBACK_AFTER = 5 * BEAT      # this long without a live publisher (deposing and electing one did not
                               # help): read the catalog ourselves
MIN_WRITE_INTERVAL = 0.05      # writes (and so wake-ups of every follower) at most 20 per second


class FormatError(ValueError):
    """A head, shard or problems value that is not what this version of the edge writes."""


Services = Mapping[str, tuple[Instance, ...]]
# One instance in KV: node, service ID, address, port, container port, healthy, tags, and the
# `edge-` keys of its service meta (the edge grammar reads routes from them).
Row = tuple[str, str, str, int, int, bool, tuple[str, ...], tuple[tuple[str, str], ...]]


def shard_of(name: str) -> int:
    """The shard a service lives in: stable across processes and versions (not Python's hash)."""
    return zlib.crc32(name.encode("utf-8", "surrogatepass")) % SHARDS


# --- values ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Head:
    chain: str
    seq: int
    beat: int = 0
    index: int = 0                               # the Consul index of the snapshot published
    publisher: str = ""
    versions: tuple[int, ...] = (0,) * SHARDS    # per shard, the seq that last wrote it
    problems_version: int = 0
    delta: Mapping[str, tuple[Instance, ...] | None] | None = None   # None: read the shards
    ready: bool = True                           # False: a new publisher still reading the catalog


@dataclass(frozen=True)
class Shard:
    chain: str
    version: int
    services: Services


@dataclass(frozen=True)
class Published:
    """What the publisher knows KV holds: its head, every service (flat: after the first write it
    is the reader's own mapping, so nothing is held twice) and the names in each shard."""

    head: Head
    services: Services = field(default_factory=lambda: MappingProxyType({}))
    members: tuple[frozenset[str], ...] = (frozenset(),) * SHARDS
    problems: tuple[Problem, ...] = ()
    dirty: frozenset[int] = frozenset()   # shards the next write must rewrite whatever changed

    def shard(self, k: int) -> Services:
        return MappingProxyType({n: self.services[n] for n in self.members[k]})


@dataclass(frozen=True)
class Write:
    """One publication: the new head, the shards it rewrote and the problems if they changed."""

    head: Head
    shards: Mapping[int, Shard]
    problems: tuple[Problem, ...] | None = None


# --- encoding -----------------------------------------------------------------------------------------
class _HeadDoc(msgspec.Struct):
    f: int
    chain: str
    seq: int
    beat: int
    index: int
    by: str
    v: tuple[int, ...]
    pv: int
    r: bool
    d: dict[str, tuple[Row, ...] | None] | None = None


class _ShardDoc(msgspec.Struct):
    f: int
    chain: str
    seq: int
    s: dict[str, tuple[Row, ...]]


class _ProblemsDoc(msgspec.Struct):
    f: int
    chain: str
    seq: int
    p: tuple[tuple[str, str], ...]


_HEAD = msgspec.json.Decoder(_HeadDoc)
_SHARD = msgspec.json.Decoder(_ShardDoc)
_PROBLEMS = msgspec.json.Decoder(_ProblemsDoc)
_ENCODE = msgspec.json.Encoder()


def _rows(instances: tuple[Instance, ...]) -> list[Row]:
    return [(i.node, i.service_id, i.address, i.port, i.container_port, i.healthy, i.tags, i.meta) for i in instances]


def _instances(service: str, rows: tuple[Row, ...]) -> tuple[Instance, ...]:
    """Rows back into instances, checked as the model checks Consul's answers."""
    if not routable_service(service):
        raise FormatError(f"service name {service!r} cannot be a route")
    out = []
    for node, sid, address, port, cport, healthy, tags, meta in rows:
        if valid_address(address) != address or valid_port(port) != port or valid_port(cport) != cport \
                or route_name(service, cport) is None:
            raise FormatError(f"instance {sid!r} of {service!r}: address, port or container port not usable")
        if any(not key.startswith(EDGE_META) for key, _ in meta):
            raise FormatError(f"instance {sid!r} of {service!r}: service meta other than {EDGE_META}* keys")
        out.append(Instance(service, node, sid, address, port, cport, healthy, tuple(sorted(set(tags))),
                            tuple(sorted(dict(meta).items()))))
    return tuple(sorted(out))


def encode_head(head: Head) -> bytes:
    delta = None
    if head.delta is not None:
        delta = {n: (None if insts is None else _rows(insts)) for n, insts in sorted(head.delta.items())}
    return _ENCODE.encode({"f": FORMAT, "chain": head.chain, "seq": head.seq, "beat": head.beat,
                           "index": head.index, "by": head.publisher, "v": head.versions,
                           "pv": head.problems_version, "r": head.ready, "d": delta})


def decode_head(raw: bytes) -> Head:
    try:
        doc = _HEAD.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FormatError(f"head: {exc}") from None
    if doc.f != FORMAT:
        raise FormatError(f"head is format {doc.f}, this edge reads {FORMAT}")
    if len(doc.v) != SHARDS or any(v < 0 or v > doc.seq for v in (*doc.v, doc.pv)) or not doc.chain:
        raise FormatError("head: versions do not fit its seq or shard count")
    delta = None
    if doc.d is not None:
        delta = MappingProxyType({n: None if rows is None else _instances(n, rows) for n, rows in doc.d.items()})
    return Head(doc.chain, doc.seq, doc.beat, doc.index, doc.by, doc.v, doc.pv, delta, doc.r)


def encode_shard(shard: Shard) -> bytes:
    body = _ENCODE.encode({"f": FORMAT, "chain": shard.chain, "seq": shard.version,
                           "s": {n: _rows(insts) for n, insts in sorted(shard.services.items())}})
    return zlib.compress(body, 6)


def decode_shard(number: int, raw: bytes) -> Shard:
    try:
        doc = _SHARD.decode(zlib.decompress(raw))
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FormatError(f"shard {number}: {exc}") from None
    if doc.f != FORMAT:
        raise FormatError(f"shard {number} is format {doc.f}, this edge reads {FORMAT}")
    if any(shard_of(n) != number for n in doc.s):
        raise FormatError(f"shard {number} holds a service that belongs to another shard")
    return Shard(doc.chain, doc.seq, MappingProxyType({n: _instances(n, rows) for n, rows in doc.s.items()}))


def encode_problems(chain: str, seq: int, problems: tuple[Problem, ...]) -> bytes:
    return zlib.compress(_ENCODE.encode({"f": FORMAT, "chain": chain, "seq": seq,
                                         "p": [(p.subject, p.reason) for p in problems]}), 6)


def decode_problems(raw: bytes) -> tuple[str, int, tuple[Problem, ...]]:
    try:
        doc = _PROBLEMS.decode(zlib.decompress(raw))
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FormatError(f"problems: {exc}") from None
    if doc.f != FORMAT:
        raise FormatError(f"problems are format {doc.f}, this edge reads {FORMAT}")
    return doc.chain, doc.seq, tuple(sorted(Problem(s, r) for s, r in doc.p))


def kv_value(raw: bytes) -> str:
    """A value as Consul's transaction API takes it."""
    return base64.b64encode(raw).decode()


def from_kv(value: object) -> bytes:
    """A value as Consul's KV API returns it (base64 in JSON; null for an empty value)."""
    if value is None:
        return b""
    if not isinstance(value, str):
        raise FormatError("a KV value that is not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise FormatError(f"a KV value that is not base64: {exc}") from None


# --- the publisher ------------------------------------------------------------------------------------
def taken(head: Head | None, publisher: str, new_chain: str) -> Head:
    """The head a new publisher writes as it takes the lock: the publication as it is (followers
    have nothing new to read), marked not ready; a new chain when there is none to continue."""
    if head is None:
        return Head(new_chain, 0, publisher=publisher, ready=False)
    return replace(head, beat=head.beat + 1, publisher=publisher, ready=False)


def adopt(head: Head | None, shards: Mapping[int, Shard], problems: tuple[str, int, tuple[Problem, ...]] | None,
          new_chain: str) -> Published:
    """A new publisher's starting point: the chain in KV when head has published and every shard
    and the problems it names are there, else a new chain (whose first write has every shard).
    A shard newer than head (its writer lost the lock before writing head) is rewritten by the
    first write, so no follower keeps the older content head still names."""
    if head is not None and head.seq > 0:
        late, usable = settle(head, tuple(range(SHARDS)), shards)
        problems_ok = head.problems_version == 0 or (problems is not None and problems[0] == head.chain
                                                     and problems[1] >= head.problems_version)
        if not late and problems_ok:
            services = {n: insts for shard in usable.values() for n, insts in shard.services.items()}
            return Published(replace(head, delta=None), MappingProxyType(services),
                             tuple(frozenset(usable[k].services) for k in range(SHARDS)),
                             problems[2] if problems is not None and head.problems_version else (),
                             frozenset(k for k, shard in usable.items() if shard.version > head.versions[k]))
    return Published(Head(new_chain, 0))


def plan_write(published: Published, services: Services, problems: tuple[Problem, ...], index: int,
               publisher: str, force: bool = False) -> tuple[Published, Write] | None:
    """What to write for a new snapshot, or None when KV already says the same (`force`: write
    head anyway, so followers see this publisher has caught up). Identity first: the reader keeps
    the same tuple for an unchanged service. A new chain (seq 0) writes every shard."""
    old = published.services
    changed = {n for n, insts in services.items() if (was := old.get(n)) is not insts and was != insts}
    changed |= old.keys() - services.keys()
    new_problems = problems if problems != published.problems else None
    head = published.head
    full = head.seq == 0
    if not (changed or new_problems is not None or full or force or published.dirty):
        return None
    seq = head.seq + 1
    touched = set(range(SHARDS)) if full else {shard_of(n) for n in changed} | published.dirty
    members = list(published.members)
    for name in changed:
        k = shard_of(name)
        members[k] = members[k] | {name} if name in services else members[k] - {name}
    after = Published(head, MappingProxyType(services) if isinstance(services, dict) else services,
                      tuple(members), problems)
    versions = tuple(seq if k in touched else v for k, v in enumerate(head.versions))
    new_head = Head(head.chain, seq, head.beat, index, publisher, versions,
                    seq if new_problems is not None else head.problems_version,
                    MappingProxyType({n: services.get(n) for n in changed}))
    if full or len(encode_head(new_head)) > DELTA_MAX:
        new_head = replace(new_head, delta=None)
    write = Write(new_head, MappingProxyType({k: Shard(head.chain, seq, after.shard(k)) for k in sorted(touched)}),
                  new_problems)
    return replace(after, head=new_head), write


def beat(published: Published, publisher: str) -> tuple[Published, Head]:
    """The heartbeat: head again with the counter moved and without a delta, so that every
    follower's answer stays small while nothing changes (one that missed the last write reads
    the shards it changed)."""
    head = replace(published.head, beat=published.head.beat + 1, publisher=publisher, delta=None)
    return replace(published, head=head), head


# --- the follower ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Following:
    """Where a follower is: the chain and seq it applied, and each shard's version it holds."""

    chain: str
    seq: int
    versions: tuple[int, ...]
    problems_version: int


@dataclass(frozen=True)
class Step:
    """What a follower does with a head: `stale` (ignore it), `same` (nothing new: a heartbeat),
    `delta` (apply head's delta), `shards` (read the shards listed, and the problems if `problems`),
    `full` (read every shard and the problems)."""

    kind: str
    shards: tuple[int, ...] = ()
    problems: bool = False


def follow(state: Following | None, head: Head) -> Step:
    if state is None or state.chain != head.chain:
        return Step("full", tuple(range(SHARDS)), True)
    if head.seq < state.seq:
        return Step("stale")
    if head.seq == state.seq:
        return Step("same")
    problems = head.problems_version != state.problems_version
    if head.seq == state.seq + 1 and head.delta is not None and not problems:
        return Step("delta")
    return Step("shards", tuple(k for k in range(SHARDS) if head.versions[k] > state.versions[k]), problems)


def settle(head: Head, numbers: tuple[int, ...], shards: Mapping[int, Shard]
           ) -> tuple[tuple[int, ...], dict[int, Shard]]:
    """The shards read for `head`: (those still behind it, the usable ones). A shard is behind when
    head says it was written but it is missing, of another chain or older (a lagging server); one
    head never wrote (version 0) is empty, whatever an older chain left there."""
    late, usable = [], {}
    for k in numbers:
        shard = shards.get(k)
        if head.versions[k] == 0:
            usable[k] = Shard(head.chain, 0, MappingProxyType({}))
        elif shard is None or shard.chain != head.chain or shard.version < head.versions[k]:
            late.append(k)
        else:
            usable[k] = shard
    return tuple(late), usable


def applied(state: Following | None, head: Head, step: Step, shards: Mapping[int, Shard]) -> Following:
    """Where the follower is once `step` is done with `shards` (the usable ones, see `settle`)."""
    if step.kind == "delta":
        return Following(head.chain, head.seq, head.versions, head.problems_version)
    base = state.versions if state is not None and step.kind == "shards" else head.versions
    versions = tuple(shards[k].version if k in shards else base[k] for k in range(SHARDS))
    return Following(head.chain, head.seq, versions, head.problems_version)


# --- the member's next move -------------------------------------------------------------------------
@dataclass(frozen=True)
class View:
    """What a member knows of the publisher, from its own reads of head.

    `role`: follower, publisher or fallback (reading the catalog itself). `usable`: head is there
    and this edge can read it. `holder`: a session holds head; `ours`: this member's. `quiet`:
    seconds since head last changed. `without`: seconds since head was last usable, held and
    moving. `newer`: head is ready and was written (a publication or a beat) since this member
    fell back. `can_publish`: False while Consul refuses this edge's writes (an ACL)."""

    role: str
    usable: bool = False
    holder: bool = False
    ours: bool = False
    quiet: float = 0.0
    without: float = 0.0
    newer: bool = False
    can_publish: bool = True


def next_move(view: View) -> str:
    """`stay`; `acquire` (take head's lock and publish); `depose` (a silent publisher: destroy
    its session once a consistent read agrees); `step-down` (this publisher lost the lock);
    `fallback` (read the catalog ourselves); `follow` (a publisher publishes again: back to KV)."""
    if view.role == "publisher":
        return "stay" if view.holder and view.ours else "step-down"
    if not view.holder and view.can_publish:
        return "acquire"
    if view.role == "follower" and (view.without >= FALLBACK_AFTER or not (view.holder or view.can_publish)):
        return "fallback"
    if view.holder and view.quiet >= SILENCE and view.can_publish:
        return "depose"
    if view.role == "fallback" and view.usable and view.holder and view.newer and view.quiet < SILENCE:
        return "follow"
    return "stay"
