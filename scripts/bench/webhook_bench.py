#!/usr/bin/env python3
"""Webhook event cost (the webhook section of scripts/bench.sh).

One run, one machine, the configuration `make run` runs: every function and the
lifecycle worker (with the dokku-provisioner in dry-run, as `make run` without
dokku), nginx, PostgreSQL with fsync on, notifications on, logs at info, the health
round at its default interval (it leaves out the instances a dry run deployed: nothing
serves them; scripts/bench/health_bench.py measures rounds). Nothing production has on
is switched off.

  1. baseline  pgbench -M prepared -c 8 -j 2 -T BENCH_SECONDS of the minimal
               transaction a webhook needs (scripts/bench/baseline.sql on the two
               tables of baseline_schema.sql, a database of its own on the same
               cluster): the rate every figure below is compared with; then
               offered at half of that rate (pgbench -R), its p50 and p99 printed
               as the reference for the paced runs' (4)
  2. sign-up   wrk -t2 -c16 through nginx: the events Stripe sends around one
               sign-up (customer.updated, customer.subscription.created,
               invoice.created, invoice.finalized, payment_intent.succeeded,
               charge.succeeded, invoice.paid, customer.subscription.updated), each
               customer ours; one event in eight creates an instance, which the
               worker provisions meanwhile                        target >= 50%
  3. new       wrk -t2 -c16: customer.subscription.created only, each a new
               subscription and instance                         target >= 25%
  4. paced     each stream offered at half its measured peak (a connection per
               100/s, a delay before each request: wrk2 is not packaged), each once the
               worker has created the instances of the bursts before it (the
               wait is reported) and the kernel's dirty pages are flushed
               (quiesce): the steady state, with the worker provisioning the
               paced stream's own instances as they come; the disk's fdatasync
               latency is probed meanwhile and reported         target p99 <= 10 ms
  5. duplicates one settled event over and over, alternating with the noop
               function behind the same nginx                   target >= 65% of noop
  6. memory    PSS of every function's workers and the lifecycle worker's
               processes after the streams                      target < 1 MiB
The machine's load average is read before and after each run: figures of one run
are comparable with each other (ratios), not with another machine's.
Events are signed beforehand (wrk's LuaJIT has no HMAC; scripts/bench/webhook.lua).

Prints a table, writes build/bench/webhook.json and a row into docs/benchmarks.md
(between the webhook-bench markers; BENCH_NO_DOCS=1 leaves the file alone).
Environment: BENCH_SECONDS (10), BENCH_CONNS (16), BENCH_PROFILE=1 (also
pg_stat_statements, track all: where the database's time goes per statement, into
build/bench/webhook-statements.txt, written anew each run; a profiling run, its rates
are not the bench's),
BENCH_PERF=1 (perf record -a -g during each stream: build/bench/perf-<stream>.txt),
MR_BUILD (build/release). For experiments (a run with either is not written to the
docs): BENCH_EXPERIMENT_SQL=FILE (run as the superuser on the stack's database once
the accounts exist, before the streams: e.g. a function redefined), and
BENCH_PACED_SIGNUP / BENCH_PACED_NEW (events a second offered in that paced run,
instead of half of its stream's peak).
"""

import contextlib
import datetime
import hashlib
import hmac
import json
import math
import os
import platform
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/integration"))
os.environ.setdefault("MR_BUILD", "build/release")
import mr  # noqa: E402
import psycopg2  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
CONNS = int(os.environ.get("BENCH_CONNS", "16"))
PROFILE = os.environ.get("BENCH_PROFILE") == "1"
PERF = os.environ.get("BENCH_PERF") == "1"
EXPERIMENT_SQL = os.environ.get("BENCH_EXPERIMENT_SQL")
# The paced runs' rates an experiment fixed, by stream ("signup", "new").
PACED_RATE = {k: float(os.environ["BENCH_PACED_" + k.upper()]) for k in ("signup", "new")
              if os.environ.get("BENCH_PACED_" + k.upper())}
EXPERIMENT = bool(EXPERIMENT_SQL or PACED_RATE)
ACCOUNTS = 1000
LUA = ROOT / "scripts/bench/webhook.lua"
OUT = ROOT / "build/bench"
DOC = ROOT / "docs/benchmarks.md"
FIXTURES = ROOT / "tests/fixtures"
WEBHOOK = "handle-stripe-webhook"
WORKER = "mindroom-lifecycle"
# The two programs whose CPU the figures show on their own, by a short name, and
# their PostgreSQL sessions (found by the application name each gives them).
SHORT = {WEBHOOK: "webhook", WORKER: "worker"}
SESSIONS = {name: "postgres:" + short for name, short in SHORT.items()}
TARGETS = {"signup": 0.50, "new": 0.25, "duplicates": 0.65, "paced_p99_ms": 10.0,
           "pss_kib": 1024}


def load():
    return tuple(float(x) for x in Path("/proc/loadavg").read_text().split()[:3])


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


# ---- events ------------------------------------------------------------------------

def sign(secret, t, body):
    mac = hmac.new(secret.encode(), ("%d.%s" % (t, body)).encode(), hashlib.sha256).hexdigest()
    return "t=%d,v1=%s\t%s\n" % (t, mac, body)


def envelope(type_, obj, created, evt):
    return {"id": evt, "object": "event", "api_version": "2025-03-31.basil", "created": created,
            "data": {"object": obj}, "livemode": False, "pending_webhooks": 1,
            "request": {"id": "req_" + evt[4:20], "idempotency_key": None}, "type": type_}


