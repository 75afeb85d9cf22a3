#!/usr/bin/env bash
# Applies pending migrations in file order, each file in its own transaction, and
# records them the way the Supabase CLI does, in
#   supabase_migrations.schema_migrations(version text primary key, name text, statements text[])
# version = the digits before the first underscore of the file name, name = the rest
# without .sql, statements = the file's statements split exactly as the CLI splits them
# (see split_statements). Either tool sees the other's work as done. A second run
# applies nothing.
# A failing file applies nothing of itself; the runner stops there and exits non-zero
# with PostgreSQL's error on stderr.
#
#   scripts/migrate.sh CONNINFO          (libpq conninfo or URL; default: $DATABASE_URL)
#   MR_MIGRATIONS_DIR=dir                 (default: sql/migrations next to this script)
#
# The connection string reaches psql through a service file only this user can read
# (written by mr-pgservice, as for mindroomctl), never as an argument: every local
# user can read a process's arguments, and a password in $DATABASE_URL would be
# there once per file.
#
# Concurrent runners are safe: each file's transaction takes an advisory lock and
# re-checks the table before applying.
#
# A file's DDL waits for its tables' locks behind the transactions of the binaries
# still running, and while it waits every other query on those tables waits behind
# it (the webhook would stop answering). So each file's statements wait at most
# MR_MIGRATE_LOCK_TIMEOUT_MS (default 2000) for a lock; a file that cannot get one
# (SQLSTATE 55P03) rolls back whole and is tried again after MR_MIGRATE_LOCK_PAUSE_S
# (default 5), MR_MIGRATE_LOCK_TRIES times in all (default 5). Then the runner stops
# there, nothing of that file applied, and says so: run it again later.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
conn=${1:-${DATABASE_URL:-}}
[ -n "$conn" ] || { echo "usage: migrate.sh CONNINFO" >&2; exit 2; }
# Filled in by `make install` (where the migrations and mr-pgservice were installed);
# empty here.
INSTALLED_MIGRATIONS=
INSTALLED_LIBEXEC=
dir=${MR_MIGRATIONS_DIR:-${INSTALLED_MIGRATIONS:-$here/sql/migrations}}
[ -d "$dir" ] || { echo "migrate: no directory $dir" >&2; exit 2; }
for v in MR_MIGRATE_LOCK_TIMEOUT_MS MR_MIGRATE_LOCK_TRIES MR_MIGRATE_LOCK_PAUSE_S; do
  [[ ${!v:-1} =~ ^[0-9]{1,7}$ ]] || { echo "migrate: $v must be a whole number, not '${!v}'" >&2; exit 2; }
done
lock_timeout_ms=${MR_MIGRATE_LOCK_TIMEOUT_MS:-2000}
lock_tries=${MR_MIGRATE_LOCK_TRIES:-5}
lock_pause_s=${MR_MIGRATE_LOCK_PAUSE_S:-5}
# 0 would be no timeout, or no try at all.
[ "$lock_timeout_ms" -gt 0 ] && [ "$lock_tries" -gt 0 ] ||
  { echo "migrate: MR_MIGRATE_LOCK_TIMEOUT_MS and MR_MIGRATE_LOCK_TRIES must be at least 1" >&2; exit 2; }

pgservice=
for d in "$INSTALLED_LIBEXEC" "$here/build/release/bin" "$here/build/san/bin"; do
  [ -n "$d" ] && [ -x "$d/mr-pgservice" ] && { pgservice=$d/mr-pgservice; break; }
done
[ -n "$pgservice" ] || { echo "migrate: mr-pgservice not found (make build)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rc=0
(umask 077; MR_MIGRATE_CONNINFO=$conn "$pgservice" --var MR_MIGRATE_CONNINFO > "$tmp/pg_service.conf") ||
  rc=$?
case $rc in
  0) target=service=mindroom; export PGSERVICEFILE=$tmp/pg_service.conf ;;
  3) target=$conn ;;  # service=NAME alone: the operator's service file, nothing secret here
  *) echo "migrate: CONNINFO is not a valid connection string" >&2; exit 2 ;;
esac
unset conn

psql_() { psql "$target" -X -q -v ON_ERROR_STOP=1 "$@"; }

