#!/usr/bin/env bash
# Builds a minimal Debian root filesystem from this machine's own Debian mirror:
#
#   scripts/debian-rootfs.sh SUITE[+EXTRA] DIR [PACKAGE...]
#
#   SUITE    a suite debootstrap knows (trixie, sid, ...), installed with --variant=minbase
#            (plus --include=PACKAGE,...).
#   +EXTRA   a further suite that is not a full distribution (e.g. `sid+experimental`): it is added
#            as an apt source inside the rootfs and the PACKAGEs come from it (`apt-get -t EXTRA`).
#   DEBIAN_ROOTFS_SEED=DIR2  start from a copy of DIR2, a rootfs of SUITE made by this script,
#            instead of debootstrapping again (the PACKAGEs are then installed with apt).
#
# Examples: `scripts/debian-rootfs.sh trixie /var/cache/haproxy-consul/rootfs/debian13` (a plain
# Debian 13), `scripts/debian-rootfs.sh trixie DIR haproxy` (HAProxy 3.0).
#
# Idempotent: the rootfs is built in DIR.part and renamed to DIR when complete, with a stamp
# (DIR/.debian-rootfs) naming what it holds; a DIR with the same stamp is left as it is, one with
# another stamp (or none) is an error, never overwritten. Concurrent runs for one DIR wait on
# DIR.lock. Needs root. The mirror is the one apt uses for this machine's own release; nothing
# else is contacted. A Release file past its Valid-Until date (the mirror's sid and experimental)
# is accepted, and apt inside the rootfs is told so only then. The daemons of installed packages
# are never started, and nothing stays mounted when the script ends.
#
# Keep DIR out of /tmp: a rootfs often gets the host's /tmp bind-mounted into it, and a recursive
# delete of /tmp would then descend into itself.
set -euo pipefail

usage() { echo "usage: $0 SUITE[+EXTRA] DIR [PACKAGE...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
spec=$1 dir=${2%/}
shift 2
packages=("$@")
base=${spec%%+*}
extra=""
[ "$base" = "$spec" ] || extra=${spec#*+}
[ -n "$base" ] && [ -n "$dir" ] || usage
[ "$(id -u)" -eq 0 ] || { echo "debian-rootfs: needs root (debootstrap, chroot)" >&2; exit 1; }
case "$dir" in
  /tmp|/tmp/*) echo "debian-rootfs: keep $dir out of /tmp (see the header of $0)" >&2; exit 1 ;;
esac

log() { echo "debian-rootfs [$spec]: $*" >&2; }

# The mirror apt uses for this machine's own release (deb822 `debian.sources`, or a one-line
# `sources.list` as debootstrap writes it).
mirror() {
  local codename uris=""
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ -n "$codename" ] || { echo "debian-rootfs: no VERSION_CODENAME in /etc/os-release" >&2; return 1; }
  local src=/etc/apt/sources.list.d/debian.sources
  if [ -f "$src" ]; then
    uris=$(awk -v rel="$codename" 'BEGIN{RS="";FS="\n"}
      { ok=0; u="" ; for(i=1;i<=NF;i++) {
          if ($i ~ /^Suites:/) { n=split(substr($i,8),s,/[ \t]+/); for(j=1;j<=n;j++) if (s[j]==rel) ok=1 }
          if ($i ~ /^URIs:/) { u=$i; sub(/^URIs:[ \t]*/,"",u); sub(/[ \t].*/,"",u) } }
        if (ok && u!="") { print u; exit } }' "$src")
  fi
  if [ -z "$uris" ] && [ -f /etc/apt/sources.list ]; then
    uris=$(awk -v rel="$codename" '$1=="deb" && $3==rel {print $2; exit}' /etc/apt/sources.list)
  fi
  [ -n "$uris" ] || { echo "debian-rootfs: cannot find the $codename mirror in $src or /etc/apt/sources.list" >&2; return 1; }
  echo "$uris"
}

# Mount points at or under $1, deepest first.
mounts_under() {
  findmnt -rn -o TARGET | awk -v d="$1" '$0==d || index($0, d"/")==1' | sort -r
}

# Remove a half-built rootfs, never across a mount point (a bind-mounted /tmp is on the same
# file system, so `rm --one-file-system` alone would not stop there).
remove_part() {
  local m
  for m in $(mounts_under "$1"); do umount "$m" || umount -l "$m"; done
  if [ -n "$(mounts_under "$1")" ]; then
    echo "debian-rootfs: $1 still has mounts under it; not deleting it" >&2
    return 1
  fi
  rm -rf --one-file-system "$1"
}

