#!/usr/bin/env bash
# `make fuzz`: libFuzzer harnesses tests/fuzz/fuzz_<name>.c (clang, ASan + UBSan).
#
# For each harness: build it; replay every input kept in tests/fuzz/regressions/<name>/
# (a crash found once is a test forever); then fuzz for FUZZ_SECONDS (default 30)
# from the seed corpus tests/fuzz/corpus/<name>/ plus the corpus grown by earlier
# runs (build/fuzz/corpus-<name>/). A crash, leak, timeout or out-of-memory fails
# the run and its input is kept under tests/fuzz/regressions/<name>/ (commit it).
#
# A harness names the code under test on a "fuzz-targets:" line: those files (and
# the harness) get coverage instrumentation; the rest of lib/ is linked in with
# the sanitizers only. So "cov: N/M edges" counts edges of the targets alone
# (a harness without the line gets all of lib/ instrumented).
# Figures (executions, coverage) are printed and written to build/fuzz/summary.txt.
#
#   FUZZ_SECONDS=300 scripts/fuzz.sh            longer run
#   scripts/fuzz.sh stripe jwt                  only these harnesses
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-30}
out=build/fuzz
CC=${FUZZ_CC:-clang}
mkdir -p "$out/plain"
command -v "$CC" >/dev/null || { echo "fuzz: $CC not found (make deps installs clang)" >&2; exit 2; }

PKGS="libcjson libcurl libpq openssl"
BASE=(-g -O1 -std=c11 -D_GNU_SOURCE -Ilib $(pkg-config --cflags $PKGS) -fno-omit-frame-pointer)
SAN=(-fsanitize=address,undefined -fno-sanitize-recover=all)
LIBS=(-lfcgi $(pkg-config --libs $PKGS) -lm)

# lib/ with the sanitizers but without coverage, built once per run.
plain_lib() {
  local f o
  for f in lib/*.c; do
    o=$out/plain/$(basename "$f" .c).o
    "$CC" "${BASE[@]}" "${SAN[@]}" -c "$f" -o "$o" || return 1
  done
}

# build NAME SRC -> $out/fuzz_NAME
build() {
  local name=$1 src=$2 targets f objs=() extra_inc=()
  targets=$(sed -n 's/.*fuzz-targets: *//; s/ *[*]\/.*//p' "$src" | head -1)
  # No fuzz-targets: line: all of lib/ is instrumented (coverage then counts it all).
  [ -n "$targets" ] || targets=$(echo lib/*.c)
  for f in $targets; do
    [ -f "$f" ] || { echo "fuzz: $src names missing $f" >&2; return 1; }
    extra_inc+=(-I"$(dirname "$f")")
  done
  for f in lib/*.c; do
    [[ " $targets " == *" $f "* ]] || objs+=("$out/plain/$(basename "$f" .c).o")
  done
  "$CC" "${BASE[@]}" "${extra_inc[@]}" "${SAN[@]}" -fsanitize=fuzzer \
    "$src" $targets "${objs[@]}" "${LIBS[@]}" -o "$out/fuzz_$name"
}

if ! plain_lib; then echo "fuzz: lib/ does not build with $CC" >&2; exit 1; fi

only=" $* "
failed=0; passed=0
: > "$out/summary.txt"
for src in tests/fuzz/fuzz_*.c; do
  name=$(basename "$src" .c); name=${name#fuzz_}
  [ $# -eq 0 ] || [[ $only == *" $name "* ]] || continue
  bin=$out/fuzz_$name
  if ! build "$name" "$src"; then
    echo "fuzz: $name does not build" >&2; failed=$((failed + 1)); continue
  fi

  # 1. Every kept regression input must now pass.
  reg=tests/fuzz/regressions/$name; mkdir -p "$reg"
  mapfile -t kept < <(find "$reg" -maxdepth 1 -type f ! -name '.*' | sort)
  if [ ${#kept[@]} -gt 0 ] && ! "$bin" -runs=1 -timeout=5 -rss_limit_mb=1024 "${kept[@]}" \
        >"$out/$name.replay.log" 2>&1; then
    echo "fuzz: $name FAILS on a kept regression input ($reg):" >&2
    tail -30 "$out/$name.replay.log" >&2
    failed=$((failed + 1)); continue
  fi

  # 2. Fuzz from the seeds and the corpus grown so far.
  work=$out/corpus-$name; mkdir -p "$work"
  seeds=tests/fuzz/corpus/$name; [ -d "$seeds" ] || { echo "fuzz: no seed corpus $seeds" >&2; failed=$((failed + 1)); continue; }
  before=$(find "$reg" -maxdepth 1 -type f | wc -l)
  "$bin" -max_total_time="$secs" -max_len=16384 -timeout=5 -rss_limit_mb=1024 \
      -artifact_prefix="$reg/" -print_final_stats=1 "$work" "$seeds" >"$out/$name.log" 2>&1
  rc=$?
  after=$(find "$reg" -maxdepth 1 -type f | wc -l)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$name.log" | awk '{s+=$1} END {print s+0}')
  cov=$(grep -Eo 'cov: [0-9]+' "$out/$name.log" | tail -1 | grep -Eo '[0-9]+')
  ft=$(grep -Eo 'ft: [0-9]+' "$out/$name.log" | tail -1 | grep -Eo '[0-9]+')
  total=$(grep -Eo 'Loaded [0-9]+ modules +\([0-9]+ inline 8-bit counters' "$out/$name.log" | head -1 \
          | grep -Eo '\([0-9]+' | tr -d '(')
  corpus=$(find "$work" -type f | wc -l)
  pct=$(awk -v c="${cov:-0}" -v t="${total:-0}" 'BEGIN { if (t > 0) printf "%.1f", 100 * c / t; else print "?" }')
  line="fuzz: $name: $runs executions in ${secs}s, cov $cov/$total edges ($pct%), ft $ft, corpus $corpus"
  if [ $rc -eq 0 ] && [ "$after" -eq "$before" ]; then
    echo "$line"; echo "$line" >> "$out/summary.txt"
    passed=$((passed + 1))
  else
    echo "$line: CRASHED; input kept in $reg/ (replayed from now on):" >&2
    grep -E '^(==[0-9]+==ERROR|SUMMARY|.*runtime error)' "$out/$name.log" | head -5 >&2
    tail -15 "$out/$name.log" >&2
    echo "$line CRASHED" >> "$out/summary.txt"
    failed=$((failed + 1))
  fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
