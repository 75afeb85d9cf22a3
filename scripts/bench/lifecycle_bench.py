#!/usr/bin/env python3
"""Lifecycle benchmark (the lifecycle section of scripts/bench.sh).

Everything runs the configuration `make run` runs (every function, the lifecycle
worker, nginx, PostgreSQL with fsync on, the real dokku-provisioner in dry-run
mode); only the provisioner's behaviour is varied, with a stand-in that hangs.

  1. new subscriptions, provisioner healthy   wrk -t2 -c16, each event a new
                                               subscription (an instance to create)
  2. the same, provisioner hanging             the worker's calls never return:
                                               target >= 90% of run 1's rate
  3. one webhook worker, provisioner hanging   new subscriptions paced at about
                                               100/s, once the kernel has flushed
                                               the bursts' writes (quiesce in
                                               webhook_bench.py), the disk's
                                               fdatasync probed meanwhile: target
                                               p99 <= 10 ms
  4. catch-up                                  the provisioner answers again: every
                                               instance of runs 2-3 ends running
  5. claim at scale                            100,000 running instances and a few
                                               owed: lifecycle_claim takes < 5 ms,
                                               every statement an index access
                                               (auto_explain of a real claim)
  6. resume at scale                           on that database, an unpaid ->
                                               active subscription runs again < 5 s
  7. claim after a burst                       the worker's connection claims on an
                                               empty database, then 100,000 running
                                               instances and 10,000 owed arrive: its
                                               next claims < 5 ms, no scan of every
                                               instance, no sort of the backlog

Prints a table and writes build/bench/lifecycle.json. Environment: BENCH_SECONDS
(10), BENCH_SCALE (100000), MR_BUILD (build/release).
"""
import json
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/integration"))
sys.path.insert(0, str(ROOT / "tests/standins"))
sys.path.insert(0, str(ROOT / "scripts/bench"))
os.environ.setdefault("MR_BUILD", "build/release")
import mr  # noqa: E402
import psycopg2  # noqa: E402
from provisioner import ProvisionerStandin  # noqa: E402
from webhook_bench import ACCOUNTS, FsyncProbe, quiesce, write_events, wrk  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
SCALE = int(os.environ.get("BENCH_SCALE", "100000"))
BACKLOG = 10000
OUT = ROOT / "build/bench"
WORKER = "mindroom-lifecycle"


def link_accounts(s):
    s.sql("INSERT INTO auth.users (id, email) SELECT gen_random_uuid(), 'bench' || i || '@example.com'"
          " FROM generate_series(1, %s) AS i", ACCOUNTS)
    s.sql("UPDATE accounts SET stripe_customer_id = 'cus_' || split_part(email, '@', 1)"
          " WHERE email LIKE 'bench%%@example.com'")


def new_stream(s, label, conns=16, seconds=SECONDS, delay=None, threads=2):
    """wrk with unique pre-signed customer.subscription.created events."""
    n = 40000 if delay is None else int(seconds * 1000 / max(delay, 1) * conns) + 2000
    events = s.run / ("%s.txt" % label)
    write_events(events, n, label, s.env["STRIPE_WEBHOOK_SECRET"])
    args = [events, threads] + ([delay] if delay is not None else [])
    return wrk(s.url("handle-stripe-webhook"), conns, seconds, args, threads=threads)


