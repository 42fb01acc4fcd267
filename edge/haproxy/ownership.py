"""Who owns a state dir and its listeners: one edge at a time, and a clean hand-over to the next.

- `StateLock`: an flock on `<state dir>/edge.lock`, held for the edge's lifetime (also by
  `--once`). A second edge on the same state dir is refused with the holder's pid instead of
  fighting the first one's HAProxy.
- `check_free()`: each listener address must be free before a new HAProxy starts. HAProxy binds
  with `noreuseport`, so a second one would fail anyway; this says which address, what holds it
  (from /proc) and, for an HAProxy waiting to be adopted, how long it still waits.
- Hand-over: on SIGTERM (with `--handover-timeout` > 0) the edge exits at once and leaves its
  HAProxy serving, watched by a small caretaker process (`python -m edge.haproxy.ownership`). A new edge
  on the same state dir adopts that HAProxy (no listener ever closes: an upgrade or restart drops
  no request); if none has taken the lock when the timeout ends, the caretaker soft-stops
  HAProxy. If the state dir is deleted or renamed meanwhile, no edge can adopt it any more: the
  caretaker stops it at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from edge.haproxy.process import is_master, stop_pid
from haproxy_consul import logs
from haproxy_consul.options import host_port

log = logging.getLogger("edge.ownership")
LOCK_FILE = "edge.lock"
CARETAKER = "edge.haproxy.ownership"


class Busy(Exception):
    """Another edge (or program) already owns the state dir or a listener address."""


class StateLock:
    def __init__(self, state_dir: Path):
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def open(self, create: bool = True) -> None:
        """Open the lock file without locking it (OSError if it cannot be, or is missing and not
        `create`). Held read-only: a file open for writing would keep the state dir's file system
        from being remounted read-only, and holding a lock needs no write access."""
        self._fd = os.open(self.path, os.O_RDONLY | (os.O_CREAT if create else 0), 0o644)

    def try_lock(self) -> bool:
        """Lock the opened file without waiting; False while another process holds it. With no
        file open (it could not be), there is nothing anyone can hold: True."""
        if self._fd is None:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def record(self) -> None:
        """Write our pid in the file we hold: who holds it, for the next one's message."""
        try:
            self.path.write_text(f"{os.getpid()}\n")
        except OSError as exc:
            log.warning("could not record our pid in %s: %s", self.path, exc)

    def acquire(self, wait_for_caretaker: float = 15.0) -> None:
        """Take the lock or raise Busy naming its holder. A caretaker holds it only while it
        stops the HAProxy nobody adopted; then we wait for it to finish."""
        self.open()
        deadline = time.monotonic() + wait_for_caretaker
        while not self.try_lock():
            holder = _holder(self._fd)
            if not (holder and _is_caretaker(holder)) or time.monotonic() > deadline:
                self.release()
                who = f"pid {holder}" if holder else "another process"
                raise Busy(f"state dir {self.path.parent} is in use by another edge ({who}); "
                           "run one edge per state dir") from None
            time.sleep(0.1)
        self.record()

    def in_place(self) -> bool:
        """Whether the state dir still holds the lock file we opened: not deleted, renamed or
        replaced, so an edge started on it can find what it needs to adopt HAProxy."""
        if self._fd is None:
            return False
        try:
            here, ours = os.stat(self.path), os.fstat(self._fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)     # closing the descriptor drops the flock
            self._fd = None


