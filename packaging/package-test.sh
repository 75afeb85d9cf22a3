#!/usr/bin/env bash
# `make package-test`: the Debian package (build/mindroom_*.deb, from `make deb`)
# installed the way an operator would, `apt install ./mindroom_*.deb`, on a fresh
# Debian 12 root made by debootstrap from Debian's archive, with its dependencies
# and maintainer scripts running in a chroot; then packaging/package-check.sh,
# inside the chroot, checks files, users, permissions, that nothing is enabled or
# running, and every unit with `systemd-analyze verify` and `security --offline`
# (<= 2.0); finally the package is purged and must leave nothing behind.
#
# The debootstrapped root is kept as build/package-test/bookworm.tar and the .debs
# apt downloads in build/package-test/apt-archives, so a rerun only unpacks,
# installs and checks. Needs root (debootstrap, chroot, mounts) and Debian's
# archive (PACKAGE_TEST_MIRROR, default http://deb.debian.org/debian).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MIRROR=${PACKAGE_TEST_MIRROR:-http://deb.debian.org/debian}
CACHE=$ROOT/build/package-test
BASE=$CACHE/bookworm.tar
ARCHIVES=$CACHE/apt-archives
start=$SECONDS

say() { echo "package-test: $*" >&2; }
die() { say "$*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts)"
command -v debootstrap >/dev/null || die "debootstrap not found (make deps)"
deb=$(ls -t build/mindroom_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || die "no build/mindroom_*.deb (make deb)"
mkdir -p "$CACHE" "$ARCHIVES/partial"

if [ ! -f "$BASE" ]; then
  say "debootstrap bookworm from $MIRROR (once; cached in $BASE)"
  tmp=$CACHE/debootstrap.tmp
  rm -rf "$tmp"
  debootstrap --cache-dir="$ARCHIVES" bookworm "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  tar -C "$tmp" -cf "$BASE.partial" . && mv "$BASE.partial" "$BASE"
  rm -rf "$tmp"
fi

root=$(mktemp -d "$CACHE/root.XXXXXX")
mounts=()
cleanup() {
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
  rm -rf "$root"
}
trap cleanup EXIT
bind() { mount "$@"; mounts+=("${!#}"); }

tar -C "$root" -xf "$BASE"
bind -t proc proc "$root/proc"
bind -t sysfs sysfs "$root/sys"
bind --bind /dev "$root/dev"
bind --bind "$ARCHIVES" "$root/var/cache/apt/archives"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# Nothing the packages install may start a service here (no init runs anyway).
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d" && chmod 0755 "$root/usr/sbin/policy-rc.d"
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$MIRROR" "$MIRROR" > "$root/etc/apt/sources.list"
cp "$deb" "$root/tmp/"
install -m 0755 packaging/package-check.sh "$root/tmp/package-check.sh"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            DEBIAN_FRONTEND=noninteractive "$@"; }

say "installing $(basename "$deb") with apt (dependencies from $MIRROR)"
in_root apt-get update -qq >"$CACHE/apt.log" 2>&1 || { tail -20 "$CACHE/apt.log" >&2; die "apt-get update failed"; }
in_root sh -c "cd /tmp && apt-get install -y -q ./$(basename "$deb")" >>"$CACHE/apt.log" 2>&1 ||
  { tail -30 "$CACHE/apt.log" >&2; die "apt install failed (log: $CACHE/apt.log)"; }
# The version the package's binaries were built with (scripts/version.sh then).
in_root /tmp/package-check.sh installed "$(cut -d' ' -f1 build/release/version.stamp)"
say "purging"
in_root apt-get purge -y -q mindroom >>"$CACHE/apt.log" 2>&1 || { tail -20 "$CACHE/apt.log" >&2; die "purge failed"; }
in_root /tmp/package-check.sh purged
say "passed in $((SECONDS - start)) s"
