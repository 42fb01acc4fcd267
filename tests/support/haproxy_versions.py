"""Every HAProxy release the edge supports, as binaries the integration tests can run.

2.6 is the host's (Debian 12); 3.0, 3.2 and 3.4 run from Debian root filesystems through the
wrappers `scripts/haproxy-rootfs.sh` writes to `$HAPROXY_CONSUL_CACHE/bin/haproxy-X.Y` (default
/var/cache/haproxy-consul; `make test` builds what is missing). A missing or wrong binary fails
the tests that need it, loudly: a CI machine without a supported release must go red, never
quietly test fewer releases.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

SUPPORTED = ("2.6", "3.0", "3.2", "3.4")


def cache() -> Path:
    return Path(os.environ.get("HAPROXY_CONSUL_CACHE", "/var/cache/haproxy-consul"))


@dataclass(frozen=True)
class HAProxyBinary:
    version: str      # "3.0"
    path: str         # what the edge gets as --haproxy
    full: str         # what `haproxy -v` says, e.g. 3.0.11-1+deb13u4

    @property
    def release(self) -> tuple[int, int]:
        major, minor = self.version.split(".")
        return int(major), int(minor)


@functools.cache
def binary(version: str) -> HAProxyBinary:
    path = cache() / "bin" / f"haproxy-{version}"
    fix = "run `make haproxy-versions` (scripts/haproxy-rootfs.sh) to build it"
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"HAProxy {version} is not installed at {path}: {fix}")
    out = subprocess.run([str(path), "-v"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version (\d+\.\d+)(\S*)", out.stdout)
    if m is None or m.group(1) != version:
        raise RuntimeError(f"{path} is not HAProxy {version} ({(out.stdout + out.stderr).strip()[:200]!r}): {fix}")
    return HAProxyBinary(version, str(path), m.group(1) + m.group(2))