def _holder(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_caretaker(pid: int) -> bool:
    try:
        return CARETAKER.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def check_free(addresses: dict[str, str]) -> None:
    """Raise Busy for the first `{option: "ADDR:PORT"}` something else already listens on,
    naming what listens there when /proc tells."""
    for option, address in addresses.items():
        host, port = host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise Busy(f"{option} {address} is already in use {_listener(port)}") from None
                if exc.errno == errno.EACCES:
                    # A port below 1024: HAProxy may hold the capability we lack (the image's
                    # setup). Its own bind says whether it can.
                    continue
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise Busy(f"{option} {address}: no such local address") from None
                raise


def _listener(port: int) -> str:
    """What listens on `port`, for a refusal: the program and its pid, or, for an HAProxy an edge
    handed over, when its caretaker stops it unless an edge on that state dir adopts it first."""
    pids = _listening_pids(port)
    if not pids:     # another user's process, or another network namespace
        return "(another edge, HAProxy or web server listens there); refusing to start beside it"
    pid = _master(min(pids))
    name = _read(f"/proc/{pid}/comm").strip() or "a process"
    if name != "haproxy":
        return f"by {name} (pid {pid}); refusing to start beside it"
    handover = _caretaker_of(pid)
    if handover is None:
        config = _argument(_cmdline(pid), "-f")
        return f"by HAProxy (pid {pid}{f', configuration {config}' if config else ''}); refusing to start beside it"
    state_dir, left = handover
    return (f"by HAProxy (pid {pid}), handed over by the edge on {state_dir}: it is stopped in {left:.0f}s "
            f"unless an edge started on {state_dir} takes it over first")


def _listening_pids(port: int) -> set[int]:
    """Processes holding a TCP socket that listens on `port` (those of other users only as root)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in _read(table).splitlines()[1:]:
            fields = line.split()
            # local address "HEX_ADDR:HEX_PORT", state 0A is LISTEN, then the socket's inode.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd") if inodes else ():
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                pids.add(int(fd_dir.parent.name))
    return pids


def _master(pid: int) -> int:
    """An HAProxy worker's master (its parent, also HAProxy); any other pid as it is."""
    stat = _read(f"/proc/{pid}/stat")
    parent = int(stat.rsplit(")", 1)[1].split()[1]) if ")" in stat else 0
    both = _read(f"/proc/{pid}/comm").strip() == _read(f"/proc/{parent}/comm").strip() == "haproxy"
    return parent if both else pid


def _caretaker_of(master: int) -> tuple[str, float] | None:
    """(state dir, seconds left) of the caretaker watching `master`, if one is."""
    for cmdline_file in Path("/proc").glob("[0-9]*/cmdline"):
        argv = _cmdline(int(cmdline_file.parent.name))
        if CARETAKER in argv and _argument(argv, "--pid") == str(master):
            started = _started(int(cmdline_file.parent.name))
            timeout = float(_argument(argv, "--timeout") or 0)
            return _argument(argv, "--state-dir") or "?", max(0.0, timeout - (_uptime() - started))
    return None


def _started(pid: int) -> float:
    """When `pid` started, in seconds since boot (/proc/PID/stat field 22, in clock ticks)."""
    fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK") if len(fields) > 19 else 0.0


def _uptime() -> float:
    return float(_read("/proc/uptime").split()[0])


def _cmdline(pid: int) -> list[str]:
    return _read(f"/proc/{pid}/cmdline").split("\0")


def _argument(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def hand_over(state_dir: Path, master: int, config: Path, timeout: float) -> None:
    """Leave `master` serving for a successor; a caretaker stops it if none comes in time."""
    subprocess.Popen([sys.executable, "-m", CARETAKER, "--state-dir", str(state_dir), "--pid", str(master),
                      "--config", str(config), "--timeout", f"{timeout:g}"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    log.info("HAProxy (pid %d) keeps serving for %gs: an edge started on %s in that time takes it over "
             "without closing a connection; otherwise it is stopped then", master, timeout, state_dir)


def caretake(state_dir: Path, master: int, config: Path, timeout: float) -> int:
    """Stop `master` unless a successor adopts it within `timeout`. A successor holds the state
    dir's lock: the file is opened now and locked only at the end, so the lock taken by a successor
    that adopted HAProxy is seen even if the state dir was deleted or renamed since. No successor
    can adopt an HAProxy whose state dir is gone (the pid file and sockets it needs were in it):
    that one is stopped at once."""
    lock = StateLock(state_dir)
    with contextlib.suppress(OSError):
        lock.open(create=False)    # if it is gone already, in_place() is False
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and lock.in_place():
            if not is_master(master, str(config)):
                return 0
            time.sleep(0.1)
        if not lock.try_lock():
            return 0               # a successor owns the state dir, and this HAProxy with it
        if not is_master(master, str(config)):
            return 0
        if lock.in_place():
            lock.record()          # an edge starting now waits for us (StateLock.acquire)
            log.warning("no edge took over HAProxy (pid %d) within %gs; stopping it", master, timeout)
        else:
            log.warning("state dir %s is gone (deleted or renamed): no edge can take over HAProxy (pid %d); "
                        "stopping it", state_dir, master)
        stop_pid(master, grace=10.0)
    finally:
        lock.release()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge.haproxy.ownership",
                                description="The caretaker of an HAProxy handed over by a stopping edge.")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--timeout", type=float, required=True)
    args = p.parse_args(argv)
    logs.setup("INFO")
    return caretake(args.state_dir, args.pid, args.config, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
