#!/usr/bin/env python3
"""What each Stripe event costs PostgreSQL (the events section of scripts/bench.sh).

One backend and nothing else: no HTTP, nginx, webhook process or lifecycle worker,
so that the SQL an event runs is measured alone: each figure still moves by about
±10% between runs on a virtual machine, but a change of about 5% shows in a few
alternating runs, where the webhook section's rates would hide it. The
cluster runs with fsync on, as the other sections; the database is the schema and
seed of every migration.

For BENCH_SIGNUPS (2,000) sign-ups, the eight events Stripe sends around one
(scripts/bench/webhook_bench.py's Templates, each customer an account of ours) are
delivered as the webhook delivers them: over a connection of the functions' login
role (authenticator), in one transaction, the service role's identity and
`public.process_stripe_event(id, payload, true)` (both statements read from the C
sources that send them). One event type after another,
in the sign-up's order, so that each subscription exists before its update. The
statements are prepared, and each transaction is one simple-protocol message and
one commit (the webhook sends one extended-protocol pipeline).

The figure per type is the backend's CPU time per event (/proc/<pid>/schedstat,
nanoseconds), with the wall time beside it. Two references from the same
connection: an empty transaction (`SELECT 1`: the round trip and what the
connection itself costs) and the baseline's minimal transaction
(scripts/bench/baseline.sql's two statements, with a payload as long as the
customer.updated event's).
No target: it says where a delivery's database time goes, by type.

Prints a table and writes build/bench/events.json. Environment: BENCH_SIGNUPS.
"""
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/integration"))
sys.path.insert(0, str(ROOT / "scripts/bench"))
os.environ.setdefault("MR_BUILD", "build/release")
import mr  # noqa: E402
import psycopg2  # noqa: E402
from webhook_bench import Templates, envelope, signup_accounts  # noqa: E402

SIGNUPS = int(os.environ.get("BENCH_SIGNUPS", "2000"))
OUT = ROOT / "build/bench"
DB = "mr_events"


def c_statement(path, name):
    """The SQL of the mr_db_stmt whose statement name is `name` in a C source: the
    string literals after it, joined (the bench runs what the webhook runs, read
    from where the webhook has it)."""
    text = (ROOT / path).read_text()
    m = re.search(r'"%s",\s*((?:"(?:[^"\\]|\\.)*"\s*)+),' % re.escape(name), text)
    if not m:
        raise RuntimeError("%s: no statement %s" % (path, name))
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(1)))


# What the webhook sends for a delivery: its identity (lib/mr_db.c) and its call
# (the webhook's main.c). Then the baseline's transaction, scripts/bench/baseline.sql's
# two statements with parameters for pgbench's variables.
PREPARE = [
    "PREPARE ident(text, text, text, text) AS "
    + c_statement("lib/mr_db.c", "mr_db_identity"),
    "PREPARE event(text, text) AS "
    + c_statement("functions/handle-stripe-webhook/main.c", "mr_wh_process"),
    "PREPARE b_event(text, text) AS INSERT INTO bench_events (id, type, created, payload)"
    " VALUES ($1, 'customer.subscription.updated', 1700000000, $2) ON CONFLICT DO NOTHING",
    "PREPARE b_sub(text) AS INSERT INTO bench_subscriptions (id, customer, status, price,"
    " last_event_created) VALUES ($1, 'cus_' || $1, 'active', 'price_starter', 1700000000)"
    " ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
    " last_event_created = excluded.last_event_created"
    " WHERE bench_subscriptions.last_event_created <= excluded.last_event_created",
]
CLAIMS = json.dumps({"role": "service_role"})
REQUEST = json.dumps({"ip": "127.0.0.1", "request_id": "bench-events"})


class Db:
    """The sql(query, *params) that webhook_bench.signup_accounts expects."""

    def __init__(self, pg):
        self.pg = pg

    def sql(self, query, *params):
        return self.pg.sql(query, *params, dbname=DB)


def events_by_type(db):
    """[(type, [(event id, body)] in sign-up order)] for the eight types."""
    ids = signup_accounts(db, "ev", SIGNUPS)
    tpl, t = Templates(), int(time.time())
    types = []
    for n in range(SIGNUPS):
        for i, (type_, obj, created) in enumerate(tpl.signup(n, "ev", "cus_ev_%d" % n, ids[n], t)):
            if n == 0:
                types.append((type_, []))
            evt = "evt_ev_%d_%d" % (n, i)
            types[i][1].append((evt, json.dumps(envelope(type_, obj, created, evt),
                                                separators=(",", ":"))))
    return types


