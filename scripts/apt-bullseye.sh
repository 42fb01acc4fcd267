#!/usr/bin/env bash
# Adds Debian 11 "bullseye" main as an apt source (for Consul 1.8.7, package `consul`), from the
# same mirror the machine already uses, pinned low so it only serves what is asked by name
# (`apt-get install consul/bullseye`). Reads the mirror from deb822 `debian.sources` (Debian 12)
# or from a one-line `sources.list` (debootstrap). Idempotent. Used by install-deps.sh and the
# Dockerfile.
set -euo pipefail
out=/etc/apt/sources.list.d/haproxy-consul-bullseye.sources
[ -f "$out" ] && exit 0
uris=""
src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ]; then
  # The first stanza whose suites include the release itself (not -security) gives the mirror.
  uris=$(awk 'BEGIN{RS="";FS="\n"} /Suites:[^\n]*bookworm( |$|\n)/ {for(i=1;i<=NF;i++) if ($i ~ /^URIs:/) {sub(/^URIs:[ \t]*/,"",$i); print $i; exit}}' "$src")
fi
if [ -z "$uris" ] && [ -f /etc/apt/sources.list ]; then
  uris=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
fi
if [ -z "$uris" ]; then
  echo "apt-bullseye: cannot find the Debian mirror in $src or /etc/apt/sources.list" >&2
  exit 1
fi
cat > "$out" <<SRC
Types: deb
URIs: $uris
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
cat > /etc/apt/preferences.d/haproxy-consul-bullseye <<'PIN'
Package: *
Pin: release n=bullseye
Pin-Priority: 100
PIN
