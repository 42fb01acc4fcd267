"""The HAProxy shell: files on disk, `haproxy -c`, the process, its master and runtime sockets.

- `install()` writes a rendered file set atomically: staged in `next/`, validated with
  `haproxy -c -C next/`, then renamed into the state directory (configuration last), and `next/`
  removed. An invalid set never replaces the live files.
  A write that fails (a full or read-only state dir) removes what it staged and raises
  `StateDirError`: the live files and the running HAProxy are untouched.
- `start()` runs HAProxy in master-worker mode (`-W -S master.sock`) as our child. The
  configuration says `default-path config`, so its relative file names resolve beside it,
  wherever it is run from. HAProxy's own output comes through a pipe and is filtered into our
  log: alerts and warnings stay, the per-backend start/stop notices of every reload do not.
- `adopt()` takes over an HAProxy master a previous edge left running (it was killed, or it
  handed over on SIGTERM): the listening sockets never close, so no request is refused.
- `reload()` goes through the master CLI and waits until a new worker is current; a failed load
  leaves the old worker serving and raises `ReloadFailed`.
- `probe()` asks the running HAProxy what it is and accepts (after every start and adoption):
  one frozen `Capabilities` (edge.haproxy.capabilities), logged in one line when it changes.
- `runtime()` sends server, backend and map commands in batches through the runtime socket, one
  connection per batch (a `del backend` or a `wait` on its own; a `prepare map` alone, its
  version then filled into the map commands after it); `ssl()` sends certificate commands, one
  connection each since `set ssl cert` carries a PEM payload. The answers are read raw, to the
  last empty line: that is what tells a batch's answers apart. Both sort every answer with
  `capabilities.classify` (success, no-op, failure, per HAProxy release) and raise
  `RuntimeFailed` on a failure; no-ops are logged at debug level.
- `served()` reads every server slot as the current worker runs it (`show servers state`), and
  `maps()` the entries of the maps it is asked for (`show map`), for the control loop to compare
  with the table it applied.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edge.haproxy.capabilities import (
    PROBE_SERVER,
    PROBES,
    Capabilities,
    Outcome,
    alone,
    cookie_probe,
    init_state_probe,
    split_batch,
)
from edge.haproxy.capabilities import classify as classify_answer
from edge.routing.maps import NEXT_VERSION
from edge.routing.plan import ServedSlot
from edge.routing.render import CONFIG_FILE, Rendered

log = logging.getLogger("edge.haproxy")

# The runtime CLI reads one line into a buffer of tune.bufsize (16 kB by default).
MAX_BATCH_BYTES = 8000
UNIX_PATH_MAX = 107
# `srv_admin_state` bits: CMAINT only records that the configuration said `disabled` (a slot made
# ready at runtime keeps it); any other bit (maintenance forced, inherited or from resolution,
# draining) means the slot takes no new traffic.
ADMIN_CMAINT = 0x04


class HAProxyError(Exception):
    """Base of every HAProxy failure the control loop handles."""


class ConfigInvalid(HAProxyError):
    """`haproxy -c` refused a rendered configuration."""


class ReloadFailed(HAProxyError):
    """The master did not bring up a new worker; the old one keeps serving."""


class RuntimeFailed(HAProxyError):
    """A runtime API command failed or the socket did not answer."""

    def __init__(self, message: str, commands: tuple[str, ...] = ()):
        super().__init__(message)
        self.commands = commands      # the commands whose answers were failures, when known


class NotRunning(HAProxyError):
    """The HAProxy master process is gone."""


class StateDirError(HAProxyError):
    """The state directory cannot be written (full, read-only, permissions)."""


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


def atomic_write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, rename: readers see the old or the new file.
    Text is written as UTF-8, bytes as they are (an OCSP response beside its certificate)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# HAProxy's output, line by line → (log level, text), or None to drop it. Every reload makes the
# old worker print one "Proxy X stopped" per backend: thousands of lines at scale that say
# nothing the edge's own one-line reload log does not.
_HAPROXY_LINE = re.compile(r"^\[(ALERT|WARNING|NOTICE)\]\s*(?:\(\d+\))?\s*:\s*(.*)$")
# Server state changes are the edge's own runtime commands, which it logs itself; so is a backend
# left with no server (HAProxy says so as an ALERT): its vhost lost its last instance, or is
# being removed.
_QUIET = re.compile(r"^((CLI : )?Proxy \S+ (started|stopped)|Former worker \(\d+\) exited with code 0|"
                    r"Stopping (frontend|backend|proxy) |Server \S+ is (UP|DOWN|going DOWN)\b|"
                    r"backend '?\S+?'? has no server available!)")
# The start-up probe's `add server`, which HAProxy refuses on purpose (edge.haproxy.capabilities)
# and reports as an alert.
_PROBED = re.compile(rf"^CLI : 'server \S+/{re.escape(PROBE_SERVER)}' : ")


def classify(line: str) -> tuple[int, str] | None:
    line = line.rstrip()
    if not line:
        return None
    m = _HAPROXY_LINE.match(line)
    if m is None:
        syslog = re.match(r"^<([0-7])>(.*)$", line)
        if syslog:
            level, text = int(syslog.group(1)), syslog.group(2)
            if _QUIET.match(text) or _PROBED.match(text):
                return logging.DEBUG, text
            return logging.ERROR if level <= 3 else logging.WARNING if level == 4 else logging.DEBUG, text
        return logging.INFO, line
    kind, text = m.groups()
    if kind == "NOTICE" or _QUIET.match(text) or _PROBED.match(text):
        return logging.DEBUG, text
    return logging.ERROR if kind == "ALERT" else logging.WARNING, text


# Advice HAProxy repeats at every reload (3.4 started as root: "configure a chroot", "drop the
# privileges with user/uid"): worth one warning per HAProxy start, not one per reload.
_ONCE = re.compile(r"^\[\S+\] HAProxy was started as (root|the root user) ")


def _relay(stream, logger: logging.Logger) -> None:
    """Thread body: HAProxy's output into our log, filtered by `classify`, until it closes."""
    said: set[str] = set()
    with stream:
        for raw in stream:
            found = classify(raw.decode(errors="replace"))
            if found is None:
                continue
            level, text = found
            if _ONCE.match(text):
                level = logging.DEBUG if text in said else level
                said.add(text)
            logger.log(level, "haproxy: %s", text)


