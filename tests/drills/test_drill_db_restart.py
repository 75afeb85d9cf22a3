"""Drill 1: PostgreSQL crashes and comes back during a burst of a few thousand
signed webhook deliveries, with duplicates and reordering, while the lifecycle
worker provisions, updates, stops and destroys the instances those events ask for.

Asserted: every 2xx answer corresponds to a committed effect (its event row is
there); every other answer is a well-formed 503 that Stripe would retry; after
redelivering what was not accepted, each subscription's row equals what its
last Stripe event says, with no event lost, none applied twice, and at most one
instance per subscription owing what the final status owes. The worker's
processes survive both outages, reconnect (their LISTEN connections too) and
finish every instance's owed work by themselves: each app as the last event says
(running with the last plan's memory, stopped, or gone), created once, one welcome
email at most; and afterwards a commit still wakes a worker at once."""
import collections
import random
import subprocess
import threading
import time

import pytest

import mr
from drill_helpers import (ENTITLED, OWED, Customer, assert_well_formed, burst, deliveries,
                           redeliver_until_accepted)
from lifecycle_helpers import LIMITS, WORKER, new_subscription, stack_env, wait_until
from resend import ResendStandin

CUSTOMERS = 650        # x 4-5 events, +30% duplicates: about 4,000 deliveries
SEED = 8
CONVERGE_S = 180
WAKE_S = 2.0           # a commit to a running instance, with the worker's poll a minute


@pytest.fixture(scope="module")
def resend():
    with ResendStandin() as r:
        yield r


@pytest.fixture(scope="module")
def stack(pg, prov, resend):
    # FAST_ENV (stack_env): 1.5 s provisioner calls, 4 s leases, backoff from 1 s, a
    # poll of a minute (so a quick wake-up is a notification, not a poll).
    env = stack_env(prov, resend, MR_WORKERS="4")
    with mr.Stack(pg, env=env, functions=["handle-stripe-webhook", WORKER]) as s:
        yield s


