#!/usr/bin/env bash
# `make drills`: the failure drills (tests/drills, pytest through the integration
# harness tests/integration/mr.py): PostgreSQL crash mid-burst, provisioner outage,
# nginx reload and function restarts under load, slowloris and oversized requests.
# Runs the functions from $MR_BUILD (default build/san, which `make drills` builds).
# Loopback only; bounded (a few minutes on 2 cores). Extra arguments go to pytest
# (e.g. scripts/drills.sh -k slowloris).
set -uo pipefail
cd "$(dirname "$0")/.."
export MR_BUILD=${MR_BUILD:-build/san}
[ -x "$MR_BUILD/bin/handle-stripe-webhook" ] || { echo "drills: no binaries in $MR_BUILD (make SAN=1 build)" >&2; exit 2; }
start=$SECONDS
"${PYTHON:-/usr/bin/python3}" -m pytest -q -s -p no:cacheprovider tests/drills "$@"
rc=$?
echo "drills: finished in $((SECONDS - start))s (exit $rc)"
exit $rc
