"""End to end: provision-instance / deprovision-instance record the request -> the
lifecycle worker -> nginx's provisioner listener -> the real dokku-provisioner ->
the stand-in `dokku` executable (tests/standins/dokku). Only Dokku itself and
Resend are stood in."""
import time

import pytest

import mr
from lifecycle_helpers import (FAST_ENV, LIMITS, WORKER, deprovision, instance, instances,
                               new_account, new_subscription, provision, wait_status, wait_until)
from provisioner_helpers import DOMAIN, Dokku, imported, mem

FUNCS = ["provision-instance", "deprovision-instance", "dokku-provisioner", WORKER]


@pytest.fixture(scope="module")
def dokku():
    return Dokku()


@pytest.fixture(scope="module")
def stack(pg, dokku, resend):
    env = dict(FAST_ENV)
    # Real deploys of two apps through the stand-in take seconds (more on a loaded
    # machine); keep the deadline comfortable and the lease above it, as start-up demands.
    env.update(MR_PROVISION_TIMEOUT_MS="30000", MR_LIFECYCLE_LEASE_S="60",
               MR_PROVISION_WAIT_MS="45000",
               RESEND_BASE_URL=resend.url, RESEND_API_KEY=resend.token)
    env.update(dokku.env())
    # DOKKU_PROVISIONER_URL and DOKKU_PROVISIONER_TOKEN: the stack's own listener and
    # the one token both sides read.
    with mr.Stack(pg, env=env, functions=FUNCS) as s:
        yield s


def commands(calls, app):
    return [c[0] for c in calls if app in c]


def test_full_life_of_an_instance_against_the_real_provisioner(stack, dokku, resend):
    acc, email = new_account(stack)
    sid = new_subscription(stack, "starter", account=acc)
    dokku.mark()
    t0 = time.monotonic()
    r = provision(stack, sid)
    assert r.status == 202, r
    inst = wait_status(stack, sid, "running", timeout=45)  # two apps, ~30 stand-in dokku calls
    elapsed = time.monotonic() - t0
    app, sub = inst["dokku_app_name"], inst["subdomain"]

    calls = dokku.new_calls()
    cmds = commands(calls, app)
    for c in ("apps:create", "resource:limit", "config:import", "domains:set", "git:from-image"):
        assert cmds.count(c) == 1, (c, calls)
    limit = next(c for c in calls if c[0] == "resource:limit" and c[-1] == app)
    assert limit[limit.index("--memory") + 1] == mem("%dm" % LIMITS["starter"][0])
    assert float(limit[limit.index("--cpu") + 1]) == LIMITS["starter"][1]
    env = imported(next(c for c in calls if c[0] == "config:import"))
    assert env["MINDROOM_INSTANCE_ID"] == str(inst["id"])
    assert env["MINDROOM_SUBDOMAIN"] == sub and env["MINDROOM_TIER"] == "starter"
    assert ["domains:set", app, "%s.%s" % (sub, DOMAIN)] in calls
    assert dokku.exists(app)
    assert inst["frontend_url"] == "http://%s.%s" % (sub, DOMAIN)
    assert inst["backend_url"] == "http://%s.%s/api" % (sub, DOMAIN)
    assert inst["matrix_server_url"]
    wait_until(lambda: instance(stack, sid)["welcome_email_sent_at"], what="welcome email")
    assert len(resend.requests) == 1 and resend.requests[0].json["to"] == [email]
    assert inst["frontend_url"] in resend.requests[0].json["text"]
    print("provisioned through the real provisioner in %.2f s" % elapsed)

    # A repeat changes nothing in Dokku.
    assert provision(stack, sid).status == 200
    time.sleep(0.3)
    assert dokku.new_calls() == []

    # Tier upgrade: the same app gets the new limits.
    stack.sql("UPDATE public.subscriptions SET tier = 'professional', "
              "stripe_price_id = 'price_professional' WHERE id = %s", sid)
    r = provision(stack, sid, wait=True)
    assert r.status == 200 and r.json["instance"]["status"] == "running", r
    calls = dokku.new_calls()
    assert "apps:create" not in commands(calls, app)
    limit = next(c for c in calls if c[0] == "resource:limit" and c[-1] == app)
    assert limit[limit.index("--memory") + 1] == mem("%dm" % LIMITS["professional"][0])
    assert float(limit[limit.index("--cpu") + 1]) == LIMITS["professional"][1]

    # Unpaid: stopped, data kept.
    r = deprovision(stack, subscription_id=sid, mode="stop", wait=True)
    assert r.status == 200 and r.json["instance"]["status"] == "stopped", r
    assert ["ps:stop", app] in dokku.new_calls()
    assert dokku.exists(app)

    # Paid again: the same app is started, not re-created.
    r = provision(stack, sid, wait=True)
    assert r.status == 200 and r.json["instance"]["status"] == "running", r
    calls = dokku.new_calls()
    # (The stop revoked its control-plane token: the start is a POST /apps of the same
    # app with a new one, which starts it; docs/lifecycle.md.)
    assert dokku.app(app, "running") == "true" and "apps:create" not in commands(calls, app)
    assert any(c[0] == "config:import" and app in c for c in calls), calls
    assert instance(stack, sid)["dokku_app_name"] == app

    # Deleted: destroyed in Dokku, deprovisioned here; a second destroy is a no-op.
    r = deprovision(stack, subscription_id=sid, mode="destroy", wait=True)
    assert r.status == 200 and r.json["instance"]["status"] == "deprovisioned", r
    assert any(c[-2:] == ["apps:destroy", app] for c in dokku.new_calls())
    assert not dokku.exists(app)
    r = deprovision(stack, subscription_id=sid, mode="destroy")
    assert r.status == 200 and r.json["instance"]["status"] == "deprovisioned", r
    time.sleep(0.2)
    assert dokku.new_calls() == []
    assert len(resend.requests) == 1


