#!/usr/bin/env bash
# `make package-test`: the Debian package (build/mindroom_*.deb, from `make deb`)
# installed the way an operator would, `apt install ./mindroom_*.deb`, on a fresh
# Debian 12 root made by debootstrap from Debian's archive, with its dependencies
# and maintainer scripts running in a chroot; then packaging/package-check.sh,
# inside the chroot, checks files, users, permissions, that nothing is enabled or
# running, and every unit with `systemd-analyze verify` and `security --offline`
# (<= 2.0). Then the root boots with systemd (systemd-nspawn, sharing the host's
# network), configured as docs/install.md says against a PostgreSQL on the host
# (scripts/pg.sh, password on TCP) that the package's own migrate.sh fills, and
# packaging/package-boot-check.py runs the units for real: sockets, sandbox,
# /ready, /metrics, lossless restarts, a clean journal. A machine where the root
# cannot boot gets "SKIPPED the booted checks" in the output, never a pass for them
# (PACKAGE_TEST_BOOT=required: a failure). Finally the package is purged and must
# leave nothing behind.
#
# The debootstrapped root is kept as $CACHE/bookworm.tar and the .debs apt
# downloads in $CACHE/apt-archives (CACHE: PACKAGE_TEST_CACHE, default
# build/package-test), so a rerun only unpacks,
# installs and checks. Needs root (debootstrap, chroot, mounts) and Debian's
# archive (PACKAGE_TEST_MIRROR, default http://deb.debian.org/debian).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MIRROR=${PACKAGE_TEST_MIRROR:-http://deb.debian.org/debian}
CACHE=${PACKAGE_TEST_CACHE:-$ROOT/build/package-test}
BASE=$CACHE/bookworm.tar
ARCHIVES=$CACHE/apt-archives
start=$SECONDS