class Templates:
    """The objects of one sign-up, from the test fixtures (Stripe's shapes)."""

    def __init__(self):
        self.customer = fixture("stripe_customer_created.json")["data"]["object"]
        self.sub_created = fixture("stripe_subscription_created_basil.json")["data"]["object"]
        self.sub_updated = fixture("stripe_subscription_updated_basil.json")["data"]["object"]
        self.invoice = fixture("stripe_invoice_paid_basil.json")["data"]["object"]

    def subscription(self, base, sub, cus, account, t):
        o = json.loads(json.dumps(base))
        o.update(id=sub, customer=cus, status="active", metadata={"account_id": account},
                 created=t, start_date=t, billing_cycle_anchor=t)
        for it in o["items"]["data"]:
            it["price"]["id"] = "price_starter"
            it["subscription"] = sub
            it["current_period_start"], it["current_period_end"] = t, t + 30 * 86400
        return o

    def signup(self, n, prefix, cus, account, t):
        """The eight events of sign-up n, oldest first: [(type, body)]."""
        sub, inv = "sub_%s_%d" % (prefix, n), "in_%s_%d" % (prefix, n)
        pi, ch = "pi_%s_%d" % (prefix, n), "ch_%s_%d" % (prefix, n)
        customer = dict(self.customer, id=cus, created=t - 60, email="bench%d@example.com" % n,
                        invoice_settings={"default_payment_method": "pm_" + cus[4:]})
        invoice = dict(self.invoice, id=inv, customer=cus, created=t, period_start=t, period_end=t,
                       number="MR-%d" % n,
                       parent={"quote_details": None, "type": "subscription_details",
                               "subscription_details": {"metadata": {"account_id": account},
                                                        "subscription": sub}})
        draft = dict(invoice, status="draft", paid=False, amount_paid=0, attempted=False,
                     attempt_count=0)
        opened = dict(invoice, status="open", paid=False, amount_paid=0)
        intent = {"id": pi, "object": "payment_intent", "amount": 1000, "amount_received": 1000,
                  "capture_method": "automatic_async", "confirmation_method": "automatic",
                  "created": t, "currency": "usd", "customer": cus, "description": "Subscription creation",
                  "latest_charge": ch, "livemode": False, "metadata": {},
                  "payment_method": "pm_" + cus[4:], "payment_method_types": ["card"],
                  "status": "succeeded", "invoice": inv}
        charge = {"id": ch, "object": "charge", "amount": 1000, "amount_captured": 1000,
                  "amount_refunded": 0, "balance_transaction": "txn_" + ch[3:], "captured": True,
                  "created": t, "currency": "usd", "customer": cus, "description": "Subscription creation",
                  "livemode": False, "metadata": {}, "outcome": {
                      "network_status": "approved_by_network", "reason": None, "risk_level": "normal",
                      "risk_score": 32, "seller_message": "Payment complete.", "type": "authorized"},
                  "paid": True, "payment_intent": pi, "payment_method": "pm_" + cus[4:],
                  "payment_method_details": {"card": {
                      "brand": "visa", "checks": {"address_line1_check": None,
                                                  "address_postal_code_check": "pass",
                                                  "cvc_check": "pass"},
                      "country": "US", "exp_month": 12, "exp_year": 2030, "funding": "credit",
                      "last4": "4242", "network": "visa"}, "type": "card"},
                  "receipt_url": "https://pay.stripe.com/receipts/" + ch, "status": "succeeded"}
        return [
            ("customer.updated", customer, t),
            ("customer.subscription.created", self.subscription(self.sub_created, sub, cus, account, t), t),
            ("invoice.created", draft, t),
            ("invoice.finalized", opened, t + 1),
            ("payment_intent.succeeded", intent, t + 1),
            ("charge.succeeded", charge, t + 1),
            ("invoice.paid", dict(invoice, status="paid"), t + 1),
            ("customer.subscription.updated",
             self.subscription(self.sub_updated, sub, cus, account, t), t + 1),
        ]


