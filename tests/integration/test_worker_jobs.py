"""What the lifecycle worker (mindroom-lifecycle) does with nobody asking, through
real nginx and PostgreSQL and the provisioner stand-in: the Stripe sweep (events
stored deferred are retried after their backoff and given up on after
STRIPE_DEFER_MAX_HOURS), run once per interval across worker processes, a
failed step retried no sooner than its backoff, and the cancellation at Stripe
(the stand-in, tests/standins/stripe_api.py) of a deleted account's subscription.
(The health round is in test_health.py; claims, leases, rejected steps and the
welcome email in test_lifecycle.py.)"""
import json
import os
import time
import uuid

import pytest

import mr
from lifecycle_helpers import (WORKER, instance, new_account, new_subscription, provision,
                               stack_env, wait_status, wait_until)
from stripe_api import StripeStandin

SWEEP_S = 1
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")


@pytest.fixture(scope="module")
def stack(pg, prov):
    """The webhook, provision-instance and the worker, with the Stripe sweep every
    second and STRIPE_DEFER_MAX_HOURS left at its default (72)."""
    env = stack_env(prov, SWEEP_INTERVAL_S=str(SWEEP_S), MR_LIFECYCLE_WORKERS="2")
    with mr.Stack(pg, env=env,
                  functions=["handle-stripe-webhook", "provision-instance", WORKER]) as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(stack, prov):
    stack.wipe_instances()
    prov.reset()
    yield
    prov.release()


def sweep_runs(s):
    r = s.sql("SELECT runs FROM public.scheduled_jobs WHERE name = 'stripe-sweep'")
    return r[0][0] if r else 0


def wait_sweeps(s, n):
    """Until the sweep has started n more runs and the last of them has finished."""
    want = sweep_runs(s) + n
    wait_until(lambda: s.sql("SELECT runs >= %s AND last_finished_at >= last_started_at "
                             "FROM public.scheduled_jobs WHERE name = 'stripe-sweep'", want)[0][0],
               timeout=n * SWEEP_S + 10, what="%d sweep runs" % n)


def event_status(s, eid):
    return s.sql("SELECT status, error, attempts FROM public.stripe_events WHERE id = %s", eid)[0]


def deferred_signup(s, claim=None):
    """A customer.subscription.created for a customer no account is linked to yet
    (naming the account `claim` in its metadata when given): the webhook stores it
    deferred and answers 503 (Stripe would retry).
    Returns (event id, customer id, subscription id)."""
    with open(os.path.join(FIXTURES, "stripe_subscription_created_basil.json")) as f:
        e = json.load(f)
    cust, sub = "cus_" + uuid.uuid4().hex[:14], "sub_" + uuid.uuid4().hex[:14]
    e["id"], e["type"] = "evt_" + uuid.uuid4().hex[:14], "customer.subscription.created"
    o = e["data"]["object"]
    o["id"], o["customer"], o["status"] = sub, cust, "active"
    o["metadata"] = {"account_id": claim} if claim else {}
    for item in o["items"]["data"]:
        item["price"]["id"] = "price_starter"
        item["subscription"] = sub
        if "plan" in item:
            item["plan"]["id"] = "price_starter"
    body = json.dumps(e, separators=(",", ":")).encode()
    r = s.call("POST", "handle-stripe-webhook", body=body, headers=s.stripe_headers(body))
    assert r.status == 503, r
    assert event_status(s, e["id"])[0] == "deferred"
    return e["id"], cust, sub


def backdate(s, eid, received_h, touched_h):
    """As if the event had arrived received_h hours ago and was last tried touched_h
    hours ago (updated_at is stamped by a trigger: bypassed)."""
    s.sql("SET session_replication_role = replica; "
          "UPDATE public.stripe_events SET received_at = now() - make_interval(hours => %s), "
          "updated_at = now() - make_interval(hours => %s) WHERE id = %s; "
          "RESET session_replication_role", received_h, touched_h, eid)


