"""Logging set-up shared by the programs: one line per event, on stderr, level from flag or env."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup(level: str = "INFO") -> None:
    logging.basicConfig(stream=sys.stderr, format=FORMAT, level=level.upper(), force=True)
    # Library chatter (connection pools, file watchers) is noise at INFO.
    for noisy in ("urllib3", "watchdog", "docker", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