def write_events(path, count, prefix, secret, kind="new", accounts=None):
    """count signed lines for wrk: kind "new" (a new subscription each, customers
    cus_bench1..ACCOUNTS cycling) or "signup" (count // 8 sign-ups of eight events,
    sign-up n for customer cus_<prefix>_<n> of account accounts[n])."""
    tpl = Templates()
    t = int(time.time())
    with open(path, "w") as f:
        if kind == "signup":
            for n in range(count // 8):
                cus = "cus_%s_%d" % (prefix, n)
                for i, (type_, obj, created) in enumerate(tpl.signup(n, prefix, cus, accounts[n], t)):
                    body = json.dumps(envelope(type_, obj, created, "evt_%s_%d_%d" % (prefix, n, i)),
                                      separators=(",", ":"))
                    f.write(sign(secret, t, body))
            return
        base = fixture("stripe_subscription_created_basil.json")
        for n in range(count):
            e = json.loads(json.dumps(base))
            e["id"] = "evt_%s_%d" % (prefix, n)
            e["created"] = t
            o = e["data"]["object"]
            o["id"] = "sub_%s_%d" % (prefix, n)
            o["customer"] = "cus_bench%d" % (n % ACCOUNTS + 1)
            o["metadata"] = {}
            f.write(sign(secret, t, json.dumps(e, separators=(",", ":"))))


def signup_accounts(s, prefix, n):
    """n accounts, each with the Stripe customer we created for it
    (cus_<prefix>_<i>). Returns their ids, in order."""
    head, like = "su_%s_" % prefix, "su\\_%s\\_%%" % prefix
    s.sql("INSERT INTO auth.users (id, email) SELECT gen_random_uuid(), %s || i || '@example.com'"
          " FROM generate_series(0, %s) AS i", head, n - 1)
    s.sql("UPDATE accounts SET stripe_customer_id = 'cus_' || %s || '_' || split_part(substr(email, %s),"
          " '@', 1) WHERE email LIKE %s", prefix, len(head) + 1, like)
    rows = s.sql("SELECT split_part(substr(email, %s), '@', 1)::int, id::text FROM accounts"
                 " WHERE email LIKE %s", len(head) + 1, like)
    ids = [None] * n
    for i, aid in rows:
        ids[i] = aid
    return ids


# ---- the tools ----------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def proc_table():
    """{pid: (ppid, cpu ticks)} of every process: its own time and that of the
    children it has reaped (so a tree's sum over its live processes includes the
    processes that ended meanwhile, such as pgbench's backends)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        out[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return out


class Cpu:
    """CPU time spent by each part of the stack between start() and stop(), from
    /proc (utime + stime of the processes and, for a process that started
    meanwhile, all of it): unlike a rate, CPU per event hardly depends on what else
    the machine is doing. Parts: postgres (every process of the cluster), nginx,
    one per function (master and workers)."""

    def __init__(self, pg, s):
        self.s = s
        self.roots = {"postgres": int(Path(pg.dir, "data/postmaster.pid").read_text().split()[0]),
                      "nginx": s.nginx.pid}
        for name in s.functions:
            self.roots[name] = s.master_pid(name)

    def _sessions(self):
        """PostgreSQL's sessions of the webhook and of the lifecycle worker, by the
        application name each process gives its connections: {pid: part}."""
        rows = self.s.sql("SELECT pid, application_name FROM pg_stat_activity"
                          " WHERE application_name = ANY(%s)", list(SESSIONS))
        return {int(pid): SESSIONS[app] for pid, app in rows}

    def _sample(self):
        sessions = self._sessions()
        table = proc_table()
        owner = dict(sessions)
        for part, root in self.roots.items():
            owner[root] = part
        # Children (and their children) belong to their root's part.
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _) in table.items():
                if pid not in owner and ppid in owner:
                    owner[pid] = owner[ppid]
                    changed = True
        return {pid: (owner[pid], ticks) for pid, (_, ticks) in table.items() if pid in owner}

    def pids(self, part=None):
        """This stack's processes (part: only that part's, e.g. a function's name)."""
        return sorted(pid for pid, (owner, _) in self._sample().items() if part in (None, owner))

    def start(self):
        self.t0 = self._sample()

    def stop(self):
        t1 = self._sample()
        out = {}
        for sample, sign in ((t1, 1), (self.t0, -1)):
            for part, ticks in sample.values():
                out[part] = out.get(part, 0) + sign * ticks
        return {k: v * 1000.0 / TICK for k, v in out.items()}   # ms


def per_event(cpu_ms, requests):
    """{part: microseconds of CPU per event}, the small parts folded into "other"."""
    out = {}
    for part, ms in cpu_ms.items():
        key = SHORT.get(part) or (part if part in ("postgres", "nginx", *SESSIONS.values())
                                  else "other")
        out[key] = out.get(key, 0) + ms * 1000.0 / max(requests, 1)
    # postgres is every process of the cluster; its webhook and worker sessions
    # are also shown on their own (a part of it, not added to the total again).
    for k in SESSIONS.values():
        out["postgres"] = out.get("postgres", 0) + out.get(k, 0)
    out["total"] = sum(v for k, v in out.items() if ":" not in k)
    return {k: round(v, 1) for k, v in out.items()}

def wrk(url, conns, seconds, args=(), threads=2):
    cmd = ["wrk", "-t%d" % threads, "-c%d" % conns, "-d%ds" % seconds, "--latency",
           "-s", str(LUA), url, "--"] + [str(a) for a in args]
    before = load()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"^RESULT (\{.*\})$", p.stdout, re.M)
    if not m:
        raise RuntimeError("wrk failed:\n" + p.stdout + p.stderr)
    out = json.loads(m.group(1))
    out["load"] = [before, load()]
    return out


def wrk_plain(url, conns, seconds, threads=2):
    p = subprocess.run(["wrk", "-t%d" % threads, "-c%d" % conns, "-d%ds" % seconds, "--latency", url],
                       capture_output=True, text=True, timeout=seconds + 60)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", p.stdout).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", p.stdout, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", p.stdout)
    return {"rps": rps, "p50": lat.get("50"), "p99": lat.get("99"),
            "non200": int(non2xx.group(1)) if non2xx else 0}


def baseline(pg, seconds):
    """pgbench of scripts/bench/baseline.sql on a database of its own; with the
    CPU per transaction of the cluster and of pgbench itself."""
    db = "bench_baseline"
    pg.sql('DROP DATABASE IF EXISTS "%s"' % db)
    pg.sql('CREATE DATABASE "%s"' % db)
    subprocess.run(["psql", pg.conninfo(db), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f",
                    str(ROOT / "scripts/bench/baseline_schema.sql")], check=True, capture_output=True)
    payload = json.dumps({"object": "event", "data": {"pad": secrets.token_hex(430)}})[:900]
    assert len(payload) == 900
    cmd = ["pgbench", "-n", "-M", "prepared", "-c", "8", "-j", "2", "-T", str(seconds),
           "-f", str(ROOT / "scripts/bench/baseline.sql"), "-D", "payload=" + payload,
           pg.conninfo(db)]
    before = load()
    post = int(Path(pg.dir, "data/postmaster.pid").read_text().split()[0])
    t0 = proc_table()
    c0 = os.times().children_user + os.times().children_system
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=seconds + 120)
    t1 = proc_table()
    ticks = (sum(t for pid, (pp, t) in t1.items() if pp == post or pid == post)
             - sum(t for pid, (pp, t) in t0.items() if pp == post or pid == post))
    # pgbench has exited: its time is in our children's.
    client = os.times().children_user + os.times().children_system
    res = pgbench_result(p.returncode, out, err)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    n = int(done.group(1)) if done else 1
    res.update(rows=pg.sql("SELECT count(*) FROM bench_events", dbname=db)[0][0],
               load=[before, load()],
               cpu_us_per_tx={"postgres": round(ticks * 1e6 / TICK / n, 1),
                              "pgbench": round((client - c0) * 1e6 / n, 1)})
    res["paced"] = baseline_paced(cmd, res["tps"] / 2, pg.dir, seconds)
    pg.sql('DROP DATABASE "%s"' % db)
    return res