def test_the_sweep_retries_a_deferred_event_after_its_backoff(stack, prov):
    eid, cust, sub = deferred_signup(stack)
    acct = new_account(stack, cust)[0]

    # Within its backoff (30 s x 2^attempts) the sweep leaves it, however often it runs.
    wait_sweeps(stack, 2)
    assert event_status(stack, eid)[0] == "deferred"
    assert stack.sql("SELECT count(*) FROM public.subscriptions WHERE stripe_subscription_id = %s",
                     sub)[0][0] == 0

    # Two hours later it is due: the worker's sweep applies it, and the instance that
    # makes owed is provisioned by the worker too. Nobody calls anything.
    backdate(stack, eid, 2, 2)
    wait_until(lambda: event_status(stack, eid)[0] == "processed", timeout=SWEEP_S + 10,
               what="reprocessed by the sweep")
    sid = stack.sql("SELECT id::text FROM public.subscriptions WHERE stripe_subscription_id = %s",
                    sub)[0][0]
    assert stack.sql("SELECT account_id::text FROM public.subscriptions WHERE id = %s", sid)[0][0] == acct
    inst = wait_status(stack, sid, "running", timeout=5)
    assert [c.json["app"] for c in prov.create_calls()] == [inst["dokku_app_name"]]
    assert "stripe event %s: retried: processed" % eid in stack.log(WORKER)


def test_a_deferred_claim_our_customer_does_not_back_is_refused_by_the_sweep(stack, prov):
    """A claim on an account whose customer creation is in flight waits; once our
    record lands with another customer, the sweep's retry refuses it, as a security
    event (error level), and the account keeps its own customer."""
    victim = new_account(stack)[0]
    attempt = stack.sql("SET ROLE service_role; SELECT public.billing_attempt_begin(%s, 'customer',"
                        " repeat('2', 64)) ->> 'attempt_id'", victim)[0][0]
    eid, forged_customer, sub = deferred_signup(stack, claim=victim)
    assert "still being created" in event_status(stack, eid)[1]
    ours = "cus_" + uuid.uuid4().hex[:14]
    stack.sql("SET ROLE service_role; SELECT public.billing_attempt_succeeded(%s, %s, NULL, NULL,"
              " false)", attempt, ours)
    backdate(stack, eid, 2, 2)
    wait_until(lambda: event_status(stack, eid)[0] == "refused", timeout=SWEEP_S + 10,
               what="refused by the sweep")
    line = next(l for l in stack.log(WORKER).splitlines() if eid in l and "refused" in l)
    assert json.loads(line)["level"] == "error", line
    assert stack.sql("SELECT stripe_customer_id FROM public.accounts WHERE id = %s", victim) == [(ours,)]
    assert stack.sql("SELECT count(*) FROM public.subscriptions WHERE stripe_subscription_id = %s",
                     sub)[0][0] == 0
    assert stack.sql("SELECT count(*) FROM public.audit_logs WHERE account_id = %s"
                     " AND action = 'stripe.account_link_refused'", victim) == [(1,)]
    assert forged_customer != ours and prov.requests == []


def test_an_event_deferred_past_the_limit_is_marked_failed_with_its_reason(stack, prov):
    old, _, old_sub = deferred_signup(stack)
    young, _, _ = deferred_signup(stack)
    # Neither account will ever be linked. One arrived 73 h ago, the other 71 h ago;
    # both were last tried long enough ago to be due.
    backdate(stack, old, 73, 2)
    backdate(stack, young, 71, 2)
    wait_until(lambda: event_status(stack, old)[0] == "failed", timeout=SWEEP_S + 10,
               what="given up on")
    status, error, _ = event_status(stack, old)
    assert error == "deferred for more than 72 h: unknown account: no account has this customer " \
                    "and no account id was given", error
    log = stack.log(WORKER)
    assert "stripe event %s: deferred for more than 72 h; marked failed" % old in log
    assert '"level":"error"' in next(l for l in log.splitlines() if old in l and "marked failed" in l)

    # The younger one is retried instead (still no account: deferred again, one
    # more attempt), not given up on.
    wait_until(lambda: event_status(stack, young)[2] == 2, timeout=SWEEP_S + 10, what="retried")
    assert event_status(stack, young)[0] == "deferred"
    # A failed event is final: later sweeps leave it, Stripe's redelivery is a
    # duplicate, and it created nothing.
    wait_sweeps(stack, 2)
    assert event_status(stack, old)[:2] == (status, error)
    assert stack.sql("SELECT count(*) FROM public.subscriptions WHERE stripe_subscription_id = %s",
                     old_sub)[0][0] == 0
    assert prov.requests == []


