"""A private D-Bus (the real dbus-daemon) with a stand-in for systemd's manager on it.

bootstrap asks systemd over the system bus to reload systemd-resolved after it writes or removes
its drop-in. The tests point DBUS_SYSTEM_BUS_ADDRESS at this bus, where `FakeSystemd` owns the
name org.freedesktop.systemd1 and records every method call (name and arguments), answering
each with a job path, or with the error it is told to give.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

from tests.support.procs import require, wait_until


class FakeSystemd:
    def __init__(self, workdir: Path):
        self.socket = workdir / "bus"
        self.address = f"unix:path={self.socket}"
        self.calls: list[tuple[float, str, tuple]] = []      # (monotonic time, method, arguments)
        self.error: str | None = None                         # answer every call with this D-Bus error
        self.daemon: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FakeSystemd:
        self.daemon = subprocess.Popen([require("dbus-daemon"), "--session", "--nofork", "--nopidfile",
                                        f"--address={self.address}"], stdout=subprocess.DEVNULL)
        wait_until(self.socket.exists, 10, what="dbus-daemon's socket")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake systemd did not get its bus name")
        return self

    def _serve(self, ready: threading.Event) -> None:
        with open_dbus_connection(bus=self.address) as conn:
            conn.send_and_get_reply(message_bus.RequestName("org.freedesktop.systemd1"), timeout=5)
            ready.set()
            while not self._stop.is_set():
                try:
                    msg = conn.receive(timeout=0.2)
                except TimeoutError:
                    continue
                if msg.header.message_type != MessageType.method_call:
                    continue
                self.calls.append((time.monotonic(), msg.header.fields[HeaderFields.member], msg.body))
                if self.error:
                    conn.send_message(new_error(msg, self.error, "s", (f"fake: {self.error}",)))
                else:
                    conn.send_message(new_method_return(msg, "o", ("/org/freedesktop/systemd1/job/1",)))

    def reloads(self) -> list[tuple[float, tuple]]:
        return [(t, args) for t, method, args in self.calls if method == "ReloadOrTryRestartUnit"]

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        if self.daemon and self.daemon.poll() is None:
            self.daemon.terminate()
            self.daemon.wait(10)
