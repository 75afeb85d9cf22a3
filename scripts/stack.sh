#!/usr/bin/env bash
# The local stack, as `make run` / `make stop` use it.
#
#   scripts/stack.sh run    foreground: PostgreSQL (.run/pg, TCP 127.0.0.1:54322,
#                           data kept across runs), migrations + seed, every function
#                           binary in $MR_BUILD/bin (default build/release/bin) on unix
#                           sockets in .run/sock, nginx on 127.0.0.1:54321 (API) and
#                           127.0.0.1:8002 (provisioner) and 127.0.0.1:8003
#                           (mindroom-admin: /live, /ready, /metrics), the lifecycle
#                           worker (owed work, the health round, the Stripe sweep).
#                           Ctrl-C stops it.
#   scripts/stack.sh stop   stops a running stack from another terminal.
#
# Configuration: embedded local defaults; secrets are generated once into
# .run/secrets.env and reused; a .env file overrides any of them (.env.example).
# PostgreSQL: peer on its socket, scram on TCP with MR_PG_PASSWORD (secrets.env; also
# written to .run/pgpass for psql's PGPASSFILE). No secret is ever a command argument.
# Logs: .run/log/<name>.log (JSON lines), nginx's in .run/log/nginx.*.log.
# Tests run it elsewhere with MR_RUN_DIR (instead of .run) and MR_ENV_FILE (instead of .env).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=${MR_RUN_DIR:-$ROOT/.run}   # another directory only for tests
FUNCTIONS=(handle-stripe-webhook provision-instance deprovision-instance check-instance-health dokku-provisioner
           create-checkout-session create-portal-session list-plans track-usage my-instance
           mindroom-admin)
DAEMONS=(mindroom-lifecycle)

die() { echo "stack: $*" >&2; exit 1; }
# shellcheck source=scripts/load-env.sh
. "$ROOT/scripts/load-env.sh"
say() { echo "stack: $*" >&2; }

# A short-lived service token signed with MINDROOM_INTERNAL_SECRET (accepted
# in every SUPABASE_AUTH_MODE), by mr-jwt from the build being run.
mint_jwt() { # role exp_in_seconds
  "$BIN/mr-jwt" --role "$1" --exp "$2"
}

