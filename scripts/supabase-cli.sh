#!/usr/bin/env bash
# The Supabase CLI, pinned, installed on demand from the npm registry (nothing else
# is downloaded: the npm package `supabase` carries no install script; its binary
# comes in the platform package @supabase/cli-<os>-<arch>, an optional dependency).
#
#   scripts/supabase-cli.sh                 install if missing, print the executable's path
#   scripts/supabase-cli.sh run ARGS...     install if missing, run `supabase ARGS...`
#
#   SUPABASE_CLI_VERSION   (default 2.117.0; newer releases may not install here)
#   SUPABASE_CLI_CACHE     (default .cache/supabase-cli in the repository, git-ignored)
# Needs node and npm; as root, installs Debian's nodejs and npm when npm is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=${SUPABASE_CLI_VERSION:-2.117.0}
cache=${SUPABASE_CLI_CACHE:-$root/.cache/supabase-cli}
dir=$cache/$version
bin=$dir/node_modules/.bin/supabase

works() { [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "$version" ]; }

install() {
  if ! command -v npm >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "supabase-cli: npm is missing; run as root: apt-get update && apt-get install -y nodejs npm" >&2
      exit 1
    fi
    echo "supabase-cli: installing nodejs npm" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  echo "supabase-cli: installing supabase@$version from the npm registry into $dir" >&2
  local tmp=$dir.tmp.$$
  rm -rf "$tmp"; mkdir -p "$tmp"
  # --ignore-scripts: nothing may run at install time (no download from elsewhere).
  if ! npm install --prefix "$tmp" --ignore-scripts --no-audit --no-fund --loglevel=error \
       "supabase@$version" >&2; then
    rm -rf "$tmp"; echo "supabase-cli: npm install supabase@$version failed" >&2; exit 1
  fi
  local got; got=$("$tmp/node_modules/.bin/supabase" --version 2>&1) || true
  if [ "$got" != "$version" ]; then
    echo "supabase-cli: installed package does not run (\`supabase --version\` said: $got);" \
         "its platform package @supabase/cli-$(uname -s | tr A-Z a-z)-* may be missing" >&2
    rm -rf "$tmp"; exit 1
  fi
  rm -rf "$dir"; mv "$tmp" "$dir"
}

if ! works; then
  mkdir -p "$cache"
  # One installer at a time; a second one finds the first one's result.
  exec 9>"$cache/.lock"
  flock 9
  works || install
  flock -u 9
fi

case "${1:-}" in
  "") echo "$bin" ;;
  run) shift; exec "$bin" "$@" ;;
  *) echo "usage: supabase-cli.sh [run ARGS...]" >&2; exit 2 ;;
esac