def baseline_paced(cmd, rate, directory, seconds):
    """The baseline's transaction offered at half of its peak (pgbench -R, its
    clients unchanged) after quiesce(), the disk probed meanwhile: what the same
    machine and disk give the minimal transaction at the load the paced streams run
    at, printed beside their p99 target. pgbench schedules each transaction on a
    Poisson clock and logs, per transaction, its time from that schedule and how
    late it started (-l); the time from its start is the one wrk reports for a
    paced request (from its send to its answer), the time from its schedule adds
    the waits of a client still busy with the transaction before."""
    with tempfile.TemporaryDirectory(prefix="bench-paced-") as tmp:
        prefix = str(Path(tmp) / "log")
        quiesce()
        before = load()
        with FsyncProbe(directory) as probe:
            p = subprocess.run(cmd[:1] + ["-R", "%.0f" % rate, "-l", "--log-prefix", prefix]
                               + cmd[1:], capture_output=True, text=True, timeout=seconds + 120)
        done = pgbench_result(p.returncode, p.stdout, p.stderr)
        sched, sent = [], []
        for f in Path(tmp).iterdir():
            for line in f.read_text().splitlines():
                # client, transaction, time (µs from its schedule), script, epoch s,
                # µs, schedule lag (µs)
                fields = line.split()
                sched.append(int(fields[2]) / 1000.0)
                sent.append((int(fields[2]) - int(fields[6])) / 1000.0)
    return {"target_tps": round(rate, 1), "tps": done["tps"],
            "n": len(sent), "p50_ms": percentile(sent, 0.5), "p99_ms": percentile(sent, 0.99),
            "p99_from_schedule_ms": percentile(sched, 0.99), "load": [before, load()],
            "disk_fsync": probe.summary()}


def pgbench_result(returncode, out, err):
    """{"tps", "latency_avg_ms"} from a pgbench run's output (tps after its
    connections were made); raises when it failed."""
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    if returncode != 0 or not m:
        raise RuntimeError("pgbench failed:\n" + out + err)
    lat = re.search(r"latency average = ([\d.]+) ms", out)
    return {"tps": float(m.group(1)), "latency_avg_ms": float(lat.group(1)) if lat else None}


def percentile(xs, q):
    """The q-quantile of xs (the value below which a fraction q of them lie; q = 1:
    the largest), rounded to 0.01; 0.0 for none."""
    xs = sorted(xs) or [0.0]
    return round(xs[min(len(xs) - 1, int(len(xs) * q))], 2)


def pss(s, names):
    """{name: [PSS KiB of each worker process]} for the functions named."""
    out = {}
    for name in names:
        vals = []
        for pid in s.workers(name):
            try:
                txt = Path("/proc/%d/smaps_rollup" % pid).read_text()
            except OSError:
                continue
            vals.append(int(re.search(r"^Pss:\s+(\d+)", txt, re.M).group(1)))
        out[name] = vals
    return out


