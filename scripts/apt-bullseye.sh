#!/usr/bin/env bash
# Adds Debian 11 "bullseye" main as an apt source (for Consul 1.8.7, package `consul`), from the
# same mirror the machine already uses, pinned low so it only serves what is asked by name
# (`apt-get install consul/bullseye`). The machine's release (Debian 12 "bookworm", 13 "trixie")
# is its VERSION_CODENAME; the mirror is read from deb822 `debian.sources` (Debian 12 and 13) or
# from a one-line `sources.list` (debootstrap). Idempotent. Used by install-deps.sh and the
# Dockerfile. APT_ROOT (tests only) prefixes every path it reads and writes.
set -euo pipefail
root=${APT_ROOT:-}
out=$root/etc/apt/sources.list.d/haproxy-consul-bullseye.sources
[ -f "$out" ] && exit 0
release=$(. "$root/etc/os-release" && echo "${VERSION_CODENAME:-}")
if [ -z "$release" ]; then
  echo "apt-bullseye: $root/etc/os-release names no VERSION_CODENAME" >&2
  exit 1
fi
uris=""
src=$root/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ]; then
  # The first stanza whose suites include the release itself (not -security) gives the mirror.
  uris=$(awk -v rel="$release" 'BEGIN{RS="";FS="\n"} $0 ~ ("Suites:[^\n]*[ \t]" rel "( |$|\n)") {for(i=1;i<=NF;i++) if ($i ~ /^URIs:/) {sub(/^URIs:[ \t]*/,"",$i); print $i; exit}}' "$src")
fi
if [ -z "$uris" ] && [ -f "$root/etc/apt/sources.list" ]; then
  uris=$(awk -v rel="$release" '$1=="deb" && $3==rel {print $2; exit}' "$root/etc/apt/sources.list")
fi
if [ -z "$uris" ]; then
  echo "apt-bullseye: cannot find the $release mirror in $src or $root/etc/apt/sources.list" >&2
  exit 1
fi
cat > "$out" <<SRC
Types: deb
URIs: $uris
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
mkdir -p "$root/etc/apt/preferences.d"
cat > "$root/etc/apt/preferences.d/haproxy-consul-bullseye" <<'PIN'
Package: *
Pin: release n=bullseye
Pin-Priority: 100
PIN
