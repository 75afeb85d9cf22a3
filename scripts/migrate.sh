#!/usr/bin/env bash
# Applies pending migrations in file order, each file in its own transaction, and
# records them the way the Supabase CLI does, in
#   supabase_migrations.schema_migrations(version text primary key, name text, statements text[])
# version = the digits before the first underscore of the file name, name = the rest
# without .sql, statements = the file's SQL statements. A second run applies nothing.
# A failing file applies nothing of itself; the runner stops there and exits non-zero
# with PostgreSQL's error on stderr.
#
#   scripts/migrate.sh CONNINFO          (libpq conninfo or URL; default: $DATABASE_URL)
#   MR_MIGRATIONS_DIR=dir                 (default: sql/migrations next to this script)
#
# Concurrent runners are safe: each file's transaction takes an advisory lock and
# re-checks the table before applying.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
conn=${1:-${DATABASE_URL:-}}
[ -n "$conn" ] || { echo "usage: migrate.sh CONNINFO" >&2; exit 2; }
dir=${MR_MIGRATIONS_DIR:-$here/sql/migrations}
[ -d "$dir" ] || { echo "migrate: no directory $dir" >&2; exit 2; }

psql_() { psql "$conn" -X -q -v ON_ERROR_STOP=1 "$@"; }

# Splits SQL text into statements on top-level semicolons, honouring '...', E'...',
# "...", $tag$...$tag$, -- comments and /* */ comments (nested). Prints a SQL array
# literal expression ARRAY['stmt', ...]::text[] with each statement trimmed and without
# its semicolon; comment-only pieces are dropped.
split_statements() {
  awk '
    BEGIN { RS = "\001"; ORS = "" }
    function flush(   s, t) {
      s = cur; cur = ""
      t = s
      gsub(/^[ \t\r\n]+|[ \t\r\n]+$/, "", s)
      if (!hascode || s == "") { hascode = 0; return }
      hascode = 0
      gsub(/\047/, "\047\047", s)
      out = out (n++ ? ",\n" : "") "\047" s "\047"
    }
    {
      text = $0; len = length(text); i = 1; cur = ""; n = 0; out = ""; hascode = 0
      while (i <= len) {
        c = substr(text, i, 1); c2 = substr(text, i, 2)
        if (c2 == "--") {
          j = index(substr(text, i), "\n"); if (j == 0) j = len - i + 2
          cur = cur substr(text, i, j - 1); i += j - 1; continue
        }
        if (c2 == "/*") {
          depth = 1; cur = cur c2; i += 2
          while (i <= len && depth > 0) {
            c2 = substr(text, i, 2)
            if (c2 == "/*") { depth++; cur = cur c2; i += 2 }
            else if (c2 == "*/") { depth--; cur = cur c2; i += 2 }
            else { cur = cur substr(text, i, 1); i++ }
          }
          continue
        }
        if (c == "\047" || c == "\"") {
          q = c; esc = (c == "\047" && i > 1 && substr(text, i - 1, 1) ~ /[eE]/ && (i == 2 || substr(text, i - 2, 1) !~ /[A-Za-z0-9_]/))
          cur = cur c; i++; hascode = 1
          while (i <= len) {
            c = substr(text, i, 1)
            if (esc && c == "\\") { cur = cur substr(text, i, 2); i += 2; continue }
            cur = cur c; i++
            if (c == q) { if (substr(text, i, 1) == q) { cur = cur q; i++ } else break }
          }
          continue
        }
        if (c == "$" && match(substr(text, i), /^\$([A-Za-z_][A-Za-z0-9_]*)?\$/) &&
            (i == 1 || substr(text, i - 1, 1) !~ /[A-Za-z0-9_]/)) {
          tag = substr(text, i, RLENGTH); cur = cur tag; i += RLENGTH; hascode = 1
          j = index(substr(text, i), tag)
          if (j == 0) { cur = cur substr(text, i); i = len + 1; continue }
          cur = cur substr(text, i, j - 1 + length(tag)); i += j - 1 + length(tag); continue
        }
        if (c == ";") { flush(); i++; continue }
        if (c !~ /[ \t\r\n]/) hascode = 1
        cur = cur c; i++
      }
      flush()
      print "ARRAY[" out "]::text[]"
    }
  ' "$1"
}

psql_ <<'SQL'
SET client_min_messages = warning;
BEGIN;
SELECT pg_advisory_xact_lock(hashtext('supabase_migrations.schema_migrations')) AS locked \gset
CREATE SCHEMA IF NOT EXISTS supabase_migrations;
CREATE TABLE IF NOT EXISTS supabase_migrations.schema_migrations (
    version    text PRIMARY KEY,
    name       text,
    statements text[]
);
COMMIT;
SQL

applied=$(psql_ -At -c 'SELECT version FROM supabase_migrations.schema_migrations')
count=0
shopt -s nullglob
for f in "$dir"/*.sql; do
  base=$(basename "$f" .sql)
  if [[ ! $base =~ ^([0-9]+)_(.+)$ ]]; then
    echo "migrate: $f: name must be <digits>_<name>.sql" >&2; exit 2
  fi
  version=${BASH_REMATCH[1]}; name=${BASH_REMATCH[2]}
  grep -qxF -- "$version" <<<"$applied" && continue
  stmts=$(split_statements "$f")
  # One transaction: lock, re-check (another runner may have applied it meanwhile),
  # apply the file, record it. ON_ERROR_STOP makes psql exit 3 on the first error;
  # the open transaction then dies with the connection, so nothing of the file stays.
  if ! out=$(psql "$conn" -X -q -v ON_ERROR_STOP=1 -v version="$version" -v name="$name" \
        -v file="$f" 2>&1 <<SQL
BEGIN;
SELECT pg_advisory_xact_lock(hashtext('supabase_migrations.schema_migrations')) AS locked \gset
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
  ); then
    printf '%s\n' "$out" >&2
    echo "migrate: $(basename "$f") failed; nothing of it was applied" >&2
    exit 1
  fi
  # Notices and warnings from the file go to stderr, as psql would show them.
  grep -v '^applied$' <<<"$out" >&2 || true
  if grep -qx applied <<<"$out"; then
    echo "migrate: applied $(basename "$f")"
    count=$((count + 1))
  fi
done
echo "migrate: $count applied"