# Splits a migration file into statements exactly as the Supabase CLI does
# (pkg/parser: Split + SplitAndTrim), so both tools record the same `statements`.
# The CLI's tokenizer is a small state machine, reproduced here state for state,
# quirks included: a statement ends at a `;` outside '...', "...", $tag$...$tag$,
# -- and /* */ comments (nested), (...) and BEGIN ATOMIC ... END; a backslash outside
# those skips the next character; comments stay with the statement that follows
# them; each piece loses its trailing `;` and surrounding white space (Go's
# strings.TrimSpace, Unicode spaces included) and is dropped only if nothing is
# left, so a trailing comment-only piece is kept. Works on bytes (LC_ALL=C), which
# gives the same result as the CLI's rune-wise scan because every delimiter is ASCII.
# Prints a SQL expression ARRAY['stmt', ...]::text[].
split_statements() {
  LC_ALL=C awk '
    BEGIN {
      RS = "\001"; ORS = ""
      # Go unicode.IsSpace: ASCII white space, U+0085, U+00A0, U+1680, U+2000-U+200A,
      # U+2028, U+2029, U+202F, U+205F, U+3000 (as UTF-8 byte sequences).
      ns = split("9 10 11 12 13 32 194,133 194,160 225,154,128 226,128,168 226,128,169 " \
                 "226,128,175 226,129,159 227,128,128", spec, " ")
      for (k = 128; k <= 138; k++) spec[++ns] = "226,128," k
      for (k = 1; k <= ns; k++) {
        m = split(spec[k], b, ","); sp[k] = ""
        for (j = 1; j <= m; j++) sp[k] = sp[k] sprintf("%c", b[j] + 0)
      }
    }
    { text = text (NR > 1 ? RS : "") $0 }
    function node(t) { nn++; T[nn] = t; return nn }
    # ReadyState.Next: returns self (r), a new state, or 0 (emit the token).
    function ready(r, i,   c, m) {
      c = substr(text, i, 1)
      if (c == "$") { m = node("tag"); OF[m] = i; return m }
      if (c == "\047" || c == "\"") { m = node("quote"); DL[m] = c; ES[m] = 0; return m }
      if (c == "-") return node("comment")
      if (c == "/") { m = node("block"); DP[m] = 0; return m }
      if (c == "\\") return node("escape")
      if (c == ";") return 0
      if (c == "(") { m = node("atomic"); PV[m] = r; DL[m] = ")"; return m }
      if ((c == "c" || c == "C") && i - 5 >= st && toupper(substr(text, i - 5, 6)) == "ATOMIC") {
        m = node("atomic"); PV[m] = r; DL[m] = "END"; return m
      }
      return r
    }
    function fresh(i) { return step(node("ready"), i) }
    function step(s, i,   t, c, w, cur, k) {
      t = T[s]; c = substr(text, i, 1)
      if (t == "ready") return ready(s, i)
      if (t == "comment") {
        if (c == "-") { k = node("dollar"); DL[k] = "\n"; return k }
        return fresh(i)
      }
      if (t == "block") {
        w = substr(text, i - 1, 2)
        if (w == "/*") { DP[s]++; return s }
        if (DP[s] == 0) return fresh(i)
        if (w == "*/") { DP[s]--; if (DP[s] == 0) return node("ready") }
        return s
      }
      if (t == "quote") {
        if (ES[s]) {
          if (c == DL[s]) { ES[s] = 0; return s }
          return fresh(i)
        }
        if (c == DL[s]) ES[s] = 1
        return s
      }
      if (t == "dollar") {
        k = length(DL[s])
        if (substr(text, i - k + 1, k) == DL[s]) return node("ready")
        return s
      }
      if (t == "tag") {
        if (c == "$") { k = node("dollar"); DL[k] = substr(text, OF[s], i - OF[s] + 1); return k }
        if (c ~ /[A-Za-z0-9_]/) return s
        return fresh(i)
      }
      if (t == "escape") return node("ready")
      # atomic: (...) or BEGIN ATOMIC ... END
      cur = step(PV[s], i)
      if (cur != 0) PV[s] = cur
      if (T[PV[s]] == "ready") {
        k = length(DL[s])
        if (i - k + 1 >= st && toupper(substr(text, i - k + 1, k)) == DL[s]) return node("ready")
      }
      return s
    }
    function trim(s,   k, again, l) {
      sub(/;+$/, "", s)
      do {
        again = 0
        for (k = 1; k <= ns; k++) {
          l = length(sp[k])
          if (l && substr(s, 1, l) == sp[k]) { s = substr(s, l + 1); again = 1 }
          if (l && length(s) >= l && substr(s, length(s) - l + 1) == sp[k]) { s = substr(s, 1, length(s) - l); again = 1 }
        }
      } while (again)
      return s
    }
    function emit(tok) {
      tok = trim(tok)
      if (tok == "") return
      gsub(/\047/, "\047\047", tok)
      out = out (n++ ? ",\n" : "") "\047" tok "\047"
    }
    END {
      len = length(text); st = 1; s = node("ready"); n = 0; out = ""
      for (i = 1; i <= len; i++) {
        s = step(s, i)
        if (s == 0) { emit(substr(text, st, i - st + 1)); st = i + 1; s = node("ready") }
      }
      if (st <= len) emit(substr(text, st))
      print "ARRAY[" out "]::text[]"
    }
  ' "$1"
}