say() { echo "package-test: $*" >&2; }
die() { say "$*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts)"
command -v debootstrap >/dev/null || die "debootstrap not found (make deps)"
command -v systemd-nspawn >/dev/null || die "systemd-nspawn not found (make deps: systemd-container)"
deb=$(ls -t build/mindroom_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || die "no build/mindroom_*.deb (make deb)"
mkdir -p "$CACHE" "$ARCHIVES/partial"

if [ ! -f "$BASE" ]; then
  say "debootstrap bookworm from $MIRROR (once; cached in $BASE)"
  tmp=$CACHE/debootstrap.tmp
  # Once more after a failure: a mirror's transient error is not the package's.
  for try in 1 2; do
    rm -rf --one-file-system "$tmp"
    timeout 1200 debootstrap --cache-dir="$ARCHIVES" bookworm "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 &&
      break
    [ "$try" = 1 ] || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    say "debootstrap failed; once more"
  done
  tar -C "$tmp" -cf "$BASE.partial" . && mv "$BASE.partial" "$BASE"
  rm -rf --one-file-system "$tmp"
fi

root=$(mktemp -d "$CACHE/root.XXXXXX")
pgdir=$(mktemp -d "$CACHE/pg.XXXXXX")
chmod 0755 "$pgdir"   # PostgreSQL runs as postgres
mounts=()
nspawn=
unmount_all() {
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
  mounts=()
}
cleanup() {
  if [ -n "$nspawn" ] && kill -0 "$nspawn" 2>/dev/null; then
    kill -TERM "$nspawn"; sleep 5; kill -KILL "$nspawn" 2>/dev/null || true
  fi
  unmount_all
  scripts/pg.sh stop "$pgdir/pg" >/dev/null 2>&1 || true
  # Never into a mount left behind (the host's /dev, /proc).
  rm -rf --one-file-system "$root" "$pgdir"
}
trap cleanup EXIT
bind() { mount "$@"; mounts+=("${!#}"); }
mount_root() {
  bind -t proc proc "$root/proc"
  bind -t sysfs sysfs "$root/sys"
  bind --bind /dev "$root/dev"
  bind --bind "$ARCHIVES" "$root/var/cache/apt/archives"
}

tar -C "$root" -xf "$BASE"
mount_root
cp /etc/resolv.conf "$root/etc/resolv.conf"
# Nothing the packages install may start a service here (no init runs anyway).
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d" && chmod 0755 "$root/usr/sbin/policy-rc.d"
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$MIRROR" "$MIRROR" > "$root/etc/apt/sources.list"
echo 'Acquire::Retries "3";' > "$root/etc/apt/apt.conf.d/80retries"
cp "$deb" "$root/tmp/"
install -m 0755 packaging/package-check.sh "$root/tmp/package-check.sh"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            DEBIAN_FRONTEND=noninteractive "$@"; }

say "installing $(basename "$deb") with apt (dependencies from $MIRROR)"
in_root apt-get update -qq >"$CACHE/apt.log" 2>&1 || { tail -20 "$CACHE/apt.log" >&2; die "apt-get update failed"; }
in_root sh -c "cd /tmp && apt-get install -y -q ./$(basename "$deb")" >>"$CACHE/apt.log" 2>&1 ||
  { tail -30 "$CACHE/apt.log" >&2; die "apt install failed (log: $CACHE/apt.log)"; }
# The version the package's binaries were built with (scripts/version.sh then).
version=$(cut -d' ' -f1 build/release/version.stamp)
in_root /tmp/package-check.sh installed "$version"

# ---- booted: configure as docs/install.md says, start the units, use them ----
say "configuring against a PostgreSQL on the host; booting the root with systemd"
rnd() { openssl rand -hex "$1"; }
pgport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pgpw=$(rnd 16); apw=$(rnd 16)
PG_FSYNC=off PG_PASSWORD=$pgpw scripts/pg.sh init "$pgdir/pg" "$pgport" >/dev/null
(umask 077; printf '127.0.0.1:%s:*:postgres:%s\n' "$pgport" "$pgpw" > "$root/root/.pgpass")
admin="host=127.0.0.1 port=$pgport dbname=mindroom user=postgres"
in_root /usr/lib/mindroom/migrate.sh "$admin" >>"$CACHE/apt.log" 2>&1 || die "the package's migrate.sh failed"
in_root psql "$admin" -X -q -v ON_ERROR_STOP=1 -f /usr/share/mindroom/seed.sql >/dev/null ||
  die "the seed failed"
printf "ALTER ROLE authenticator PASSWORD '%s';\n" "$apw" | in_root psql "$admin" -X -q -v ON_ERROR_STOP=1 -f - ||
  die "cannot set authenticator's password"
cat >> "$root/etc/mindroom/mindroom.env" <<CONF
SUPABASE_AUTH_MODE=legacy
SUPABASE_JWT_SECRET=$(rnd 32)
MINDROOM_INTERNAL_SECRET=$(rnd 32)
MINDROOM_SECRETS_KEY=$(openssl rand -base64 32)
MINDROOM_CONTROL_PLANE_URL=https://api.mindroom.test
STRIPE_WEBHOOK_SECRET=whsec_$(rnd 24)
DOKKU_PROVISIONER_TOKEN=$(rnd 32)
DOKKU_MODE=dry-run
DOKKU_PROVISIONER_URL=http://127.0.0.1:9
DATABASE_URL="host=127.0.0.1 port=$pgport dbname=mindroom user=authenticator password=$apw"
MR_WORKERS=2
CONF
# Configured as an install from before provisioner.env (the provisioner's settings in
# mindroom.env too); then what an upgrade runs, the postinst, must have copied the
# provisioner's settings into provisioner.env and none of the control plane's.
in_root /var/lib/dpkg/info/mindroom.postinst configure 0.0.0 ||
  die "the postinst failed on an upgrade"
prov_env=$(cat "$root/etc/mindroom/provisioner.env")
for v in DOKKU_PROVISIONER_TOKEN DOKKU_MODE MR_WORKERS; do
  grep -q "^$v=" <<<"$prov_env" || die "the upgrade did not copy $v into provisioner.env"
done
for v in DATABASE_URL SUPABASE_JWT_SECRET MINDROOM_INTERNAL_SECRET MINDROOM_SECRETS_KEY \
         STRIPE_WEBHOOK_SECRET DOKKU_PROVISIONER_URL; do
  ! grep -q "^$v=" <<<"$prov_env" || die "the upgrade copied $v into provisioner.env"
done
[ "$(stat -c '%a %U' "$root/etc/mindroom/provisioner.env")" = "600 root" ] ||
  die "provisioner.env is not root's 0600 after the upgrade"
# The nginx site as docs/install.md says: server_name and certificates edited,
# enabled (nginx is the package's Recommends).
site=$root/etc/nginx/sites-available/mindroom.conf
[ -x "$root/usr/sbin/nginx" ] || die "nginx (Recommends) was not installed"
mkdir -p "$root/etc/ssl/mindroom-test"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=api.operator.test \
  -keyout "$root/etc/ssl/mindroom-test/key.pem" -out "$root/etc/ssl/mindroom-test/cert.pem" 2>/dev/null
sed -i -e 's/api\.mindroom\.example;/api.operator.test;/' \
  -e 's|ssl_certificate .*|ssl_certificate /etc/ssl/mindroom-test/cert.pem;|' \
  -e 's|ssl_certificate_key .*|ssl_certificate_key /etc/ssl/mindroom-test/key.pem;|' "$site"
ln -s ../sites-available/mindroom.conf "$root/etc/nginx/sites-enabled/mindroom.conf"
in_root nginx -t -q || die "nginx -t fails on the configured site"
# The next release, as apt sees it: this package with a later version whose
# configuration templates changed, as a release adding a setting does, and whose
# nginx part has a new route. Installed the way docs/install.md says (no answer to
# give: stdin is empty), then the downgrade back and a second install of the same
# version: each completes, leaves the configured mindroom.env, provisioner.env and
# nginx site as they were, and brings its own nginx part, which the site serves.
next=$CACHE/next
rm -rf "$next"
dpkg-deb -R "$deb" "$next"
sed -i 's/^Version: .*/&+next/' "$next/DEBIAN/control"
find "$next/usr/share/mindroom" -name '*.env*' -type f \
  -exec sh -c 'echo "# a setting of the next release" >> "$1"' sh {} \;
echo 'location = /functions/v1/next-release { return 204; }' >> "$next/usr/share/mindroom/nginx/api.conf"
echo '# a change of the next release' >> "$next/usr/share/mindroom/nginx/site.conf"
dpkg-deb --root-owner-group -Zgzip -z1 --build "$next" "$root/tmp/mindroom-next.deb" >/dev/null
rm -rf "$next"
conf() { stat -c '%a %U %n' "$root"/etc/mindroom/*.env "$site"; sha256sum "$root"/etc/mindroom/*.env "$site"; }
configured=$(conf)
for step in "upgrade:./mindroom-next.deb:1" "downgrade:--allow-downgrades ./$(basename "$deb"):0" \
            "reinstall:--reinstall ./$(basename "$deb"):0"; do
  name=${step%%:*} args=${step#*:} routes=${step##*:}
  in_root sh -c "cd /tmp && apt-get install -y -q ${args%:*} </dev/null" >>"$CACHE/apt.log" 2>&1 ||
    { tail -20 "$CACHE/apt.log" >&2; die "the $name failed (log: $CACHE/apt.log)"; }
  [ "$(conf)" = "$configured" ] || die "the $name changed the configuration: $(conf)"
  in_root nginx -T 2>/dev/null > "$CACHE/nginx-T.txt" || die "nginx -t fails on the site after the $name"
  [ "$(grep -c 'location = /functions/v1/next-release' "$CACHE/nginx-T.txt")" = "$routes" ] ||
    die "after the $name, the site serves the next release's route $(grep -c next-release "$CACHE/nginx-T.txt") times, want $routes"
done
say "upgrade, downgrade and reinstall keep the configuration and the nginx site, and replace nginx's part"
# Removed (not purged) while the site is enabled: what the site includes is gone,
# and nginx, every site of the host, must still pass nginx -t (package-check.sh
# removed). Installed again, the site is enabled and served as before.
in_root sh -c 'apt-get remove -y -q mindroom </dev/null' >>"$CACHE/apt.log" 2>&1 ||
  { tail -20 "$CACHE/apt.log" >&2; die "the remove failed (log: $CACHE/apt.log)"; }
in_root /tmp/package-check.sh removed
in_root sh -c "cd /tmp && apt-get install -y -q ./$(basename "$deb") </dev/null" >>"$CACHE/apt.log" 2>&1 ||
  { tail -20 "$CACHE/apt.log" >&2; die "the install after the remove failed (log: $CACHE/apt.log)"; }
[ "$(readlink "$root/etc/nginx/sites-enabled/mindroom.conf")" = ../sites-available/mindroom.conf ] ||
  die "the install after the remove did not enable the site again"
[ "$(conf)" = "$configured" ] || die "the remove and install changed the configuration: $(conf)"
in_root nginx -T 2>/dev/null > "$CACHE/nginx-T.txt" || die "nginx -t fails on the site after the install"
grep -q 'server_name api.operator.test;' "$CACHE/nginx-T.txt" &&
  grep -q 'location = /functions/v1/handle-stripe-webhook' "$CACHE/nginx-T.txt" ||
  die "after the remove and install, nginx does not serve the site"
say "a remove leaves nginx working without the site; the next install serves it again"
# The container shares the host's network: nothing in it may listen on a port.
ln -sf /dev/null "$root/etc/systemd/system/nginx.service"
mkdir -p "$root/opt/mindroom-check"
install -m 0644 tests/integration/fcgi.py "$root/opt/mindroom-check/fcgi.py"
install -m 0755 packaging/package-boot-check.py "$root/opt/mindroom-check/check.py"
unmount_all
# The container must come up before anything of ours is enabled: a root that cannot
# boot here (no cgroup delegation, no namespaces in this sandbox) is a fact about
# the machine, not the package, and is reported as skipped, never as passed.
# PACKAGE_TEST_BOOT=required turns that skip into a failure.
systemd-nspawn -D "$root" --boot --register=no --keep-unit --console=passive \
  -M "mrpkg$$" >"$CACHE/boot.log" 2>&1 &
nspawn=$!
init= state=
for _ in $(seq 300); do
  kill -0 "$nspawn" 2>/dev/null || break
  init=$(pgrep -P "$nspawn" -x systemd || true)
  [ -n "$init" ] && state=$(nsenter -t "$init" -a systemctl is-system-running 2>/dev/null || true) &&
    case "$state" in running|degraded) break ;; esac
  sleep 0.2
done
booted=yes
case "$state" in running|degraded) ;; *)
  booted=no
  tail -15 "$CACHE/boot.log" >&2
  [ "${PACKAGE_TEST_BOOT:-}" != required ] ||
    die "the container did not boot (systemd '${state:-not up}'; log: $CACHE/boot.log)"
  say "SKIPPED the booted checks: systemd-nspawn could not boot the root on this machine" \
      "(systemd '${state:-not up}'; log: $CACHE/boot.log). Not tested here: the units running," \
      "socket access, /ready, /metrics, restarts, the journal."
  skipped="the booted checks (systemd-nspawn could not boot here)"
  ;;
esac
if [ "$booted" = yes ]; then
  inside() { nsenter -t "$init" -a /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
  inside systemctl enable --now mindroom.target mindroom-provisioner.service >/dev/null 2>&1 ||
    { inside systemctl --no-pager --failed >&2; inside journalctl --no-pager -u 'mindroom-*' -n 30 >&2; die "the units did not start"; }
  units=$(inside systemctl list-units --plain --no-legend 'mindroom*.service' | awk '{print $1}')
  for _ in $(seq 100); do
    inactive=$(for u in $units; do [ "$(inside systemctl is-active "$u")" = active ] || echo "$u"; done)
    [ -z "$inactive" ] && break
    sleep 0.2
  done
  [ -z "$inactive" ] || { inside journalctl --no-pager -u 'mindroom-*' -n 30 >&2; die "not active: $inactive"; }
  say "$(echo "$units" | wc -w) services active"
  # The provisioner runs with its own settings and without the control plane's secrets.
  penv=$(inside sh -c 'tr "\0" "\n" < /proc/$(systemctl show -p MainPID --value mindroom-provisioner.service)/environ')
  grep -q '^DOKKU_PROVISIONER_TOKEN=' <<<"$penv" ||
    die "the provisioner runs without DOKKU_PROVISIONER_TOKEN"
  ! grep -Eq '^(DATABASE_URL|MINDROOM_SECRETS_KEY|STRIPE_WEBHOOK_SECRET|MINDROOM_INTERNAL_SECRET)=' <<<"$penv" ||
    die "the provisioner's environment holds the control plane's secrets"
  inside /usr/bin/python3 /opt/mindroom-check/check.py /opt/mindroom-check "$version" ||
    { inside journalctl --no-pager -u 'mindroom-*' -n 40 >&2; die "the booted checks failed"; }
  inside systemctl poweroff >/dev/null 2>&1 || true
fi
for _ in $(seq 150); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.2; done
kill -0 "$nspawn" 2>/dev/null && { kill -TERM "$nspawn"; sleep 3; }
nspawn=
mount_root

# Enabled as an operator does (already so where the root booted): purging must not
# leave the links behind.
in_root systemctl enable mindroom.target mindroom-provisioner.service >/dev/null 2>&1 ||
  die "cannot enable the units"
say "purging"
in_root apt-get purge -y -q mindroom >>"$CACHE/apt.log" 2>&1 || { tail -20 "$CACHE/apt.log" >&2; die "purge failed"; }
in_root /tmp/package-check.sh purged
if [ -n "${skipped:-}" ]; then
  say "passed in $((SECONDS - start)) s, except what was SKIPPED: $skipped"
else
  say "passed in $((SECONDS - start)) s"
fi
