#!/usr/bin/env bash
# Installs the real programs haproxy-consul drives and tests against, on Debian 12:
# HAProxy 2.6, Consul 1.8.7 (from Debian 11 "bullseye", which ships it), etcd 3.4,
# Docker Engine 20.10, busybox-static (test images), wrk and hey (load tools), debootstrap
# (the image's base when no registry is reachable), Chromium (headless browser test).
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
command -v debootstrap >/dev/null || need+=(debootstrap)   # the image's base, built offline
command -v chromium >/dev/null || need+=(chromium)         # the landing page, seen by a real browser
# `python3 -m venv` needs ensurepip, which Debian ships separately.
python3 -c "import ensurepip" 2>/dev/null || need+=(python3-venv python3-pip)
[ "${#need[@]}" -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Consul 1.8.7 lives in bullseye's main: add that suite from the machine's own mirror.
$SUDO bash "$(dirname "$0")/apt-bullseye.sh"

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# Debian's packages start their daemons where a init system runs; the tests start their own.
for svc in haproxy etcd consul docker containerd; do
  $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
done
