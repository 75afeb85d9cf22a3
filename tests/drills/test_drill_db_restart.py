"""Drill 1: PostgreSQL crashes and comes back during a burst of a few thousand
signed webhook deliveries, with duplicates and reordering.

Asserted: every 2xx answer corresponds to a committed effect (its event row is
there); every other answer is a well-formed 503 that Stripe would retry; after
redelivering what was not accepted, each subscription's row equals what its
last Stripe event says, with no event lost, none applied twice, and at most one
instance per subscription owing what the final status owes."""
import collections
import random
import subprocess
import threading
import time

import pytest

import mr
from drill_helpers import (ENTITLED, OWED, Customer, assert_well_formed, burst, deliveries,
                           redeliver_until_accepted)

CUSTOMERS = 650        # x 4-5 events, +30% duplicates: about 4,000 deliveries
SEED = 8


@pytest.fixture(scope="module")
def stack(pg):
    # Only the webhook: the owed instance work is left in the rows (FUNCTIONS_URL
    # empty), which is what this drill checks.
    env = {"FUNCTIONS_URL": "", "MR_WORKERS": "4"}
    with mr.Stack(pg, env=env, functions=["handle-stripe-webhook"]) as s:
        yield s


def pg_ctl(pg, cmd):
    p = subprocess.run([str(mr.ROOT / "scripts/pg.sh"), cmd, str(pg.dir)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=120)
    if p.returncode != 0:
        log = (pg.dir / "postgres.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError("pg.sh %s: %s\n%s" % (cmd, p.stdout, "\n".join(log)))


def test_postgres_crash_mid_burst_loses_and_doubles_nothing(stack, pg):
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
    inst = collections.defaultdict(list)
    for sub, status, desired in stack.sql(
            "SELECT s.stripe_subscription_id, i.status::text, i.desired_status::text "
            "FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id"):
        inst[sub].append((status, desired))
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
        elif last["status"] in ENTITLED and (len(rows_i) != 1 or rows_i[0][1] != "running"):
            wrong.append((c.sub, "owed running", rows_i))
        elif rows_i and rows_i[0][1] != OWED[last["status"]]:
            wrong.append((c.sub, "owed %s" % OWED[last["status"]], rows_i))
    assert not wrong, "%d subscriptions differ from Stripe's last event: %r" % (len(wrong), wrong[:5])
