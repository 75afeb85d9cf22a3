#!/usr/bin/env bash
# `make deb`: a Debian package of the release build, with dpkg-deb (Debian's own
# tool; no debhelper: the maintainer scripts below are the whole of what it does).
#
#   build/deb/root/                 `make install` into it, Debian's layout
#   build/mindroom_<v>_<arch>.deb   the package; `apt install ./build/mindroom_*.deb`
#
# The version is scripts/version.sh's, made a Debian version ('-' -> '+'); Depends
# comes from dpkg-shlibdeps on the binaries. The package has no conffiles: what
# the operator edits under /etc (mindroom.env, provisioner.env, the nginx site) the
# postinst makes from templates in /usr/share/mindroom, and the rest of nginx's
# configuration is the package's, in /usr/share/mindroom/nginx.
# Run as root or not (dpkg-deb --root-owner-group gives root:root either way).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
STAGE=$ROOT/build/deb/root
version=$(scripts/version.sh | tr -- '-_' '++')
arch=$(dpkg --print-architecture)

rm -rf "$ROOT/build/deb"
mkdir -p "$STAGE/DEBIAN"
make --no-print-directory -s install DESTDIR="$STAGE" PREFIX=/usr SYSCONFDIR=/etc \
  UNITDIR=/lib/systemd/system >/dev/null
# mindroom.env and provisioner.env hold the operator's secrets: the package ships
# their templates (/usr/share/mindroom/*.env.example) and the postinst makes each
# where it is missing. As conffiles, every release that changed a template would
# stop its upgrade at dpkg's prompt (and fail without a terminal), offering to
# replace the configured file with the template.
rm "$STAGE"/etc/mindroom/mindroom.env "$STAGE"/etc/mindroom/provisioner.env
rmdir "$STAGE"/etc/mindroom
# So is the nginx site (server_name, certificates): its template is
# /usr/share/mindroom/nginx/site.conf, and what it includes, the package's part
# that every release changes, is replaced by each upgrade without a question.
rm "$STAGE"/etc/nginx/sites-available/mindroom.conf
rmdir "$STAGE"/etc/nginx/sites-available "$STAGE"/etc/nginx "$STAGE"/etc

# The ELF executables (not the scripts beside them).
elfs=()
while IFS= read -r -d '' f; do
  [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ] && elfs+=("$f")
done < <(find "$STAGE/usr/lib/mindroom" -type f -perm -u+x -print0)
[ ${#elfs[@]} -gt 0 ] || { echo "deb: no binaries staged" >&2; exit 1; }
# Debian ships stripped binaries (the build keeps its debug information).
strip --strip-unneeded --remove-section=.comment --remove-section=.note "${elfs[@]}"

# Shared-library dependencies, as dpkg-shlibdeps reads them off the binaries.
shl=$ROOT/build/deb/shlibs
mkdir -p "$shl/debian"
printf 'Source: mindroom\n\nPackage: mindroom\nArchitecture: any\n' > "$shl/debian/control"
depends=$(cd "$shl" && dpkg-shlibdeps -O "${elfs[@]}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$depends" ] || { echo "deb: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

# Recommends: what docs/install.md runs and the package's programs call where they
# are used: nginx, psql (migrate.sh, mindroomctl), python3 (mindroomctl's signing),
# ssh, ssh-keygen and ssh-keyscan (the provisioner's ssh mode, install step 4) and
# openssl (the keys of step 2); none is in a fresh Debian 12 (debootstrap) root.
size=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: mindroom
Version: $version
Architecture: $arch
Maintainer: MindRoom <ops@mindroom.chat>
Installed-Size: $size
Depends: $depends, systemd-sysusers, systemd-tmpfiles, curl
Recommends: nginx | nginx-light, postgresql-client, python3, openssh-client, openssl
Section: net
Priority: optional
Homepage: https://mindroom.chat
Description: MindRoom control plane
 FastCGI functions behind nginx at Supabase Edge Functions' URLs (the Stripe
 webhook, provisioning, health checks, billing edges), the lifecycle worker
 that does all owed work, the Dokku provisioner, mindroom-admin (readiness and
 Prometheus metrics), mindroomctl, systemd units, nginx configuration and the
 PostgreSQL migrations. Nothing starts until /etc/mindroom/mindroom.env is
 filled in and the units are enabled (/usr/share/doc/mindroom/install.md).
CONTROL
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$STAGE/DEBIAN/"

out=$ROOT/build/mindroom_${version}_${arch}.deb
rm -f "$ROOT"/build/mindroom_*.deb
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$out" >/dev/null
echo "deb: $out"
