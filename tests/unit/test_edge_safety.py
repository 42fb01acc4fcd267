"""The ACL guard's decisions, as a table: when to ask the public API, and what its answer means."""

import pytest

from edge.consul.safety import PublicView, judge, needs_confirmation, start_problem


@pytest.mark.parametrize("before, after, ask", [
    (0, 0, False), (10, 10, False), (10, 5, False), (10, 4, True), (10, 0, True), (1, 0, True), (3, 2, False),
])
def test_needs_confirmation(before, after, ask):
    assert needs_confirmation(before, after) is ask


ALL = frozenset({"consul", "web", "api"})


@pytest.mark.parametrize("removed, view, confirmed, words", [
    ({"web"}, PublicView(True, 3, frozenset({"consul", "api"})), True, ""),
    ({"web"}, PublicView(True, 0, ALL), False, "node:read"),
    ({"web"}, PublicView(True, 3, frozenset()), False, "service:read"),
    ({"web"}, PublicView(True, 3, ALL, invisible=("web",)), False, "node:read on their nodes"),
    ({"web"}, PublicView(True, 3, frozenset({"consul"}), filtered=True), False, "X-Consul-Results-Filtered-By-ACLs"),
    ({"web"}, PublicView(True, 3, ALL), False, "still lists web"),
    ({"web"}, PublicView(False, 0, ALL), False, "no ACL token is configured"),
])
def test_judge(removed, view, confirmed, words):
    verdict = judge(removed, view)
    assert verdict.confirmed is confirmed and words in verdict.cause


@pytest.mark.parametrize("acl, token, nodes, services, words", [
    ("off", False, 0, 0, None),
    ("on", True, 2, 3, None),
    ("on", True, 0, 3, "node:read missing"),
    ("on", True, 0, 0, "node:read and service:read missing"),
    ("on", False, 0, 0, "anonymous token"),
    ("unknown-token", True, 0, 0, "does not know the edge's token"),
])
def test_start_problem_is_one_line_or_none(acl, token, nodes, services, words):
    line = start_problem(acl, token, nodes, services)
    assert (line is None) if words is None else (words in line and "\n" not in line)
