#!/usr/bin/env bash
# Installs the real programs haproxy-consul drives and tests against, on Debian 12:
# HAProxy 2.6, Consul 1.8.7 (from Debian 11 "bullseye", which ships it), etcd 3.4,
# Docker Engine 20.10, busybox-static (test images), wrk and hey (load tools).
# Idempotent: a second run installs nothing and exits quickly.
set -euo pipefail

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v consul >/dev/null || need+=(consul/bullseye)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v dockerd >/dev/null || need+=(docker.io)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v wrk >/dev/null || need+=(wrk)
command -v hey >/dev/null || need+=(hey)
# `python3 -m venv` needs ensurepip, which Debian ships separately.
python3 -c "import ensurepip" 2>/dev/null || need+=(python3-venv python3-pip)
[ "${#need[@]}" -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Consul 1.8.7 lives in bullseye's main. Add that suite from the same mirror the machine
# already uses (never a host name of our own), pinned low so it only serves what we name.
src=/etc/apt/sources.list.d/debian.sources
bull=/etc/apt/sources.list.d/haproxy-consul-bullseye.sources
if [ ! -f "$bull" ]; then
  uris=""
  if [ -f "$src" ]; then
    # The first stanza whose suites include the release itself (not -security) gives the mirror.
    uris=$(awk 'BEGIN{RS="";FS="\n"} /Suites:[^\n]*bookworm( |$|\n)/ {for(i=1;i<=NF;i++) if ($i ~ /^URIs:/) {sub(/^URIs:[ \t]*/,"",$i); print $i; exit}}' "$src")
  fi
  if [ -z "$uris" ] && [ -f /etc/apt/sources.list ]; then
    uris=$(awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list)
  fi
  if [ -z "$uris" ]; then
    echo "install-deps: cannot find the Debian mirror in $src or /etc/apt/sources.list" >&2
    exit 1
  fi
  $SUDO tee "$bull" >/dev/null <<SRC
Types: deb
URIs: $uris
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  $SUDO tee /etc/apt/preferences.d/haproxy-consul-bullseye >/dev/null <<'PIN'
Package: *
Pin: release n=bullseye
Pin-Priority: 100
PIN
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# Debian's packages start their daemons where a init system runs; the tests start their own.
for svc in haproxy etcd consul docker containerd; do
  $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
done
