#!/usr/bin/env bash
# `make fuzz`: builds each libFuzzer harness in tests/fuzz (clang, ASan + UBSan),
# replays the kept regression inputs, then fuzzes each for FUZZ_SECONDS (default 30)
# from its seed corpus. A crash fails the run and its input is kept under
# tests/fuzz/regressions/<harness>/ so it is replayed from then on.
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-30}
out=build/fuzz; mkdir -p "$out"
CFLAGS=(-g -O1 -std=c11 -D_GNU_SOURCE -Ilib $(pkg-config --cflags libcjson libcurl libpq openssl)
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all)
LIBS=(-lfcgi $(pkg-config --libs libcjson libcurl libpq openssl) -lm)
failed=0; passed=0
for src in tests/fuzz/fuzz_*.c; do
  name=$(basename "$src" .c); short=${name#fuzz_}
  if ! clang "${CFLAGS[@]}" "$src" lib/*.c "${LIBS[@]}" -o "$out/$name"; then
    echo "fuzz: $name does not build" >&2; failed=$((failed + 1)); continue
  fi
  reg=tests/fuzz/regressions/$short; mkdir -p "$reg"
  if [ -n "$(ls -A "$reg")" ] && ! "$out/$name" "$reg"/* >"$out/$name.replay.log" 2>&1; then
    echo "fuzz: $name fails on a kept regression input:" >&2; tail -20 "$out/$name.replay.log" >&2
    failed=$((failed + 1)); continue
  fi
  work=$out/corpus-$short; mkdir -p "$work"
  if "$out/$name" -max_total_time="$secs" -max_len=8192 -timeout=5 -rss_limit_mb=1024 \
        -artifact_prefix="$reg/" -print_final_stats=1 "$work" "tests/fuzz/corpus/$short" \
        >"$out/$name.log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$name.log")
    cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$out/$name.log" | tail -1)
    echo "fuzz: $name ok: $runs executions in ${secs}s, $cov"
    passed=$((passed + 1))
  else
    echo "fuzz: $name CRASHED; input kept in $reg:" >&2; tail -30 "$out/$name.log" >&2
    failed=$((failed + 1))
  fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
