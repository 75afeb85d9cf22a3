#!/usr/bin/env python3
"""What creating an instance costs (the provision section of scripts/bench.sh).

The configuration `make run` runs: every function, the lifecycle worker, nginx,
PostgreSQL with fsync on, the real dokku-provisioner in dry-run mode. BENCH_OWED
(3,000) new subscriptions are delivered through the webhook while the lifecycle
worker is stopped (SIGSTOP), so that they wait as owed creates; then the worker is
let go alone, and the CPU each part spends until every instance runs is divided by
their number:

  postgres (worker)   the lifecycle worker's sessions (their application name)
  postgres (rest)     the cluster's other processes (WAL writer, checkpointer,
                      this bench's polling session...)
  worker              the lifecycle worker's processes
  provisioner         dokku-provisioner's processes (dry-run: no Dokku)
  nginx               nginx, which carries the worker's calls to the provisioner

and the rate at which they were created. A new subscription's cost to the webhook
itself is the webhook section's. Prints a table and writes build/bench/provision.json.
Environment: BENCH_OWED (3000), MR_BUILD (build/release), BENCH_PROFILE=1 (also
pg_stat_statements, track all, while the worker creates them: where its sessions'
time goes per statement and function, into build/bench/provision-statements.txt; a
profiling run, its CPU figures are not the bench's).
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/integration"))
sys.path.insert(0, str(ROOT / "scripts/bench"))
os.environ.setdefault("MR_BUILD", "build/release")
import mr  # noqa: E402
import psycopg2  # noqa: E402
from webhook_bench import (ACCOUNTS, Cpu, quiesce, statements, track_statements,  # noqa: E402
                           write_events, wrk)

OWED = int(os.environ.get("BENCH_OWED", "3000"))
PROFILE = os.environ.get("BENCH_PROFILE") == "1"
OUT = ROOT / "build/bench"
WORKER = "mindroom-lifecycle"


def run():
    pg = mr.Cluster(fsync=True)
    try:
        if PROFILE:
            track_statements(pg)
        pg.make_template()
        with mr.Stack(pg, env={"DOKKU_MODE": "dry-run", "HEALTH_INTERVAL_S": "600"}) as s:
            s.sql("INSERT INTO auth.users (id, email) SELECT gen_random_uuid(),"
                  " 'bench' || i || '@example.com' FROM generate_series(1, %s) AS i", ACCOUNTS)
            s.sql("UPDATE accounts SET stripe_customer_id = 'cus_' || split_part(email, '@', 1)"
                  " WHERE email LIKE 'bench%%@example.com'")
            cpu = Cpu(pg, s)
            worker = cpu.pids(WORKER)
            for p in worker:
                os.kill(p, signal.SIGSTOP)
            try:
                print("bench provision: %d new subscriptions, the worker stopped..." % OWED, flush=True)
                events = s.run / "owed.txt"
                write_events(events, OWED, "pv", s.env["STRIPE_WEBHOOK_SECRET"])
                # wrk cycles through the file: later rounds are duplicates, answered
                # from the webhook's memory; the count below is what matters.
                wrk(s.url("handle-stripe-webhook"), 8, max(5, OWED // 300), [events, 2])
                owed = s.sql("SELECT count(*) FROM instances WHERE owed_action = 'create'")[0][0]
                if owed != OWED:
                    raise RuntimeError("%d creates owed, expected %d" % (owed, OWED))
                # One session polls (a connection per poll would cost more than it
                # measures); its little time is among the rest of PostgreSQL's.
                conn = psycopg2.connect(pg.conninfo(s.db))
                conn.autocommit = True
                cur = conn.cursor()
                quiesce()
                if PROFILE:
                    OUT.mkdir(parents=True, exist_ok=True)
                    (OUT / "provision-statements.txt").unlink(missing_ok=True)
                    statements(pg, s.db, "the webhook recording %d new subscriptions" % OWED,
                               OUT / "provision-statements.txt")
                cpu.start()
            finally:
                for p in worker:
                    os.kill(p, signal.SIGCONT)
            print("bench provision: the worker let go; waiting for every instance to run...", flush=True)
            t0 = time.monotonic()
            left = owed
            while left and time.monotonic() - t0 < 900:
                cur.execute("SELECT count(*) FROM instances WHERE status <> 'running'")
                left = cur.fetchone()[0]
                time.sleep(0.5)
            seconds = time.monotonic() - t0
            ms = cpu.stop()
            if PROFILE:
                statements(pg, s.db, "the worker creating %d instances" % owed,
                           OUT / "provision-statements.txt")
            per = lambda *parts: round(sum(ms.get(k, 0) for k in parts) * 1000 / owed, 1)  # noqa: E731
            us = {"postgres:worker": per("postgres:worker"),
                  "postgres:rest": per("postgres", "postgres:webhook"),
                  "postgres": per("postgres", "postgres:webhook", "postgres:worker"),
                  "worker": per(WORKER), "provisioner": per("dokku-provisioner"), "nginx": per("nginx")}
            conn.close()
            return {"owed": owed, "left": left, "seconds": round(seconds, 1),
                    "per_s": round(owed / seconds, 1), "cpu_us_per_instance": us,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    finally:
        pg.destroy()


def main():
    res = run()
    c = res["cpu_us_per_instance"]
    print()
    print("provision benchmark, %s; %d owed creates, the worker alone, provisioner in dry-run"
          % (res["date"], res["owed"]))
    print("  all running after %.1f s: %.0f instances/s%s"
          % (res["seconds"], res["per_s"], "" if not res["left"] else ", %d NOT running" % res["left"]))
    print("  CPU per instance (us): postgres %.0f (the worker's sessions %.0f, the rest %.0f),"
          " worker %.0f, provisioner %.0f, nginx %.0f"
          % (c["postgres"], c["postgres:worker"], c["postgres:rest"], c["worker"], c["provisioner"],
             c["nginx"]))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "provision.json").write_text(json.dumps(res, indent=2) + "\n")
    print("  written to %s" % (OUT / "provision.json"))
    return 0 if not res["left"] else 1


if __name__ == "__main__":
    sys.exit(main())
