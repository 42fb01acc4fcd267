"""The HAProxy shell: files on disk, `haproxy -c`, the process, its master and runtime sockets.

- `install()` writes a rendered file set atomically: staged in `next/`, validated with
  `haproxy -c -C next/`, then renamed into the state directory (configuration last). An invalid
  set never replaces the live files.
- `start()` runs HAProxy in master-worker mode (`-W -S master.sock`) as our child, with `-C
  <state dir>` so the relative file names in the configuration resolve there.
- `reload()` goes through the master CLI and waits until a new worker is current; a failed load
  leaves the old worker serving and raises `ReloadFailed`.
- `runtime()` sends `set server` batches through the runtime socket (haproxyadmin) and raises
  `RuntimeFailed` on any answer that is not a success.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from haproxyadmin import exceptions as hapexc
from haproxyadmin import haproxy as hapadmin

from edge.render import CONFIG_FILE, Rendered

log = logging.getLogger("edge.haproxy")

# The runtime CLI reads one line into a buffer of tune.bufsize (16 kB by default).
MAX_BATCH_BYTES = 8000
# What `set server ... addr/state` answers when it worked.
RUNTIME_OK = re.compile(r"^(IP changed from|no need to change|port changed from|$)")
UNIX_PATH_MAX = 107


class HAProxyError(Exception):
    """Base of every HAProxy failure the control loop handles."""


class ConfigInvalid(HAProxyError):
    """`haproxy -c` refused a rendered configuration."""


class ReloadFailed(HAProxyError):
    """The master did not bring up a new worker; the old one keeps serving."""


class RuntimeFailed(HAProxyError):
    """A runtime API command failed or the socket did not answer."""


class NotRunning(HAProxyError):
    """The HAProxy master process is gone."""


@dataclass(frozen=True)
class Paths:
    state_dir: Path

    @property
    def config(self) -> Path:
        return self.state_dir / CONFIG_FILE

    @property
    def staging(self) -> Path:
        return self.state_dir / "next"

    @property
    def runtime_socket(self) -> Path:
        return self.state_dir / "haproxy.sock"

    @property
    def master_socket(self) -> Path:
        return self.state_dir / "master.sock"

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "haproxy.pid"

    def check_socket_lengths(self) -> None:
        for path in (self.runtime_socket, self.master_socket):
            if len(str(path)) > UNIX_PATH_MAX:
                raise ValueError(f"state dir {self.state_dir} is too long for a unix socket path ({path})")


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, rename: readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class HAProxy:
    def __init__(self, binary: str, paths: Paths, check_timeout: float = 60.0):
        self.binary = binary
        self.paths = paths
        self.check_timeout = check_timeout
        self.proc: subprocess.Popen | None = None
        self._admin: hapadmin.HAProxy | None = None

    # --- files -------------------------------------------------------------------------------
    def check(self, directory: Path) -> None:
        try:
            result = subprocess.run(
                [self.binary, "-c", "-C", str(directory), "-f", str(directory / CONFIG_FILE)],
                capture_output=True, text=True, timeout=self.check_timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigInvalid(f"haproxy -c did not run: {exc}") from exc
        if result.returncode != 0:
            lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
            alerts = [line for line in lines if "[ALERT]" in line] or lines[-4:]
            raise ConfigInvalid("; ".join(alerts[:8]) or f"haproxy -c exited {result.returncode}")

    def install(self, rendered: Rendered) -> None:
        """Validate the whole file set, then move it into place (configuration last)."""
        staging = self.paths.staging
        staging.mkdir(parents=True, exist_ok=True)
        for name, text in rendered.files:
            atomic_write(staging / name, text)
        self.check(staging)
        for name, _ in sorted(rendered.files, key=lambda f: f[0] == CONFIG_FILE):
            os.replace(staging / name, self.paths.state_dir / name)

    def write_config(self, rendered: Rendered) -> None:
        """After runtime updates: only server lines changed, so the file set stays valid."""
        atomic_write(self.paths.config, rendered[CONFIG_FILE])

    # --- process -----------------------------------------------------------------------------
    def _orphan(self) -> int | None:
        """The master of an HAProxy a previous edge left running (it was killed), if any."""
        try:
            pid = int(self.paths.pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return None
        mine = self.proc is not None and self.proc.pid == pid
        return pid if not mine and b"haproxy" in cmdline and str(self.paths.config).encode() in cmdline else None

    def start(self, timeout: float = 30.0) -> None:
        orphan = self._orphan()
        for sock in (self.paths.runtime_socket, self.paths.master_socket):
            sock.unlink(missing_ok=True)
        argv = [self.binary, "-W", "-S", f"{self.paths.master_socket},mode,600",
                "-C", str(self.paths.state_dir), "-f", str(self.paths.config), "-p", str(self.paths.pidfile)]
        log.info("starting HAProxy: %s", " ".join(argv))
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NotRunning(f"HAProxy exited with status {self.proc.returncode} while starting")
            if self.current_worker() is not None and self._runtime_answers():
                if orphan is not None:
                    # Both listen (SO_REUSEPORT) until the old one, soft-stopped, has drained.
                    log.warning("an HAProxy left by a previous edge (pid %d) was still serving; "
                                "soft-stopping it now that ours answers", orphan)
                    os.kill(orphan, signal.SIGUSR1)
                return
            time.sleep(0.02)
        raise NotRunning(f"HAProxy did not answer on {self.paths.runtime_socket} within {timeout}s")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """Soft stop (finish in-flight requests), then hard stop after `grace` seconds."""
        if not self.running():
            return
        self.proc.send_signal(signal.SIGUSR1)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # --- master CLI --------------------------------------------------------------------------
    def master(self, command: str, timeout: float = 5.0) -> str:
        """One master CLI command. The master answers only once we shut our write side."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.paths.master_socket))
            s.sendall(command.encode() + b"\n")
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def processes(self) -> tuple[int | None, int | None]:
        """(the master's count of failed reloads, the current worker's pid) from `show proc`."""
        failed, worker = None, None
        for line in self.master("show proc").splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1] == "master":
                m = re.search(r"failed:\s*(\d+)", line)
                failed = int(m.group(1)) if m else None
            # The current worker has been through 0 reloads; older ones are draining.
            elif len(fields) >= 3 and fields[1] == "worker" and fields[2] == "0":
                worker = int(fields[0])
        return failed, worker

    def current_worker(self) -> int | None:
        try:
            return self.processes()[1]
        except OSError:
            return None

    def reload(self, timeout: float = 60.0) -> int:
        """Reload through the master CLI; return the new worker's pid once it answers."""
        try:
            failed_before, old_worker = self.processes()
            self.master("reload")
        except OSError as exc:
            raise ReloadFailed(f"master socket: {exc}") from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.01)
            if self.proc is not None and self.proc.poll() is not None:
                raise NotRunning(f"HAProxy exited with status {self.proc.returncode} during the reload")
            try:
                failed, worker = self.processes()
            except OSError:
                continue  # the master re-executes itself during a reload
            if failed is not None and failed_before is not None and failed > failed_before:
                raise ReloadFailed("the new configuration did not load; the previous worker keeps serving")
            if worker is not None and worker != old_worker and self._runtime_answers():
                return worker
        raise ReloadFailed(f"no new worker within {timeout}s")

    # --- runtime API -------------------------------------------------------------------------
    def _runtime_answers(self) -> bool:
        try:
            self._admin = hapadmin.HAProxy(socket_file=str(self.paths.runtime_socket), retry=None,
                                           retry_interval=0, timeout=2)
            return True
        except (ValueError, OSError, hapexc.HAProxyBaseError):
            self._admin = None
            return False

    def runtime(self, commands: tuple[str, ...]) -> None:
        """Send commands in `;`-joined batches; any answer other than success raises."""
        if not commands:
            return
        if self._admin is None and not self._runtime_answers():
            raise RuntimeFailed(f"runtime socket {self.paths.runtime_socket} does not answer")
        for batch in _batches(commands):
            try:
                results = self._admin.command(batch)
            except (OSError, ValueError, hapexc.HAProxyBaseError) as exc:
                self._admin = None
                raise RuntimeFailed(f"runtime socket: {exc}") from exc
            bad = [line for _, lines in results for line in lines if not RUNTIME_OK.match(line)]
            if bad:
                raise RuntimeFailed("; ".join(bad[:5]))


def _batches(commands: tuple[str, ...]) -> list[str]:
    batches, current = [], ""
    for cmd in commands:
        if current and len(current) + len(cmd) + 2 > MAX_BATCH_BYTES:
            batches.append(current)
            current = ""
        current = f"{current}; {cmd}" if current else cmd
    if current:
        batches.append(current)
    return batches
