#!/usr/bin/env bash
# Runs every suite against the sanitizer build and ends with one summary line
# "N passed, N failed". Called by `make test` (which builds first).
#   scripts/test.sh [unit] [sql] [integration] [pooler]   (default: all of them)
set -uo pipefail
cd "$(dirname "$0")/.."
export MR_BUILD=${MR_BUILD:-build/san}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
suites=("$@"); [ ${#suites[@]} -eq 0 ] && suites=(unit sql integration pooler k3s)
passed=0; failed=0
add() { passed=$((passed + $1)); failed=$((failed + $2)); }
log=$(mktemp -d); trap 'rm -rf "$log"' EXIT

run_unit() {
  local t out p f
  for t in "$MR_BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    out="$log/$(basename "$t").out"
    "$t" >"$out" 2>&1; local rc=$?
    cat "$out"
    p=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$out" | tail -1)
    f=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$out" | tail -1)
    if [ -z "$p$f" ] || { [ $rc -ne 0 ] && [ "${f:-0}" -eq 0 ]; }; then
      echo "unit: $t exited $rc without a cmocka summary (crash or sanitizer report)" >&2; f=$(( ${f:-0} + 1 ))
    fi
    add "${p:-0}" "${f:-0}"
  done
}

run_sql() {
  local dir conn out
  dir=$(mktemp -d /tmp/mr-sqltest.XXXXXX)
  conn=$(PG_FSYNC=off scripts/pg.sh init "$dir") || { add 0 1; return; }
  if scripts/migrate.sh "$conn" && psql "$conn" -X -q -v ON_ERROR_STOP=1 -f sql/seed.sql >/dev/null; then
    psql "$conn" -X -q -c 'CREATE EXTENSION IF NOT EXISTS pgtap' >/dev/null
    out="$log/pgtap.out"
    # From supabase/tests (a link to tests/sql), where `supabase test db` looks for them.
    # shellcheck disable=SC2046
    PGHOST=$dir PGDATABASE=mindroom PGUSER=postgres pg_prove --ext .sql -r supabase/tests/ 2>&1 | tee "$out"
    local total fails
    total=$(sed -n 's/.*Tests=\([0-9]*\).*/\1/p' "$out" | tail -1)
    fails=$(grep -Eo 'Failed [0-9]+/[0-9]+ subtests' "$out" | awk '{split($2,a,"/"); s+=a[1]} END {print s+0}')
    if grep -q '^Result: PASS' "$out"; then add "${total:-0}" 0
    else add $(( ${total:-0} - fails )) $(( fails > 0 ? fails : 1 )); fi
  else
    echo "sql: migrations or seed failed" >&2; add 0 1
  fi
  scripts/pg.sh stop "$dir"; rm -rf "$dir"
}

run_pytest() {
  local name=$1 out; shift
  [ -e "$1" ] || return 0
  out="$log/$name.out"
  "${PYTHON:-/usr/bin/python3}" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$out"
  local p f e
  p=$(grep -Eo '[0-9]+ passed' "$out" | tail -1 | awk '{print $1}')
  f=$(grep -Eo '[0-9]+ failed' "$out" | tail -1 | awk '{print $1}')
  e=$(grep -Eo '[0-9]+ error' "$out" | tail -1 | awk '{print $1}')
  [ -z "$p$f$e" ] && f=1
  add "${p:-0}" $(( ${f:-0} + ${e:-0} ))
}

for s in "${suites[@]}"; do
  echo "== $s"
  case "$s" in
    unit) run_unit ;;
    sql) run_sql ;;
    integration) run_pytest integration tests/integration ;;
    # The integration suite once more, the functions and the worker reaching
    # PostgreSQL through PgBouncer in transaction mode (as through Supavisor's
    # port 6543): no named statements, no session state, LISTEN on a direct URL.
    # Only the tests on the session cluster (conftest.py deselects the others).
    pooler) MR_TEST_POOLER=transaction run_pytest pooler tests/integration ;;
    # The provisioner's tests and the lifecycle suite once more against a k3s-mode
    # target: the provisioner with DOKKU_SCHEDULER=k3s (provisioner_helpers.py) and,
    # in every stack that runs the worker, its provisioner registered as a
    # provisioner target with scheduler k3s that the worker goes through (mr.py).
    k3s) MR_DOKKU_SCHEDULER=k3s MR_TEST_TARGET=k3s run_pytest k3s \
           tests/integration/test_provisioner*.py tests/integration/test_lifecycle.py \
           tests/integration/test_lifecycle_e2e.py tests/integration/test_lifecycle_webhook.py \
           tests/integration/test_instance_e2e.py tests/integration/test_tenant.py ;;
    *) echo "unknown suite $s" >&2; add 0 1 ;;
  esac
done
echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
