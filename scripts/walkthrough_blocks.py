"""The README's walkthrough blocks and how they run on one machine. Pure: text in, text out.

The README marks each block the walkthrough runs with an HTML comment on the line before its
fence, saying where it runs:

    <!-- walkthrough: t1 -->          once, as host t1
    <!-- walkthrough: each host -->   three times, as t1, t2 and t3
    <!-- walkthrough: each engine --> once per Docker engine; on one machine one engine stands in
                                      for the three hosts', so once, as t1

`on_host` rewrites a block for host tN on one machine, by the substitutions the README
documents (its table "The walkthrough on one machine"): the hosts' addresses 10.0.0.1-3 become
127.0.0.1-3 and their wildcard addresses the same; tN's own loopback 127.0.0.1 becomes 127.1.0.N,
an address apart, so that what a host keeps on its loopback is not reachable at its address on
one machine either; names of containers and volumes get a `-tN` suffix, `$(hostname -f)` is
tN.example.com and `$(hostname -s)` tN, and the host side of a mount (the Docker socket,
machine-id, resolved's drop-in directory, D-Bus) points where the caller says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

HOSTS = ("t1", "t2", "t3")
WHERE = {"t1": ("t1",), "each host": HOSTS, "each engine": ("t1",)}
MARKER = re.compile(r"^<!-- walkthrough: (?P<where>[a-z0-9 ]+) -->$")
FENCE = re.compile(r"^```(?P<info>\S*)\s*$")


class BadMarker(ValueError):
    """A walkthrough marker that names no known place or is not followed by a fenced block."""


@dataclass(frozen=True)
class Block:
    line: int                 # where the fence opens in the README (1-based), for messages
    hosts: tuple[str, ...]
    text: str


def blocks(readme: str) -> tuple[Block, ...]:
    """Every marked block, in README order."""
    lines = readme.splitlines()
    out = []
    for i, line in enumerate(lines):
        marker = MARKER.match(line.strip())
        if not marker:
            continue
        where = marker.group("where")
        if where not in WHERE:
            raise BadMarker(f"README line {i + 1}: walkthrough marker {where!r} is none of {sorted(WHERE)}")
        if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
            raise BadMarker(f"README line {i + 1}: a walkthrough marker must be followed by a ``` fence")
        body = []
        for j in range(i + 2, len(lines)):
            if lines[j].strip() == "```":
                break
            body.append(lines[j])
        else:
            raise BadMarker(f"README line {i + 2}: the walkthrough block is never closed")
        out.append(Block(i + 2, WHERE[where], "\n".join(body) + "\n"))
    return tuple(out)


def host_number(host: str) -> int:
    return HOSTS.index(host) + 1


_ADDRESS = re.compile(r"(?<![\w.])(?:10\.0\.0\.(?P<host>\d+|\$\w+)|(?P<own>127\.0\.0\.1|0\.0\.0\.0))(?![\w.])")
_ALL_ADDRESSES = re.compile(r"(?<=[\s=]):(?=\d+\b)")            # `--bind :80`: every address of the host
_NAME = re.compile(r"(docker run\b(?:[^\n]|\\\n)*?--name\s+)([\w.-]+)")   # docker's, not the program's
_VOLUME = re.compile(r"(-v\s+)([A-Za-z0-9][\w.-]*)(?=:/)")       # a named volume (a path starts with /)
_HOST_SIDE = r"(?<![:\w/]){}(?=[^\w./-]|$)"


def loopback(host: str) -> str:
    """Host tN's own 127.0.0.1 on one machine."""
    return f"127.1.0.{host_number(host)}"


def on_host(text: str, host: str, host_paths: Mapping[str, str]) -> str:
    """The block as it runs on host `host` (t1..t3) of the one-machine walkthrough; `host_paths`
    maps a host-side path (a mount's source, e.g. /var/run/docker.sock) to the one to use."""
    n = host_number(host)

    def address(m: re.Match) -> str:
        if m.group("host"):
            return f"127.0.0.{m.group('host')}"
        return loopback(host) if m.group("own") == "127.0.0.1" else f"127.0.0.{n}"

    text = _ADDRESS.sub(address, text)
    text = _ALL_ADDRESSES.sub(f"127.0.0.{n}:", text)
    text = _NAME.sub(rf"\g<1>\g<2>-{host}", text)
    text = _VOLUME.sub(rf"\g<1>\g<2>-{host}", text)
    for path, replacement in host_paths.items():
        text = re.sub(_HOST_SIDE.format(re.escape(path)), replacement, text, flags=re.M)
    return text.replace("$(hostname -f)", f"{host}.example.com").replace("$(hostname -s)", host)


def names(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The container names (`docker run --name`) and named volumes a rewritten block creates."""
    return (tuple(m.group(2) for m in _NAME.finditer(text)), tuple(m.group(2) for m in _VOLUME.finditer(text)))
