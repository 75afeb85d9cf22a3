#!/bin/sh
# Prints this source tree's version, the one place it is worked out (the Makefile
# compiles it into every binary, `make deb` names the package after it, mindroomctl
# prints it): `git describe` of the newest v<version> tag when there is one; else
# VERSION's number plus the count of commits and the commit ("0.1.0+r412.g2a635a9d1e2f",
# ".dirty" with local changes); outside a git checkout (a release tarball), VERSION
# alone. The count comes before the hash so that dpkg (and apt) order a later
# commit's package after an earlier one's, as they order describe's "-<n>-g<hash>";
# by the hash alone a later commit is a downgrade about half the time. The "r" puts
# every such version after the older form "0.1.0+g<hash>" (dpkg orders the letter r
# after g, and a bare digit before any letter), so an install of that form upgrades.
# (A shallow clone counts only what it has: build packages from a full clone.)
cd "$(dirname "$0")/.." || exit 1
base=$(cat VERSION 2>/dev/null || echo 0.0.0)
if command -v git >/dev/null 2>&1 && git rev-parse --git-dir >/dev/null 2>&1; then
  if d=$(git describe --tags --dirty --match 'v[0-9]*' 2>/dev/null); then
    echo "${d#v}"
    exit 0
  fi
  if h=$(git rev-parse --short=12 HEAD 2>/dev/null) && n=$(git rev-list --count HEAD 2>/dev/null); then
    dirty=
    git diff --quiet HEAD -- 2>/dev/null || dirty=.dirty
    echo "$base+r$n.g$h$dirty"
    exit 0
  fi
fi
echo "$base"
