#!/bin/sh
# Runs inside the fresh Debian 12 root of packaging/package-test.sh, as root.
#   package-check.sh installed VERSION   the package is installed as it should be
#   package-check.sh removed             removing it kept the configuration, and nginx works
#   package-check.sh purged              and purging it left nothing behind
set -eu
fail() { echo "package-check: FAIL: $*" >&2; exit 1; }
ok() { echo "package-check: ok: $*" >&2; }
mode_is() { # path "mode user group"
  got=$(stat -c '%a %U %G' "$1") || fail "$1 missing"
  [ "$got" = "$2" ] || fail "$1 is $got, want $2"
}

if [ "$1" = purged ]; then
  dpkg-query -W -f='${Status}' mindroom 2>/dev/null | grep -q 'not-installed' ||
    ! dpkg-query -W mindroom >/dev/null 2>&1 || fail "mindroom still known to dpkg"
  for p in /etc/mindroom /usr/lib/mindroom /usr/share/mindroom /usr/bin/mindroomctl \
           /lib/systemd/system/mindroom.target /var/lib/mindroom-provisioner /var/lib/mindroom-package \
           /etc/nginx/sites-available/mindroom.conf /etc/nginx/sites-enabled/mindroom.conf; do
    [ ! -e "$p" ] || fail "$p left after purge"
  done
  links=$(find /etc/systemd/system -type l -lname '*/systemd/system/mindroom*')
  [ -z "$links" ] || fail "enabled units' links left after purge:" $links
  ok "purge leaves nothing"
  exit 0
fi

if [ "$1" = removed ]; then
  dpkg-query -W -f='${Status}' mindroom | grep -q 'deinstall ok config-files' ||
    fail "mindroom is '$(dpkg-query -W -f='${Status}' mindroom)', want removed"
  for p in /usr/lib/mindroom /usr/share/mindroom /usr/bin/mindroomctl; do
    [ ! -e "$p" ] || fail "$p left after remove"
  done
  for p in /etc/mindroom/mindroom.env /etc/mindroom/provisioner.env /etc/nginx/sites-available/mindroom.conf; do
    [ -e "$p" ] || fail "$p gone after remove"
  done
  # The site was enabled: nginx, every site of the host, must still load.
  out=$(nginx -t 2>&1) || fail "nginx -t fails after remove: $out"
  [ ! -e /etc/nginx/sites-enabled/mindroom.conf ] && [ ! -L /etc/nginx/sites-enabled/mindroom.conf ] ||
    fail "the nginx site is still enabled after remove"
  ok "remove keeps the configuration; nginx -t passes without the site"
  exit 0
fi

want_version=$2
dpkg-query -W -f='${Status}' mindroom | grep -q 'install ok installed' || fail "mindroom not installed"
ok "installed $(dpkg-query -W -f='${Version}' mindroom)"

# Users and groups: system accounts without a login; only nginx's user in the socket group.
for u in mindroom mindroom-provisioner; do
  line=$(getent passwd "$u") || fail "no user $u"
  uid=$(echo "$line" | cut -d: -f3); shell=$(echo "$line" | cut -d: -f7)
  [ "$uid" -lt 1000 ] || fail "$u is not a system user (uid $uid)"
  [ "$shell" = /usr/sbin/nologin ] || fail "$u has a login shell ($shell)"
done
members=$(getent group mindroom-web | cut -d: -f4)
[ "$members" = www-data ] || fail "group mindroom-web has members '$members', want www-data only"
ok "users mindroom, mindroom-provisioner; group mindroom-web = www-data"

