"""Desired registrations vs what this host has in its Consul agent → what to register and
deregister. Pure. Only services whose ID starts with `<hostname>:` are ours to remove: the
registrator never touches another host's (or a human's) registrations."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from registrator.mapping import Registration


@dataclass(frozen=True)
class Changes:
    register: tuple[Registration, ...] = ()
    deregister: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.register and not self.deregister


def same(desired: Registration, current: Registration) -> bool:
    """Equal as far as the agent's service list shows (checks are not listed there)."""
    return (desired.name, desired.address, desired.port, desired.tags, desired.meta) == (
        current.name, current.address, current.port, current.tags, current.meta)


def diff(desired: Iterable[Registration], registered: Mapping[str, Registration], hostname: str,
         scope: set[str] | None = None) -> Changes:
    """`scope`: only these container IDs are being looked at (an event); None: everything."""
    prefix = f"{hostname}:"
    want = {r.id: r for r in desired}
    ours = {sid: r for sid, r in registered.items() if sid.startswith(prefix)
            and (scope is None or r.container_id in scope)}
    register = [r for sid, r in sorted(want.items()) if sid not in ours or not same(r, ours[sid])]
    deregister = [sid for sid in sorted(ours) if sid not in want]
    return Changes(tuple(register), tuple(deregister))
