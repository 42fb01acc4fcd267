"""A throwaway Debian machine for the install tests: a cached root filesystem under an overlay.

`fresh_machine(rootfs, checkout)` runs commands in a new machine made of `rootfs` (built once by
`scripts/debian-rootfs.sh`, never written to: every write goes to an overlay upper directory
removed afterwards), with the checkout's files in /root/haproxy-consul. It shares the host's
network (so its loopback ports are the host's) and nothing else that could change the host: it
runs in a mount namespace of its own (`unshare --mount`), where /proc, /dev and the read-only
directories below are mounted; they all vanish with the namespace.

What a new machine of this workplace has besides Debian itself is carried over, so that its apt
and pip reach the same mirror and package index the host's do: the host's resolver files, CA
certificates added under /usr/local/share/ca-certificates (and the bundle made from them), pip's
configuration files and the local directories and files they name (bound read-only), and the
PIP_* environment. pip's cache is kept between runs in `cache` (pip shares it safely between
concurrent runs; apt's archives are not shared: two apts would fight over their lock); the
machine's file system is new every time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Runs as root inside `unshare --mount --propagation private`: $1 base rootfs, $2 scratch dir,
# $3 cache dir, $4 a file of read-only bind mounts (one path a line), then the command to chroot.
_ENTER = r"""
set -eu
base=$1 scratch=$2 cache=$3 binds=$4; shift 4
root=$scratch/root
mkdir -p "$scratch/upper" "$scratch/work" "$root" "$cache/pip"
mount -t overlay overlay -o "lowerdir=$base,upperdir=$scratch/upper,workdir=$scratch/work" "$root"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mkdir -p "$root/root/.cache/pip"
mount --bind "$cache/pip" "$root/root/.cache/pip"
while IFS= read -r path; do
  [ -n "$path" ] || continue
  mkdir -p "$root$path"
  mount --bind -o ro "$path" "$root$path"
done < "$binds"
exec chroot "$root" "$@"
"""

# What a machine here has besides Debian that its apt and pip depend on (copied when present).
_MACHINE_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/pip.conf", "/etc/xdg/pip",
                  "/root/.config/pip", "/root/.pip", "/usr/local/share/ca-certificates",
                  "/etc/ssl/certs/ca-certificates.crt")
_PIP_PATH_KEYS = ("find-links", "index-url", "extra-index-url", "constraint", "cert", "client-cert")


def pip_local_paths(config_lines: list[str]) -> list[str]:
    """Local files and directories named by `pip config list` lines (`file://` URLs or absolute paths).

    A local index is taken with its parent: its pages link to files beside it (`../../files/…`)."""
    paths = []
    for line in config_lines:
        key, _, value = line.partition("=")
        key = key.rsplit(".", 1)[-1]
        if key not in _PIP_PATH_KEYS:
            continue
        for item in value.strip().strip("'\"").split():
            item = item.removeprefix("file://").rstrip("/")
            if key.endswith("index-url") and item.startswith("/"):
                item = str(Path(item).parent)
            if item.startswith("/") and item not in paths:
                paths.append(item)
    return paths


def _copy_machine_settings(root: Path) -> list[str]:
    """Copy the host's network and pip settings into root; the directories to bind read-only."""
    for path in _MACHINE_FILES:
        src = Path(path)
        if not src.exists():
            continue
        dst = root / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    binds = []
    for path in pip_local_paths(out.stdout.splitlines()):
        src = Path(path)
        if src.is_dir():
            binds.append(path)
        elif src.is_file():
            dst = root / path.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return binds


def _checkout_files(repo: Path) -> list[str]:
    """The checkout as a user has it: tracked and untracked-but-not-ignored files (no .venv, state)."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name and (repo / name).is_file()]


def _mounts_under(path: Path) -> list[str]:
    out = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.splitlines() if m == str(path) or m.startswith(f"{path}/")]


class Machine:
    """One fresh machine; `run(cmd)` chroots into it (cwd /root/haproxy-consul) and returns the result."""

    def __init__(self, base: Path, scratch: Path, cache: Path, binds_file: Path, env: dict[str, str]):
        self.base, self.scratch, self.cache, self.binds_file, self.env = base, scratch, cache, binds_file, env

    def run(self, command: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        full_env = {**self.env, **(env or {})}
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _ENTER, "enter",
                str(self.base), str(self.scratch), str(self.cache), str(self.binds_file),
                "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in full_env.items()),
                "/bin/sh", "-c", f"cd /root/haproxy-consul && {command}"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def fresh_machine(base: Path, repo: Path, cache: Path) -> Iterator[Machine]:
    """A new machine on `base` with the checkout at /root/haproxy-consul; everything it wrote is removed after."""
    scratch = Path(tempfile.mkdtemp(prefix="haproxy-consul-machine-", dir="/var/tmp"))   # never under /tmp
    try:
        seed = scratch / "upper"          # the overlay's upper layer, filled before it is mounted
        binds = _copy_machine_settings(seed)
        dest = seed / "root" / "haproxy-consul"
        for name in _checkout_files(repo):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, dest / name, follow_symlinks=False)
        binds_file = scratch / "binds"
        binds_file.write_text("".join(f"{b}\n" for b in binds))
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "LANG": "C.UTF-8", "TERM": "dumb",
               **{k: v for k, v in os.environ.items() if k.startswith("PIP_")}}
        yield Machine(base, scratch, cache, binds_file, env)
    finally:
        if _mounts_under(scratch):        # the namespace is gone with its last process; never delete through a mount
            raise RuntimeError(f"{scratch} still has mounts under it; not deleting it")
        shutil.rmtree(scratch, ignore_errors=True)