# Whether apt inside the rootfs must be told to accept Release files past their Valid-Until.
expired_release() {
  local f until now
  now=$(date -u +%s)
  for f in "$1"/var/lib/apt/lists/*Release; do
    [ -f "$f" ] || continue
    until=$(sed -n 's/^Valid-Until: //p' "$f" | head -1)
    [ -n "$until" ] && [ "$(date -u -d "$until" +%s)" -lt "$now" ] && return 0
  done
  return 1
}

# apt-get inside the rootfs, in a mount namespace of its own (its /proc and /dev vanish with it),
# with the daemons of what it installs kept from starting.
in_rootfs_apt() {
  local root=$1; shift
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  local rc=0
  unshare --mount --propagation private sh -c '
    root=$1; shift
    mount --bind /dev "$root/dev" && mount -t proc proc "$root/proc" &&
    DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get -o Acquire::Check-Valid-Until=false "$@"
  ' sh "$root" "$@" || rc=$?
  rm -f "$root/usr/sbin/policy-rc.d"
  return $rc
}

stamp="suite=$spec packages=$(printf '%s\n' "${packages[@]}" | sort -u | tr '\n' ' ' | sed 's/ $//')"
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9

if [ -e "$dir" ]; then
  have=$(cat "$dir/.debian-rootfs" 2>/dev/null || echo "no stamp")
  if [ "$have" = "$stamp" ]; then
    exit 0
  fi
  echo "debian-rootfs: $dir exists ($have), not the wanted $stamp; unmount and remove it to rebuild" >&2
  exit 1
fi

part="$dir.part"
[ -e "$part" ] && remove_part "$part"
url=$(mirror)
start=$(date +%s)
seed=${DEBIAN_ROOTFS_SEED:-}
if [ -n "$seed" ]; then
  [ "$(sed -n 's/^suite=\([^ ]*\) .*/\1/p' "$seed/.debian-rootfs" 2>/dev/null | sed 's/+.*//')" = "$base" ] ||
    { echo "debian-rootfs: seed $seed is not a $base rootfs made by this script" >&2; exit 1; }
  log "copying $seed"
  mkdir -p "$part"
  # Through a non-recursive bind mount in a namespace of our own: whatever is mounted inside the
  # seed (its users bind /tmp, /proc, /dev into it) is not copied.
  unshare --mount --propagation private sh -c '
    view=$(mktemp -d) && mount --bind "$1" "$view" && cp -a "$view/." "$2/"; rc=$?
    umount "$view"; rmdir "$view"; exit $rc
  ' sh "$seed" "$part"
  rm -f "$part/.debian-rootfs"
else
  include=()
  if [ -z "$extra" ] && [ ${#packages[@]} -gt 0 ]; then
    include=("--include=$(IFS=,; echo "${packages[*]}")")
  fi
  log "debootstrap --variant=minbase ${include[*]} $base from $url"
  debootstrap --variant=minbase "${include[@]}" "$base" "$part" "$url" >"$part.log" 2>&1 ||
    { tail -20 "$part.log" >&2; echo "debian-rootfs: debootstrap failed (log: $part.log)" >&2; exit 1; }
  rm -f "$part.log"
fi

if [ -n "$extra" ]; then
  echo "deb $url $extra main" > "$part/etc/apt/sources.list.d/$extra.list"
fi
if [ -n "$extra" ] || { [ -n "$seed" ] && [ ${#packages[@]} -gt 0 ]; }; then
  target=()
  [ -z "$extra" ] || target=(-t "$extra")
  log "apt-get install ${target[*]} ${packages[*]}"
  { in_rootfs_apt "$part" -qq update &&
    in_rootfs_apt "$part" -y -qq --no-install-recommends "${target[@]}" install "${packages[@]}"; } >"$part.log" 2>&1 ||
    { tail -20 "$part.log" >&2; echo "debian-rootfs: apt-get failed (log: $part.log)" >&2; exit 1; }
  rm -f "$part.log"
fi
if expired_release "$part"; then
  printf '// The mirror serves Release files past their Valid-Until date (written by debian-rootfs.sh)\nAcquire::Check-Valid-Until "false";\n' \
    > "$part/etc/apt/apt.conf.d/99valid-until"
fi
chroot "$part" apt-get clean
echo "$stamp" > "$part/.debian-rootfs"
mv "$part" "$dir"
log "built $dir in $(( $(date +%s) - start )) s ($(du -sx --block-size=1M "$dir" | cut -f1) MB)"
