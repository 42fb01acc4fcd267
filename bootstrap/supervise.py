"""Announce, wait, run the agent, keep the lease alive; leave and revoke on the way out.

The lease is kept alive every ttl/3 seconds while the agent runs; if etcd lost it (an outage
longer than the TTL) a new one is granted and the announcement written again. SIGTERM makes
the agent leave the cluster gracefully (`consul leave`); Consul's own exit status becomes ours,
so a unit's restart policy applies.

On the way out, what points at this server from outside is withdrawn first: the DNS drop-in is
removed and the lease revoked the moment a stop is asked for, and only then does the agent leave
(a graceful leave can take 15 s, longer than `docker stop` waits by default). A kill in the middle
of leaving then leaves neither a resolver pointing at a dead agent nor an announcement to join.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bootstrap import resolved
from bootstrap.etcd import EtcdError, EtcdUnavailable, Store
from bootstrap.plan import Member, agent_argv, announcement, decide, http_address, machines_key, members_from_kv
from bootstrap.settings import Settings
from haproxy_consul import consul_api

log = logging.getLogger("bootstrap")
POLL_INTERVAL = 0.25     # seconds between reads of the announced servers while waiting for them


class DataDirUnwritable(Exception):
    """Consul could not write its data dir: said before anything is announced."""

    def __init__(self, directory: Path, error: OSError):
        super().__init__(
            f"cannot write the data dir {directory} as uid {os.getuid()} ({error.strerror or error}): mount a "
            f"volume this user owns there (a new named volume is: -v consul-data:{directory}) or run the "
            "container with --user root; nothing was announced in etcd")


def check_writable(directory: Path) -> None:
    """Create the data dir if needed and write a file in it, or raise DataDirUnwritable."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".bootstrap-check-"):
            pass
    except OSError as exc:
        raise DataDirUnwritable(directory, exc) from exc


