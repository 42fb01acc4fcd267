"""`haproxy-consul bootstrap [options] [-- consul agent args]`: wiring and exit codes.

0: stopped on request; 2: bad options, servers disagreeing on --expect, or a data dir it cannot
write (found before announcing anything); 1: etcd refused a request; otherwise the Consul
agent's own exit status, so a unit's restart policy applies.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping, Sequence

from bootstrap.etcd import EtcdError, connect
from bootstrap.plan import ExpectMismatch
from bootstrap.settings import parse
from bootstrap.supervise import DataDirUnwritable, Supervisor
from haproxy_consul import __version__, logs

log = logging.getLogger("bootstrap")


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    settings = parse(argv, environ)
    logs.setup(settings.log_level)
    log.info("haproxy-consul bootstrap %s; etcd %s (api %s); prefix %s; machine %s; advertise %s; expect %d; data %s",
             __version__, ",".join(settings.etcd), settings.etcd_api, settings.prefix, settings.machine_id,
             settings.advertise, settings.expect, settings.data_dir)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    etcd = connect(settings.etcd, settings.etcd_api)
    try:
        return Supervisor(settings, etcd, stop).run()
    except (ExpectMismatch, DataDirUnwritable) as exc:
        log.error("%s", exc)
        return 2
    except EtcdError as exc:
        log.error("etcd refused a request: %s", exc)
        return 1
    finally:
        etcd.close()
