"""`haproxy-consul registrator [options]`: wiring and exit codes (0 stopped, 2 bad options)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping, Sequence

from haproxy_consul import __version__, logs
from haproxy_consul.consul_api import ConsulHTTP
from registrator.consul_sink import ConsulSink
from registrator.docker_source import DockerSource
from registrator.feeds import AgentWatch
from registrator.loop import Registrator
from registrator.settings import parse

log = logging.getLogger("registrator")


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    settings = parse(argv, environ)
    logs.setup(settings.log_level)
    for warning in settings.consul.warnings():
        log.warning("%s", warning)
    log.info("haproxy-consul registrator %s; docker %s; consul %s; host %s; resync %gs%s",
             __version__, settings.docker, settings.consul.describe(), settings.hostname, settings.resync,
             f"; ttl {settings.ttl}s every {settings.ttl_refresh:g}s" if settings.ttl else "")
    log.info("drain on stop %s; --explicit %s; --script-checks %s; --cleanup %s", *(
        "on" if on else "off" for on in (settings.drain, settings.explicit, settings.script_checks, settings.cleanup)))
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s; stopping (registrations stay while their containers run)",
                 signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Registrator(settings, DockerSource(settings.docker), ConsulSink(settings.consul), stop,
                AgentWatch(ConsulHTTP(settings.consul)).run).run()
    return 0