def webhook_under_provisioner(pg, results):
    hanging = ProvisionerStandin()
    hanging.start()
    hanging.behave("hang")
    try:
        # MR_LIFECYCLE_WORKERS=2 and MR_WORKERS=2 as on this 2-core machine by default.
        env = {"MR_LOG_LEVEL": "warn", "MR_WORKERS": "2", "MR_LIFECYCLE_WORKERS": "2",
               "DOKKU_MODE": "dry-run"}
        with mr.Stack(pg, env=env) as s:
            link_accounts(s)
            print("bench lifecycle: new subscriptions, provisioner healthy...", flush=True)
            healthy = new_stream(s, "healthy")
            # The provisioner hangs from now on: the worker's calls never return.
            s.env["DOKKU_PROVISIONER_URL"] = hanging.url
            s.env["DOKKU_PROVISIONER_TOKEN"] = hanging.token
            s.restart_function(WORKER)
            print("bench lifecycle: new subscriptions, provisioner hanging...", flush=True)
            hung = new_stream(s, "hanging")
            stuck = s.sql("SELECT count(*) FROM instances WHERE claimed_by IS NOT NULL")[0][0]

            s.env["MR_WORKERS"] = "1"
            s.restart_function("handle-stripe-webhook")
            print("bench lifecycle: one webhook worker, provisioner hanging, paced ~100/s...", flush=True)
            calib = new_stream(s, "calib", conns=1, seconds=3, delay=10, threads=1)
            delay = max(0.0, round(10 - calib["p50_ms"], 3))
            quiesce()
            with FsyncProbe(pg.dir) as probe:
                paced = new_stream(s, "paced", conns=1, delay=delay, threads=1)
            paced["disk_fsync"] = probe.summary()

            owed = s.sql("SELECT count(*) FROM instances WHERE owed_action = 'create'")[0][0]
            print("bench lifecycle: the provisioner answers again; catching up %d owed..." % owed,
                  flush=True)
            hanging.behave("ok")
            hanging.release()  # the hung calls fail now; retried after their backoff
            t0 = time.monotonic()
            deadline = t0 + 600
            left = owed
            while time.monotonic() < deadline:
                left = s.sql("SELECT count(*) FROM instances WHERE status <> 'running'")[0][0]
                if left == 0:
                    break
                time.sleep(0.5)
            catch = {"owed": owed, "seconds": round(time.monotonic() - t0, 1), "left": left,
                     "creates": len(hanging.create_calls())}
            total = s.sql("SELECT count(*) FROM instances")[0][0]
            apps = len(hanging.apps)
    finally:
        hanging.stop()
    results["new_healthy"] = healthy
    results["new_hanging"] = dict(hung, claims_stuck=stuck)
    results["paced_one_worker_hanging"] = dict(paced, delay_ms=delay)
    results["catch_up"] = dict(catch, instances=total, stand_in_apps=apps)


def population(running, owed):
    """SQL that adds `running` instances with nothing owed and `owed` instances owed a
    create, on one account, and holds the periodic jobs' leases so that no health
    round runs over them. One string: run at once, it is one transaction."""
    return (
        "INSERT INTO auth.users (id, email) VALUES ('b0000000-0000-4000-8000-000000000001',"
        "  'scale@example.com');"
        "UPDATE accounts SET stripe_customer_id = 'cus_scale'"
        " WHERE id = 'b0000000-0000-4000-8000-000000000001';"
        "INSERT INTO scheduled_jobs (name, until) VALUES ('health', 'infinity'),"
        " ('stripe-sweep', 'infinity');"
        "INSERT INTO subscriptions (account_id, stripe_subscription_id, stripe_price_id, tier, status)"
        " SELECT 'b0000000-0000-4000-8000-000000000001', 'sub_scale_' || i, 'price_starter',"
        "        'starter', 'active' FROM generate_series(1, %d) i;"
        "INSERT INTO instances (subscription_id, dokku_app_name, subdomain, status, desired_status,"
        "                       applied_config_version, welcome_email_sent_at, backend_url)"
        " SELECT s.id, nm.dokku_app_name, nm.subdomain,"
        "        CASE WHEN substr(s.stripe_subscription_id, 11)::int > %d"
        "             THEN 'provisioning' ELSE 'running' END::instance_status,"
        "        'running', 1, now(), 'https://' || nm.subdomain || '.bench.test'"
        "   FROM subscriptions s CROSS JOIN LATERAL instance_names(s.id) nm"
        "  WHERE s.stripe_subscription_id ~ '^sub_scale_[0-9]+$'" % (running + owed, running))