class GuardedWrites:
    """Writes to the state dir, which may refuse them (full, read-only): the first refusal of an
    outage is one ERROR, `waiting` holds callers off for `retry` seconds after each refusal, and
    the first success after an outage says so. `what` names the writes in those lines."""

    def __init__(self, what: str, meanwhile: str, retry: float):
        self.what, self.meanwhile, self.retry = what, meanwhile, retry
        self.error: str | None = None
        self.retry_at = 0.0

    @property
    def waiting(self) -> bool:
        return time.monotonic() < self.retry_at

    def __call__(self, write) -> bool:
        """Run `write`; False when the state dir refused it."""
        try:
            write()
        except (OSError, StateDirError) as exc:
            self.retry_at = time.monotonic() + self.retry
            if self.error is None:
                log.error("%s: %s; %s; retrying every %gs", self.what, exc, self.meanwhile, self.retry)
            self.error = str(exc)
            return False
        if self.error is not None:
            log.info("%s: the state dir takes writes again", self.what)
            self.error = None
        return True


class HAProxy:
    def __init__(self, binary: str, paths: Paths, check_timeout: float = 60.0):
        self.binary = binary
        self.paths = paths
        self.check_timeout = check_timeout
        self.proc: subprocess.Popen | None = None
        self.adopted: int | None = None   # pid of a master we took over instead of starting one
        # What the running HAProxy is and accepts; until a probe answered, the oldest supported
        # release's rules apply (an answer they do not know is a failure: a reload, never a wrong state).
        self.caps = Capabilities(version="unknown")

    # --- files -------------------------------------------------------------------------------
    def clean_staging(self) -> None:
        """Drop a staged set a crash or a full disk left behind (it holds the space we need)."""
        shutil.rmtree(self.paths.staging, ignore_errors=True)

    def check(self, directory: Path) -> None:
        try:
            result = subprocess.run(
                [self.binary, "-c", "-f", str(directory / CONFIG_FILE)],
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
        try:
            staging.mkdir(parents=True, exist_ok=True)
            for name, text in rendered.files:
                atomic_write(staging / name, text)
            self.check(staging)
            for name, _ in sorted(rendered.files, key=lambda f: f[0] == CONFIG_FILE):
                os.replace(staging / name, self.paths.state_dir / name)
        except ConfigInvalid:
            self.clean_staging()
            raise
        except OSError as exc:
            self.clean_staging()
            raise StateDirError(f"cannot install the configuration in {self.paths.state_dir}: {exc}") from exc
        with contextlib.suppress(OSError):   # empty now: nothing staged is left in the state dir
            staging.rmdir()

    def write_config(self, rendered: Rendered) -> None:
        """After runtime updates: server lines and router map entries changed, so the file set
        stays valid; the maps first, the configuration last."""
        try:
            for name, text in sorted(rendered.files, key=lambda f: f[0] == CONFIG_FILE):
                atomic_write(self.paths.state_dir / name, text)
        except OSError as exc:
            raise StateDirError(f"cannot write {self.paths.config}: {exc}") from exc

    # --- process -----------------------------------------------------------------------------
    def _orphan(self) -> int | None:
        """The master of an HAProxy a previous edge left running (killed, or handed over), if any."""
        try:
            pid = int(self.paths.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid != self.pid and is_master(pid, str(self.paths.config)) else None

    def adopt(self) -> int | None:
        """Take over the master a previous edge left serving, if its master CLI answers with a
        current worker; its pid, or None (then `start()` a new one)."""
        orphan = self._orphan()
        if orphan is None or self.current_worker() is None or not self._runtime_answers():
            return None
        self.proc, self.adopted = None, orphan
        self.probe()
        return orphan

    def start(self, timeout: float = 30.0) -> None:
        orphan = self._orphan()
        if orphan is not None:
            # It holds the listening sockets (noreuseport): ours could not bind beside it.
            log.warning("an HAProxy left by a previous edge (pid %d) does not answer; stopping it", orphan)
            stop_pid(orphan, grace=5.0)
        try:
            for sock in (self.paths.runtime_socket, self.paths.master_socket):
                sock.unlink(missing_ok=True)
        except OSError as exc:   # HAProxy could not bind its sockets either
            raise StateDirError(f"cannot replace HAProxy's sockets in {self.paths.state_dir}: {exc}") from exc
        argv = [self.binary, "-W", "-S", f"{self.paths.master_socket},mode,600",
                "-f", str(self.paths.config), "-p", str(self.paths.pidfile)]
        log.info("starting HAProxy: %s", " ".join(argv))
        self.adopted = None
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=_relay, args=(self.proc.stdout, log), name="haproxy-output", daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NotRunning(f"HAProxy exited with status {self.proc.returncode} while starting")
            if self.current_worker() is not None and self._runtime_answers():
                self.probe()
                return
            time.sleep(0.02)
        raise NotRunning(f"HAProxy did not answer on {self.paths.runtime_socket} within {timeout}s")

    @property
    def pid(self) -> int | None:
        """The master's pid, ours or adopted."""
        return self.proc.pid if self.proc is not None else self.adopted

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.adopted is not None and is_master(self.adopted, str(self.paths.config))

    def exit_status(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def stop(self, grace: float = 10.0) -> None:
        """Soft stop (finish in-flight requests), then hard stop after `grace` seconds."""
        if not self.running():
            return
        if self.proc is None:
            stop_pid(self.adopted, grace)
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
            if not self.running():
                raise NotRunning(f"HAProxy exited (status {self.exit_status()}) during the reload")
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
            self._ask("show version", timeout=2)
            return True
        except RuntimeFailed:
            return False

    def _ask(self, command: str, payload: str = "", timeout: float = 10) -> str:
        """One runtime command (or a `;`-joined batch) on a connection of its own; the whole
        answer, as HAProxy wrote it. A payload goes after `<<`, ended by an empty line."""
        text = f"{command} <<\n{payload.strip()}\n\n" if payload else f"{command}\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.paths.runtime_socket))
                s.sendall(text.encode())
                s.shutdown(socket.SHUT_WR)
                return b"".join(iter(lambda: s.recv(65536), b"")).decode(errors="replace")
        except OSError as exc:
            raise RuntimeFailed(f"runtime socket {self.paths.runtime_socket}: {exc}") from exc

    def probe(self) -> Capabilities:
        """Learn what the running HAProxy is and accepts (edge.haproxy.capabilities): a few
        harmless commands, ~1 ms. Logged in one line when it differs from what was known (the
        first start; an adopted HAProxy of another version). A probe that fails keeps what was
        known: unknown answers then count as failures, which reload."""
        try:
            version, help_text, wait_help, backends = (self._ask(c) for c in PROBES)
            init_state = cookie = ""
            names = [b.strip() for b in backends.splitlines() if b.strip() and not b.startswith("#")]
            for name in names[:3]:   # a backend whose balancing refuses dynamic servers says nothing
                init_state = self._ask(init_state_probe(name))
                if "init-state" in init_state:
                    cookie = self._ask(cookie_probe(name))
                    break
        except RuntimeFailed as exc:
            log.warning("could not ask HAProxy what it supports (%s); keeping %s", exc, self.caps.version)
            return self.caps
        caps = Capabilities.from_probes(version, help_text, wait_help, init_state, cookie)
        if caps != self.caps:
            log.info("%s", caps.describe())
        self.caps = caps
        return caps

    def runtime(self, commands: tuple[str, ...]) -> None:
        """Send commands in `;`-joined batches; any answer that is a failure raises. A `prepare
        map` goes alone: the version it answers replaces `@next` in the commands after it that
        name its map (`add map @next NAME …`, `commit map @next NAME`: edge.routing.maps)."""
        versions: dict[str, str] = {}
        pending: list[str] = []
        for command in commands:
            if command.startswith("prepare map "):
                self._send(tuple(pending))
                pending = []
                versions[command.split()[2]] = self._prepare(command)
            else:
                pending.append(_versioned(command, versions))
        self._send(tuple(pending))

    def _prepare(self, command: str) -> str:
        answer = self._ask(command)
        self._judge((command,), (answer,))
        m = re.search(r"New version created: (\d+)", answer)
        if m is None:
            raise RuntimeFailed(f"{command}: no version in {answer.strip()[:100]!r}")
        return m.group(1)

    def _send(self, commands: tuple[str, ...]) -> None:
        """Commands in order: the entries of a map version as payloads (`_payloads`), the rest in
        `;`-joined batches."""
        for group in _payloads(commands):
            if isinstance(group, tuple):
                command, payload = group
                self._judge((command,), (self._ask(command, payload),))
            else:
                self._batch(group)

    def _batch(self, commands: list[str]) -> None:
        for batch in _batches(tuple(commands)):
            output = self._ask("; ".join(batch))
            answers = [output] if len(batch) == 1 and alone(batch[0]) else split_batch(batch, output)
            if answers is None:
                raise RuntimeFailed(f"answers do not line up with the {len(batch)} commands sent: "
                                    f"{output.strip()[:300]!r}")
            self._judge(batch, answers)

    def served(self) -> tuple[ServedSlot, ...]:
        """Every server slot as the current worker runs it; RuntimeFailed when it cannot be read."""
        return servers_state(self._ask("show servers state").splitlines())

    def maps(self, names) -> dict[str, dict[str, str] | None]:
        """Each map's entries as the current worker looks them up (None: it has no map of that
        name); RuntimeFailed when one cannot be read."""
        return {name: map_entries(self._ask(f"show map {name}")) for name in names}

    def ssl(self, commands: tuple[tuple[str, str], ...]) -> None:
        """Certificate commands `(command, payload)`, one connection each; any answer that is a
        failure raises RuntimeFailed (the caller reloads)."""
        for command, payload in commands:
            self._judge((command,), (self._ask(command, payload),))

    def _judge(self, commands, answers) -> None:
        outcomes = [(c, a.strip(), classify_answer(self.caps, c, a)) for c, a in zip(commands, answers, strict=True)]
        failed = [(c, a) for c, a, o in outcomes if o is Outcome.FAILURE]
        if failed:
            raise RuntimeFailed("; ".join(f"{c}: {a or '(no answer)'}" for c, a in failed[:5]),
                                tuple(c for c, _ in failed))
        for c, a, o in outcomes:
            if o is Outcome.NOOP:
                log.debug("no-op: %s: %s", c, a)


def is_master(pid: int, config: str) -> bool:
    """Whether `pid` is an HAProxy master running `config` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"haproxy" in cmdline and config.encode() in cmdline


def stop_pid(pid: int, grace: float) -> None:
    """Soft-stop a master that is not our child (SIGUSR1), then SIGTERM after `grace` seconds."""
    try:
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def servers_state(lines: list[str]) -> tuple[ServedSlot, ...]:
    """`show servers state` (format 1: a version line, a `#` line naming the columns, a line per
    server) as slots; RuntimeFailed when the columns it needs are not there."""
    header = next((line[1:].split() for line in lines if line.startswith("#")), [])
    try:
        backend, name, addr, admin, port = (header.index(c) for c in (
            "be_name", "srv_name", "srv_addr", "srv_admin_state", "srv_port"))
    except ValueError:
        raise RuntimeFailed(f"show servers state: unexpected columns {header}") from None
    slots = []
    for line in lines:
        fields = line.split()
        if line.startswith("#") or len(fields) < len(header):
            continue
        try:
            slots.append(ServedSlot(fields[backend], fields[name], fields[addr], int(fields[port]),
                                    int(fields[admin]) & ~ADMIN_CMAINT == 0))
        except ValueError:
            raise RuntimeFailed(f"show servers state: unexpected line {line!r}") from None
    return tuple(slots)


# A key HAProxy holds twice (an `add map` repeated): lookups find one of them, so any value the
# table wants differs from this one and is set again (`set map` sets every entry of the key).
DUPLICATE_KEY = "(several entries)"


def map_entries(answer: str) -> dict[str, str] | None:
    """`show map NAME` (`0x55d0… key value` per entry, HAProxy's own order) as key → value; None
    when HAProxy has no such map; RuntimeFailed for any other answer."""
    text = answer.strip("\n")
    if text.startswith("Unknown map identifier"):
        return None
    entries: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split(" ", 2)
        if len(fields) < 2 or not fields[0].startswith("0x"):
            raise RuntimeFailed(f"show map: unexpected line {line!r}")
        key, value = fields[1], fields[2] if len(fields) > 2 else ""
        entries[key] = DUPLICATE_KEY if key in entries and entries[key] != value else value
    return entries


def _versioned(command: str, versions: dict[str, str]) -> str:
    """`add map @next NAME …` → `add map @7 NAME …` with the version `prepare map NAME` gave."""
    words = command.split(" ")
    if len(words) < 4 or words[2] != NEXT_VERSION:
        return command
    if words[3] not in versions:
        raise RuntimeFailed(f"{command}: no prepare map {words[3]} before it")
    return " ".join([*words[:2], f"@{versions[words[3]]}", *words[3:]])


# A payload is read into one buffer (tune.bufsize, 16 kB): 2.6 answered success to a 35 kB one
# and added nothing. The entries of a new map version go in payloads of at most this many bytes:
# ~5 µs an entry, five times less than `add map @VER NAME KEY VALUE` each in a `;` batch
# (bench/map_swap.py).
MAX_PAYLOAD_BYTES = 12000
_VERSION_ENTRY = re.compile(r"(add map @\d+ \S+) (\S+ \S+)")


def _payloads(commands: tuple[str, ...]) -> list[list[str] | tuple[str, str]]:
    """Consecutive `add map @VER NAME KEY VALUE` of one map → (`add map @VER NAME`, the entries
    one a line), each payload within MAX_PAYLOAD_BYTES; the other commands as they come."""
    groups: list[list[str] | tuple[str, str]] = []
    for command in commands:
        m = _VERSION_ENTRY.fullmatch(command)
        last = groups[-1] if groups else None
        if m is None:
            if isinstance(last, list):
                last.append(command)
            else:
                groups.append([command])
        elif isinstance(last, tuple) and last[0] == m.group(1) and len(last[1]) + len(m.group(2)) < MAX_PAYLOAD_BYTES:
            groups[-1] = (last[0], f"{last[1]}\n{m.group(2)}")
        else:
            groups.append((m.group(1), m.group(2)))
    return groups


def _batches(commands: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Commands grouped so that each `;`-joined group fits the CLI's line buffer; a command whose
    answer can run over several lines, or whose failure must stop what follows (`capabilities.alone`),
    makes a group of its own."""
    batches, current, size = [], [], 0
    for cmd in commands:
        if alone(cmd):
            batches += [tuple(current)] if current else []
            batches.append((cmd,))
            current, size = [], 0
            continue
        if current and size + len(cmd) + 2 > MAX_BATCH_BYTES:
            batches.append(tuple(current))
            current, size = [], 0
        size += len(cmd) + (2 if current else 0)
        current.append(cmd)
    if current:
        batches.append(tuple(current))
    return batches
