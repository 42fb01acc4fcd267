"""The rules that keep an answer from a server behind what was seen out of the route table."""

import pytest

from edge.consul.freshness import Clocks, behind, proves_caught_up


@pytest.mark.parametrize("index, floor, known_leader, last_contact_ms, reason", [
    (120, 100, True, 5, None),                              # newer than anything seen
    (100, 100, True, 5, None),                              # the same state again
    (61, 100, True, 5, "index 61, below 100 already seen"),  # a restarted server replaying its log
    (61, 100, True, 0, "index 61, below 100 already seen"),  # ...even though it just heard from the leader
    (120, 100, False, 5, "its server knows no leader"),
    (120, 100, True, 10_001, "its server last heard from the leader 10001 ms ago (more than 10000)"),
    (5, 0, True, 0, None),                                  # nothing seen yet: anything goes
])
def test_behind(index, floor, known_leader, last_contact_ms, reason):
    assert behind(index, floor, known_leader, last_contact_ms, 10_000) == reason


@pytest.mark.parametrize("index, highest, last_contact_ms, proof", [
    (900, 900, 3, True),       # a follower's own state holds everything seen
    (950, 900, 1, True),
    (899, 900, 3, False),      # one write short
    (950, 900, 0, False),      # the leader's answer (or one forwarded to it): nothing about the server
])
def test_proves_caught_up(index, highest, last_contact_ms, proof):
    assert proves_caught_up(index, highest, last_contact_ms) is proof


def test_clocks_only_go_forward_until_cleared():
    clocks = Clocks()
    clocks.advance("/a", 10)
    clocks.advance("/a", 7)
    clocks.advance("/b", 12)
    assert (clocks.floor("/a"), clocks.floor("/b"), clocks.floor("/c"), clocks.highest()) == (10, 12, 0, 12)
    clocks.clear()
    assert (clocks.floor("/a"), clocks.highest()) == (0, 0)