def populate(pg, db, n):
    """n running instances with nothing owed, and 10 owed a create; analyzed."""
    pg.sql('CREATE DATABASE "%s" TEMPLATE %s' % (db, mr.TEMPLATE_DB))
    pg.sql(population(n, 10), dbname=db)
    pg.sql("VACUUM ANALYZE instances", dbname=db)


def timed_claims(conn, n=200):
    """(p50, p99, max) ms of n claims made as the worker makes them (one call, as
    service_role), each lease given back so the next call finds the same owed work.
    Timed in the server and kept in a variable: a temporary table would create the
    session's temporary schema, and that invalidates every plan the session cached."""
    cur = conn.cursor()
    cur.execute("SET client_min_messages = notice")
    del conn.notices[:]
    cur.execute("SET ROLE service_role")
    cur.execute("DO $$ DECLARE t0 timestamptz; r jsonb; ms float8[] := '{}'; BEGIN"
                "  FOR k IN 1..%d LOOP"
                "    t0 := clock_timestamp();"
                "    r := public.lifecycle_claim('bench', 60);"
                "    ms := ms || extract(epoch FROM clock_timestamp() - t0)::float8 * 1000;"
                "    PERFORM public.lifecycle_release((r #>> '{step,instance_id}')::uuid, r #>> '{step,token}');"
                "  END LOOP;"
                "  RAISE NOTICE 'timings %% %% %%', (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY v)"
                "    FROM unnest(ms) v), (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY v)"
                "    FROM unnest(ms) v), (SELECT max(v) FROM unnest(ms) v);"
                " END $$" % n)
    cur.execute("RESET ROLE")
    return tuple(float(v) for v in conn.notices[-1].split("timings ", 1)[1].split())


def explained_claim(conn):
    """The plans of every statement one claim runs (auto_explain, nested, with
    ANALYZE), the claim made as the worker makes it and its lease given back."""
    cur = conn.cursor()
    cur.execute("LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;"
                " SET auto_explain.log_nested_statements = on; SET auto_explain.log_analyze = on;"
                " SET client_min_messages = log")
    del conn.notices[:]
    cur.execute("SET ROLE service_role")
    cur.execute("SELECT public.lifecycle_claim('bench', 60)")
    r = cur.fetchone()[0]
    cur.execute("RESET ROLE")
    plans = "".join(conn.notices)
    cur.execute("SET client_min_messages = warning; SET auto_explain.log_min_duration = -1")
    if r.get("step"):
        cur.execute("SELECT public.lifecycle_release(%s::uuid, %s)",
                    (r["step"]["instance_id"], r["step"]["token"]))
    return plans


def no_scan_or_sort(plans):
    """Neither a scan of every instance nor a sort of the due rows in a claim."""
    return "Seq Scan on instances" not in plans and "Sort Key: owed_due_at" not in plans


def walk_plan(plans):
    """The plan of the claim's walk over the due rows, from explained_claim."""
    for chunk in plans.split("LOG:  duration:"):
        if "ORDER BY x.owed_due_at" in chunk:
            return chunk.split("plan:", 1)[-1].strip()
    return "(not found)"


def claim_at_scale(pg, results):
    db = "mr_scale_" + uuid.uuid4().hex[:6]
    t0 = time.monotonic()
    populate(pg, db, SCALE)
    load_s = time.monotonic() - t0
    counts = pg.sql("SELECT count(*), count(*) FILTER (WHERE owed_action IS NOT NULL) FROM instances",
                    dbname=db)[0]
    conn = psycopg2.connect(pg.conninfo(db))
    conn.autocommit = True
    try:
        plans = explained_claim(conn)
        p50, p99, mx = timed_claims(conn)
    finally:
        conn.close()
    results["claim"] = {
        "instances": counts[0], "owed": counts[1], "load_s": round(load_s, 1),
        "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "max_ms": round(mx, 3),
        "index_scan": "Index Scan using instances_owed_due_idx" in plans,
        "no_scan_or_sort": no_scan_or_sort(plans),
        "busy_index": "instances_claimed_idx" in plans,
        "plans": plans}
    return db


