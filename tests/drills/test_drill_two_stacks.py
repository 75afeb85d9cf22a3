"""Drill: two complete stacks on one database, as two control-plane hosts would run.

Each stack has its own nginx (other ports), its own functions, its own lifecycle
worker (two processes each) and its own provisioner; both provisioners drive the
same Dokku host (the stand-in dokku, one state directory). Nothing but
PostgreSQL coordinates them. The drill shows:

  1. 200 subscriptions, half signed up through each stack's webhook: every
     instance ends running, and every app was created exactly once on the Dokku
     host (one apps:create each), whichever worker on whichever host did it;
  2. the periodic health round runs once per interval across both hosts (the
     scheduled_jobs lease), not once per host;
  3. an instance whose health endpoint hangs is marked failed after
     HEALTH_FAILURE_THRESHOLD intervals (not sooner, although two hosts and an
     operator probe it meanwhile) and is redeployed once, not once per prober.
"""
import json
import time
import uuid

import pytest

import mr
from health import HealthStandin
from lifecycle_helpers import PRICES, WORKER, new_account, wait_until
from provisioner_helpers import Dokku

N = int(__import__("os").environ.get("DRILL_N", "200"))
INTERVAL = 2
THRESHOLD = 3


def health_state(s, iid):
    """What decides when a failure counts, for an assertion's message: the
    instance's health columns and its status changes, with the database's clock."""
    row = s.sql("SELECT clock_timestamp()::text, consecutive_failures, health_counted_at::text,"
                " last_health_check::text, health_status, status, owed_action, claimed_by,"
                " claim_expires_at::text FROM public.instances WHERE id = %s", iid)
    changes = s.sql("SELECT created_at::text, details->>'from', details->>'to' FROM public.audit_logs"
                    " WHERE action = 'instance.status_changed' AND details->>'instance_id' = %s"
                    " ORDER BY created_at", iid)
    return {"instance": row, "status_changes": changes}


@pytest.fixture(scope="module")
def health():
    with HealthStandin() as h:
        yield h


@pytest.fixture(scope="module")
def stacks(pg, health):
    dokku = Dokku()
    env = dokku.env(
        MR_LIFECYCLE_WORKERS="2", MR_PROVISION_BACKOFF_BASE_S="1",
        HEALTH_INTERVAL_S=str(INTERVAL), HEALTH_FAILURE_THRESHOLD=str(THRESHOLD),
        HEALTH_TIMEOUT_MS="500", HEALTH_ALLOW_LOOPBACK="1",
        # Every instance's two components are the health stand-in, keyed by the
        # subdomain (MindRoom) and the homeserver's host (its homeserver).
        PROVISIONER_BACKEND_URL="http://127.0.0.1:%d/i/{subdomain}/api" % health.port,
        PROVISIONER_MATRIX_URL="http://127.0.0.1:%d/i/{matrix_host}" % health.port)
    with mr.Stack(pg, env=env) as a:
        # The second host shares the database, the Dokku host and the secrets a
        # real deployment shares; everything else (ports, processes) is its own.
        shared = {k: a.env[k] for k in ("SUPABASE_JWT_SECRET", "STRIPE_WEBHOOK_SECRET",
                                        "DOKKU_PROVISIONER_TOKEN", "MINDROOM_SECRETS_KEY")}
        with mr.Stack(pg, env=dict(env, **shared), db=a.db) as b:
            yield a, b, dokku


def signup(stack, i, t):
    customer = "cus_%d_%s" % (i, uuid.uuid4().hex[:8])
    account, _ = new_account(stack, customer)
    sub = "sub_%s" % uuid.uuid4().hex[:16]
    event = {"id": "evt_" + uuid.uuid4().hex, "object": "event",
             "type": "customer.subscription.created", "created": t, "livemode": False,
             "api_version": "2025-03-31.basil",
             "data": {"object": {
                 "id": sub, "object": "subscription", "customer": customer,
                 "status": "active", "metadata": {"account_id": account},
                 "cancel_at_period_end": False,
                 "items": {"object": "list", "data": [{
                     "id": "si_" + uuid.uuid4().hex[:10], "price": {"id": PRICES["starter"]},
                     "current_period_end": t + 30 * 86400}]}}}}
    raw = json.dumps(event).encode()
    r = stack.call("POST", "handle-stripe-webhook", body=raw, headers=stack.stripe_headers(raw))
    assert r.status == 200, r
    return sub


