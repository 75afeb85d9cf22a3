"""Drill 2: the provisioner is unreachable for a while (connections refused),
then answers 500 for a while, then is back. Sign-ups keep arriving through the
webhook the whole time; the lifecycle worker is the only thing that acts on them.

Asserted: the webhook answers every event 200 meanwhile (it never waits on the
provisioner: it records intent and calls nothing); every instance is held back
during the outage while the worker retries with backoff; once the provisioner is
back every instance ends running with its URLs, with nobody calling anything, and
each app was created exactly once."""
import collections
import json
import re
import time

import pytest

import mr
from drill_helpers import Gate
from lifecycle_helpers import FAST_ENV, PRICES, WORKER, new_account

SIGNUPS = 24
REFUSED_S = 4.0
FAILING_S = 3.0
CONVERGE_S = 60.0
# The worker's retry backoff here: 1 s, doubling up to 4 s.
BACKOFF_BASE_S = 1
BACKOFF_CAP_S = 4
# How much longer the outage may last for the worker to have tried every instance
# once (a loaded machine makes it slower, never faster).
FIRST_TRY_GRACE_S = 30.0
FAILED = re.compile(r"instance ([0-9a-f-]{36}): create failed in ")


def most_failures(window_s):
    """The most failed tries one instance can have within window_s seconds. After
    its k-th failure (k from 0) lifecycle_finish makes it due again no sooner than
    min(cap, base * 2^k) later, measured from after the failed call; the first
    try of every drill instance starts after the outage does and the last failed
    one before it ends. So with waits 1, 2, 4, 4, ... s, n tries need at least
    1 + 2 + 4 + 4 ... (n - 1 terms) seconds: 4 tries in 7 s, 5 in 11 s. Load only
    stretches the waits, so it can give fewer failures, never more."""
    n, spent = 1, 0.0
    while True:
        wait = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (n - 1))
        if spent + wait > window_s:
            return n
        spent += wait
        n += 1


@pytest.fixture(scope="module")
def gate(prov):
    g = Gate(prov.url).open()
    yield g
    g.close()


@pytest.fixture(scope="module")
def stack(pg, prov, gate):
    # Backoff 1 s doubling up to 4 s; the worker's poll is a minute long (FAST_ENV),
    # so what it does is woken by commits and its own retry times, nothing else.
    env = dict(FAST_ENV, DOKKU_PROVISIONER_URL=gate.url, DOKKU_PROVISIONER_TOKEN=prov.token,
               MR_PROVISION_BACKOFF_BASE_S=str(BACKOFF_BASE_S),
               MR_PROVISION_BACKOFF_CAP_S=str(BACKOFF_CAP_S), MR_WORKERS="3")
    with mr.Stack(pg, env=env, functions=["handle-stripe-webhook", WORKER]) as s:
        yield s


def signup_event(account, i, t):
    obj = {"id": "sub_drill2_%d_%d" % (t, i), "object": "subscription",
           "customer": "cus_drill2_%d_%d" % (t, i), "status": "active",
           "metadata": {"account_id": account}, "cancel_at_period_end": False,
           "items": {"object": "list", "data": [{"id": "si_%d" % i,
                                                 "price": {"id": PRICES["starter"]},
                                                 "current_period_end": t + 86400 * 30}]}}
    return json.dumps({"id": "evt_drill2_%d_%d" % (t, i), "object": "event",
                       "type": "customer.subscription.created", "created": t,
                       "api_version": "2025-03-31.basil", "data": {"object": obj}}).encode()


def failures_by_instance(stack):
    """Failed create steps in the worker's log, by instance id."""
    return collections.Counter(FAILED.findall(stack.log(WORKER)))


