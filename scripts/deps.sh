#!/usr/bin/env bash
# Installs the Debian packages the build, the stack and the tests need.
# As root: installs what is missing. Otherwise: prints the exact apt-get line and fails.
set -euo pipefail

PKGS=(
  build-essential pkg-config
  libfcgi-dev libpq-dev libcjson-dev libcurl4-openssl-dev libssl-dev libcmocka-dev
  postgresql-15 postgresql-contrib postgresql-15-pgtap libtap-parser-sourcehandler-pgtap-perl pgbouncer
  nginx-light curl openssl iproute2
  python3 python3-pytest python3-psycopg2 python3-cryptography
  wrk valgrind clang libclang-rt-14-dev
  prometheus debootstrap systemd systemd-container
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "deps: missing packages; run as root:" >&2
  echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# The Debian packages start their own services through policy-rc.d-less installs;
# this stack runs its own PostgreSQL and nginx, so keep the system ones from starting.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