load_config() {
  mkdir -p "$RUN"
  # Local secrets: each generated on the first run that lacks it, reused after
  # (tokens stay valid across restarts).
  local name value
  for name in SUPABASE_JWT_SECRET MINDROOM_INTERNAL_SECRET STRIPE_WEBHOOK_SECRET DOKKU_PROVISIONER_TOKEN \
              MINDROOM_SECRETS_KEY MR_PG_PASSWORD; do
    grep -q "^$name=" "$RUN/secrets.env" 2>/dev/null && continue
    value=$(openssl rand -hex 32)
    [ "$name" = STRIPE_WEBHOOK_SECRET ] && value=whsec_$(openssl rand -hex 24)
    [ "$name" = MINDROOM_SECRETS_KEY ] && value=$(openssl rand -base64 32)
    (umask 077; echo "$name=$value" >> "$RUN/secrets.env")
  done
  # Lowest precedence first: secrets.env, .env, then what was exported already
  # (mindroomctl loads them with the same load_env, in the same order).
  load_env "$RUN/secrets.env" "${MR_ENV_FILE:-$ROOT/.env}"
  set -a  # what follows reaches the processes too
  MR_BUILD=${MR_BUILD:-build/release}
  API_LISTEN=${MR_API_LISTEN:-127.0.0.1:54321}
  PROVISIONER_LISTEN=${MR_PROVISIONER_LISTEN:-127.0.0.1:8002}
  ADMIN_LISTEN=${MR_ADMIN_LISTEN:-127.0.0.1:8003}
  MR_METRICS_DIR=${MR_METRICS_DIR:-$RUN/metrics}
  PG_PORT=${MR_PG_PORT:-54322}
  SUPABASE_URL=${SUPABASE_URL:-http://$API_LISTEN}
  # Where instances report usage: this stack's nginx (an instance on this machine's
  # Dokku reaches it there).
  MINDROOM_CONTROL_PLANE_URL=${MINDROOM_CONTROL_PLANE_URL:-http://$API_LISTEN}
  DOKKU_PROVISIONER_URL=${DOKKU_PROVISIONER_URL:-http://$PROVISIONER_LISTEN}
  # Per-instance locks and applied-spec hashes: ours alone (the provisioner refuses
  # a directory another user owns or can write), never a shared /tmp path.
  PROVISIONER_STATE_DIR=${PROVISIONER_STATE_DIR:-$RUN/provisioner}
  # No dokku on this machine: the provisioner prints the commands it would run.
  if [ -z "${DOKKU_MODE:-}" ]; then
    if command -v dokku >/dev/null; then DOKKU_MODE=local; else DOKKU_MODE=dry-run; fi
  fi
  set +a
  # The database superuser's password is for pg.sh and psql, not the functions.
  export -n MR_PG_PASSWORD
}

# Running (a zombie waiting for its parent to reap it counts as gone).
pid_alive() {
  [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || return 1
  local st; st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$st" ] && [ "$st" != Z ]
}

# Starts "$@" in its own session (Ctrl-C reaches only this script, which then
# stops everything in order), output to .run/log/<name>.log, pid in .run/pids.
spawn() { # name cmd...
  local name=$1; shift
  setsid "$@" >>"$RUN/log/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/pids/$name.pid"
  PIDS[$name]=$!
}

stop_pid() { # name signal
  local pid=${PIDS[$1]:-}
  pid_alive "$pid" || return 0
  kill -"$2" "$pid" 2>/dev/null || true
}

wait_gone() { # timeout_s name... (each name's pid in PIDS)
  local limit=$1 deadline=$((SECONDS + $1)) n p; shift
  for n in "$@"; do
    p=${PIDS[$n]:-}
    while pid_alive "$p" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    if pid_alive "$p"; then
      say "$n did not stop within $limit s of the signal; killed (see .run/log/$n.log)"
      kill -KILL -- -"$p" 2>/dev/null
    fi
  done
  true
}

STOPPING=0
shutdown() {
  [ $STOPPING -eq 1 ] && return; STOPPING=1
  trap '' INT TERM
  echo; say "stopping"
  # The worker first (it finishes or gives back its claims), then nginx (no new
  # requests), then the functions drain what they have in flight.
  local n
  for n in "${DAEMONS[@]}"; do stop_pid "$n" TERM; done
  stop_pid nginx QUIT
  for n in "${FUNCTIONS[@]}"; do stop_pid "$n" TERM; done
  wait_gone 60 nginx "${DAEMONS[@]}" "${FUNCTIONS[@]}"
  scripts/pg.sh stop "$RUN/pg"
  rm -rf "$RUN/pids" "$RUN/sock" "$RUN/stack.pid"
  say "stopped"
}

cmd_run() {
  load_config
  if [ -f "$RUN/stack.pid" ] && pid_alive "$(cat "$RUN/stack.pid")"; then
    die "already running (pid $(cat "$RUN/stack.pid")); scripts/stack.sh stop"
  fi
  command -v nginx >/dev/null || die "nginx not found (make deps)"
  BIN=$MR_BUILD/bin
  [[ $BIN == /* ]] || BIN=$ROOT/$BIN
  [ -d "$BIN" ] || die "no binaries in $BIN (make build)"
  [ -x "$BIN/mr-jwt" ] || die "no mr-jwt in $BIN (make build)"
  rm -rf "$RUN/sock" "$RUN/pids" "$RUN/nginx"
  mkdir -p "$RUN/log" "$RUN/sock" "$RUN/pids" "$RUN/nginx" "$RUN/conf.d"
  mkdir -p -m 0750 "$MR_METRICS_DIR"
  echo $$ > "$RUN/stack.pid"
  declare -gA PIDS=()
  trap shutdown EXIT
  # Ctrl-C and `make stop` (SIGTERM) are the normal way out: a clean stop is success.
  trap 'exit 0' INT TERM

  # PostgreSQL: the cluster persists in .run/pg; pending migrations and the
  # (idempotent) seed are applied on every start.
  say "postgresql on 127.0.0.1:$PG_PORT (data in .run/pg)"
  local admin
  admin=$(PG_PASSWORD=$MR_PG_PASSWORD scripts/pg.sh init "$RUN/pg" "$PG_PORT")
  (umask 077; printf '127.0.0.1:%s:*:postgres:%s\n' "$PG_PORT" "$MR_PG_PASSWORD" > "$RUN/pgpass")
  if [ -x scripts/migrate.sh ]; then scripts/migrate.sh "$admin" >&2; else say "no scripts/migrate.sh yet: schema not applied"; fi
  [ -f sql/seed.sql ] && psql "$admin" -X -q -v ON_ERROR_STOP=1 -f sql/seed.sql >/dev/null
  if [ -z "${DATABASE_URL:-}" ]; then
    local user=postgres
    [ "$(psql "$admin" -X -tAc "select 1 from pg_roles where rolname = 'authenticator'")" = 1 ] && user=authenticator
    export DATABASE_URL="host=$RUN/pg port=$PG_PORT dbname=mindroom user=$user"
  fi

  # nginx from the dev template. X-Forwarded-For is believed only from the
  # addresses in MR_TRUSTED_PROXIES (comma-separated addresses or CIDRs; none by default).
  local user_line="# user: the current one" real_ip="# no trusted proxies" p
  [ "$(id -u)" -eq 0 ] && user_line="user root root;"
  if [ -n "${MR_TRUSTED_PROXIES:-}" ]; then
    real_ip=""
    for p in ${MR_TRUSTED_PROXIES//,/ }; do
      [[ $p =~ ^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$ ]] || die "MR_TRUSTED_PROXIES: '$p' is not an address or CIDR"
      real_ip+="set_real_ip_from $p; "
    done
  fi
  sed -e "s#@ROOT@#$ROOT#g; s#@RUN@#$RUN#g; s#@PUBLIC_LISTEN@#$API_LISTEN#g" \
      -e "s#@PROVISIONER_LISTEN@#$PROVISIONER_LISTEN#g; s#@USER@#$user_line#g" \
      -e "s|@REAL_IP_FROM@|$real_ip|g" \
      -e "s#@ADMIN_LISTEN@#$ADMIN_LISTEN#g" \
      nginx/dev.conf > "$RUN/nginx.conf"
  nginx -t -q -p "$RUN/nginx" -c "$RUN/nginx.conf" -e "$RUN/log/nginx.error.log" \
    || die "nginx config invalid (see above)"

  # Functions, then nginx.
  local n started=()
  for n in "${FUNCTIONS[@]}"; do
    [ -x "$BIN/$n" ] || continue
    MR_SOCKET=$RUN/sock/$n.sock spawn "$n" "$BIN/$n"
    started+=("$n")
  done
  [ ${#started[@]} -gt 0 ] || die "no function binaries in $BIN"
  for n in "${started[@]}"; do
    local deadline=$((SECONDS + 30))
    until [ -S "$RUN/sock/$n.sock" ]; do
      pid_alive "${PIDS[$n]}" || { tail -20 "$RUN/log/$n.log" >&2; die "$n exited at start-up (.run/log/$n.log)"; }
      [ $SECONDS -lt $deadline ] || die "$n: no socket after 30 s (.run/log/$n.log)"
      sleep 0.1
    done
  done
  spawn nginx nginx -p "$RUN/nginx" -c "$RUN/nginx.conf" -e "$RUN/log/nginx.error.log"
  local deadline=$((SECONDS + 15))
  until curl -s -o /dev/null "http://$API_LISTEN/"; do
    pid_alive "${PIDS[nginx]}" || { tail -5 "$RUN/log/nginx.error.log" >&2; die "nginx did not start (port ${API_LISTEN##*:}, ${PROVISIONER_LISTEN##*:} or ${ADMIN_LISTEN##*:} in use?)"; }
    [ $SECONDS -lt $deadline ] || die "nginx not answering on $API_LISTEN"
    sleep 0.1
  done
  # The lifecycle worker, once the provisioner's listener answers.
  for n in "${DAEMONS[@]}"; do
    [ -x "$BIN/$n" ] || continue
    spawn "$n" "$BIN/$n"
    started+=("$n")
  done

  # The provisioner has its own listener and is never routed on the public one.
  local public=() f
  for f in "${started[@]}"; do
    [[ $f = dokku-provisioner || $f = mindroom-admin || " ${DAEMONS[*]} " == *" $f "* ]] || public+=("$f")
  done
  local token
  token=$(mint_jwt service_role 86400)
  cat >&2 <<EOF

MindRoom control plane is up (Ctrl-C or \`make stop\` stops it).
  API           http://$API_LISTEN/functions/v1/<name>   (${public[*]})
  provisioner   $DOKKU_PROVISIONER_URL   (DOKKU_MODE=$DOKKU_MODE)
  admin         http://$ADMIN_LISTEN/metrics   (/live, /ready)
  PostgreSQL    PGPASSFILE=$RUN/pgpass psql "host=127.0.0.1 port=$PG_PORT dbname=mindroom user=postgres"
  worker        mindroom-lifecycle: owed work, health round every ${HEALTH_INTERVAL_S:-60} s
  logs          .run/log/   (the worker's: .run/log/mindroom-lifecycle.log)

A service_role token (valid 24 h) and a call:
  export TOKEN=$token
  curl -s -X POST http://$API_LISTEN/functions/v1/check-instance-health \\
       -H "Authorization: Bearer \$TOKEN" -H 'Content-Type: application/json' -d '{}'

EOF
  # Stay in the foreground; leave if a component dies.
  while :; do
    sleep 1 & wait $! || true
    for n in nginx "${started[@]}"; do
      pid_alive "${PIDS[$n]}" || { say "$n exited unexpectedly; see .run/log/$n.log"; exit 1; }
    done
  done
}

cmd_stop() {
  local pid
  pid=$(cat "$RUN/stack.pid" 2>/dev/null || true)
  if pid_alive "$pid"; then
    kill -TERM "$pid"
    while pid_alive "$pid"; do sleep 0.2; done
    say "stopped"
    return
  fi
  # The foreground script is gone (killed hard): stop what it left behind.
  local f
  for f in "$RUN"/pids/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f"); pid_alive "$pid" && kill -TERM "$pid"
  done
  sleep 1
  [ -d "$RUN/pg/data" ] && scripts/pg.sh stop "$RUN/pg"
  rm -rf "$RUN/pids" "$RUN/sock" "$RUN/stack.pid"
  say "nothing was running in the foreground; leftovers stopped"
}

case "${1:-}" in
  run) cmd_run ;;
  stop) cmd_stop ;;
  *) echo "usage: scripts/stack.sh run|stop" >&2; exit 2 ;;
esac
