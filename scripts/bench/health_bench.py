#!/usr/bin/env python3
"""Benchmark of check-instance-health (the health section of scripts/bench.sh).

N running instances are served by the loopback health stand-in, 10 % of them
hanging until the probe deadline; one service_role call (probes + recording +
sweep) is timed through real nginx and PostgreSQL, with the release build.

    scripts/bench/health_bench.py [--sizes 100,1000,5000] [--timeout-ms 2000]
                            [--concurrency 256] [--hang-pct 10] [--runs 3]

Prints one line per size and checks the bar: with 1,000 instances one call
finishes within the probe deadline + 1 s (exit status 1 otherwise).
"""
import argparse
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


def populate(s, n, port, hang_pct):
    """n running instances (one account, one subscription each) whose backend
    URLs say how the stand-in answers: every (100 / hang_pct)-th one hangs."""
    s.sql("DELETE FROM public.instances")
    s.sql("DELETE FROM public.subscriptions WHERE account_id = %s", ACCOUNT)
    every = max(1, round(100 / hang_pct)) if hang_pct > 0 else 0
    s.sql("""
        WITH subs AS (
            INSERT INTO public.subscriptions (account_id, stripe_price_id, tier, status)
            SELECT %s, 'price_starter', 'starter', 'active' FROM generate_series(1, %s)
            RETURNING id)
        INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status,
                                      backend_url, welcome_email_sent_at)
        SELECT subs.id, n.dokku_app_name, n.subdomain, 'running',
               format('http://127.0.0.1:%%s/h/%%s/%%s', %s::int,
                      CASE WHEN %s > 0 AND row_number() OVER () %% %s = 0 THEN 'hang' ELSE 'ok' END,
                      n.subdomain),
               now()
          FROM subs CROSS JOIN LATERAL public.instance_names(subs.id) n""",
          ACCOUNT, n, port, every, every or 1)
    # Nothing owed: the sweep has nothing to ask for (it still runs and is timed).
    s.sql("UPDATE public.instances i SET applied_config_hash = public.lifecycle_config_hash(i)")
    return s.sql("SELECT count(*) FILTER (WHERE backend_url LIKE '%%/h/hang/%%') FROM public.instances")[0][0]


ACCOUNT = "b0000000-0000-4000-8000-00000000be11"


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
            env = {"MINDROOM_BASE_DOMAIN": "mindroom.test", "HEALTH_ALLOW_LOOPBACK": "1",
                   "HEALTH_TIMEOUT_MS": str(a.timeout_ms),
                   "HEALTH_CONCURRENCY": str(a.concurrency), "MR_LOG_LEVEL": "warn"}
            with mr.Stack(pg, env=env, functions=["check-instance-health"], workers=1) as s:
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
                    wall = statistics.median(walls)
                    print("  %5d instances (%4d hanging): call %6.0f ms (probes %6.0f ms, "
                          "record+select+sweep %4.0f ms), %6.0f probes/s"
                          % (n, hanging, wall, statistics.median(probes),
                             wall - statistics.median(probes), n / (wall / 1000)))
                    if n == 1000 and wall > a.timeout_ms + 1000:
                        print("  FAIL: 1,000 instances took %.0f ms > deadline %d ms + 1 s"
                              % (wall, a.timeout_ms))
                        ok = False
    finally:
        pg.destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