def prepare(s, kind, secret, prefix, count):
    """A file of count signed events (a sign-up stream's customers made first)."""
    f = s.run / ("%s.txt" % prefix)
    accounts = signup_accounts(s, prefix, count // 8 + 1) if kind == "signup" else None
    write_events(f, count, prefix, secret, kind, accounts)
    return f


def quiesce():
    """Flushes the kernel's dirty pages before a latency run. A 10 s burst leaves
    hundreds of MiB of written-but-unflushed files (PostgreSQL's pages, the logs); the
    kernel writes back what is older than 30 s every 5 s, and while it does, every
    fsync on the disk waits: each accepted event waits for one (its WAL flush), so a
    paced run that starts within a minute of a burst measures the burst's writeback
    (docs/webhook.md, Benchmark). With this, each run measures its own I/O."""
    os.sync()


class Sampler:
    """Something sampled every 10 ms on a thread of its own for as long as a `with`
    block runs (a run of wrk or pgbench): _open() once, _sample(handle) each time,
    _close(handle) at the end."""

    def __init__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        handle = self._open()
        try:
            while not self.stop.is_set():
                self._sample(handle)
                self.stop.wait(0.01)
        finally:
            self._close(handle)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class FsyncProbe(Sampler):
    """The disk's fdatasync latency during a run: an 8 KiB write and fdatasync every
    10 ms on a file next to the cluster's data. Reported beside a paced run's p99 so
    that a stall of the disk is visible as such."""

    def __init__(self, directory):
        super().__init__()
        self.path = Path(directory) / "fsync-probe"
        self.lat = []

    def _open(self):
        return os.open(str(self.path), os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600)

    def _sample(self, fd):
        os.pwrite(fd, b"\0" * 8192, 0)
        t = time.perf_counter()
        os.fdatasync(fd)
        self.lat.append((time.perf_counter() - t) * 1000)

    def _close(self, fd):
        os.close(fd)
        self.path.unlink()

    def summary(self):
        return {"n": len(self.lat), "p50_ms": percentile(self.lat, 0.5),
                "p99_ms": percentile(self.lat, 0.99), "max_ms": percentile(self.lat, 1.0)}

    @staticmethod
    def line(f):
        """A summary() as the report prints it under the run it was probed during."""
        return ("            disk fdatasync meanwhile: p50 %.2f p99 %.2f max %.2f ms (%d probes)"
                % (f["p50_ms"], f["p99_ms"], f["max_ms"], f["n"]))


class WaitSampler(Sampler):
    """What the webhook's database sessions wait for during a run (in a profiling run):
    pg_stat_activity every 10 ms over one connection, each active session counted
    as on CPU (no wait event), waiting for the WAL's flush (its own, IO WALSync and
    WALWrite, or another session's, LWLock WALWrite) or waiting for something else."""

    FLUSH = {("IO", "WALSync"), ("IO", "WALWrite"), ("LWLock", "WALWrite")}

    def __init__(self, s):
        super().__init__()
        self.s = s
        self.counts = {"cpu": 0, "wal flush": 0, "other": 0}
        self.samples = 0

    def _open(self):
        conn = psycopg2.connect(self.s.pg.conninfo(self.s.db))
        conn.autocommit = True
        return conn

    def _sample(self, conn):
        with conn.cursor() as cur:
            cur.execute("SELECT wait_event_type, wait_event FROM pg_stat_activity"
                        " WHERE application_name = %s AND state = 'active'", (WEBHOOK,))
            for wt, we in cur.fetchall():
                self.counts["cpu" if wt is None else
                            "wal flush" if (wt, we) in self.FLUSH else "other"] += 1
        self.samples += 1

    def _close(self, conn):
        conn.close()

    def summary(self):
        """{part: mean number of sessions in it}."""
        return {k: round(v / max(self.samples, 1), 3) for k, v in self.counts.items()}


def paced(s, url, kind, secret, peak, prefix):
    """The stream offered at half of `peak` (or at the rate an experiment fixed,
    PACED_RATE), about 100 requests a second per connection, each connection
    waiting a delay before each request: calibrated by
    a 3 s run so that delay + p50 makes one request period per connection (the
    delay is fractional, webhook.lua keeps it exact on average). With fewer
    connections, a period shorter than a request's own time could not be offered:
    the run would measure a closed loop at the rate two connections reach."""
    target = PACED_RATE.get(kind, peak / 2)
    conns = max(2, int(math.ceil(target / 100.0)))
    period = conns * 1000.0 / target
    need = int(target * (SECONDS + 4) * 1.5) + 200
    f = prepare(s, kind, secret, prefix + "c", need)
    calib = wrk(url, conns, 3, [f, conns, round(period, 3)], threads=conns)
    delay = max(0.0, round(period - calib["p50_ms"], 3))
    f = prepare(s, kind, secret, prefix, need)
    quiesce()
    with FsyncProbe(s.pg.dir) as probe, (WaitSampler(s) if PROFILE else contextlib.nullcontext()) as waits:
        r = wrk(url, conns, SECONDS, [f, conns, delay], threads=conns)
    # instances_behind: the instances the run asked for that the worker had not created
    # by its end; more than a few means it did not keep pace with the rate offered.
    r.update(target_rps=round(target, 1), rate_fixed=kind in PACED_RATE, delay_ms=delay,
             connections=conns, disk_fsync=probe.summary(),
             instances_behind=provisioning(s), sessions=waits.summary() if waits else None)
    return r


def provisioning(s):
    """How many instances the lifecycle worker has yet to create."""
    return s.sql("SELECT count(*) FROM instances WHERE status = 'provisioning'")[0][0]


def settle(s, limit=300):
    """Waits until the lifecycle worker has created every instance the streams so far
    asked for (none left provisioning), up to limit seconds: a paced run measures
    its own steady state (the worker provisioning the paced stream's instances as
    they come), not the backlog a 10 s burst at full rate left behind. Returns the
    seconds waited and how many were still provisioning at the start."""
    t0 = time.monotonic()
    left0 = None
    while True:
        left = provisioning(s)
        if left0 is None:
            left0 = left
        if left == 0 or time.monotonic() - t0 > limit:
            return {"seconds": round(time.monotonic() - t0, 1), "backlog": left0, "left": left}
        time.sleep(0.5)


def stream(s, url, kind, secret, prefix, supply, cpu):
    f = prepare(s, kind, secret, prefix, supply)
    cpu.start()
    rec = None
    if PERF:
        data = OUT / ("perf-%s.data" % prefix)
        rec = subprocess.Popen(["perf", "record", "-a", "-g", "-q", "-o", str(data), "--",
                                "sleep", str(SECONDS)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    r = wrk(url, CONNS, SECONDS, [f, 2])
    if rec is not None:
        rec.wait()
        # This stack's processes only (the machine is shared).
        pids = ",".join(str(p) for p in cpu.pids())
        text = ""
        for sort in ("comm,dso", "comm,dso,sym"):
            rep = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio",
                                  "--pid", pids, "--sort", sort, "-g", "none", "--percent-limit",
                                  "0.3"], capture_output=True, text=True)
            text += rep.stdout
        (OUT / ("perf-%s.txt" % prefix)).write_text(text)
    # The worker's share of the stream is done while it runs or shortly after.
    time.sleep(1)
    r["cpu_us_per_event"] = per_event(cpu.stop(), r["requests"])
    r["supply"] = supply
    r["rows"] = s.sql("SELECT count(*) FROM stripe_events WHERE id LIKE %s", "evt_%s\\_%%" % prefix)[0][0]
    return r


# ---- the run -------------------------------------------------------------------------

def run():
    OUT.mkdir(parents=True, exist_ok=True)
    pg = mr.Cluster(fsync=True)
    res = {"seconds": SECONDS, "connections": CONNS, "cores": os.cpu_count(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": "%s, %d cores, %s" % (platform.node(), os.cpu_count(), platform.release()),
           "experiment": EXPERIMENT}
    try:
        if PROFILE:
            track_statements(pg)
            # This run's profile only (statements() adds each stream's to the file).
            (OUT / "webhook-statements.txt").write_text("profile of the run of %s\n" % res["date"])
        pg.make_template()

        print("bench webhook: pgbench baseline (8 clients, %ds)..." % SECONDS, flush=True)
        res["baseline"] = baseline(pg, SECONDS)

        env = {"DOKKU_MODE": "dry-run", "HEALTH_INTERVAL_S": "60"}
        # workers=None: MR_WORKERS unset, each function's default, as in make run.
        with mr.Stack(pg, env=env, workers=None, extra_functions=("noop",)) as s:
            secret = s.env["STRIPE_WEBHOOK_SECRET"]
            url = s.url(WEBHOOK)
            s.sql("INSERT INTO auth.users (id, email) SELECT gen_random_uuid(),"
                  " 'bench' || i || '@example.com' FROM generate_series(1, %s) AS i", ACCOUNTS)
            s.sql("UPDATE accounts SET stripe_customer_id = 'cus_' || split_part(email, '@', 1)"
                  " WHERE email LIKE 'bench%%@example.com'")
            if EXPERIMENT_SQL:
                s.sql(Path(EXPERIMENT_SQL).read_text())
            # Enough unique events for the whole baseline rate: a stream never
            # wraps around into duplicates (rows == requests says so).
            supply = int(res["baseline"]["tps"] * SECONDS) + 2000
            if PROFILE:
                pg.sql("SELECT pg_stat_statements_reset()", dbname="postgres")

            print("bench webhook: sign-up stream (%d events pre-signed)..." % supply, flush=True)
            cpu = Cpu(pg, s)
            res["signup"] = stream(s, url, "signup", secret, "su", supply, cpu)
            res["signup"]["instances"] = s.sql(
                "SELECT count(*) FROM instances i JOIN subscriptions u ON u.id = i.subscription_id"
                " WHERE u.stripe_subscription_id LIKE 'sub\\_su\\_%%'")[0][0]
            if PROFILE:
                statements(pg, s.db, "signup")
            print("bench webhook: new subscriptions only...", flush=True)
            res["new"] = stream(s, url, "new", secret, "nw", supply, cpu)
            if PROFILE:
                statements(pg, s.db, "new")

            print("bench webhook: paced at half of each peak, each once the worker has caught up...",
                  flush=True)
            res["settle_signup_paced"] = settle(s)
            res["signup_paced"] = paced(s, url, "signup", secret, res["signup"]["rps"], "ps")
            res["settle_new_paced"] = settle(s)
            res["new_paced"] = paced(s, url, "new", secret, res["new"]["rps"], "pn")
            res["settle_duplicates"] = settle(s)

            # Duplicates and the no-op alternate in short rounds, so that a change in
            # the machine's load hits both alike; rates are the rounds' means.
            print("bench webhook: duplicates and the noop function, alternating...", flush=True)
            dup = s.run / "dup.txt"
            with open(s.run / "nw.txt") as f, open(dup, "w") as g:
                g.write(f.readline())
            rounds, per = 3, max(2, SECONDS // 3)
            dups, noops = [], []
            for _ in range(rounds):
                dups.append(wrk(url, CONNS, per, [dup, 2]))
                noops.append(wrk_plain(s.url("noop"), CONNS, per))
            res["duplicates"] = {"rps": round(sum(r["rps"] for r in dups) / rounds, 1),
                                 "rounds": [r["rps"] for r in dups],
                                 "non200": sum(r["non200"] for r in dups)}
            res["noop"] = {"rps": round(sum(r["rps"] for r in noops) / rounds, 1),
                           "rounds": [r["rps"] for r in noops]}

            res["pss_kib"] = pss(s, s.functions)
            res["worker_log_lines"] = sum(1 for _ in s.log(WEBHOOK).splitlines())
    finally:
        pg.destroy()
    return res


def track_statements(pg):
    """Has the cluster (before make_template) count every statement, nested ones
    too, and every function's time: a profiling run's, whose rates are not a
    bench's."""
    conf = Path(pg.dir) / "data/postgresql.auto.conf"
    subprocess.run(["sh", "-c", "cat >> '%s'" % conf], check=True, text=True, input=(
        "shared_preload_libraries = 'pg_stat_statements'\n"
        "pg_stat_statements.track = all\n"
        "pg_stat_statements.max = 2000\n"
        "pg_stat_statements.track_planning = on\n"
        "track_functions = all\n"))
    pg.stop()
    pg.start()
    pg.sql("CREATE EXTENSION pg_stat_statements", dbname="postgres")


def statements(pg, db, label, path=OUT / "webhook-statements.txt"):
    """The top statements (by execution and planning time: a statement a function
    plans again at each call shows as many plans as calls) and functions by total
    time since the last call (or track_statements), added to path; then the counts
    start again."""
    rows = pg.sql(
        "SELECT round(total_exec_time::numeric, 1), calls,"
        " round((total_exec_time / nullif(calls, 0))::numeric, 4), plans, round(total_plan_time::numeric, 1),"
        " round((100 * total_exec_time / sum(total_exec_time) OVER ())::numeric, 1),"
        " toplevel, left(regexp_replace(query, '\\s+', ' ', 'g'), 160)"
        " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s"
        " ORDER BY total_exec_time + total_plan_time DESC LIMIT 40", db, dbname="postgres")
    # Statements planned again at most calls (PL/pgSQL keeps a plan for a statement
    # unless plans made for the parameters of each call look cheaper).
    replanned = pg.sql(
        "SELECT round(total_plan_time::numeric, 1), plans, calls,"
        " left(regexp_replace(query, '\\s+', ' ', 'g'), 160)"
        " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s"
        " AND calls >= 100 AND plans > calls / 2 ORDER BY total_plan_time DESC LIMIT 20",
        db, dbname="postgres")
    funcs = pg.sql("SELECT funcname, calls, round(total_time::numeric, 1), round(self_time::numeric, 1)"
                   " FROM pg_stat_user_functions ORDER BY self_time DESC LIMIT 25", dbname=db)
    with open(path, "a") as f:
        f.write("== %s: pg_stat_statements (ms total, calls, ms/call, plans, ms planning,"
                " %%, toplevel, query)\n" % label)
        for r in rows:
            f.write("%10s %8s %9s %8s %8s %5s%% %-5s %s\n" % r)
        f.write("== %s: planned again at most calls (ms planning, plans, calls, query)\n" % label)
        for r in replanned:
            f.write("%10s %8s %8s %s\n" % r)
        f.write("== %s: pg_stat_user_functions (name, calls, total ms, self ms)\n" % label)
        for r in funcs:
            f.write("%-40s %8s %10s %10s\n" % r)
    pg.sql("SELECT pg_stat_statements_reset()", dbname="postgres")
    pg.sql("SELECT pg_stat_reset()", dbname=db)


# ---- the report ------------------------------------------------------------------------

def ratios(res):
    b = res["baseline"]["tps"]
    fn_pss = max((v for name, vals in res["pss_kib"].items() if name != WORKER for v in vals), default=0)
    wk_pss = max(res["pss_kib"].get(WORKER) or [0])
    return {
        "signup": res["signup"]["rps"] / b,
        "new": res["new"]["rps"] / b,
        "duplicates": res["duplicates"]["rps"] / res["noop"]["rps"],
        "signup_paced_p99_ms": res["signup_paced"]["p99_ms"],
        "new_paced_p99_ms": res["new_paced"]["p99_ms"],
        "function_pss_kib": fn_pss,
        "worker_pss_kib": wk_pss,
    }


def verdict(r):
    return {
        "signup": r["signup"] >= TARGETS["signup"],
        "new": r["new"] >= TARGETS["new"],
        "duplicates": r["duplicates"] >= TARGETS["duplicates"],
        "signup_paced": r["signup_paced_p99_ms"] <= TARGETS["paced_p99_ms"],
        "new_paced": r["new_paced_p99_ms"] <= TARGETS["paced_p99_ms"],
        "pss": max(r["function_pss_kib"], r["worker_pss_kib"]) < TARGETS["pss_kib"],
    }


def fmt_load(pair):
    return "%.1f/%.1f" % (pair[0][0], pair[1][0])


def report(res):
    r = ratios(res)
    ok = verdict(r)
    b, su, nw = res["baseline"], res["signup"], res["new"]
    sp, npd, d, z = res["signup_paced"], res["new_paced"], res["duplicates"], res["noop"]
    mark = lambda k: "ok" if ok[k] else "MISSED"  # noqa: E731
    print()
    print("webhook benchmark, %s, %s; %d s per run, fsync on, the make run configuration"
          % (res["date"], res["machine"], SECONDS))
    print("  (load average, 1 min, before/after each run)")
    print("  baseline  pgbench minimal transaction, 8 clients : %8.0f tx/s    avg %.2f ms   load %s"
          % (b["tps"], b["latency_avg_ms"] or 0, fmt_load(b["load"])))
    bp = b["paced"]
    print("            paced at half of peak (%4.0f/s offered): %8.0f tx/s    p50 %.2f p99 %.2f ms"
          " (from pgbench's schedule: p99 %.2f ms), the paced runs' reference   load %s"
          % (bp["target_tps"], bp["tps"] or 0, bp["p50_ms"], bp["p99_ms"],
             bp["p99_from_schedule_ms"], fmt_load(bp["load"])))
    print(FsyncProbe.line(bp["disk_fsync"]))
    print("  sign-up   wrk -c%d                               : %8.0f events/s p50 %.2f p99 %.2f ms"
          "  non-200 %d  -> %.0f%% of baseline (target %.0f%%) %s   load %s"
          % (CONNS, su["rps"], su["p50_ms"], su["p99_ms"], su["non200"], 100 * r["signup"],
             100 * TARGETS["signup"], mark("signup"), fmt_load(su["load"])))
    print("  new       wrk -c%d                               : %8.0f events/s p50 %.2f p99 %.2f ms"
          "  non-200 %d  -> %.0f%% of baseline (target %.0f%%) %s   load %s"
          % (CONNS, nw["rps"], nw["p50_ms"], nw["p99_ms"], nw["non200"], 100 * r["new"],
             100 * TARGETS["new"], mark("new"), fmt_load(nw["load"])))
    # The paced target holds when both streams meet it; each line says its own.
    for name, p, w, key in (("sign-up", sp, res["settle_signup_paced"], "signup_paced"),
                            ("new", npd, res["settle_new_paced"], "new_paced")):
        print("  (before the paced %s run: %d instances left to create, the worker took %.1f s%s)"
              % (name, w["backlog"], w["seconds"], "" if not w["left"] else
                 ", %d still left" % w["left"]))
        print("  paced     %-7s at %-12s (%4.0f/s offered): %8.0f events/s p50 %.2f p99 %.2f ms"
              "  (target p99 <= 10 ms) %s   load %s"
              % (name, "a fixed rate" if p["rate_fixed"] else "half of peak",
                 p["target_rps"], p["rps"], p["p50_ms"], p["p99_ms"],
                 mark(key),
                 fmt_load(p["load"])))
        print(FsyncProbe.line(p["disk_fsync"]))
        print("            instances asked for and not yet created at its end: %d" % p["instances_behind"])
        w = p.get("sessions")
        if w:
            print("            the webhook's database sessions meanwhile (mean in each state): on CPU %.2f,"
                  " waiting for the WAL flush %.2f, for something else %.2f"
                  % (w["cpu"], w["wal flush"], w["other"]))
    # One decimal: 64.9% is short of 65%, and must not read as 65%.
    print("  duplicates wrk -c%d                              : %8.0f events/s = %.1f%% of the noop's"
          " %.0f/s (target 65%%) %s" % (CONNS, d["rps"], 100 * r["duplicates"], z["rps"],
                                       mark("duplicates")))
    print("  PSS       largest function worker %.2f MiB, lifecycle worker %.2f MiB (target < 1 MiB) %s"
          % (r["function_pss_kib"] / 1024, r["worker_pss_kib"] / 1024, mark("pss")))
    print("  rows      sign-up %d events recorded (%d instances), new %d"
          % (su["rows"], su["instances"], nw["rows"]))
    bc = b["cpu_us_per_tx"]
    print("  CPU per event (us, from /proc; load-independent): baseline tx postgres %.0f + pgbench %.0f"
          % (bc["postgres"], bc["pgbench"]))
    for name, x in (("sign-up", su), ("new", nw)):
        c = x["cpu_us_per_event"]
        print("    %-8s total %6.0f = postgres %5.0f, webhook %5.0f, nginx %5.0f, worker %5.0f, other %5.0f"
              % (name, c["total"], c.get("postgres", 0), c.get("webhook", 0), c.get("nginx", 0),
                 c.get("worker", 0), c.get("other", 0)))
        print("             postgres: the webhook's sessions %5.0f, the lifecycle worker's %5.0f,"
              " the rest (WAL writer, checkpointer, autovacuum...) %5.0f"
              % (c.get("postgres:webhook", 0), c.get("postgres:worker", 0),
                 c.get("postgres", 0) - c.get("postgres:webhook", 0) - c.get("postgres:worker", 0)))
    res["ratios"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
    res["targets_met"] = ok
    return all(ok.values()) and not (su["non200"] + nw["non200"] + sp["non200"] + npd["non200"]
                                     + d["non200"])


BEGIN, END = "<!-- webhook-bench:begin -->", "<!-- webhook-bench:end -->"
HEADER = ("| date | machine (load avg during the runs) | baseline tx/s | sign-up events/s | "
          "new events/s | paced p99 sign-up / new (pgbench's) | duplicates / noop | PSS fn / worker |\n"
          "|---|---|---|---|---|---|---|---|\n")


def doc_row(res):
    r, loads = res["ratios"], []
    for k in ("baseline", "signup", "new", "signup_paced", "new_paced"):
        loads += [res[k]["load"][0][0], res[k]["load"][1][0]]
    return ("| %s | %d cores (%.1f-%.1f) | %.0f | %.0f = %.0f%% | %.0f = %.0f%% | %.1f / %.1f ms"
            " (%.1f) | %.0f / %.0f = %.1f%% | %.2f / %.2f MiB |\n" % (
                res["date"], res["cores"], min(loads), max(loads), res["baseline"]["tps"],
                res["signup"]["rps"], 100 * r["signup"], res["new"]["rps"], 100 * r["new"],
                r["signup_paced_p99_ms"], r["new_paced_p99_ms"],
                res["baseline"]["paced"]["p99_ms"], res["duplicates"]["rps"],
                res["noop"]["rps"], 100 * r["duplicates"], r["function_pss_kib"] / 1024,
                r["worker_pss_kib"] / 1024))


def write_doc(res, keep=8):
    """Adds this run's row to the table between the markers (the newest first,
    at most `keep` rows)."""
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        print("  %s has no %s ... %s block: not written" % (DOC, BEGIN, END))
        return
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    rows = [l + "\n" for l in block.strip().splitlines() if l.startswith("| 2")]
    rows = [doc_row(res)] + rows[:keep - 1]
    DOC.write_text(head + BEGIN + "\n" + HEADER + "".join(rows) + END + tail)
    print("  row added to %s" % DOC)


def main():
    res = run()
    ok = report(res)
    (OUT / "webhook.json").write_text(json.dumps(res, indent=2) + "\n")
    print("  written to %s" % (OUT / "webhook.json"))
    if PROFILE:
        print("  statements: %s (a profiling run: not written to the docs)" % (OUT / "webhook-statements.txt"))
    elif res["experiment"]:
        print("  an experiment (BENCH_EXPERIMENT_SQL or BENCH_PACED_*): not written to the docs")
    elif os.environ.get("BENCH_NO_DOCS") != "1":
        write_doc(res)
    print("webhook: targets %s" % ("met" if ok else "MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