def health_runs(stack):
    rows = stack.sql("SELECT runs FROM public.scheduled_jobs WHERE name = 'health'")
    return rows[0][0] if rows else 0


def test_two_hosts_share_the_work_once(stacks, health):
    a, b, dokku = stacks
    t = int(time.time()) - 60
    t0 = time.monotonic()
    for i in range(N):
        signup(a if i % 2 == 0 else b, i, t)
    accepted = time.monotonic() - t0
    # Running with nothing owed but the welcome email (no Resend key here: it
    # waits for one). Each create is a few dozen stand-in dokku runs (two apps,
    # two storage entries and a network, each checked before it is made), a
    # Python process each: 272 s for the 200 on a quiet 2-core machine (make
    # drills), more on a busy one; the wait allows for a busy one.
    wait_until(lambda: a.sql("SELECT count(*) FROM public.instances WHERE status = 'running'"
                             " AND coalesce(owed_action, 'email') = 'email'")[0][0] == N,
               timeout=900, interval=0.5, what="%d instances running" % N)
    converged = time.monotonic() - t0

    creates = {}
    for argv in dokku.all_calls():
        if argv[0] == "apps:create":
            creates[argv[1]] = creates.get(argv[1], 0) + 1
    # Two apps per instance: MindRoom and its homeserver (docs/instance.md).
    names = [r[0] for r in a.sql("SELECT dokku_app_name FROM public.instances")]
    assert len(set(names)) == N
    apps = set(names) | {n + "-matrix" for n in names}
    assert set(creates) == apps and set(creates.values()) == {1}, \
        {k: v for k, v in creates.items() if v != 1}
    # Both hosts' workers did some of it.
    by_a, by_b = (s.log(WORKER).count(": create succeeded") for s in (a, b))
    assert by_a > 0 and by_b > 0 and by_a + by_b == N, (by_a, by_b)

    # 2. The health round: once per interval across both hosts.
    r0, w0 = health_runs(a), time.monotonic()
    time.sleep(5 * INTERVAL + 0.5)
    rounds = health_runs(a) - r0
    window = time.monotonic() - w0
    print("\n%d sign-ups through two webhooks in %.1f s; all %d running after %.1f s "
          "(%d deployed by host A's worker, %d by B's); apps:create once per app; "
          "%d health rounds in %.1f s (interval %d s, two hosts)"
          % (N, accepted, N, converged, by_a, by_b, rounds, window, INTERVAL))
    assert window / INTERVAL - 1 <= rounds <= window / INTERVAL + 1, rounds

    # 3. One instance hangs. Both hosts probe it every interval, and an operator
    #    probes it too; it still takes THRESHOLD intervals to fail, and it is
    #    redeployed once.
    iid, sub = a.sql("SELECT id::text, subdomain FROM public.instances ORDER BY created_at LIMIT 1")[0]
    health.set_mode(sub, "hang")
    hung_at = time.monotonic()
    tok = a.jwt()

    def failed():
        for s in (a, b):  # the operator's extra probes, through both hosts
            s.call("POST", "check-instance-health", json={"instance_id": iid}, token=tok)
        return a.sql("SELECT status = 'failed' OR owed_action = 'create' FROM public.instances"
                     " WHERE id = %s", iid)[0][0]

    before = health_state(a, iid)
    wait_until(failed, timeout=10 * INTERVAL, interval=0.3, what="marked failed")
    took = time.monotonic() - hung_at
    after = health_state(a, iid)
    health.set_mode(sub, "ok")
    wait_until(lambda: a.sql("SELECT status = 'running' AND coalesce(owed_action, 'email') = 'email'"
                             " FROM public.instances WHERE id = %s", iid)[0][0], timeout=30, what="redeployed")
    time.sleep((THRESHOLD + 1) * INTERVAL)
    to_failed = a.sql("SELECT count(*) FROM public.audit_logs WHERE action = 'instance.status_changed'"
                      " AND details->>'instance_id' = %s AND details->>'to' = 'failed'", iid)[0][0]
    print("hanging instance marked failed after %.1f s (threshold %d x %d s), redeployed %d time(s)"
          % (took, THRESHOLD, INTERVAL, to_failed))
    # Counted once per interval: the first counted failure may come at once, the
    # THRESHOLD-th no sooner than THRESHOLD - 1 intervals later.
    assert took >= (THRESHOLD - 1) * INTERVAL - 0.5, (took, before, after)
    assert to_failed == 1
    assert a.sql("SELECT status FROM public.instances WHERE id = %s", iid)[0][0] == "running"
