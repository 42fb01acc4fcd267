"""The optional systemd-resolved drop-in that sends `.consul` queries to this agent (as the seed
did), written atomically and removed on exit. Reloading resolved is best effort."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("bootstrap.resolved")
FILE_NAME = "consul.conf"


def content(address: str, dns_port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return ("# Written by haproxy-consul bootstrap; removed when it exits.\n"
            f"[Resolve]\nDNS={host}:{dns_port}\nDomains=~consul\n")


def install(directory: Path, address: str, dns_port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".consul.")
    with os.fdopen(fd, "w") as f:
        f.write(content(address, dns_port))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    _reload()
    log.info("wrote %s: .consul queries go to %s:%d", path, address, dns_port)
    return path


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    _reload()


def _reload() -> None:
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        log.info("systemctl not found: systemd-resolved not reloaded")
        return
    result = subprocess.run([systemctl, "try-reload-or-restart", "systemd-resolved"], capture_output=True, text=True)
    if result.returncode != 0:
        log.info("systemd-resolved not reloaded: %s", (result.stderr or result.stdout).strip()[:200])
