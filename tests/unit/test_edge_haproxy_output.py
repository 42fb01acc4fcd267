"""HAProxy's output in the edge's log: what stays an error or a warning, what goes to DEBUG."""

import logging

import pytest

from edge.haproxy.process import classify


@pytest.mark.parametrize("line, expected", [
    ("[ALERT]    (1234) : config : parsing [haproxy.cfg:12] : unknown keyword 'x'",
     (logging.ERROR, "config : parsing [haproxy.cfg:12] : unknown keyword 'x'")),
    ("[WARNING]  (1234) : Server be_a-80/s1 is DOWN, reason: Layer4 timeout",
     (logging.DEBUG, "Server be_a-80/s1 is DOWN, reason: Layer4 timeout")),
    ("[WARNING]  (1234) : config : 'option forwardfor' ignored",
     (logging.WARNING, "config : 'option forwardfor' ignored")),
    ("[NOTICE]   (1234) : New worker (5678) forked", (logging.DEBUG, "New worker (5678) forked")),
    # The edge's own doing (its vhost lost its last instance, or is being removed): not an error.
    ("[ALERT]    (1234) : backend 'be_a-80' has no server available!",
     (logging.DEBUG, "backend 'be_a-80' has no server available!")),
    ("<0>backend be_a-80 has no server available!", (logging.DEBUG, "backend be_a-80 has no server available!")),
    ("<3>Proxy http cannot bind", (logging.ERROR, "Proxy http cannot bind")),
    ("<4>Proxy be_a-80 stopped (cumulated conns: FE: 0, BE: 3).",
     (logging.DEBUG, "Proxy be_a-80 stopped (cumulated conns: FE: 0, BE: 3).")),
    ("", None),
])
def test_classify(line, expected):
    assert classify(line) == expected
