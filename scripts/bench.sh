#!/usr/bin/env bash
# `make bench`: starts a throwaway stack (release build, PostgreSQL with fsync
# on, nginx on free ports) and runs the benchmark sections against it.
#
#   scripts/bench.sh [section...]      default: every section in SECTIONS
#
# Adding a section: write `bench_<name>() { ... }` below and append <name> to
# SECTIONS. A section sees the stack through these variables (tests/bench/stack.py):
#   BENCH_API           http://127.0.0.1:<port> (public listener; /functions/v1/<name>)
#   BENCH_PROVISIONER   the provisioner listener
#   BENCH_DB            superuser conninfo of the stack's database (psql "$BENCH_DB")
#   BENCH_RUN           the run directory (sockets, logs in $BENCH_RUN/log)
#   BENCH_PID_<fn>      master pid of each function (dashes as underscores), and nginx's
#   SERVICE_TOKEN       a service_role JWT; SUPABASE_JWT_SECRET, STRIPE_WEBHOOK_SECRET,
#                       DOKKU_PROVISIONER_TOKEN, MR_WORKERS as the functions have them
# and these helpers: wrk_run LABEL URL [wrk args] (prints one table row and sets
# WRK_RPS, WRK_P50, WRK_P99; CPU per request of nginx and of WRK_PIDS=<pids>),
# workers_of FUNCTION, mem_table (RSS and PSS of every worker).
# Knobs: BENCH_DURATION (s, default 10), BENCH_CONNECTIONS (default 32),
# BENCH_THREADS (default 2), MR_WORKERS (default: cores).
set -euo pipefail
cd "$(dirname "$0")/.."
SECTIONS=(runtime webhook events provision lifecycle health usage)
DURATION=${BENCH_DURATION:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-32}
THREADS=${BENCH_THREADS:-2}
export MR_BUILD=${MR_BUILD:-build/release}
# Debian's python3 has python3-psycopg2 (deps.sh); a pyenv/venv python3 first
# on PATH usually does not.
PY=python3; [ -x /usr/bin/python3 ] && PY=/usr/bin/python3

command -v wrk >/dev/null || { echo "bench: wrk not found (make deps)" >&2; exit 1; }
[ -x "$MR_BUILD/bin/noop" ] || { echo "bench: $MR_BUILD/bin/noop missing (make build)" >&2; exit 1; }