def test_a_failing_dokku_command_fails_with_backoff_and_the_retry_completes_one_app(stack, dokku):
    sid = new_subscription(stack, "free")
    dokku.mark()
    dokku.tell("fail", "git:from-image", times=1, status=1)
    r = provision(stack, sid, wait=True)
    assert r.status == 503, r                             # the provisioner's 502: transient
    inst = instance(stack, sid)
    assert inst["status"] == "failed" and inst["attempts"] == 1
    assert "502" in inst["last_error"] and inst["next_attempt_at"] is not None
    app = inst["dokku_app_name"]
    r = provision(stack, sid, wait=True)
    assert r.status == 200 and r.json["instance"]["status"] == "running", r
    calls = dokku.new_calls()
    assert commands(calls, app).count("apps:create") == 1   # resumed, never duplicated
    assert dokku.exists(app)
    assert len(instances(stack, sid)) == 1


def test_wrong_provisioner_token_is_not_a_rejection(pg, dokku):
    """A token mismatch is configuration: recorded and retried with backoff, never
    marked as a rejected request, and nothing reaches Dokku."""
    env = dict(FAST_ENV)
    env.update(dokku.env())
    with mr.Stack(pg, env=env, functions=FUNCS) as s:
        s.env["DOKKU_PROVISIONER_TOKEN"] = "wrong-" + "x" * 30
        if "MR_TEST_TARGET_TOKEN" in s.env:   # the worker reads the target's token there
            s.env["MR_TEST_TARGET_TOKEN"] = s.env["DOKKU_PROVISIONER_TOKEN"]
        s.restart_function(WORKER)
        sid = new_subscription(s, "starter")
        dokku.mark()
        r = provision(s, sid, wait=True)
        assert r.status == 503, r
        inst = instance(s, sid)
        assert "401" in inst["last_error"] and not inst["last_error"].startswith("rejected")
        assert inst["next_attempt_at"] is not None
        assert dokku.new_calls() == []