def claim_backlog(pg, results):
    """A burst of owed work arriving after the worker's connection planned its claim:
    the worker's first claim on an empty database (PL/pgSQL keeps the plans for the
    connection), then SCALE running instances and BACKLOG owed a create arrive from
    another connection in one transaction; the claims that follow on the first
    connection are timed and one is explained. (An ANALYZE of instances by autovacuum
    in between would have the plans made again; the burst and the claims take a few
    seconds.)"""
    db = "mr_backlog_" + uuid.uuid4().hex[:6]
    pg.sql('CREATE DATABASE "%s" TEMPLATE %s' % (db, mr.TEMPLATE_DB))
    worker = psycopg2.connect(pg.conninfo(db))
    worker.autocommit = True
    try:
        w = worker.cursor()
        w.execute("SET ROLE service_role; SELECT public.lifecycle_claim('bench', 60); RESET ROLE")
        pg.sql(population(SCALE, BACKLOG), dbname=db)
        owed = pg.sql("SELECT count(*) FROM instances WHERE owed_action = 'create'", dbname=db)[0][0]
        p50, p99, mx = timed_claims(worker)
        plans = explained_claim(worker)
    finally:
        worker.close()
    pg.sql('DROP DATABASE "%s"' % db)
    results["claim_backlog"] = {
        "instances": SCALE + BACKLOG, "owed": owed,
        "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "max_ms": round(mx, 3),
        "index_scan": "Index Scan using instances_owed_due_idx" in plans,
        "no_scan_or_sort": no_scan_or_sort(plans),
        "plans": plans}