# Files and permissions.
mode_is /etc/mindroom/mindroom.env "600 root root"
mode_is /etc/mindroom/provisioner.env "600 root root"
mode_is /run/mindroom "755 root root"
mode_is /run/mindroom/metrics "3770 mindroom mindroom"
for f in /usr/lib/mindroom/functions/* /usr/lib/mindroom/mindroom-lifecycle /usr/lib/mindroom/dokku-provisioner \
         /usr/lib/mindroom/mr-jwt /usr/lib/mindroom/mr-pgservice /usr/lib/mindroom/mr-secrets \
         /usr/bin/mindroomctl; do
  mode_is "$f" "755 root root"
done
ww=$(dpkg -L mindroom | while read -r p; do [ -e "$p" ] && [ ! -L "$p" ] && stat -c '%A %n' "$p"; done |
     awk 'substr($1, 9, 1) == "w" { print $2 }')
[ -z "$ww" ] || fail "world-writable: $ww"
for f in /usr/lib/mindroom/functions/*; do
  n=$(basename "$f")
  [ "$("$f" --version)" = "$n $want_version" ] || fail "$f --version: $("$f" --version)"
done
for f in mindroom-lifecycle dokku-provisioner mr-jwt mr-pgservice mr-secrets; do
  [ "$(/usr/lib/mindroom/$f --version)" = "$f $want_version" ] || fail "$f --version"
done
[ "$(mindroomctl version)" = "mindroomctl $want_version" ] || fail "mindroomctl version: $(mindroomctl version)"
out=$(mindroomctl status 2>&1) && fail "mindroomctl status worked unconfigured"
echo "$out" | grep -q "DATABASE_URL is required: not set in /etc/mindroom/mindroom.env" ||
  fail "mindroomctl status: $out"
grep -q '^INSTALLED_MIGRATIONS=/usr/share/mindroom/migrations$' /usr/lib/mindroom/migrate.sh ||
  fail "migrate.sh does not look in /usr/share/mindroom/migrations"
grep -q '^INSTALLED_LIBEXEC=/usr/lib/mindroom$' /usr/lib/mindroom/migrate.sh ||
  fail "migrate.sh does not look for mr-pgservice in /usr/lib/mindroom"
[ -f /usr/share/mindroom/migrations/000_supabase_compat.sql ] && [ -f /usr/share/mindroom/seed.sql ] ||
  fail "migrations or seed missing"
for f in mindroom api redirect fastcgi json-errors cors site; do
  mode_is "/usr/share/mindroom/nginx/$f.conf" "644 root root"
done
# The site is the operator's, made from its template; the package has no conffile.
mode_is /etc/nginx/sites-available/mindroom.conf "644 root root"
cmp -s /etc/nginx/sites-available/mindroom.conf /usr/share/mindroom/nginx/site.conf ||
  fail "the nginx site is not its template"
[ ! -s /var/lib/dpkg/info/mindroom.conffiles ] || fail "conffiles: $(cat /var/lib/dpkg/info/mindroom.conffiles)"
[ ! -e /etc/nginx/sites-enabled/mindroom.conf ] || fail "the nginx site was enabled"
ok "files, modes, --version of every binary, mindroomctl installed"

# What docs/install.md runs on this host, and what the package's programs run
# (the provisioner's ssh mode, migrate.sh's and mindroomctl's psql, the signing
# of mindroomctl replay), come with `apt install` on a fresh Debian 12.
for c in ssh ssh-keygen ssh-keyscan openssl psql python3 curl runuser; do
  command -v "$c" >/dev/null || fail "$c not installed: docs/install.md or the package's programs run it"
done
ok "the commands the install steps and the programs run are installed"

# Nothing enabled, nothing running, until an operator configures and enables it.
if ls /etc/systemd/system/*.wants/ 2>/dev/null | grep -q mindroom; then fail "a mindroom unit was enabled"; fi
for u in mindroom.target mindroom-lifecycle.service mindroom-provisioner.service; do
  state=$(systemctl is-enabled "$u" 2>/dev/null || true)
  [ "$state" = disabled ] || fail "$u is '$state', want disabled"
done
if pgrep -f /usr/lib/mindroom >/dev/null; then fail "a mindroom process runs"; fi
ok "nothing enabled or running"

# Every unit: verify, and the services' exposure.
units="mindroom.target mindroom-lifecycle.service mindroom-provisioner.service mindroom-provisioner.socket"
for f in /usr/lib/mindroom/functions/*; do
  units="$units mindroom-function@$(basename "$f").service mindroom-function@$(basename "$f").socket"
done
for u in $units; do
  out=$(systemd-analyze verify "$u" 2>&1) || fail "systemd-analyze verify $u: $out"
  [ -z "$out" ] || fail "systemd-analyze verify $u: $out"
  case "$u" in
  *.service)
    level=$(systemd-analyze security --offline=true --no-pager "$u" 2>&1 |
            sed -n 's/.*Overall exposure level for .*: \([0-9.]*\) .*/\1/p')
    [ -n "$level" ] || fail "no exposure level for $u"
    awk -v l="$level" 'BEGIN { exit !(l <= 2.0) }' || fail "$u exposure $level > 2.0"
    echo "package-check:   $u: verified, exposure $level" >&2 ;;
  *) echo "package-check:   $u: verified" >&2 ;;
  esac
done
ok "every unit verified; every service's exposure <= 2.0"