def test_the_sweep_runs_once_per_interval_across_worker_processes(stack):
    assert len(stack.workers(WORKER)) == 2
    window = 6 * SWEEP_S
    before = sweep_runs(stack)
    time.sleep(window)
    runs = sweep_runs(stack) - before
    # Each process asks every second; the lease lets one run through per interval
    # (plus one whose start fell at the window's edge).
    assert 2 <= runs <= window // SWEEP_S + 1, runs


def test_a_failed_step_is_retried_no_sooner_than_its_backoff(stack, prov):
    sid = new_subscription(stack, "starter")
    prov.next("fail", "fail")
    assert provision(stack, sid).status == 202
    inst = wait_status(stack, sid, "running", timeout=10)
    calls = [c for c in prov.create_calls() if c.json["app"] == inst["dokku_app_name"]]
    assert len(calls) == 3, calls
    # MR_PROVISION_BACKOFF_BASE_S=1: the retries wait 1 s, then 2 s, each counted
    # from the failure (which follows its call's start).
    gaps = [b.time - a.time for a, b in zip(calls, calls[1:])]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps
    assert instance(stack, sid)["attempts"] == 0


# ---- the Stripe subscriptions of deleted accounts -------------------------------------

@pytest.fixture(scope="module")
def stripe():
    with StripeStandin() as st:
        yield st


@pytest.fixture(scope="module")
def keyed(pg, prov, stripe):
    """The worker alone, with a Stripe key and the stand-in for Stripe, its jobs every
    second, and one attempt per call (STRIPE_MAX_RETRIES=0), so that every retry
    is the job's, after its backoff (MR_PROVISION_BACKOFF_BASE_S=1)."""
    env = stack_env(prov, SWEEP_INTERVAL_S=str(SWEEP_S), STRIPE_SECRET_KEY=stripe.key,
                    STRIPE_API_BASE=stripe.url, STRIPE_MAX_RETRIES="0")
    with mr.Stack(pg, env=env, functions=[WORKER]) as s:
        yield s


def paying_account(s, status="active"):
    """An account with a subscription of ours in `status`, carrying a fresh Stripe
    subscription id; returns (account id, that id)."""
    acc, _ = new_account(s)
    sub = "sub_" + uuid.uuid4().hex[:24]
    s.sql("UPDATE public.accounts SET stripe_customer_id = %s WHERE id = %s",
          "cus_" + uuid.uuid4().hex[:14], acc)
    s.sql("INSERT INTO public.subscriptions (account_id, stripe_subscription_id, stripe_price_id, "
          "tier, status) VALUES (%s, %s, 'price_starter', 'starter', %s)", acc, sub, status)
    return acc, sub


def cancellation(s, sub):
    r = s.sql("SELECT done_at IS NOT NULL, outcome, attempts, last_error "
              "FROM public.stripe_cancellations WHERE stripe_subscription_id = %s", sub)
    return r[0] if r else None


def job_runs(s, name):
    r = s.sql("SELECT runs FROM public.scheduled_jobs WHERE name = %s", name)
    return r[0][0] if r else 0


def cancels(stripe, sub):
    return [r for r in stripe.recorded("/v1/subscriptions/" + sub) if r.method == "DELETE"]


