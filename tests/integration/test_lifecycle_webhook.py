"""The lifecycle driven by Stripe: signed events through handle-stripe-webhook, which
records what the instance should become; its commit wakes the lifecycle worker,
which does the work. Nobody calls provision-instance or deprovision-instance."""
import json
import statistics
import time
import uuid

import pytest

import mr
from lifecycle_helpers import (LIMITS, PRICES, WORKER, deprovision,
                               instance, instances, new_account, stack_env, wait_status,
                               wait_until)

FUNCS = ["handle-stripe-webhook", "deprovision-instance", WORKER]


@pytest.fixture(scope="module")
def stack(pg, prov, resend):
    with mr.Stack(pg, env=stack_env(prov, resend), functions=FUNCS) as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(fresh_standins):
    yield


class Customer:
    """One Stripe customer with one subscription; each event is newer than the last."""

    def __init__(self, stack, tier="starter"):
        self.stack = stack
        self.sub = "sub_" + uuid.uuid4().hex[:14]
        self.customer = "cus_" + uuid.uuid4().hex[:14]
        self.account, self.email = new_account(stack, self.customer)
        self.tier = tier
        self.t = int(time.time()) - 100

    def event(self, type_, status, tier=None):
        self.t += 1
        self.tier = tier or self.tier
        obj = {
            "id": self.sub, "object": "subscription", "customer": self.customer,
            "status": status, "metadata": {"account_id": self.account},
            "cancel_at_period_end": False,
            "items": {"object": "list", "data": [{
                "id": "si_" + uuid.uuid4().hex[:10],
                "price": {"id": PRICES[self.tier], "object": "price"},
                "current_period_end": self.t + 30 * 86400}]},
        }
        return {"id": "evt_" + uuid.uuid4().hex, "object": "event", "type": type_,
                "created": self.t, "api_version": "2025-03-31.basil", "livemode": False,
                "data": {"object": obj}}

    def send(self, type_, status, tier=None):
        raw = json.dumps(self.event(type_, status, tier)).encode()
        t0 = time.monotonic()
        r = self.stack.call("POST", "handle-stripe-webhook", body=raw,
                            headers=self.stack.stripe_headers(raw))
        assert r.status == 200, r
        return time.monotonic() - t0

    @property
    def sid(self):
        rows = self.stack.sql("SELECT id FROM public.subscriptions WHERE stripe_subscription_id = %s",
                              self.sub)
        return str(rows[0][0]) if rows else None


def test_signed_subscription_created_is_running_within_two_seconds(stack, prov, resend):
    c = Customer(stack, "starter")
    t0 = time.monotonic()
    c.send("customer.subscription.created", "active")
    inst = wait_status(stack, c.sid, "running", timeout=2.0)
    took = time.monotonic() - t0
    assert took < 2.0
    print("\nsubscription.created -> running with URLs: %.0f ms" % (took * 1000))
    assert inst["frontend_url"] and inst["backend_url"] and inst["matrix_server_url"]
    creates = prov.create_calls()
    assert len(creates) == 1
    assert creates[0].json["app"] == inst["dokku_app_name"]
    assert (creates[0].json["memory_mb"], float(creates[0].json["cpu"])) == LIMITS["starter"]
    wait_until(lambda: instance(stack, c.sid)["welcome_email_sent_at"], timeout=2.0, what="email")
    assert len(resend.requests) == 1 and resend.requests[0].json["to"] == [c.email]
    # A redelivery of the same state changes nothing and calls nobody again.
    c.send("customer.subscription.updated", "active")
    time.sleep(0.5)
    assert len(prov.requests) == 1 and len(resend.requests) == 1


