#!/usr/bin/env python3
"""Benchmark of a health round (the health section of scripts/bench.sh).

N running instances are served by the loopback health stand-in, 10 % of them
hanging until the probe deadline. A round is: select the running instances, probe
them all concurrently, record every result in one statement. It is timed two
ways, with the release build, through real PostgreSQL:

  call   an operator's service_role call to check-instance-health through nginx
         (the answer's probe_ms splits probes from select + record + HTTP)
  worker the lifecycle worker's periodic round (the same code, no HTTP), as its
         scheduled_jobs lease row times it (last_started_at to last_finished_at);
         the worker runs only while its rounds are timed

    scripts/bench/health_bench.py [--sizes 100,1000,5000] [--timeout-ms 2000]
                            [--concurrency 256] [--hang-pct 10] [--runs 3]

Prints one line per size and checks the bar: with 1,000 instances a round
finishes within the probe deadline + 1 s, both ways (exit status 1 otherwise).
"""
import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/integration"))
sys.path.insert(0, str(ROOT / "tests/standins"))
os.environ.setdefault("MR_BUILD", "build/release")

import mr  # noqa: E402
from health import HealthStandin  # noqa: E402

ACCOUNT = "b0000000-0000-4000-8000-00000000be11"
WORKER = "mindroom-lifecycle"


def populate(s, n, port, hang_pct):
    """n running instances (one account, one subscription each) whose backend
    URLs say how the stand-in answers: every (100 / hang_pct)-th one hangs. As a
    finished deploy leaves them: nothing owed, so the worker only probes."""
    s.sql("DELETE FROM public.instances")
    s.sql("DELETE FROM public.subscriptions WHERE account_id = %s", ACCOUNT)
    every = max(1, round(100 / hang_pct)) if hang_pct > 0 else 0
    s.sql("""
        WITH subs AS (
            INSERT INTO public.subscriptions (account_id, stripe_price_id, tier, status)
            SELECT %s, 'price_starter', 'starter', 'active' FROM generate_series(1, %s)
            RETURNING id)
        INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status,
                                      backend_url, applied_config_version, welcome_email_sent_at)
        SELECT subs.id, n.dokku_app_name, n.subdomain, 'running',
               format('http://127.0.0.1:%%s/h/%%s/%%s', %s::int,
                      CASE WHEN %s > 0 AND row_number() OVER () %% %s = 0 THEN 'hang' ELSE 'ok' END,
                      n.subdomain),
               1, now()
          FROM subs CROSS JOIN LATERAL public.instance_names(subs.id) n""",
          ACCOUNT, n, port, every, every or 1)
    owed = s.sql("SELECT count(*) FROM public.instances WHERE owed_action IS NOT NULL")[0][0]
    assert owed == 0, "%d instances owe work: the worker would do more than probe" % owed
    return s.sql("SELECT count(*) FILTER (WHERE backend_url LIKE '%%/h/hang/%%') FROM public.instances")[0][0]