def measure(cur, cpu, query, rows, result=None):
    """CPU and wall microseconds per transaction of query over rows; with
    result(first column of an answer), also how many answers gave each result
    (counted after the timing)."""
    c0, w0, answers = cpu(), time.monotonic(), []
    for params in rows:
        cur.execute(query, params)
        answers.append(cur.fetchone()[0] if cur.description else None)
    n = len(rows)
    m = {"cpu_us": round((cpu() - c0) / 1000 / n, 1),
         "wall_us": round((time.monotonic() - w0) * 1e6 / n, 1)}
    if result:
        m["results"] = {}
        for a in answers:
            r = result(a)
            m["results"][r] = m["results"].get(r, 0) + 1
    return m


def run():
    pg = mr.Cluster(fsync=True)
    try:
        pg.make_template()
        pg.sql('CREATE DATABASE %s TEMPLATE %s' % (DB, mr.TEMPLATE_DB))
        types = events_by_type(Db(pg))
        pg.sql((ROOT / "scripts/bench/baseline_schema.sql").read_text(), dbname=DB)
        pg.sql("GRANT SELECT, INSERT, UPDATE ON bench_events, bench_subscriptions TO authenticator", dbname=DB)
        # The functions' login role, which each transaction switches to the caller's.
        conn = psycopg2.connect(pg.conninfo(DB, user="authenticator"))
        conn.autocommit = True  # each execute below is one transaction
        cur = conn.cursor()
        for p in PREPARE:
            cur.execute(p)
        cur.execute("SELECT pg_backend_pid()")
        stat = Path("/proc/%d/schedstat" % cur.fetchone()[0])

        def cpu():
            return int(stat.read_text().split()[0])

        size = len(types[0][1][0][1])
        res = {"signups": SIGNUPS, "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "types": []}
        res["empty"] = measure(cur, cpu, "SELECT 1", [()] * SIGNUPS)
        res["baseline"] = measure(
            cur, cpu, "EXECUTE b_event(%s, %s); EXECUTE b_sub(%s)",
            [("evt_b%d" % n, "x" * size, "sub_b%d" % n) for n in range(SIGNUPS)])
        for type_, events in types:
            m = measure(cur, cpu, "EXECUTE ident('service_role', %s, %s, '10s'); EXECUTE event(%s, %s)",
                        [(CLAIMS, REQUEST, evt, body) for evt, body in events],
                        lambda answer: json.loads(answer)["result"])
            # Every event of a type must be answered as the webhook's own list of the
            # types it applies says (public.stripe_event_kind), or the figure is of
            # another path.
            applied = pg.sql("SELECT public.stripe_event_kind(%s) IS NOT NULL", type_, dbname=DB)[0][0]
            res["types"].append(dict(m, type=type_, want="processed" if applied else "ignored"))
        conn.close()
        return res
    finally:
        pg.destroy()


def main():
    res = run()
    print()
    print("event cost, %s; one backend, %d sign-ups, one transaction per event, fsync on"
          % (res["date"], res["signups"]))
    print("  %-32s %14s %12s" % ("", "PostgreSQL CPU", "wall"))
    for label, m in (("(empty transaction)", res["empty"]),
                     ("(baseline minimal transaction)", res["baseline"])):
        print("  %-32s %11.0f us %9.0f us" % (label, m["cpu_us"], m["wall_us"]))
    wrong = []
    for m in res["types"]:
        print("  %-32s %11.0f us %9.0f us  %s" % (m["type"], m["cpu_us"], m["wall_us"],
                                               ", ".join("%s %d" % kv for kv in m["results"].items())))
        if set(m["results"]) != {m["want"]}:
            wrong.append("%s: %s, not all %s" % (m["type"], m["results"], m["want"]))
    mean = sum(m["cpu_us"] for m in res["types"]) / len(res["types"])
    res["mean_cpu_us"] = round(mean, 1)
    print("  %-32s %11.0f us" % ("mean of the eight", mean))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "events.json").write_text(json.dumps(res, indent=2) + "\n")
    print("  written to %s" % (OUT / "events.json"))
    for w in wrong:
        print("events: the figure measures something else: %s" % w, file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