psql_ <<'SQL'
SET client_min_messages = warning;
BEGIN;
SELECT pg_advisory_xact_lock(hashtext('supabase_migrations.schema_migrations')) AS locked \gset
-- The Supabase CLI's own DDL for its history table (pkg/migration/history.go), so
-- whichever tool comes first creates the same table (columns version, statements, name).
CREATE SCHEMA IF NOT EXISTS supabase_migrations;
CREATE TABLE IF NOT EXISTS supabase_migrations.schema_migrations (version text NOT NULL PRIMARY KEY);
ALTER TABLE supabase_migrations.schema_migrations ADD COLUMN IF NOT EXISTS statements text[];
ALTER TABLE supabase_migrations.schema_migrations ADD COLUMN IF NOT EXISTS name text;
COMMIT;
SQL

applied=$(psql_ -At -c 'SELECT version FROM supabase_migrations.schema_migrations')
count=0
# Byte order of file names, as the CLI reads the directory (Go's os.ReadDir), whatever
# the locale's collation.
mapfile -t files < <(find -L "$dir" -mindepth 1 -maxdepth 1 -name '*.sql' ! -type d -printf '%f\n' | LC_ALL=C sort)
for file in "${files[@]}"; do
  f=$dir/$file
  base=${file%.sql}
  # The CLI's pattern ^([0-9]+)_(.*)\.sql$. It skips other files with a warning; the
  # runner refuses them, so a misnamed migration is never silently left out.
  if [[ ! $base =~ ^([0-9]+)_(.*)$ ]]; then
    echo "migrate: $f: name must be <digits>_<name>.sql" >&2; exit 2
  fi
  version=${BASH_REMATCH[1]}; name=${BASH_REMATCH[2]}
  grep -qxF -- "$version" <<<"$applied" && continue
  stmts=$(split_statements "$f")
  # One transaction: lock, re-check (another runner may have applied it meanwhile),
  # apply the file, record it. ON_ERROR_STOP makes psql exit 3 on the first error;
  # the open transaction then dies with the connection, so nothing of the file stays.
  # The file's statements wait at most lock_timeout for a lock (the runners' own
  # advisory lock before it is not limited); VERBOSITY=verbose puts the SQLSTATE in
  # the error, which tells a lock not got (55P03: try again) from a failing file.
  try=1
  until out=$(psql_ -v VERBOSITY=verbose -v version="$version" -v name="$name" -v file="$f" 2>&1 <<SQL
BEGIN;
SELECT pg_advisory_xact_lock(hashtext('supabase_migrations.schema_migrations')) AS locked \gset
SET LOCAL lock_timeout = $lock_timeout_ms;
SELECT EXISTS (SELECT 1 FROM supabase_migrations.schema_migrations WHERE version = :'version') AS already \gset
\if :already
ROLLBACK;
\else
\i :file
INSERT INTO supabase_migrations.schema_migrations (version, name, statements)
VALUES (:'version', :'name', $stmts);
COMMIT;
\echo applied
\endif
SQL
  ); do
    # The C source's place of each message means nothing here.
    out=$(grep -v '^LOCATION:  ' <<<"$out" || true)
    if ! grep -q 'ERROR:  55P03: ' <<<"$out"; then
      printf '%s\n' "$out" >&2
      echo "migrate: $file failed; nothing of it was applied" >&2
      exit 1
    fi
    if [ "$try" -ge "$lock_tries" ]; then
      printf '%s\n' "$out" >&2
      echo "migrate: $file could not get a lock it needs within ${lock_timeout_ms} ms, $lock_tries times:" \
           "another transaction holds it (pg_stat_activity, pg_locks say which); nothing of it was" \
           "applied; run migrate.sh again" >&2
      exit 1
    fi
    echo "migrate: $file waited ${lock_timeout_ms} ms for a lock (try $try of $lock_tries);" \
         "nothing of it applied; again in ${lock_pause_s} s" >&2
    sleep "$lock_pause_s"
    try=$((try + 1))
  done
  out=$(grep -v '^LOCATION:  ' <<<"$out" || true)
  # Notices and warnings from the file go to stderr, as psql would show them.
  grep -v '^applied$' <<<"$out" >&2 || true
  if grep -qx applied <<<"$out"; then
    echo "migrate: applied $(basename "$f")"
    count=$((count + 1))
  fi
done
echo "migrate: $count applied"
