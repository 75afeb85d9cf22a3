"""Drill 2: the provisioner is unreachable for a while (connections refused),
then answers 500 for a while, then is back. Sign-ups keep arriving through the
webhook the whole time and the periodic sweep (check-instance-health) keeps
running, as the timer would.

Asserted: the webhook answers every event 200 meanwhile (it never waits on the
provisioner); once the provisioner is back every owed instance ends running with
its URLs, and each app was created exactly once."""
import collections
import json
import threading
import time

import pytest

import mr
from drill_helpers import Gate
from lifecycle_helpers import FAST_ENV, PRICES, new_account

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
    env = dict(FAST_ENV, DOKKU_PROVISIONER_URL=gate.url, DOKKU_PROVISIONER_TOKEN=prov.token,
               MR_PROVISION_BACKOFF_BASE_S="1", MR_PROVISION_BACKOFF_CAP_S="4",
               MINDROOM_BASE_DOMAIN="mindroom.test", HEALTH_TIMEOUT_MS="300",
               HEALTH_FAILURE_THRESHOLD="1000", MR_WORKERS="3")
    funcs = ["handle-stripe-webhook", "provision-instance", "deprovision-instance",
             "check-instance-health"]
    with mr.Stack(pg, env=env, functions=funcs) as s:
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
    accounts = [new_account(stack)[0] for _ in range(SIGNUPS)]
    t = int(time.time())
    stop = threading.Event()
    sweeps = collections.Counter()

    def timer():   # the health timer, every second instead of every minute
        while not stop.is_set():
            r = stack.call("POST", "check-instance-health", json={}, token=stack.jwt(), timeout=60)
            sweeps[r.status] += 1
            stop.wait(1.0)

    # Outage, phase 1: nothing listens (connection refused).
    gate.close()
    outage_start = time.monotonic()
    sweeper = threading.Thread(target=timer)
    sweeper.start()
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
                "SELECT i.status::text, i.frontend_url FROM public.instances i "
                "JOIN public.subscriptions s ON s.id = i.subscription_id "
                "WHERE s.stripe_subscription_id LIKE 'sub_drill2_%%'")
            if len(rows) == SIGNUPS and all(st == "running" and url for st, url in rows):
                break
            time.sleep(0.25)
        converged = time.monotonic() - back
    finally:
        stop.set()
        sweeper.join()
        prov.behave("ok")

    rows = stack.sql(
        "SELECT i.dokku_app_name, i.status::text, i.frontend_url, i.attempts "
        "FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id "
        "WHERE s.stripe_subscription_id LIKE 'sub_drill2_%%'")
    print("\ndrill provisioner-outage: %d sign-ups, %d not running at the end of the outage, "
          "%d create calls answered 500 meanwhile; all running %.1fs after it came back; "
          "sweeps %s" % (
              SIGNUPS, refused_or_failed, failing_calls, converged, dict(sweeps)))
    assert refused_or_failed == SIGNUPS, "the outage should have held every instance back"
    assert len(rows) == SIGNUPS
    assert all(st == "running" and url for _, st, url, _ in rows), rows
    # Each app created exactly once at the provisioner (failed calls created nothing).
    assert prov.creates == SIGNUPS, prov.creates
    apps = {r[0] for r in rows}
    assert apps == set(prov.apps), (apps ^ set(prov.apps))
    assert all(prov.apps[a]["state"] == "running" for a in apps)
    assert set(sweeps) == {200}, sweeps
