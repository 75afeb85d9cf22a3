#!/usr/bin/env bash
# Runs every unit test binary of the release build under valgrind memcheck and
# fails on any memory error or leak (`make valgrind` builds them first).
# Sanitizer builds cannot run under valgrind, hence build/release.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${MR_BUILD:-build/release}
failed=0; ran=0
for t in "$build"/tests/test_*; do
  [ -x "$t" ] || continue
  ran=$((ran + 1))
  log=$(mktemp)
  if valgrind --quiet --error-exitcode=99 --leak-check=full --show-leak-kinds=definite,indirect,possible \
       --errors-for-leak-kinds=definite,indirect,possible --track-origins=yes "$t" >"$log" 2>&1; then
    echo "valgrind: ok   $(basename "$t")"
  else
    echo "valgrind: FAIL $(basename "$t")"; cat "$log"; failed=$((failed + 1))
  fi
  rm -f "$log"
done
[ "$ran" -gt 0 ] || { echo "valgrind: no test binaries in $build/tests" >&2; exit 1; }
echo "valgrind: $ran binaries, $failed failed"
[ "$failed" -eq 0 ]