def test_provisioner_outage_then_back_every_instance_running_created_once(stack, prov, gate):
    t = int(time.time())
    accounts = [new_account(stack, "cus_drill2_%d_%d" % (t, i))[0] for i in range(SIGNUPS)]

    # Outage, phase 1: nothing listens (connection refused).
    gate.close()
    outage_start = time.monotonic()
    try:
        answers = []
        for i, acc in enumerate(accounts):
            raw = signup_event(acc, i, t)
            t0 = time.monotonic()
            r = stack.call("POST", "handle-stripe-webhook", body=raw, headers=stack.stripe_headers(raw))
            answers.append((r.status, time.monotonic() - t0))
            if i == SIGNUPS // 2:
                # Phase 2: it listens again but answers 500 to everything.
                while time.monotonic() - outage_start < REFUSED_S:
                    time.sleep(0.1)
                prov.behave("fail")
                gate.open()
            time.sleep(0.05)
        assert all(s == 200 for s, _ in answers), answers
        slowest = max(d for _, d in answers)
        assert slowest < 1.0, "the webhook waited on the provisioner: %.2fs" % slowest
        ids = [r[0] for r in stack.sql(
            "SELECT i.id::text FROM public.instances i "
            "JOIN public.subscriptions s ON s.id = i.subscription_id "
            "WHERE s.stripe_subscription_id LIKE 'sub_drill2_%%'")]
        # The 500s go on until the worker has tried every instance at least once
        # (held back by its tries, not by its absence), however slow it is.
        while (time.monotonic() - outage_start < REFUSED_S + FAILING_S
               or (not all(failures_by_instance(stack)[i] for i in ids)
                   and time.monotonic() - outage_start < REFUSED_S + FAILING_S + FIRST_TRY_GRACE_S)):
            time.sleep(0.1)
        refused_or_failed = stack.sql(
            "SELECT count(*) FROM public.instances WHERE status <> 'running' "
            "AND subscription_id IN (SELECT id FROM public.subscriptions "
            "WHERE stripe_subscription_id LIKE 'sub_drill2_%%')")[0][0]
        failing_calls = len(prov.create_calls())
        # Back.
        prov.behave("ok")
        back = time.monotonic()
        outage_s = back - outage_start
        deadline = back + CONVERGE_S
        while time.monotonic() < deadline:
            rows = stack.sql(
                "SELECT i.status::text, i.frontend_url, i.claimed_by FROM public.instances i "
                "JOIN public.subscriptions s ON s.id = i.subscription_id "
                "WHERE s.stripe_subscription_id LIKE 'sub_drill2_%%'")
            if len(rows) == SIGNUPS and all(st == "running" and url and not c for st, url, c in rows):
                break
            time.sleep(0.25)
        converged = time.monotonic() - back
    finally:
        prov.behave("ok")

    rows = stack.sql(
        "SELECT i.dokku_app_name, i.status::text, i.frontend_url, i.attempts "
        "FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id "
        "WHERE s.stripe_subscription_id LIKE 'sub_drill2_%%'")
    failed = failures_by_instance(stack)
    failed_steps = sum(failed.values())
    print("\ndrill provisioner-outage: %d sign-ups, %d not running at the end of the %.1fs outage, "
          "%d create calls answered 500 meanwhile, %d failed create steps retried by the worker "
          "(%d to %d per instance); all running %.1fs after it came back" % (
              SIGNUPS, refused_or_failed, outage_s, failing_calls, failed_steps,
              min((failed[i] for i in ids), default=0), max((failed[i] for i in ids), default=0), converged))
    assert refused_or_failed == SIGNUPS, "the outage should have held every instance back"
    # Held back by the worker's tries: each instance failed at least once, some
    # calls reached the provisioner while it answered 500, and the retries kept to
    # the backoff (0.5 s for PostgreSQL's clock against ours).
    assert len(ids) == SIGNUPS and all(failed[i] >= 1 for i in ids), \
        "instances the worker never tried during the outage: %s" % [i for i in ids if not failed[i]]
    assert failing_calls > 0, "no create call reached the provisioner while it answered 500"
    bound = most_failures(outage_s + 0.5)
    over = {i: n for i, n in failed.items() if n > bound}
    assert not over, "%d instances had more than %d failed create steps (up to %d) in the %.1fs " \
        "outage with backoff %d s doubling to %d s" % (
            len(over), bound, max(over.values(), default=0), outage_s, BACKOFF_BASE_S, BACKOFF_CAP_S)
    assert len(rows) == SIGNUPS
    assert all(st == "running" and url for _, st, url, _ in rows), rows
    # Each app created exactly once at the provisioner (failed calls created nothing).
    assert prov.creates == SIGNUPS, prov.creates
    apps = {r[0] for r in rows}
    assert apps == set(prov.apps), (apps ^ set(prov.apps))
    assert all(prov.apps[a]["state"] == "running" for a in apps)
    # Settled: nothing claimed, nothing owed but the welcome emails (no Resend key
    # here: they wait an hour, not due).
    assert stack.sql("SELECT count(*) FROM public.instances WHERE claimed_by IS NOT NULL "
                     "OR coalesce(owed_action, 'email') <> 'email' OR owed_due_at <= now()")[0][0] == 0
