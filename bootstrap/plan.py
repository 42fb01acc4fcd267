"""What etcd says → who the Consul servers are, whether to start, and the agent's argv. Pure.

Announcements live under `<prefix>/machines/<machine-id>`; the value is JSON
`{"address": "10.0.0.5", "expect": 3}` (a bare address, as the seed wrote, is accepted too).
Anything else under the prefix is garbage: reported and ignored, never joined.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MACHINE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class ExpectMismatch(Exception):
    """Announced servers disagree on how many servers the cluster has: a misconfiguration."""


@dataclass(frozen=True, order=True)
class Member:
    machine_id: str
    address: str
    expect: int | None = None


@dataclass(frozen=True)
class Decision:
    start: bool
    reason: str


def machines_key(prefix: str, machine_id: str = "") -> str:
    return f"{prefix.rstrip('/')}/machines/{machine_id}"


def announcement(address: str, expect: int) -> str:
    return json.dumps({"address": address, "expect": expect}, sort_keys=True)


def members_from_kv(kvs: Mapping[str, str], prefix: str) -> tuple[tuple[Member, ...], tuple[str, ...]]:
    """etcd keys and values under `<prefix>/machines/` → members (sorted) and problems."""
    base = machines_key(prefix)
    members, problems = [], []
    for key, value in sorted(kvs.items()):
        machine_id = key[len(base):] if key.startswith(base) else ""
        if not MACHINE_ID_RE.match(machine_id):
            problems.append(f"ignoring key {key!r}: not {base}<machine-id>")
            continue
        address, expect = value.strip(), None
        if address.startswith("{"):
            try:
                data = json.loads(address)
                address, expect = str(data.get("address", "")), data.get("expect")
            except (ValueError, AttributeError):
                problems.append(f"ignoring {key!r}: value is not valid JSON")
                continue
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            problems.append(f"ignoring {key!r}: {address[:60]!r} is not an IP address")
            continue
        if expect is not None and (not isinstance(expect, int) or isinstance(expect, bool) or expect < 1):
            problems.append(f"ignoring {key!r}: expect {expect!r} is not a positive number")
            continue
        members.append(Member(machine_id, address, expect))
    return tuple(sorted(members)), tuple(problems)


def decide(me: Member, members: Sequence[Member], expect: int, has_data: bool, waited: float,
           wait_timeout: float) -> Decision:
    """Start the agent now, or wait for more servers to be announced?

    A server with Raft data is part of a cluster already: it starts at once and rejoins. A
    fresh one waits for `expect` announcements (bounded); after the timeout it starts anyway:
    `-bootstrap-expect` makes Consul itself wait for `expect` servers before electing, so
    starting early can never bootstrap a second, smaller cluster.
    """
    disagree = sorted({m.expect for m in members if m.expect is not None and m.expect != expect})
    if disagree:
        raise ExpectMismatch(f"--expect {expect} disagrees with other announced servers ({disagree}); "
                             "every server of one cluster must expect the same number")
    known = {m.machine_id for m in members} | {me.machine_id}
    if has_data:
        return Decision(True, "existing Raft data: rejoining the cluster")
    if len(known) >= expect:
        return Decision(True, f"{len(known)} of {expect} servers announced")
    if waited >= wait_timeout:
        return Decision(True, f"only {len(known)} of {expect} servers announced after {wait_timeout:g}s; "
                              f"starting anyway, Consul waits for {expect} before electing a leader")
    return Decision(False, f"{len(known)} of {expect} servers announced: {', '.join(sorted(known))}")


def agent_argv(consul: str, me: Member, members: Sequence[Member], expect: int, data_dir: str,
               datacenter: str | None, extra: Sequence[str]) -> list[str]:
    others = sorted({m.address for m in members if m.machine_id != me.machine_id and m.address != me.address})
    argv = [consul, "agent", "-server", f"-bootstrap-expect={expect}", f"-advertise={me.address}",
            f"-data-dir={data_dir}"]
    if datacenter:
        argv.append(f"-datacenter={datacenter}")
    argv += [f"-retry-join={addr}" for addr in others]
    return argv + list(extra)


def _client(extra: Sequence[str]) -> str:
    """The first address `-client` gives (a space-separated list is allowed), as a client reaches it:
    every address (`0.0.0.0`, `::`) is reached on loopback."""
    client = "127.0.0.1"
    for arg in extra:
        if arg.startswith("-client="):
            client = (arg.split("=", 1)[1].split() or [client])[0]
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(client, client)


def _flag(extra: Sequence[str], name: str, default: str) -> str:
    value = default
    for arg in extra:
        if arg.startswith(f"-{name}="):
            value = arg.split("=", 1)[1]
    return value


def http_address(extra: Sequence[str]) -> str:
    """The agent's HTTP address as the `--` arguments set it (`-client`, `-http-port`), for `consul leave`."""
    client = _client(extra)
    return f"{'[' + client + ']' if ':' in client else client}:{_flag(extra, 'http-port', '8500')}"


def dns_address(extra: Sequence[str]) -> tuple[str, int] | None:
    """Where the agent answers DNS as the `--` arguments set it: Consul binds its DNS interface to
    the `-client` address(es), port `-dns-port` (8600); None when `-dns-port=-1` turns it off.
    (Not `-advertise`/`-bind`: those carry Serf and RPC, never DNS.)"""
    port = _flag(extra, "dns-port", "8600")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"-dns-port={port} is not a number") from None
    if number < 0:
        return None
    if not 0 < number < 65536:
        raise ValueError(f"-dns-port={port} is not a port")
    return _client(extra), number
