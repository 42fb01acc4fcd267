"""Who owns a state dir and its listeners: one edge at a time, and a clean hand-over to the next.

- `StateLock`: an flock on `<state dir>/edge.lock`, held for the edge's lifetime (also by
  `--once`). A second edge on the same state dir is refused with the holder's pid instead of
  fighting the first one's HAProxy.
- `check_free()`: each listener address must be free before a new HAProxy starts. HAProxy binds
  with `noreuseport`, so a second one would fail anyway; this says which address and why first.
- Hand-over: on SIGTERM (with `--handover-timeout` > 0) the edge exits at once and leaves its
  HAProxy serving, watched by a small caretaker process (`python -m edge.haproxy.ownership`). A new edge
  on the same state dir adopts that HAProxy (no listener ever closes: an upgrade or restart drops
  no request); if none has taken the lock when the timeout ends, the caretaker soft-stops
  HAProxy.
"""

from __future__ import annotations

import argparse
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

    def acquire(self, wait_for_caretaker: float = 15.0) -> None:
        """Take the lock or raise Busy naming its holder. A caretaker holds it only while it
        stops the HAProxy nobody adopted; then we wait for it to finish."""
        # Held read-only: a file open for writing would keep the state dir's file system from
        # being remounted read-only, and holding a lock needs no write access.
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_for_caretaker
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(fd)
                if not (holder and _is_caretaker(holder)) or time.monotonic() > deadline:
                    os.close(fd)
                    who = f"pid {holder}" if holder else "another process"
                    raise Busy(f"state dir {self.path.parent} is in use by another edge ({who}); "
                               "run one edge per state dir") from None
                time.sleep(0.1)
        self._fd = fd
        try:
            self.path.write_text(f"{os.getpid()}\n")    # who holds it, for the next one's message
        except OSError as exc:
            log.warning("could not record our pid in %s: %s", self.path, exc)

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
    """Raise Busy for the first `{option: "ADDR:PORT"}` something else already listens on."""
    for option, address in addresses.items():
        host, port = host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise Busy(f"{option} {address} is already in use (another edge, HAProxy or web "
                               "server listens there); refusing to start beside it") from None
                if exc.errno == errno.EACCES:
                    # A port below 1024: HAProxy may hold the capability we lack (the image's
                    # setup). Its own bind says whether it can.
                    continue
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise Busy(f"{option} {address}: no such local address") from None
                raise


def hand_over(state_dir: Path, master: int, config: Path, timeout: float) -> None:
    """Leave `master` serving for a successor; a caretaker stops it if none comes in time."""
    subprocess.Popen([sys.executable, "-m", CARETAKER, "--state-dir", str(state_dir), "--pid", str(master),
                      "--config", str(config), "--timeout", f"{timeout:g}"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    log.info("HAProxy (pid %d) keeps serving for %gs: an edge started on %s in that time takes it over "
             "without closing a connection; otherwise it is stopped then", master, timeout, state_dir)


def caretake(state_dir: Path, master: int, config: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_master(master, str(config)):
            return 0
        time.sleep(0.1)
    lock = StateLock(state_dir)
    try:
        lock.acquire(wait_for_caretaker=0)
    except (Busy, OSError):
        return 0                   # a successor owns the state dir, and this HAProxy with it
    try:
        if is_master(master, str(config)):
            log.warning("no edge took over HAProxy (pid %d) within %gs; stopping it", master, timeout)
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