def worker_rounds(s, n, count, interval_s, timeout_s=600):
    """count periodic rounds of the lifecycle worker, each as its lease row times it
    (last_started_at to last_finished_at), in ms. The worker is started with
    HEALTH_INTERVAL_S = interval_s (twice a round or more, so one round's end is
    seen before the next begins) and the lease given back, so its first round
    starts at once; that first one warms the process up (prepared statements,
    libcurl's first handles) and is not counted. Stopped again after."""
    s.env["HEALTH_INTERVAL_S"] = str(interval_s)
    seen = s.sql("INSERT INTO public.scheduled_jobs (name) VALUES ('health') ON CONFLICT (name) "
                 "DO UPDATE SET until = '-infinity' RETURNING runs")[0][0]
    took = []
    s.start_function(WORKER)
    try:
        deadline = time.monotonic() + timeout_s
        while len(took) < count + 1:
            assert time.monotonic() < deadline, "%d health rounds in %d s" % (len(took), timeout_s)
            r = s.sql("SELECT runs, last_error, "
                      "1000 * extract(epoch FROM last_finished_at - last_started_at)::float8 "
                      "FROM public.scheduled_jobs WHERE name = 'health' "
                      "AND last_finished_at >= last_started_at")
            if r and r[0][0] > seen:
                assert r[0][0] == seen + 1, "a round ended unseen: raise interval_s"
                assert r[0][1] is None, r[0][1]
                seen = r[0][0]
                took.append(r[0][2])
                checked = s.sql("SELECT count(*) FROM public.instances WHERE last_health_check >= "
                                "(SELECT last_started_at FROM public.scheduled_jobs "
                                "WHERE name = 'health')")[0][0]
                assert checked == n, (checked, n)
            time.sleep(0.02)
    finally:
        s.stop_function(WORKER)
    return took[1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,5000")
    ap.add_argument("--timeout-ms", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--hang-pct", type=float, default=10)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]

    pg = mr.Cluster(fsync=True)  # as in production: every recorded round is a real commit
    ok = True
    try:
        pg.make_template()
        with HealthStandin() as h:
            # One worker process, stopped while the calls are timed so that no round of
            # its own overlaps them; worker_rounds() starts it with a short interval.
            # The hanging instances are never marked failed (the threshold is out of
            # reach): every round probes the same N.
            env = {"MINDROOM_BASE_DOMAIN": "mindroom.test", "HEALTH_ALLOW_LOOPBACK": "1",
                   "HEALTH_TIMEOUT_MS": str(a.timeout_ms), "HEALTH_INTERVAL_S": "86400",
                   "HEALTH_FAILURE_THRESHOLD": "1000",
                   "HEALTH_CONCURRENCY": str(a.concurrency), "MR_LIFECYCLE_WORKERS": "1",
                   "MR_LOG_LEVEL": "warn"}
            with mr.Stack(pg, env=env, functions=["check-instance-health", WORKER], workers=1) as s:
                s.stop_function(WORKER)
                s.sql("INSERT INTO auth.users (id, aud, role, email) VALUES "
                      "(%s, 'authenticated', 'authenticated', 'bench@example.com')", ACCOUNT)
                print("health bench: timeout %d ms, concurrency %d, %g%% hanging, median of %d"
                      % (a.timeout_ms, a.concurrency, a.hang_pct, a.runs))
                for n in sizes:
                    hanging = populate(s, n, h.port, a.hang_pct)
                    walls, probes = [], []
                    for _ in range(a.runs):
                        t0 = time.monotonic()
                        r = s.call("POST", "check-instance-health", json={}, token=s.jwt(),
                                   timeout=600)
                        walls.append((time.monotonic() - t0) * 1000)
                        assert r.status == 200, r
                        j = r.json
                        assert j["checked"] == n, j["checked"]
                        assert j["healthy"] == n - hanging and j["unreachable"] == hanging, (
                            j["healthy"], j["unreachable"])
                        probes.append(j["probe_ms"])
                    wall, probe = statistics.median(walls), statistics.median(probes)
                    rnd = statistics.median(worker_rounds(s, n, a.runs, max(2, math.ceil(2 * wall / 1000))))
                    print("  %5d instances (%4d hanging): call %6.0f ms (probes %6.0f ms, "
                          "select+record+HTTP %4.0f ms); worker round %6.0f ms; %6.0f probes/s"
                          % (n, hanging, wall, probe, wall - probe, rnd, n / (rnd / 1000)))
                    for what, ms in (("call", wall), ("worker round", rnd)):
                        if n == 1000 and ms > a.timeout_ms + 1000:
                            print("  FAIL: the %s over 1,000 instances took %.0f ms > deadline %d ms + 1 s"
                                  % (what, ms, a.timeout_ms))
                            ok = False
    finally:
        pg.destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
