#!/usr/bin/env bash
# Every HAProxy version haproxy-consul supports, runnable on this Debian 12 machine:
#
#   2.6  the host's own package (Debian 12)
#   3.0  Debian 13 "trixie"           rootfs/trixie
#   3.2  Debian sid                   rootfs/sid
#   3.4  Debian sid + experimental    rootfs/sid+experimental (a copy of sid, HAProxy from experimental)
#
# The 3.x binaries need newer C libraries than Debian 12 has, so each runs from a minimal root
# filesystem (scripts/debian-rootfs.sh, from this machine's own mirror). For each version it
# writes CACHE/bin/haproxy-X.Y, to be passed as the edge's `--haproxy`: it runs
# `chroot ROOTFS /usr/sbin/haproxy "$@"` in a mount namespace of its own, where the host's /tmp and
# /dev are bound into the rootfs (recursively: a tmpfs mounted under /tmp before the start is
# seen too) and /proc is mounted, so files and sockets under /tmp have the same paths inside and
# out. Nothing stays mounted on the host: the namespace ends with the HAProxy it holds, and the
# cache can be deleted like any directory. The pid is HAProxy's own (exec all the way), so
# signals, pid files and master-worker reloads work as with a host binary. haproxy-2.6 execs the
# host's binary. Every version is checked before its wrapper is (re)written: a suite that
# moved on to another HAProxy fails here, loudly.
#
#   scripts/haproxy-rootfs.sh [VERSION...]    build what is missing (default: all); idempotent
#
# CACHE is $HAPROXY_CONSUL_CACHE, default /var/cache/haproxy-consul (keep it out of /tmp). The
# first build takes a few minutes per suite; later runs only check. Needs root, as do the
# wrappers (chroot). Nothing here starts, stops or reconfigures a service of the machine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${HAPROXY_CONSUL_CACHE:-/var/cache/haproxy-consul}
cache=${cache%/}
all=(2.6 3.0 3.2 3.4)

suite_of() {
  case "$1" in
    3.0) echo trixie ;;
    3.2) echo sid ;;
    3.4) echo sid+experimental ;;
    *) echo "haproxy-rootfs: unsupported HAProxy version $1 (supported: ${all[*]})" >&2; return 1 ;;
  esac
}

[ "$(id -u)" -eq 0 ] || { echo "haproxy-rootfs: needs root (debootstrap, chroot, mount)" >&2; exit 1; }
case "$cache" in
  /tmp|/tmp/*) echo "haproxy-rootfs: keep HAPROXY_CONSUL_CACHE out of /tmp: the rootfs get /tmp bound into them" >&2; exit 1 ;;
esac
mkdir -p "$cache/bin" "$cache/rootfs"

# `HAProxy version 3.0.11-1 2025/…` → 3.0
major_minor() { "$@" -v 2>/dev/null | sed -n 's/^HA-\{0,1\}Proxy version \([0-9]*\.[0-9]*\).*/\1/p' | head -1; }

# Writes $1 with the content on stdin, only when it differs (atomically).
install_file() {
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  cat > "$tmp"
  chmod 755 "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

wrapper() {   # version, rootfs
  cat <<WRAP
#!/bin/sh
# HAProxy $1 from the root filesystem $2 (written by haproxy-consul's scripts/haproxy-rootfs.sh).
# First pass: re-run this script in a mount namespace of its own. Second pass, inside it: bind the
# host's /tmp (with what is mounted under it) and /dev into the rootfs, mount /proc, chroot. The
# working directory is kept when it exists inside (under /tmp), else it is /. exec all the way:
# the caller's child is HAProxy itself, and the mounts end with it.
root='$2'
if [ "\${HAPROXY_ROOTFS_NS:-}" != "\$root" ]; then
  HAPROXY_ROOTFS_NS=\$root exec unshare --mount --propagation private "\$0" "\$@"
fi
unset HAPROXY_ROOTFS_NS
mount --rbind /tmp "\$root/tmp" && mount --rbind /dev "\$root/dev" && mount -t proc proc "\$root/proc" ||
  { echo "haproxy-$1: cannot mount /tmp, /dev and /proc into \$root" >&2; exit 1; }
exec chroot "\$root" /bin/sh -c 'cd "\$0" 2>/dev/null || cd /; exec /usr/sbin/haproxy "\$@"' "\$PWD" "\$@"
WRAP
}

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("${all[@]}")
for v in "${versions[@]}"; do
  if [ "$v" = 2.6 ]; then
    host=$(command -v haproxy || true)
    [ -n "$host" ] || { echo "haproxy-rootfs: no haproxy on the host (scripts/install-deps.sh installs it)" >&2; exit 1; }
    got=$(major_minor "$host")
    [ "$got" = 2.6 ] || { echo "haproxy-rootfs: the host's $host is HAProxy ${got:-?}, not 2.6" >&2; exit 1; }
    # A script, not a symlink: the process is then named `haproxy`, as on every release (a
    # symlink's name would become the process name, which the edge uses to recognise HAProxy).
    printf '#!/bin/sh\n# HAProxy 2.6: the host'"'"'s own (written by haproxy-consul'"'"'s scripts/haproxy-rootfs.sh).\nexec %s "$@"\n' \
      "$host" | install_file "$cache/bin/haproxy-2.6"
    continue
  fi
  suite=$(suite_of "$v")
  root="$cache/rootfs/$suite"
  seed=""
  # 3.4 starts from a copy of the sid rootfs instead of a second debootstrap of sid.
  [ "$v" = 3.4 ] && [ -f "$cache/rootfs/sid/.debian-rootfs" ] && seed="$cache/rootfs/sid"
  # ca-certificates: the system CAs (`ca-file @system-ca`, a backend's `verify required`), as on
  # a real Debian host; without them such a configuration does not even load.
  DEBIAN_ROOTFS_SEED=$seed bash "$here/debian-rootfs.sh" "$suite" "$root" haproxy ca-certificates
  wrapper "$v" "$root" | install_file "$cache/bin/haproxy-$v"
  got=$(major_minor "$cache/bin/haproxy-$v")
  if [ "$got" != "$v" ]; then
    rm -f "$cache/bin/haproxy-$v"
    echo "haproxy-rootfs: $root holds HAProxy ${got:-?}, not $v; remove it (after --unmount) to rebuild" >&2
    exit 1
  fi
done