tmp=$(mktemp -d /tmp/mr-bench.XXXXXX)
stack_pid=
cleanup() {
  if [ -n "$stack_pid" ] && kill -0 "$stack_pid" 2>/dev/null; then
    kill -TERM "$stack_pid"; wait "$stack_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# ---- helpers ---------------------------------------------------------------

# cpu_stat PIDS OUTFILE: task-clock of PIDS for DURATION seconds, in the background.
cpu_stat() {
  perf stat -x, -e task-clock -p "$1" -- sleep "$DURATION" 2>"$2" &
}

# wrk_run LABEL URL [extra wrk args...]: one row "label  req/s  p50  p99  cpu/req".
# With perf available, also the CPU nginx's workers and (WRK_PIDS, comma-separated)
# the function's workers spent per request (task-clock / requests): unlike
# requests/s, it hardly depends on what else the machine is doing.
wrk_run() {
  local label=$1 url=$2; shift 2
  local out reqs ncpu="" wcpu="" pids=() f
  if command -v perf >/dev/null; then
    cpu_stat "$(workers_of nginx)" "$tmp/perf.nginx"; pids+=($!)
    if [ -n "${WRK_PIDS:-}" ]; then cpu_stat "$WRK_PIDS" "$tmp/perf.workers"; pids+=($!); fi
  fi
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$@" "$url")
  WRK_RPS=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  WRK_P50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  WRK_P99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  for f in "${pids[@]}"; do wait "$f" || true; done
  per_req() { awk -F, -v n="$reqs" '/task-clock/ && n > 0 {printf "%.1f us", $1 * 1000 / n}' "$1" 2>/dev/null; }
  if [ ${#pids[@]} -gt 0 ]; then
    ncpu=$(per_req "$tmp/perf.nginx")
    [ -n "${WRK_PIDS:-}" ] && wcpu=$(per_req "$tmp/perf.workers")
    rm -f "$tmp"/perf.*
  fi
  local errs non2xx
  errs=$(awk '/Socket errors/ {print $0}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  printf '%-38s %11s %9s %9s %10s %10s   %s\n' "$label" "$WRK_RPS" "$WRK_P50" "$WRK_P99" "$ncpu" "$wcpu" \
    "${non2xx:+non-2xx: $non2xx }${errs}"
}

wrk_header() {
  printf '%-38s %11s %9s %9s %10s %10s\n' "what (wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s)" "requests/s" "p50" "p99" "nginx CPU" "fn CPU"
  echo "(CPU columns: per request, from perf stat task-clock of nginx's and the function's workers)"
}

# workers_of FUNCTION: its worker pids, comma-separated.
workers_of() {
  local var=BENCH_PID_${1//-/_}
  local master=${!var}
  tr -s ' ' '\n' < "/proc/$master/task/$master/children" | grep . | paste -sd, -
}

kib() { awk -v k="$1" 'BEGIN { printf "%.2f MiB", k / 1024 }'; }

# mem_table: RSS and PSS of each function's workers (PSS splits shared library
# pages fairly among the processes that map them: the honest per-worker cost).
mem_table() {
  printf '%-24s %8s %12s %12s\n' function worker RSS PSS
  local fn var master w rss pss maxpss=0
  for fn in $BENCH_FUNCTIONS; do
    var=BENCH_PID_${fn//-/_}
    master=${!var}
    for w in $(cat "/proc/$master/task/$master/children" 2>/dev/null); do
      rss=$(awk '/^Rss:/ {print $2}' "/proc/$w/smaps_rollup")
      pss=$(awk '/^Pss:/ {print $2}' "/proc/$w/smaps_rollup")
      printf '%-24s %8s %12s %12s\n' "$fn" "$w" "$(kib "$rss")" "$(kib "$pss")"
      [ "$pss" -gt "$maxpss" ] && maxpss=$pss
    done
  done
  MEM_MAX_PSS_KIB=$maxpss
  echo "largest worker PSS: $(kib "$maxpss") (target < 6 MiB)"
}

# ---- sections --------------------------------------------------------------

# nginx's own `return 200` against the noop function behind the same nginx, with
# a bare libfcgi responder (no libmindroom, libfcgi's own draining close) as the reference.
bench_runtime() {
  echo "== runtime: nginx alone vs a no-op libmindroom function ($MR_WORKERS workers)"
  curl -sf "$BENCH_API/bench/noop" >/dev/null || { echo "bench: /bench/noop does not answer" >&2; return 1; }
  wrk_header
  wrk_run "nginx return 200 (/bench/static)" "$BENCH_API/bench/static"
  WRK_PIDS=$(workers_of bare) wrk_run "bare libfcgi responder (/bench/bare)" "$BENCH_API/bench/bare"
  WRK_PIDS=$(workers_of noop) wrk_run "noop function (/bench/noop)" "$BENCH_API/bench/noop"
  local rps=${WRK_RPS%.*}
  # Memory as a working worker has it: with its PostgreSQL connection open
  # (two slow requests at once, so each noop worker opens one).
  local i curls=()
  for i in 1 2 3 4; do curl -sf "$BENCH_API/bench/noop?sleep_ms=300" >/dev/null & curls+=($!); done
  wait "${curls[@]}"
  echo
  mem_table
  echo
  local ok=1
  [ "$rps" -ge 15000 ] || { echo "runtime: $rps requests/s through the function is under the 15,000 target"; ok=0; }
  [ "$MEM_MAX_PSS_KIB" -lt 6144 ] || { echo "runtime: a worker's PSS is over 6 MiB"; ok=0; }
  [ $ok -eq 1 ] && echo "runtime: targets met (>= 15,000 requests/s, < 6 MiB PSS per worker)"
  return 0
}

# A health round (select, concurrent probes, record) over N running instances on
# the loopback health stand-in, 10 % hanging: timed as an operator's call to
# check-instance-health through nginx and as the lifecycle worker's periodic round.
# Runs its own stack (the probes need HEALTH_ALLOW_LOOPBACK=1); the bar: 1,000
# instances within the probe deadline + 1 s. Knob: BENCH_HEALTH_ARGS (see
# scripts/bench/health_bench.py --help), e.g. "--sizes 1000 --concurrency 1024".
bench_health() {
  echo "== health: one probe round (call and worker), 10 % of instances hanging"
  # shellcheck disable=SC2086
  MR_BUILD=$MR_BUILD "$PY" scripts/bench/health_bench.py ${BENCH_HEALTH_ARGS:-}
}

# handle-stripe-webhook's event cost. Runs on its own stack in the configuration
# `make run` runs (scripts/bench/webhook_bench.py): pgbench of the minimal webhook
# transaction (scripts/bench/baseline.sql) as the baseline, then wrk with pre-signed
# events: Stripe's sign-up stream, new subscriptions only, each paced at half its
# peak, duplicates against the noop function; worker PSS. Writes
# build/bench/webhook.json and a row into docs/benchmarks.md.
bench_webhook() {
  echo "== webhook: signed Stripe events through nginx vs pgbench of the minimal transaction"
  BENCH_SECONDS=$DURATION BENCH_CONNS=${BENCH_WEBHOOK_CONNECTIONS:-16} \
    "$PY" scripts/bench/webhook_bench.py
}

# What each event type of a sign-up costs PostgreSQL, in one backend with nothing
# else running, beside an empty transaction and the webhook section's minimal one
# (scripts/bench/event_cost_bench.py, fsync on): the SQL alone, where a change of
# about 5% shows in a few alternating runs. Writes build/bench/events.json.
bench_events() {
  echo "== events: PostgreSQL CPU per Stripe event, by type, one backend"
  "$PY" scripts/bench/event_cost_bench.py
}

# The lifecycle under the configuration `make run` runs (every function, the
# worker, the dry-run provisioner), on its own stack (scripts/bench/lifecycle_bench.py):
# new subscriptions with the provisioner healthy and hanging (>= 90%), one webhook
# worker paced at ~100/s while it hangs (p99 <= 10 ms), the catch-up, the claim
# with BENCH_SCALE (100,000) instances (< 5 ms, index access only), a resume on
# that database (< 5 s), and the claim after a burst of 10,000 owed arrived
# since its plans were made (< 5 ms). Writes build/bench/lifecycle.json.
bench_lifecycle() {
  echo "== lifecycle: Stripe's deliveries never wait on provisioning; claims at scale"
  BENCH_SECONDS=$DURATION "$PY" scripts/bench/lifecycle_bench.py
}

# What creating an instance costs the lifecycle worker, the provisioner (dry-run),
# nginx and PostgreSQL, per instance, with 3,000 owed creates and the worker alone
# (docs/benchmarks.md, Webhook event cost).
bench_provision() {
  echo "== provision: CPU per created instance, by part"
  "$PY" scripts/bench/provision_bench.py
}

# track-usage: 100 instances' tokens round-robin through nginx vs pgbench calling
# public.track_usage directly for the same 100 instances, on its own stack
# (scripts/bench/usage_bench.py, fsync on). The bar: >= 50% of pgbench's rate.
# Writes build/bench/usage.json.
bench_usage() {
  echo "== usage: instances' reports through track-usage vs pgbench of track_usage"
  BENCH_SECONDS=$DURATION BENCH_CONNS=${BENCH_USAGE_CONNECTIONS:-8} \
    BENCH_WORKERS=${BENCH_USAGE_WORKERS:-8} "$PY" scripts/bench/usage_bench.py
}

# ---- main ------------------------------------------------------------------

echo "bench: starting a stack ($MR_BUILD)..." >&2
"$PY" tests/bench/stack.py "$tmp/stack.env" &
stack_pid=$!
for _ in $(seq 600); do
  [ -f "$tmp/stack.env" ] && break
  kill -0 "$stack_pid" 2>/dev/null || { echo "bench: the stack failed to start" >&2; exit 1; }
  sleep 0.1
done
[ -f "$tmp/stack.env" ] || { echo "bench: the stack did not start in 60 s" >&2; exit 1; }
# shellcheck disable=SC1091
. "$tmp/stack.env"
echo "bench: $(nproc) cores, $(uname -r), nginx $(nginx -v 2>&1 | sed 's/.*\///'), $(date -u +%FT%TZ)"

sections=("$@"); [ ${#sections[@]} -eq 0 ] && sections=("${SECTIONS[@]}")
for s in "${sections[@]}"; do
  declare -F "bench_$s" >/dev/null || { echo "bench: no section $s" >&2; exit 2; }
done
# Every section runs, whatever the one before found: a missed target is reported
# at the end and is the exit status, it does not hide the sections after it. Each
# runs in a subshell with -e of its own (a function called as `f || ...` would run
# with -e off).
missed=()
for s in "${sections[@]}"; do
  echo
  set +e
  ( set -e; "bench_$s" )
  rc=$?
  set -e
  [ "$rc" -eq 0 ] || missed+=("$s")
done
if [ ${#missed[@]} -gt 0 ]; then
  echo
  echo "bench: targets missed or a run failed in: ${missed[*]}" >&2
  exit 1
fi
