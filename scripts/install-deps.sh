#!/usr/bin/env bash
# Installs the real programs haproxy-consul drives and tests against, on Debian 12 or 13:
# HAProxy 2.6 / 3.0, Consul 1.8.7 (from Debian 11 "bullseye", which ships it; 12 and 13 do not),
# etcd 3.4 / 3.5, Docker Engine 20.10 / 26, Python's venv and pip (3.11 / 3.13), busybox-static
# (test images), wrk, hey and h2load (load tools), debootstrap (the image's base when no registry
# is reachable), Chromium (headless browser test), and for HTTPS: pebble + pebble-challtestsrv
# (Let's Encrypt's ACME test server and test DNS), lego (an independent ACME client), BIND 9
# (RFC 2136 updates), openssl.
# Idempotent: a second run installs nothing and exits quickly.
#
# It installs and nothing else: a service the user already runs is never stopped, disabled or
# reconfigured. The daemons of packages it installs are not started either (a temporary
# policy-rc.d, only where none exists); the tests start their own.
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
command -v h2load >/dev/null || need+=(nghttp2-client)     # HTTPS / HTTP/2 load
command -v pebble >/dev/null || need+=(pebble)             # ACME test server + pebble-challtestsrv
command -v lego >/dev/null || need+=(lego)                 # an independent ACME client to compare with
command -v named >/dev/null || need+=(bind9)               # RFC 2136 dynamic DNS for DNS-01
command -v dig >/dev/null || need+=(bind9-dnsutils)
command -v openssl >/dev/null || need+=(openssl)
command -v certutil >/dev/null || need+=(libnss3-tools)              # trust a test CA in headless Chromium
command -v curl >/dev/null || need+=(curl)                 # the README walkthrough's own checks
command -v docker-compose >/dev/null || need+=(docker-compose)   # checks deploy/docker-compose.yml
command -v dbus-daemon >/dev/null || need+=(dbus-daemon)   # a private bus for bootstrap's resolved reload (tests)
# `python3 -m venv` needs ensurepip, which Debian ships separately.
python3 -c "import ensurepip" 2>/dev/null || need+=(python3-venv python3-pip)
[ "${#need[@]}" -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Consul 1.8.7 lives in bullseye's main: add that suite from the machine's own mirror.
$SUDO bash "$(dirname "$0")/apt-bullseye.sh"

# Keep the packages we install from starting their daemons (exit 101 = "not allowed"), unless
# the machine already has a policy of its own, which is then left alone.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# haproxy-consul install-deps: do not start daemons while installing\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  trap '$SUDO rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