def test_deleting_an_account_cancels_its_live_stripe_subscription_once(keyed, stripe):
    stripe.reset()
    acc, _ = paying_account(keyed)
    sub = stripe.add_subscription()
    keyed.sql("UPDATE public.subscriptions SET stripe_subscription_id = %s WHERE account_id = %s",
              sub, acc)
    # A second, cancelled one of the same account: Stripe is not asked about it.
    old = "sub_" + uuid.uuid4().hex[:24]
    keyed.sql("INSERT INTO public.subscriptions (account_id, stripe_subscription_id, status) "
              "VALUES (%s, %s, 'cancelled')", acc, old)
    keyed.sql("DELETE FROM auth.users WHERE id = %s", acc)
    assert keyed.sql("SELECT count(*) FROM public.accounts WHERE id = %s", acc)[0][0] == 0
    wait_until(lambda: (cancellation(keyed, sub) or (False,))[0], timeout=10,
               what="the cancellation done")
    assert cancellation(keyed, sub) == (True, "cancelled", 1, None)
    assert stripe.subscriptions[sub]["status"] == "canceled"
    [req] = cancels(stripe, sub)
    assert req.idempotency_key == "mindroom-cancel-" + sub
    assert req.headers.get("Stripe-Version") == "2025-03-31.basil"
    assert req.body == ""
    assert cancellation(keyed, old) is None and cancels(stripe, old) == []
    # Later rounds leave it done: Stripe was asked once.
    runs = job_runs(keyed, "stripe-cancel")
    wait_until(lambda: job_runs(keyed, "stripe-cancel") >= runs + 2, timeout=10, what="two more rounds")
    assert len(cancels(stripe, sub)) == 1
    assert keyed.sql("SELECT count(*) FROM public.audit_logs WHERE action = "
                     "'stripe.subscription_cancelled' AND details->>'stripe_subscription_id' = %s",
                     sub)[0][0] == 1
    assert stripe.key not in keyed.log(WORKER)


def test_a_refused_or_failed_cancellation_is_retried_with_backoff_and_the_same_key(keyed, stripe):
    stripe.reset()
    acc, _ = paying_account(keyed)
    sub = stripe.add_subscription()
    keyed.sql("UPDATE public.subscriptions SET stripe_subscription_id = %s WHERE account_id = %s",
              sub, acc)
    stripe.next(("status", 400), ("status", 500))
    keyed.sql("DELETE FROM auth.users WHERE id = %s", acc)
    wait_until(lambda: (cancellation(keyed, sub) or (False,))[0], timeout=15,
               what="the cancellation done")
    assert cancellation(keyed, sub) == (True, "cancelled", 3, None)
    reqs = cancels(stripe, sub)
    assert len(reqs) == 3, reqs
    assert {r.idempotency_key for r in reqs} == {"mindroom-cancel-" + sub}
    # Backoff 1 s after the refusal, then 2 s after the 500.
    gaps = [b.time - a.time for a, b in zip(reqs, reqs[1:])]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps
    assert stripe.subscriptions[sub]["status"] == "canceled"
    # The refusal (a 4xx) is logged at error, the 500 at warn.
    mine = [json.loads(l) for l in keyed.log(WORKER).splitlines()
            if sub in l and "retried with backoff" in l]
    assert [l["level"] for l in mine] == ["error", "warn"], mine


def test_a_subscription_stripe_has_cancelled_already_is_done_with_one_call(keyed, stripe):
    stripe.reset()
    acc, _ = paying_account(keyed, status="past_due")
    sub = stripe.add_subscription(status="canceled")   # its deletion event not yet applied
    keyed.sql("UPDATE public.subscriptions SET stripe_subscription_id = %s WHERE account_id = %s",
              sub, acc)
    keyed.sql("DELETE FROM auth.users WHERE id = %s", acc)
    wait_until(lambda: (cancellation(keyed, sub) or (False,))[0], timeout=10,
               what="the cancellation done")
    assert cancellation(keyed, sub) == (True, "not_found", 1, None)
    assert len(cancels(stripe, sub)) == 1