def _die_with_parent() -> None:
    """In the child: get SIGTERM if bootstrap itself dies, so no agent outlives its supervisor."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    def __init__(self, s: Settings, etcd: Store, stop: threading.Event):
        self.s, self.etcd, self.stop = s, etcd, stop
        self.me = Member(s.machine_id, s.advertise, s.expect)
        self.key = machines_key(s.prefix, s.machine_id)
        self.lease: str | None = None
        self.dropin: Path | None = None
        self.problems: tuple[str, ...] = ()

    def _retrying(self, what: str, fn):
        """Call fn until etcd answers (capped backoff), or None once we are asked to stop."""
        delay = 0.5
        while not self.stop.is_set():
            try:
                return fn()
            except EtcdUnavailable as exc:
                log.error("etcd %s unreachable (%s): %s; retrying in %.1fs", ",".join(self.s.etcd), what, exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 10.0)
        return None

    def announce(self) -> bool:
        def do() -> bool:
            self.lease = self.etcd.grant(self.s.ttl)
            self.etcd.put(self.key, announcement(self.s.advertise, self.s.expect), self.lease)
            return True
        ok = self._retrying("announce", do)
        if ok:
            log.info("announced %s -> %s under %s (lease %s, ttl %ds)", self.s.machine_id, self.s.advertise,
                     self.key, self.lease, self.s.ttl)
        return bool(ok)

    def members(self) -> tuple[Member, ...] | None:
        kvs = self._retrying("read members", lambda: self.etcd.get_prefix(machines_key(self.s.prefix)))
        if kvs is None:
            return None
        members, problems = members_from_kv(kvs, self.s.prefix)
        if problems != self.problems:        # said once, not on every poll
            for problem in problems:
                log.warning("%s", problem)
            self.problems = problems
        return members

    def keepalive(self, done: threading.Event) -> None:
        """Every ttl/3 until `done`: renew the lease, and put the key back if it is gone.

        The key can vanish while our lease lives: a second bootstrap run on this machine wrote
        it under its own lease and revoked that on exit. Writing it again keeps that harmless.
        """
        value = announcement(self.s.advertise, self.s.expect)
        while not done.wait(max(1.0, self.s.ttl / 3)):
            try:
                if self.etcd.keepalive(self.lease) == 0:
                    log.warning("lease %s expired in etcd; announcing again", self.lease)
                    self.lease = self.etcd.grant(self.s.ttl)
                    self.etcd.put(self.key, value, self.lease)
                elif self.etcd.get(self.key) != value:
                    log.warning("%s was removed or changed in etcd; announcing again", self.key)
                    self.etcd.put(self.key, value, self.lease)
            except (EtcdUnavailable, EtcdError) as exc:
                log.warning("lease keepalive failed: %s", exc)

    def wait_for_peers(self) -> tuple[Member, ...] | None:
        has_data = (self.s.data_dir / "raft").is_dir()
        t0, last = time.monotonic(), ""
        while not self.stop.is_set():
            members = self.members()
            if members is None:
                return None
            decision = decide(self.me, members, self.s.expect, has_data, time.monotonic() - t0, self.s.wait_timeout)
            if decision.reason != last:
                log.info("%s", decision.reason)
                last = decision.reason
            if decision.start:
                return members
            # A range read of a few keys is cheap for etcd, and only `expect` servers poll, only
            # while they wait: a short interval keeps the last starter from adding a second.
            self.stop.wait(POLL_INTERVAL)
        return None

    def run(self) -> int:
        if self.s.dry_run:
            members = self.members() or ()
            print(" ".join(agent_argv(self.s.consul, self.me, members, self.s.expect, str(self.s.data_dir),
                                      self.s.datacenter, self.s.agent_args)))
            return 0
        check_writable(self.s.data_dir)      # before announcing: a server that cannot start must not be joined
        if not self.announce():
            return 0
        done = threading.Event()     # not self.stop: the keeper must not outlive the revoke below
        keeper = threading.Thread(target=self.keepalive, args=(done,), name="etcd-keepalive", daemon=True)
        keeper.start()
        try:
            members = self.wait_for_peers()
            if members is None:
                return 0
            argv = agent_argv(self.s.consul, self.me, members, self.s.expect, str(self.s.data_dir),
                              self.s.datacenter, self.s.agent_args)
            log.info("starting: %s", " ".join(argv))
            proc = subprocess.Popen(argv, preexec_fn=_die_with_parent)
            if self.s.dns_resolved and self.s.dns_target:
                self.dropin = resolved.install(self.s.resolved_dir, *self.s.dns_target)
            while proc.poll() is None:
                if self.stop.wait(0.2):
                    self.withdraw(done, keeper)
                    self.leave(proc)
                    break
            status = proc.wait()
            log.info("consul agent exited with status %d", status)
            return 0 if self.stop.is_set() else status
        finally:
            self.withdraw(done, keeper)

    def withdraw(self, done: threading.Event, keeper: threading.Thread) -> None:
        """Remove the DNS drop-in and revoke the announcement (once; again is a no-op)."""
        done.set()
        keeper.join(10)
        if self.dropin is not None:
            resolved.remove(self.dropin)
            self.dropin = None
        if self.lease is not None:
            lease, self.lease = self.lease, None
            try:
                self.etcd.revoke(lease)
                log.info("revoked lease %s: %s is no longer announced", lease, self.s.machine_id)
            except EtcdUnavailable as exc:
                log.warning("could not revoke lease %s (it expires in %ds): %s", lease, self.s.ttl, exc)

    def leave(self, proc: subprocess.Popen) -> None:
        """`consul leave` with the Consul client settings in its environment (TLS files, token
        file or token), so the token never shows in argv."""
        client = self.s.client or consul_api.build(http_address(self.s.agent_args))
        log.info("leaving the cluster gracefully (consul leave, %s)", client.describe())
        try:
            done = subprocess.run([self.s.consul, "leave"], capture_output=True, text=True, timeout=20,
                                  env=consul_api.child_env(client, os.environ))
            status = proc.wait(20)
            if done.returncode != 0:
                # A lone server can shut its HTTP listener down before it answers the leave
                # (`unexpected EOF`): the agent's own exit status says whether it left.
                (log.info if status == 0 else log.warning)(
                    "consul leave answered %s (%s); the agent exited with status %d",
                    done.returncode, (done.stderr or done.stdout).strip()[-500:], status)
        except (subprocess.TimeoutExpired, OSError) as exc:
            log.warning("graceful leave did not finish (%s); stopping the agent", exc)
            proc.terminate()
