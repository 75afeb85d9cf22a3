#!/usr/bin/env bash
# Manages a PostgreSQL 15 cluster kept in one directory (the stack's .run/pg or a
# test's temporary directory). initdb refuses to run as root, so as root every
# server command runs as the unprivileged `postgres` user, which owns the directory.
#
#   scripts/pg.sh init  DIR [PORT]   create (if missing) and start; PORT "" = unix socket only
#   scripts/pg.sh start DIR          start an existing cluster
#   scripts/pg.sh stop  DIR          fast shutdown (waits)
#   scripts/pg.sh kill  DIR          immediate shutdown (crash-like; for failure drills)
#   scripts/pg.sh url   DIR          print the libpq conninfo for the `mindroom` database
#
# The socket lives in DIR itself, so clusters in different directories never collide.
# PG_FSYNC=off (tests only) trades durability for speed.
#
# Authentication (pg_hba.conf and pg_ident.conf, rewritten on every init):
#   unix socket    peer, mapped: the user running this script (root included) and the
#                  OS user `postgres` may log in as the roles the stack, the tools and
#                  the tests use (LOGIN_ROLES); nobody else
#   TCP            scram-sha-256 on 127.0.0.1 and ::1: a password is needed. With
#                  PG_PASSWORD in the environment (never an argument: `ps` shows
#                  those), init sets it as the `postgres` role's password; without it
#                  no role has one and TCP admits nobody.
set -euo pipefail
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
cmd=${1:?usage: pg.sh init|start|stop|kill|url DIR [PORT]}
dir=$(realpath -m "${2:?DIR required}")
port=${3-}

# PostgreSQL 15's pg_ident.conf names each role a mapped user may use (a pattern
# for the role arrives in 16): the stack's and the tools' roles, and the ones the
# schema tests create to play Supabase's.
LOGIN_ROLES="postgres authenticator supabase_auth_admin app_owner"

as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

conninfo() {
  local p; p=$(sed -n 's/^port = \([0-9]*\).*/\1/p' "$dir/data/postgresql.auto.conf" 2>/dev/null | tail -1)
  echo "host=$dir port=${p:-5432} dbname=mindroom user=postgres"
}

# Writes pg_hba.conf and pg_ident.conf (see the top), as the cluster's owner.
write_auth() {
  local me u r
  me=$(id -un)
  {
    echo "# Written by scripts/pg.sh on every init: peer (mapped) on the socket, scram on TCP."
    echo "local   all   all                  peer map=mindroom"
    echo "host    all   all   127.0.0.1/32   scram-sha-256"
    echo "host    all   all   ::1/128        scram-sha-256"
  } | as_owner tee "$dir/data/pg_hba.conf" >/dev/null
  {
    echo "# Written by scripts/pg.sh: who may log in over the socket as which role."
    for u in $(printf '%s\n' "$me" postgres | sort -u); do
      for r in $LOGIN_ROLES; do echo "mindroom  $u  $r"; done
    done
  } | as_owner tee "$dir/data/pg_ident.conf" >/dev/null
}

# Sets PG_PASSWORD as the postgres role's password; the statement goes on psql's
# stdin, so the password is in no process's arguments.
set_password() {
  local p=$1
  [ -n "${PG_PASSWORD:-}" ] || return 0
  [[ $PG_PASSWORD =~ ^[A-Za-z0-9_.-]{16,200}$ ]] || { echo "pg.sh: PG_PASSWORD must be 16+ characters of [A-Za-z0-9_.-]" >&2; exit 2; }
  printf "SET log_statement = 'none';\nALTER ROLE postgres PASSWORD '%s';\n" "$PG_PASSWORD" |
    as_owner "$PGBIN/psql" -X -q -h "$dir" -p "$p" -U postgres -d postgres -v ON_ERROR_STOP=1 -f - >/dev/null
}

start() {
  as_owner "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start >/dev/null
}

case "$cmd" in
init)
  mkdir -p "$dir"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_owner "$PGBIN/initdb" -D "$dir/data" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
      -E UTF8 --locale=C.UTF-8 >/dev/null
    tcp_port=${port:-5432}
    {
      echo "unix_socket_directories = '$dir'"
      if [ -n "$port" ]; then echo "listen_addresses = '127.0.0.1'"; else echo "listen_addresses = ''"; fi
      echo "port = $tcp_port"
      echo "max_connections = 200"
      # Sessions in UTC, as Supabase's are, whatever zone this machine is in: a day
      # (usage, daily limits) is a UTC day, and psql and the tests read it so.
      echo "timezone = 'UTC'"
      echo "shared_buffers = 128MB"
      echo "fsync = ${PG_FSYNC:-on}"
      echo "synchronous_commit = ${PG_FSYNC:-on}"
      echo "full_page_writes = ${PG_FSYNC:-on}"
      echo "log_min_messages = warning"
      echo "log_min_error_statement = panic"
    } | as_owner tee "$dir/data/postgresql.auto.conf" >/dev/null
    write_auth
    start
  else
    # A cluster made by an older pg.sh gets today's authentication too.
    write_auth
    if as_owner "$PGBIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
      as_owner "$PGBIN/pg_ctl" -D "$dir/data" reload >/dev/null
    else
      start
    fi
  fi
  # Also after a first start that failed once the cluster existed (a port in use):
  # the next init must still end with the database.
  p=$(sed -n 's/^port = \([0-9]*\).*/\1/p' "$dir/data/postgresql.auto.conf" | tail -1)
  if [ "$(as_owner "$PGBIN/psql" -X -qAt -h "$dir" -p "${p:-5432}" -U postgres -d postgres \
          -c "SELECT 1 FROM pg_database WHERE datname = 'mindroom'")" != 1 ]; then
    as_owner "$PGBIN/psql" -X -q -h "$dir" -p "${p:-5432}" -U postgres -d postgres \
      -c "CREATE DATABASE mindroom" >/dev/null
  fi
  set_password "${p:-5432}"
  conninfo
  ;;
start) start; conninfo ;;
stop)  as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true ;;
kill)  as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true ;;
url)   conninfo ;;
*) echo "pg.sh: unknown command $cmd" >&2; exit 2 ;;
esac