def pg_ctl(pg, cmd):
    p = subprocess.run([str(mr.ROOT / "scripts/pg.sh"), cmd, str(pg.dir)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=120)
    if p.returncode != 0:
        log = (pg.dir / "postgres.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError("pg.sh %s: %s\n%s" % (cmd, p.stdout, "\n".join(log)))


def test_postgres_crash_mid_burst_loses_and_doubles_nothing(stack, pg, prov, resend):
    workers = stack.workers(WORKER)
    rng = random.Random(SEED)
    t0 = int(time.time()) - 100000
    customers = [Customer(stack, rng, t0 + i * 20) for i in range(CUSTOMERS)]
    events = deliveries(customers, rng)
    n_unique = sum(len(c.events) for c in customers)

    # A quarter into the burst the database crashes (immediate stop: every
    # backend killed, as a kill -9 of the postmaster would) and is started again
    # two seconds later; two thirds in, it is restarted cleanly (fast stop, as a
    # minor-version upgrade or a failover would). Deliveries keep coming.
    outages = []
    gates = [(len(events) // 4, "kill", threading.Event()),
             (2 * len(events) // 3, "stop", threading.Event())]

    def outages_in_turn():
        for _, how, reached in gates:
            reached.wait(120)
            down = time.monotonic()
            pg_ctl(pg, how)
            time.sleep(1.5)
            pg_ctl(pg, "start")
            outages.append((how, time.monotonic() - down))

    def progress(done):
        for at, _, reached in gates:
            if done >= at:
                reached.set()

    outage_thread = threading.Thread(target=outages_in_turn)
    outage_thread.start()
    started = time.monotonic()
    results = burst(stack, events, threads=16, on_progress=progress)
    outage_thread.join()
    elapsed = time.monotonic() - started

    statuses = collections.Counter(d.status for d in results)
    print("\ndrill db-restart: %d deliveries (%d unique events) in %.1fs, answers %s, "
          "outages %s" % (len(results), n_unique, elapsed, dict(statuses),
                          ", ".join("%s %.1fs" % o for o in outages)))
    assert len(outages) == 2, outages
    for d in results:
        assert_well_formed(d)
    odd = [d for d in results if d.status not in (200, 503)]
    warn = [l for l in stack.log("handle-stripe-webhook").splitlines()
            if '"warn"' in l or '"error"' in l]
    assert not odd, "answers other than 200/503: %r\n%s" % (odd[:5], "\n".join(warn[-30:]))
    assert statuses[503] > 0, "the crash should have been noticed by some deliveries"

    # Every 2xx is a committed effect: the event's row exists and is final.
    accepted = {d.event["id"] for d in results if d.status == 200}
    rows = dict(stack.sql("SELECT id, status FROM public.stripe_events"))
    missing = [e for e in accepted if e not in rows]
    assert not missing, "answered 2xx but not committed: %r" % missing[:10]
    assert all(rows[e] in ("processed", "stale") for e in accepted), \
        collections.Counter(rows[e] for e in accepted)

    # Stripe redelivers whatever was not accepted.
    retried = redeliver_until_accepted(stack, [d for d in results if d.status != 200], rng)
    for d in retried:
        assert_well_formed(d)
    print("drill db-restart: %d redeliveries until every event was accepted" % len(retried))

    # Nothing lost, nothing doubled.
    rows = stack.sql("SELECT status, count(*) FROM public.stripe_events GROUP BY 1")
    by_status = dict(rows)
    assert sum(by_status.values()) == n_unique, by_status
    assert set(by_status) <= {"processed", "stale"}, by_status

    subs = {r[0]: r[1:] for r in stack.sql(
        "SELECT stripe_subscription_id, status::text, tier::text, "
        "extract(epoch FROM current_period_end)::bigint, last_event_id, account_id::text "
        "FROM public.subscriptions WHERE stripe_subscription_id IS NOT NULL")}
    assert len(subs) == CUSTOMERS
    # The worker finishes every instance's owed work after the outages, by itself.
    t_conv = time.monotonic()
    # (A cancelled instance's storage stays owed a destroy_storage, due only after
    # the retention period: docs/lifecycle.md. Everything else owed is due now.)
    owed_now = ("FROM public.instances WHERE (owed_action IS NOT NULL AND "
                "(owed_action <> 'destroy_storage' OR owed_due_at <= now())) "
                "OR claimed_by IS NOT NULL")
    try:
        wait_until(lambda: stack.sql("SELECT count(*) " + owed_now)[0][0] == 0,
                   timeout=CONVERGE_S, interval=0.5, what="every instance's owed work done")
    except AssertionError as e:
        left = stack.sql("SELECT owed_action::text, status::text, claimed_by IS NOT NULL, "
                         "left(coalesce(last_error, ''), 80), count(*) " + owed_now +
                         " GROUP BY 1, 2, 3, 4 ORDER BY 5 DESC LIMIT 10")
        raise AssertionError("%s; still owed: %r" % (e, left)) from None
    retained = stack.sql("SELECT count(*) FROM public.instances WHERE status = 'deprovisioned' "
                         "AND owed_action = 'destroy_storage' AND owed_due_at > now() + "
                         "interval '29 days'")[0][0]
    converged = time.monotonic() - t_conv
    log = stack.log(WORKER)
    claim_errors = log.count('"msg":"claim: ')
    listen_errors = log.count('"msg":"LISTEN ')
    reconnects = log.count('"msg":"database connection lost; reconnecting"')
    print("drill db-restart: worker settled every instance %.1fs after the last redelivery; "
          "%d claims refused and %d LISTEN attempts failed while the database was away, "
          "%d reconnections; %d apps created, %d welcome emails" % (
              converged, claim_errors, listen_errors, reconnects, prov.creates, len(resend.delivered)))
    # Same processes: they reconnected rather than died and were replaced.
    assert stack.workers(WORKER) == workers, (workers, stack.workers(WORKER))
    assert claim_errors + listen_errors + reconnects > 0, "the worker never noticed the outages"

    inst = collections.defaultdict(list)
    for sub, iid, status, desired, app in stack.sql(
            "SELECT s.stripe_subscription_id, i.id::text, i.status::text, i.desired_status::text, "
            "i.dokku_app_name FROM public.instances i "
            "JOIN public.subscriptions s ON s.id = i.subscription_id"):
        inst[sub].append((status, desired, app, iid))
    wrong = []
    for c in customers:
        status, tier, period_end, last_id, account = subs[c.sub]
        last = c.last
        if (status, tier, period_end, last_id, account) != (
                last["status"], last["tier"], last["period_end"], last["id"], c.account):
            wrong.append((c.sub, (status, tier, period_end, last_id), last))
        rows_i = inst.get(c.sub, [])
        # One instance row at most (an older entitled event applied after the
        # final one is stale and creates nothing).
        if len(rows_i) > 1:
            wrong.append((c.sub, "instances", rows_i))
            continue
        if last["status"] in ENTITLED and (len(rows_i) != 1 or rows_i[0][1] != "running"):
            wrong.append((c.sub, "owed running", rows_i))
            continue
        if not rows_i:
            continue
        st, desired, app, _ = rows_i[0]
        if desired != OWED[last["status"]]:
            wrong.append((c.sub, "owed %s" % OWED[last["status"]], rows_i))
            continue
        # What the provisioner holds is what the last event says.
        have = prov.apps.get(app)
        if desired == "running":
            if st != "running" or not have or have["state"] != "running" \
                    or have["memory_mb"] != LIMITS[last["tier"]][0]:
                wrong.append((c.sub, "app running with the %s plan" % last["tier"], st, have))
        elif desired == "stopped":
            # Stopped by the worker: its app stopped, or never deployed (a stop is
            # owed even before the app ever ran, and stopping a missing app is
            # done: provisioning -> stopped, docs/lifecycle.md).
            if st != "stopped" or (have and have["state"] != "stopped"):
                wrong.append((c.sub, "app stopped", st, have))
        elif st != "deprovisioned" or have:
            wrong.append((c.sub, "app destroyed", st, have))
    assert not wrong, "%d subscriptions differ from Stripe's last event: %r" % (len(wrong), wrong[:5])
    # A destroyed instance's storage is kept for the retention period, not destroyed
    # with its apps.
    destroyed = stack.sql("SELECT count(*) FROM public.instances WHERE status = 'deprovisioned'")[0][0]
    assert retained == destroyed, (retained, destroyed)

    # Each app created once (a retry or an update finds it there), one email each.
    created = {c.json["app"] for c in prov.create_calls() if c.json}
    assert prov.creates == len(created), (prov.creates, len(created))
    keys = [r.headers.get("Idempotency-Key") for r in resend.delivered]
    assert len(keys) == len(set(keys)), collections.Counter(keys).most_common(3)

    # And the LISTEN connections are back: a commit that makes work owed wakes a
    # worker at once, three times running (the poll is a minute; a periodic job's
    # turn comes at most every 15 s, so three quick wake-ups are notifications).
    waits = []
    for _ in range(3):
        sid = new_subscription(stack, "starter")
        t0 = time.monotonic()
        stack.sql("INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, "
                  "status, desired_status) SELECT %s, n.dokku_app_name, n.subdomain, "
                  "'provisioning', 'running' FROM public.instance_names(%s) n", sid, sid)
        wait_until(lambda: stack.sql("SELECT status = 'running' FROM public.instances "
                                     "WHERE subscription_id = %s", sid)[0][0],
                   timeout=WAKE_S + 10, interval=0.02, what="a woken worker")
        waits.append(time.monotonic() - t0)
    print("drill db-restart: after the outages a new instance ran %s s after its commit" %
          ", ".join("%.2f" % w for w in waits))
    assert max(waits) < WAKE_S, waits
