#!/usr/bin/env python3
"""Usage-report benchmark (the usage section of scripts/bench.sh).

One run, one machine, fsync on, 100 running instances each with its own token:
  1. ceiling  pgbench calls public.track_usage directly for the 100 instances
              (random instance per call, agent "general"): the database's own rate.
  2. reports  wrk through nginx: POST /functions/v1/track-usage with the 100
              instances' tokens round-robin, body {"agent": "general"}.
The target: reports >= 50% of the ceiling. Prints a table and writes
build/bench/usage.json.

Environment: BENCH_SECONDS (10), BENCH_CONNS (8), BENCH_WORKERS (8 track-usage
workers), MR_BUILD (build/release), BENCH_USAGE_KEYS=1 (every report with an
Idempotency-Key of its own).
"""

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/integration"))
os.environ.setdefault("MR_BUILD", "build/release")
import mr  # noqa: E402
from webhook_bench import pgbench_result  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
CONNS = int(os.environ.get("BENCH_CONNS", "8"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "8"))
# BENCH_USAGE_KEYS=1: every report carries an Idempotency-Key of its own.
KEYS = os.environ.get("BENCH_USAGE_KEYS") == "1"
INSTANCES = 100
LUA = ROOT / "scripts/bench/usage.lua"
OUT = ROOT / "build/bench"

PGBENCH_SCRIPT = r"""\set n random(1, %d)
SELECT public.track_usage(b.id, 'general', NULL) FROM bench_instances b WHERE b.n = :n;
""" % INSTANCES


def new_token():
    """A token as lib/mr_itoken.c makes one: (token, key id, SHA-256 hex)."""
    kid = secrets.token_hex(8)
    token = "mri_%s_%s" % (kid, base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("="))
    return token, kid, hashlib.sha256(token.encode()).hexdigest()


def setup(s):
    """INSTANCES accounts on the enterprise plan, each with a running instance and a
    token (written directly: no worker runs here). Returns the tokens."""
    s.sql("INSERT INTO auth.users (id, email) SELECT gen_random_uuid(), 'usage' || i || '@example.com'"
          " FROM generate_series(1, %s) AS i", INSTANCES)
    s.sql("INSERT INTO public.subscriptions (account_id, tier, status, stripe_price_id)"
          " SELECT a.id, 'enterprise', 'active', 'price_enterprise' FROM public.accounts a"
          " WHERE a.email LIKE 'usage%%@example.com'")
    s.sql("INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status)"
          " SELECT su.id, n.dokku_app_name, n.subdomain, 'running', 'running'"
          " FROM public.subscriptions su JOIN public.accounts a ON a.id = su.account_id,"
          " public.instance_names(su.id) n WHERE a.email LIKE 'usage%%@example.com'")
    s.sql("CREATE TABLE public.bench_instances (n int PRIMARY KEY, id uuid NOT NULL)")
    s.sql("INSERT INTO public.bench_instances SELECT row_number() OVER (ORDER BY i.id), i.id"
          " FROM public.instances i")
    ids = [r[0] for r in s.sql("SELECT id::text FROM public.bench_instances ORDER BY n")]
    tokens = []
    for iid in ids:
        token, kid, h = new_token()
        s.sql("INSERT INTO public.instance_tokens (instance_id, key_id, token_hash) VALUES (%s, %s, %s)",
              iid, kid, h)
        tokens.append(token)
    return tokens


def pgbench(s):
    script = s.run / "usage_ceiling.sql"
    script.write_text(PGBENCH_SCRIPT)
    cmd = ["pgbench", "-n", "-M", "prepared", "-c", str(CONNS), "-j", "2", "-T", str(SECONDS),
           "-f", str(script), s.pg.conninfo(s.db, "postgres")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 120)
    return pgbench_result(p.returncode, p.stdout, p.stderr)


def wrk(url, tokens_file, threads=2):
    cmd = ["wrk", "-t%d" % threads, "-c%d" % CONNS, "-d%ds" % SECONDS, "--latency",
           "-s", str(LUA), url, "--", str(tokens_file), str(threads)]
    if KEYS:
        cmd.append("keys")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 60)
    m = re.search(r"^RESULT (\{.*\})$", p.stdout, re.M)
    if not m:
        raise RuntimeError("wrk failed:\n" + p.stdout + p.stderr)
    return json.loads(m.group(1))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    pg = mr.Cluster(fsync=True)
    results = {"seconds": SECONDS, "connections": CONNS, "workers": WORKERS,
               "instances": INSTANCES, "cores": os.cpu_count()}
    try:
        pg.make_template()
        with mr.Stack(pg, env={"MR_LOG_LEVEL": "warn"}, functions=["track-usage"],
                      workers=WORKERS) as s:
            tokens = setup(s)
            tokens_file = s.run / "tokens.txt"
            tokens_file.write_text("".join(t + "\n" for t in tokens))
            print("bench usage: pgbench track_usage (%d clients, %ds)..." % (CONNS, SECONDS), flush=True)
            results["ceiling"] = pgbench(s)
            before = s.sql("SELECT coalesce(sum(messages_sent), 0) FROM public.usage_metrics")[0][0]
            print("bench usage: wrk track-usage, %d tokens round-robin..." % INSTANCES, flush=True)
            results["reports"] = wrk(s.url("track-usage"), tokens_file)
            results["reports"]["counted"] = int(s.sql(
                "SELECT coalesce(sum(messages_sent), 0) FROM public.usage_metrics")[0][0] - before)
    finally:
        pg.destroy()

    c, r = results["ceiling"]["tps"], results["reports"]
    results["targets"] = {"reports_vs_ceiling": round(r["rps"] / c, 3), "ok": r["rps"] >= 0.5 * c}
    (OUT / "usage.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print("usage benchmark (%d s per run, fsync on, %d cores, %d instances)" % (SECONDS, os.cpu_count(), INSTANCES))
    print("  ceiling  pgbench track_usage, %d clients : %8.0f calls/s    (avg %.2f ms)"
          % (CONNS, c, results["ceiling"]["latency_avg_ms"] or 0))
    print("  reports  wrk %d conns, tokens round-robin : %8.0f reports/s  p50 %.2f ms  p99 %.2f ms"
          "  non-200 %d  counted %d  -> %.0f%% of ceiling (target 50%%)"
          % (CONNS, r["rps"], r["p50_ms"], r["p99_ms"], r["non200"], r["counted"], 100 * r["rps"] / c))
    print("  written to %s" % (OUT / "usage.json"))
    ok = results["targets"]["ok"] and not r["non200"] and r["socket_errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
