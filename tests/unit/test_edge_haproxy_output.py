"""HAProxy's output: in the edge's log, what stays an error or a warning and what goes to DEBUG;
from the runtime API, what the HAProxy shell reads back (answers HAProxy 2.6 gave)."""

import io
import logging

import pytest

from edge.haproxy.process import RuntimeFailed, _relay, classify, servers_state
from edge.routing.plan import ServedSlot


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
    # The same, from a worker stopped while the master serves a CLI command (seen on 2.6).
    ("[WARNING]  (1234) : CLI : Proxy landing stopped (cumulated conns: FE: 0, BE: 1).",
     (logging.DEBUG, "CLI : Proxy landing stopped (cumulated conns: FE: 0, BE: 1).")),
    # The start-up probe's `add server` (edge.haproxy.capabilities), refused on purpose.
    ("[ALERT]    (1234) : CLI : 'server landing/haproxy-consul-probe' : unknown keyword 'init-state'.",
     (logging.DEBUG, "CLI : 'server landing/haproxy-consul-probe' : unknown keyword 'init-state'.")),
    ("<3>CLI : 'server landing/haproxy-consul-probe' : 'init-state' expects one of 'none', 'up' but got '?'.",
     (logging.DEBUG, "CLI : 'server landing/haproxy-consul-probe' : 'init-state' expects one of 'none', 'up' but got "
                     "'?'.")),
    ("[ALERT]    (1234) : CLI : 'server be_a-80/s5' : unknown keyword 'init-state'.",
     (logging.ERROR, "CLI : 'server be_a-80/s5' : unknown keyword 'init-state'.")),
    ("", None),
])
def test_classify(line, expected):
    assert classify(line) == expected


# `show servers state` after: s1 set ready from the configuration, s2 (`disabled` in the
# configuration) given an address and made ready, s3 left free, s4 put in maintenance at runtime.
SHOW_SERVERS_STATE = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight \
srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state \
bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr \
srv_agent_addr srv_agent_port
3 be_web-80 1 s1 127.0.0.1 2 0 1 1 2 1 0 2 0 0 0 0 - 8001 - 0 0 - - 0
3 be_web-80 2 s2 127.0.0.1 2 4 1 1 0 1 0 0 8 0 0 0 - 8002 - 0 0 - - 0
3 be_web-80 3 s3 0.0.0.0 0 5 1 1 2 1 0 0 8 0 0 0 - 0 - 0 0 - - 0
3 be_web-80 4 s4 127.0.0.1 0 1 1 1 0 1 0 0 0 0 0 0 - 8004 - 0 0 - - 0
4 edge_metrics 1 edge /run/x/metrics.sock 2 0 1 1 9 1 0 2 0 0 0 0 - 0 - 0 0 - - 0

"""


def test_servers_state_reads_address_port_and_whether_a_slot_takes_traffic():
    assert servers_state(SHOW_SERVERS_STATE.splitlines()) == (
        ServedSlot("be_web-80", "s1", "127.0.0.1", 8001, True),
        ServedSlot("be_web-80", "s2", "127.0.0.1", 8002, True),     # `disabled` in the file, ready at runtime
        ServedSlot("be_web-80", "s3", "0.0.0.0", 0, False),
        ServedSlot("be_web-80", "s4", "127.0.0.1", 8004, False),
        ServedSlot("edge_metrics", "edge", "/run/x/metrics.sock", 0, True),
    )


@pytest.mark.parametrize("text", ["1\n# be_id be_name srv_id\n3 be 1\n", "Unknown command.\n"])
def test_servers_state_in_another_shape_fails(text):
    with pytest.raises(RuntimeFailed):
        servers_state(text.splitlines())


def test_advice_haproxy_repeats_at_every_reload_is_one_warning_per_start(caplog):
    """3.4 started as root advises dropping privileges at the start and again at every reload."""
    advice = (b"[WARNING]  (%d) : [/usr/sbin/haproxy.main()] HAProxy was started as the root user and does not "
              b"make use of 'user' nor 'uid' global options to drop the privileges. Consider the 'chroot'.\n")
    other = b"[WARNING]  (7) : config : missing timeouts for backend 'b'.\n"
    stream = io.BytesIO(advice % 1 + other + advice % 2 + advice % 3 + other)
    with caplog.at_level("DEBUG", logger="edge.haproxy"):
        _relay(stream, logging.getLogger("edge.haproxy"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "chroot" in w]) == 1
    assert len([w for w in warnings if "missing timeouts" in w]) == 2     # anything else: every time
    assert len([r for r in caplog.records if "chroot" in r.getMessage()]) == 3