def test_a_subscription_of_the_other_mode_is_not_counted_cancelled(keyed, stripe):
    """A live subscription and a test key (or the reverse): Stripe answers 404
    resource_missing, "a similar object exists in live mode", and keeps charging it.
    It stays owed, refused (logged at error, retried with backoff), saying why."""
    stripe.reset()
    acc, _ = paying_account(keyed)
    sub = stripe.add_subscription(livemode=True)   # the worker's key is a test key
    keyed.sql("UPDATE public.subscriptions SET stripe_subscription_id = %s WHERE account_id = %s",
              sub, acc)
    keyed.sql("DELETE FROM auth.users WHERE id = %s", acc)
    wait_until(lambda: len(cancels(stripe, sub)) >= 2, timeout=15, what="a retry")
    done, outcome, attempts, last_error = cancellation(keyed, sub)
    assert (done, outcome) == (False, None) and attempts >= 1
    assert "live mode" in last_error and "test key" in last_error, last_error
    assert stripe.subscriptions[sub]["status"] == "active"
    assert keyed.sql("SELECT count(*) FROM public.audit_logs WHERE action = "
                     "'stripe.subscription_cancelled' AND details->>'stripe_subscription_id' = %s",
                     sub)[0][0] == 0
    mine = [json.loads(l) for l in keyed.log(WORKER).splitlines()
            if sub in l and "retried with backoff" in l]
    assert mine and all(l["level"] == "error" for l in mine), mine


def test_when_stripe_stops_answering_a_round_waits_out_one_call_not_each(pg, prov, stripe):
    """Two deleted accounts' subscriptions are owed when Stripe stops answering. The
    round's first call runs to its deadline (1 s here, 20 s by default) and is counted
    failed; the other is not called in that round (nothing counted), instead of each
    of up to twenty holding the worker for a deadline. The next round does both."""
    stripe.reset()
    env = stack_env(prov, SWEEP_INTERVAL_S="30", STRIPE_SECRET_KEY=stripe.key,
                    STRIPE_API_BASE=stripe.url, STRIPE_MAX_RETRIES="0", STRIPE_DEADLINE_MS="1000")
    with mr.Stack(pg, env=env, functions=[WORKER]) as s:
        subs = []
        for _ in range(2):
            acc, _ = paying_account(s)
            sub = stripe.add_subscription()
            s.sql("UPDATE public.subscriptions SET stripe_subscription_id = %s "
                  "WHERE account_id = %s", sub, acc)
            subs.append((acc, sub))
        stripe.next("hang", "hang")
        s.sql("DELETE FROM auth.users WHERE id = ANY(%s::uuid[])", [a for a, _ in subs])
        # The job's next round now, not at the end of its 30 s interval.
        s.sql("UPDATE public.scheduled_jobs SET until = now() WHERE name = 'stripe-cancel'")
        wait_until(lambda: any(cancellation(s, sub)[2] for _, sub in subs), timeout=15,
                   what="the first call counted failed")
        time.sleep(1.5)  # a second call in the same round would be counted by now
        assert sorted(cancellation(s, sub)[2] for _, sub in subs) == [0, 1]
        assert sum(len(cancels(stripe, sub)) for _, sub in subs) == 1
        assert [l for l in s.log(WORKER).splitlines()
                if "1 more wait for the next round: Stripe did not answer" in l]
        stripe.release()
        s.sql("UPDATE public.scheduled_jobs SET until = now() WHERE name = 'stripe-cancel'")
        wait_until(lambda: all(cancellation(s, sub)[0] for _, sub in subs), timeout=20,
                   what="both cancelled in a later round")
        assert all(stripe.subscriptions[sub]["status"] == "canceled" for _, sub in subs)


def test_without_a_stripe_key_a_deleted_accounts_subscription_stays_owed(stack):
    acc, sub = paying_account(stack)
    stack.sql("DELETE FROM auth.users WHERE id = %s", acc)
    runs = job_runs(stack, "stripe-cancel")
    wait_until(lambda: job_runs(stack, "stripe-cancel") >= runs + 2, timeout=10, what="two rounds")
    assert cancellation(stack, sub) == (False, None, 0, None)
    warned = [json.loads(l) for l in stack.log(WORKER).splitlines()
              if "stripe cancellations" in l and "STRIPE_SECRET_KEY is not set" in l]
    assert warned and all(l["level"] == "warn" for l in warned), warned