def test_unpaid_stops_active_resumes_the_same_app_deleted_destroys(stack, prov):
    c = Customer(stack, "starter")
    c.send("customer.subscription.created", "trialing")
    first = wait_status(stack, c.sid, "running", timeout=3)
    app = first["dokku_app_name"]

    c.send("customer.subscription.updated", "unpaid")
    wait_status(stack, c.sid, "stopped", timeout=3)
    assert prov.apps[app]["state"] == "stopped"

    c.send("customer.subscription.updated", "active")
    back = wait_status(stack, c.sid, "running", timeout=3)
    assert back["id"] == first["id"] and back["dokku_app_name"] == app
    assert prov.apps[app]["state"] == "running"
    # Resumed, not re-created: the same app's configuration again, with a new
    # control-plane token (the stop revoked the old one).
    creates = prov.create_calls()
    assert len(creates) == 2 and {c.json["app"] for c in creates} == {app}
    assert (creates[1].json["env"]["MINDROOM_CONTROL_PLANE_TOKEN"]
            != creates[0].json["env"]["MINDROOM_CONTROL_PLANE_TOKEN"])

    c.send("customer.subscription.deleted", "canceled")
    gone = wait_until(lambda: (lambda i: i if i["status"] == "deprovisioned" else None)(
        instances(stack, c.sid)[0]), timeout=3, what="deprovisioned")
    assert gone["deprovisioned_at"] is not None
    assert app not in prov.apps
    assert prov.recorded("DELETE", "/apps/" + app)
    n = len(prov.requests)
    r = deprovision(stack, subscription_id=c.sid, mode="destroy")
    assert r.status == 200 and r.json["instance"]["status"] == "deprovisioned", r
    assert len(prov.requests) == n


def test_tier_upgrade_reaches_the_provisioner(stack, prov):
    c = Customer(stack, "starter")
    c.send("customer.subscription.created", "active")
    inst = wait_status(stack, c.sid, "running", timeout=3)
    c.send("customer.subscription.updated", "active", tier="professional")
    assert instance(stack, c.sid)["memory_limit_mb"] == LIMITS["professional"][0]

    def new_limits_applied():
        posts = [r.json for r in prov.create_calls() if r.json["app"] == inst["dokku_app_name"]]
        return posts[-1]["memory_mb"] == LIMITS["professional"][0] and not instance(stack, c.sid)["claimed_by"]

    # The commit that changed the limits woke the worker: nobody asks for the update.
    wait_until(new_limits_applied, timeout=3, what="update")
    last = prov.create_calls()[-1].json
    assert (last["memory_mb"], float(last["cpu"])) == LIMITS["professional"]
    assert prov.apps[inst["dokku_app_name"]]["memory_mb"] == LIMITS["professional"][0]
    assert list(prov.apps) == [inst["dokku_app_name"]]
    assert instance(stack, c.sid)["status"] == "running"


def test_a_hanging_provisioner_never_slows_the_webhook(stack, prov):
    # Baseline latency with a healthy provisioner.
    warm = [Customer(stack) for _ in range(5)]
    base = [c.send("customer.subscription.created", "active") for c in warm]
    for c in warm:
        wait_status(stack, c.sid, "running", timeout=5)

    prov.behave("hang")
    stuck = Customer(stack)
    stuck.send("customer.subscription.created", "active")
    prov.wait_for(lambda p: p.create_calls() and len(p.create_calls()) > 5, timeout=3)

    # While it hangs: a stream of other events, each of them owing provisioning too.
    others = [Customer(stack) for _ in range(12)]
    lat = [c.send("customer.subscription.created", "active") for c in others]
    print("\nwebhook latency, healthy provisioner: median %.1f ms, max %.1f ms; "
          "provisioner hanging: median %.1f ms, max %.1f ms (%d events)" % (
              statistics.median(base) * 1000, max(base) * 1000,
              statistics.median(lat) * 1000, max(lat) * 1000, len(lat)))
    assert max(lat) < max(0.5, 3 * max(base)), (lat, base)
    assert statistics.median(lat) < 0.25, lat

    # The stuck one fails at its deadline; nothing was lost for the others.
    failed = wait_status(stack, stuck.sid, "failed", timeout=5)
    assert failed["next_attempt_at"] is not None
    prov.release()
    for c in others:
        assert len(instances(stack, c.sid)) == 1
    # The worker finishes every one of them (the stuck one after its backoff), with
    # one app each, and nobody asked.
    wait_until(lambda: all(instance(stack, c.sid)["status"] == "running" and
                           not instance(stack, c.sid)["claimed_by"] for c in others + [stuck]),
               timeout=20, what="every instance running")
    for c in others + [stuck]:
        i = instance(stack, c.sid)
        assert i["status"] == "running", i
        assert i["dokku_app_name"] in prov.apps
    assert len(prov.apps) == len(warm) + len(others) + 1
