"""The optional systemd-resolved drop-in that sends `.consul` queries to this agent's DNS
interface (as the seed did): written atomically, removed before the agent leaves.

resolved reads drop-ins only when it starts or reloads, so after each write and removal bootstrap
asks the host's systemd over the system D-Bus (`ReloadOrTryRestartUnit systemd-resolved.service`,
which does nothing where resolved does not run). In a container that needs root and the host's
`/run/dbus` mounted; without a bus the file is still written and one line says what to do.
The default directory is under /run, so a drop-in left by a killed container (`docker rm -f`,
SIGKILL) never outlives a reboot; the next start or stop replaces or removes it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call
from jeepney.auth import AuthenticationError
from jeepney.io.blocking import open_dbus_connection

log = logging.getLogger("bootstrap.resolved")
FILE_NAME = "haproxy-consul.conf"
UNIT = "systemd-resolved.service"
SYSTEMD = DBusAddress("/org/freedesktop/systemd1", bus_name="org.freedesktop.systemd1",
                      interface="org.freedesktop.systemd1.Manager")


def content(address: str, dns_port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return ("# Written by haproxy-consul bootstrap; removed when it stops.\n"
            f"[Resolve]\nDNS={host}:{dns_port}\nDomains=~consul\n")


def install(directory: Path, address: str, dns_port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".haproxy-consul.")
    with os.fdopen(fd, "w") as f:
        f.write(content(address, dns_port))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    log.info("wrote %s: .consul queries go to %s:%d%s", path, address, dns_port, _reload())
    return path


def remove(path: Path) -> None:
    if path.exists():
        path.unlink(missing_ok=True)
        log.info("removed %s%s", path, _reload())


def reload_resolved(timeout: float = 10.0) -> str | None:
    """Ask systemd to reload (or restart) systemd-resolved if it runs. None when systemd took the
    job; otherwise why not, in words. The bus is $DBUS_SYSTEM_BUS_ADDRESS or the system bus."""
    try:
        with open_dbus_connection(bus="SYSTEM") as conn:
            reply = conn.send_and_get_reply(new_method_call(SYSTEMD, "ReloadOrTryRestartUnit", "ss",
                                                            (UNIT, "replace")), timeout=timeout)
    except (OSError, AuthenticationError, TimeoutError) as exc:
        return f"no system D-Bus to reach systemd ({type(exc).__name__}: {exc})"
    if reply.header.message_type == MessageType.error:
        detail = reply.body[0] if reply.body else ""
        return f"systemd refused: {reply.header.fields.get(HeaderFields.error_name, 'error')} {detail}".strip()
    return None


def _reload() -> str:
    """The reload, as a suffix for the log line that reports the file."""
    why_not = reload_resolved()
    if why_not is None:
        return f"; asked systemd to reload {UNIT}"
    return (f"; {UNIT} not reloaded: {why_not}. Where resolved runs, restart it once "
            "(systemctl restart systemd-resolved) or run bootstrap as root with the host's /run/dbus mounted")