def resume_at_scale(pg, db, results):
    env = {"MR_LOG_LEVEL": "warn", "DOKKU_MODE": "dry-run", "MR_LIFECYCLE_WORKERS": "2"}
    with mr.Stack(pg, env=env, db=db) as s:
        # The few owed instances are created first (their notification woke the worker).
        deadline = time.monotonic() + 60
        while s.sql("SELECT count(*) FROM instances WHERE owed_action = 'create'")[0][0] and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        sub, sid = s.sql("SELECT stripe_subscription_id, id FROM subscriptions"
                         " WHERE stripe_subscription_id = 'sub_scale_1'")[0]
        tpl = json.loads((ROOT / "tests/fixtures/stripe_subscription_updated_basil.json").read_text())
        t = int(time.time())

        def send(status, created):
            e = json.loads(json.dumps(tpl))
            e["id"] = "evt_scale_" + uuid.uuid4().hex
            e["created"] = created
            o = e["data"]["object"]
            o["id"], o["customer"], o["status"], o["metadata"] = sub, "cus_scale", status, {}
            for it in o["items"]["data"]:
                it["price"]["id"] = "price_starter"
            raw = json.dumps(e).encode()
            r = s.call("POST", "handle-stripe-webhook", body=raw, headers=s.stripe_headers(raw))
            assert r.status == 200, r

        def wait(status):
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60:
                row = s.sql("SELECT status::text, owed_action FROM instances WHERE subscription_id = %s", sid)[0]
                if row[0] == status and row[1] in (None, "email"):
                    return time.monotonic() - t0
                time.sleep(0.02)
            raise RuntimeError("instance not %s after 60 s" % status)

        send("unpaid", t)
        stopped = wait("stopped")
        send("active", t + 1)
        resumed = wait("running")
    results["resume"] = {"instances": SCALE, "stop_s": round(stopped, 2), "resume_s": round(resumed, 2)}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"seconds": SECONDS, "cores": os.cpu_count(), "scale": SCALE}
    pg = mr.Cluster(fsync=True)
    try:
        pg.make_template()
        webhook_under_provisioner(pg, results)
        print("bench lifecycle: %d instances, claiming..." % SCALE, flush=True)
        db = claim_at_scale(pg, results)
        print("bench lifecycle: unpaid -> active on that database...", flush=True)
        resume_at_scale(pg, db, results)
        print("bench lifecycle: claiming with %d owed, plans made on an empty table..." % BACKLOG, flush=True)
        claim_backlog(pg, results)
    finally:
        pg.destroy()

    h, g, p, c, cl, rs, bl = (results[k] for k in ("new_healthy", "new_hanging", "paced_one_worker_hanging",
                                                  "catch_up", "claim", "resume", "claim_backlog"))
    ratio = g["rps"] / h["rps"]
    results["targets"] = {
        "hanging_vs_healthy": round(ratio, 3), "hanging_ok": ratio >= 0.9,
        "paced_p99_ms": p["p99_ms"], "paced_ok": p["p99_ms"] <= 10.0,
        "catch_up_ok": c["left"] == 0,
        "claim_ok": cl["p99_ms"] < 5.0 and cl["index_scan"] and cl["no_scan_or_sort"],
        "resume_ok": rs["resume_s"] < 5.0,
        "backlog_ok": bl["p99_ms"] < 5.0 and bl["index_scan"] and bl["no_scan_or_sort"],
    }
    (OUT / "lifecycle.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print("lifecycle benchmark (%d s per run, fsync on, %d cores, every function and the worker)"
          % (SECONDS, os.cpu_count()))
    print("  new subscriptions, provisioner healthy : %7.0f events/s  p50 %.2f ms  p99 %.2f ms  non-200 %d"
          % (h["rps"], h["p50_ms"], h["p99_ms"], h["non200"]))
    print("  new subscriptions, provisioner hanging : %7.0f events/s  p50 %.2f ms  p99 %.2f ms  non-200 %d"
          "  -> %.0f%% of healthy (target 90%%); %d worker calls stuck"
          % (g["rps"], g["p50_ms"], g["p99_ms"], g["non200"], 100 * ratio, g["claims_stuck"]))
    print("  one webhook worker, hanging, paced     : %7.0f events/s  p50 %.2f ms  p99 %.2f ms"
          "  (delay %d ms; target p99 <= 10 ms)" % (p["rps"], p["p50_ms"], p["p99_ms"], p["delay_ms"]))
    f = p["disk_fsync"]
    print("    disk fdatasync meanwhile             : p50 %.2f ms  p99 %.2f ms  max %.2f ms (%d probes)"
          % (f["p50_ms"], f["p99_ms"], f["max_ms"], f["n"]))
    print("  catch-up after the provisioner returns : %d owed -> %s in %.1f s (%d instances, %d apps)"
          % (c["owed"], "all running" if c["left"] == 0 else "%d left" % c["left"], c["seconds"],
             c["instances"], c["stand_in_apps"]))
    print("  claim with %d instances, %d owed   : p50 %.2f ms  p99 %.2f ms  max %.2f ms  index scan: %s,"
          " no scan of every instance or sort: %s  (target < 5 ms)"
          % (cl["instances"], cl["owed"], cl["p50_ms"], cl["p99_ms"], cl["max_ms"], cl["index_scan"],
             cl["no_scan_or_sort"]))
    print("  unpaid -> active at that scale         : stopped in %.2f s, running again in %.2f s"
          " (target < 5 s)" % (rs["stop_s"], rs["resume_s"]))
    print("  claim, a burst of %d owed after it was planned: p50 %.2f ms  p99 %.2f ms  max %.2f ms  index scan: %s,"
          " no scan of every instance or sort: %s  (target < 5 ms)"
          % (bl["owed"], bl["p50_ms"], bl["p99_ms"], bl["max_ms"], bl["index_scan"], bl["no_scan_or_sort"]))
    print("  the claim's walk over due rows, as auto_explain saw it in the burst:\n    "
          + walk_plan(bl["plans"]).replace("\n", "\n    "))
    print("  written to %s" % (OUT / "lifecycle.json"))
    ok = all(v for k, v in results["targets"].items() if k.endswith("_ok"))
    print("lifecycle: targets %s" % ("met" if ok else "MISSED"))
    return 0 if ok and not (h["non200"] + g["non200"] + p["non200"]) else 1


if __name__ == "__main__":
    sys.exit(main())
