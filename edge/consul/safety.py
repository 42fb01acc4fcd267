"""Pure decisions that keep Consul ACL surprises from emptying the route table.

Consul's ACLs filter rather than refuse: with `default_policy = "deny"` and no token, or a token
without `node:read`, catalog and health reads answer `200 []`. So an answer that would remove
every route, or more than half of them, is only applied once an independent read through the
public API confirms it (`needs_confirmation`, then `judge` on what that read saw); otherwise the
edge keeps serving and the operator is told the likely cause. No I/O here: the watcher (the
shell) does the reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

NO_TOKEN = ("no ACL token is configured, so Consul uses its anonymous/default token: "
            "give the edge a token (CONSUL_HTTP_TOKEN_FILE or --token-file)")
POLICY = 'the edge needs node:read and service:read on everything it routes (see README "Consul")'


def needs_confirmation(before: int, after: int) -> bool:
    """Whether going from `before` to `after` services with instances removes every one of them,
    or more than half: what ACL filtering looks like."""
    return before > 0 and (after == 0 or before - after > before / 2)


@dataclass(frozen=True)
class PublicView:
    """What an independent read through the documented API saw (consistent reads)."""

    token: bool                    # a token is configured
    nodes: int                     # entries of /v1/catalog/nodes
    services: frozenset[str]       # names in /v1/catalog/services
    filtered: bool = False         # X-Consul-Results-Filtered-By-ACLs on any answer (Consul >= 1.11)
    invisible: tuple[str, ...] = ()  # removed services the catalog lists but whose health is empty


@dataclass(frozen=True)
class Verdict:
    confirmed: bool
    cause: str = ""


def _names(names: Iterable[str], limit: int = 5) -> str:
    ordered = sorted(names)
    return ", ".join(ordered[:limit]) + (f" and {len(ordered) - limit} more" if len(ordered) > limit else "")


def judge(removed: set[str], view: PublicView) -> Verdict:
    """Confirm a large removal, or name the likely cause of a false one."""
    if view.nodes == 0:
        cause = "Consul shows no node at all: the token lacks node:read"
    elif not view.services:
        cause = "Consul shows no service at all (not even `consul`): the token lacks service:read"
    elif view.invisible:
        cause = (f"the catalog lists {_names(view.invisible)} but shows none of their instances: "
                 "the token lacks node:read on their nodes")
    elif view.filtered:
        cause = "Consul says it filtered the answers by ACLs (X-Consul-Results-Filtered-By-ACLs)"
    elif removed & view.services:
        cause = (f"the public catalog still lists {_names(removed & view.services)}: "
                 "the internal API answered differently")
    else:
        return Verdict(True)
    if not view.token:
        cause = f"{cause}; {NO_TOKEN}"
    return Verdict(False, f"{cause}; {POLICY}")


def start_problem(acl: str, token: bool, nodes: int, services: int) -> str | None:
    """One line for the start when the token cannot read, else None. `acl`: 'off' (ACLs disabled),
    'unknown-token' (Consul does not know the token), 'on' (the token resolved)."""
    if acl == "off":
        return None
    if acl == "unknown-token":
        return ("Consul ACLs are on and Consul does not know the edge's token (revoked or mistyped): "
                f"every read will be refused; {POLICY}")
    missing = [what for what, seen in (("node:read", nodes), ("service:read", services)) if not seen]
    if not missing:
        return None
    who = "the edge's token" if token else "the anonymous token (no ACL token is configured)"
    return (f"Consul ACLs are on and {who} cannot read the catalog: {' and '.join(missing)} missing; "
            f"the edge keeps the routes it serves until it can; {POLICY}")
