"""Drill 2: the provisioner is unreachable for a while (connections refused),
then answers 500 for a while, then is back. Sign-ups keep arriving through the
webhook the whole time; the lifecycle worker is the only thing that acts on them.

Asserted: the webhook answers every event 200 meanwhile (it never waits on the
provisioner: it records intent and calls nothing); every instance is held back
during the outage while the worker retries with backoff; once the provisioner is
back every instance ends running with its URLs, with nobody calling anything, and
each app was created exactly once."""
import json
import time

import pytest

import mr
from drill_helpers import Gate
from lifecycle_helpers import FAST_ENV, PRICES, WORKER, new_account

SIGNUPS = 24
REFUSED_S = 4.0
FAILING_S = 3.0
CONVERGE_S = 60.0


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
               MR_PROVISION_BACKOFF_BASE_S="1", MR_PROVISION_BACKOFF_CAP_S="4", MR_WORKERS="3")
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
        while time.monotonic() - outage_start < REFUSED_S + FAILING_S:
            time.sleep(0.1)
        refused_or_failed = stack.sql(
            "SELECT count(*) FROM public.instances WHERE status <> 'running' "
            "AND subscription_id IN (SELECT id FROM public.subscriptions "
            "WHERE stripe_subscription_id LIKE 'sub_drill2_%%')")[0][0]
        failing_calls = len(prov.create_calls())
        # Back.
        prov.behave("ok")
        back = time.monotonic()
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
    failed_steps = stack.log(WORKER).count(" create failed in ")
    print("\ndrill provisioner-outage: %d sign-ups, %d not running at the end of the outage, "
          "%d create calls answered 500 meanwhile, %d failed create steps retried by the worker; "
          "all running %.1fs after it came back" % (
              SIGNUPS, refused_or_failed, failing_calls, failed_steps, converged))
    assert refused_or_failed == SIGNUPS, "the outage should have held every instance back"
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
