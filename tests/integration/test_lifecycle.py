"""provision-instance and deprovision-instance through real nginx and PostgreSQL,
against the provisioner and Resend stand-ins (tests/standins)."""
import concurrent.futures
import time

import pytest

import mr
from lifecycle_helpers import (kill_workers_mid_provision, LIMITS, deprovision,
                               instance, instances, new_account, new_subscription, owed,
                               provision, stack_env, wait_status, wait_until)

FUNCS = ["provision-instance", "deprovision-instance"]


@pytest.fixture(scope="module")
def stack(pg, prov, resend):
    with mr.Stack(pg, env=stack_env(prov, resend), functions=FUNCS) as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(fresh_standins):
    yield


def creates_for(prov, app):
    return [r for r in prov.create_calls() if r.json and r.json.get("app") == app]


# --- the happy path --------------------------------------------------------------------

def test_provision_answers_202_then_runs_with_one_create_and_one_email(stack, prov, resend):
    acc, email = new_account(stack)
    sid = new_subscription(stack, "starter", account=acc)
    t0 = time.monotonic()
    r = provision(stack, sid)
    assert r.status == 202, r
    assert r.json["instance"]["status"] == "provisioning"
    assert r.json["instance"]["busy"] is True
    assert r.json["instance"]["dokku_app_name"] == "mindroom-" + sid.replace("-", "")[:12]
    assert "environment_vars" not in r.json["instance"]

    inst = wait_status(stack, sid, "running", timeout=5)
    assert time.monotonic() - t0 < 2.0
    app = inst["dokku_app_name"]
    calls = creates_for(prov, app)
    assert len(calls) == 1
    body = calls[0].json
    assert (body["memory_mb"], float(body["cpu"])) == LIMITS["starter"]
    assert body["subdomain"] == inst["subdomain"] == "m" + sid.replace("-", "")[:12]
    assert body["env"]["MINDROOM_INSTANCE_ID"] == str(inst["id"])
    assert body["env"]["MINDROOM_SUBDOMAIN"] == inst["subdomain"]
    assert inst["frontend_url"] == "https://%s.mindroom.test" % inst["subdomain"]
    assert inst["backend_url"] and inst["matrix_server_url"]
    assert inst["provisioned_at"] is not None and inst["attempts"] == 0

    wait_until(lambda: instance(stack, sid)["welcome_email_sent_at"], what="email recorded")
    assert len(resend.requests) == 1
    mail = resend.requests[0]
    assert mail.json["to"] == [email]
    assert inst["frontend_url"] in mail.json["text"]
    assert mail.headers["Idempotency-Key"] == "welcome-%s" % inst["id"]
    assert mail.json["from"] == "MindRoom <hello@mindroom.test>"

    # Already running: answered unchanged, nothing sent anywhere.
    r2 = provision(stack, sid)
    assert r2.status == 200, r2
    assert r2.json["instance"]["status"] == "running"
    assert r2.json["instance"]["frontend_url"] == inst["frontend_url"]
    time.sleep(0.3)
    assert len(prov.requests) == 1 and len(resend.requests) == 1


def test_ten_concurrent_provision_calls_make_one_app(stack, prov, resend):
    sid = new_subscription(stack, "professional")
    prov.behave(("slow", 0.3))
    with concurrent.futures.ThreadPoolExecutor(10) as ex:
        results = list(ex.map(lambda _: provision(stack, sid), range(10)))
    assert {r.status for r in results} <= {200, 202}, results
    assert sum(1 for r in results if r.status == 202) >= 1
    inst = wait_status(stack, sid, "running", timeout=8)
    assert len(instances(stack, sid)) == 1
    assert len(creates_for(prov, inst["dokku_app_name"])) == 1
    assert list(prov.apps) == [inst["dokku_app_name"]]
    wait_until(lambda: instance(stack, sid)["welcome_email_sent_at"], what="email")
    assert len(resend.requests) == 1


def test_wait_true_answers_200_with_the_final_instance(stack, prov):
    sid = new_subscription(stack, "free")
    r = provision(stack, sid, wait=True)
    assert r.status == 200, r
    i = r.json["instance"]
    assert i["status"] == "running" and i["busy"] is False
    assert i["frontend_url"].startswith("https://m")
    assert (i["memory_limit_mb"], float(i["cpu_limit"])) == LIMITS["free"]
    assert len(prov.create_calls()) == 1


# --- input and authorization -------------------------------------------------------------

@pytest.mark.parametrize("body, status", [
    (b"not json", 400),
    (b"[]", 400),
    (b'{"subscription_id": "not-a-uuid"}', 400),
    (b'{"subscription_id": 42}', 400),
    (b'{}', 400),
    (b'{"subscription_id": "00000000-0000-4000-8000-000000000000", "wait": "yes"}', 400),
    (b'{"subscription_id": "00000000-0000-4000-8000-000000000000"}', 404),
])
def test_bad_input_is_refused_and_writes_nothing(stack, prov, body, status):
    before = stack.sql("SELECT count(*) FROM public.instances")[0][0]
    r = stack.call("POST", "provision-instance", body=body, token=stack.jwt(),
                   headers={"Content-Type": "application/json"})
    assert r.status == status, r
    assert r.json["error"]["code"]
    assert stack.sql("SELECT count(*) FROM public.instances")[0][0] == before
    assert prov.requests == []


def test_deprovision_bad_input(stack, prov):
    for body in ({}, {"instance_id": "x"}, {"instance_id": "00000000-0000-4000-8000-000000000000",
                                            "subscription_id": "00000000-0000-4000-8000-000000000000"},
                 {"subscription_id": "00000000-0000-4000-8000-000000000000", "mode": "nuke"}):
        r = deprovision(stack, **body)
        assert r.status == 400, (body, r)
    r = deprovision(stack, instance_id="00000000-0000-4000-8000-000000000000")
    assert r.status == 404
    assert prov.requests == []


def test_not_entitled_is_409_and_creates_nothing(stack, prov):
    for status in ("unpaid", "cancelled", "incomplete", "paused", "incomplete_expired"):
        sid = new_subscription(stack, "starter", status=status)
        r = provision(stack, sid)
        assert r.status == 409, r
        assert r.json["error"]["code"] == "not_entitled"
        assert status in r.json["error"]["message"]
        assert instances(stack, sid) == []
    assert prov.requests == []


@pytest.mark.parametrize("fn", FUNCS)
def test_wrong_or_missing_token_is_refused_before_any_work(stack, prov, fn):
    sid = new_subscription(stack, "starter")
    body = {"subscription_id": sid}
    forged = mr.make_jwt({"role": "service_role", "exp": int(time.time()) + 60}, "x" * 40)
    cases = [(None, 401), ("", 401), ("garbage", 401), (forged, 401),
             (stack.jwt(exp_in=-60), 401),
             (stack.jwt(role="anon"), 403),
             (stack.jwt(role="authenticated", sub=new_account(stack)[0]), 403)]
    for token, want in cases:
        headers = {} if token is None else {"Authorization": "Bearer " + token}
        r = stack.call("POST", fn, json=body, headers=headers)
        assert r.status == want, (token, r)
    assert instances(stack, sid) == []
    assert prov.requests == []


# --- failures ---------------------------------------------------------------------------

def test_provisioner_500_fails_with_backoff_then_succeeds_on_retry(stack, prov):
    sid = new_subscription(stack, "starter")
    prov.next("fail")
    assert provision(stack, sid).status == 202
    inst = wait_status(stack, sid, "failed")
    assert inst["attempts"] == 1
    assert "500" in inst["last_error"] and inst["error_message"] == inst["last_error"]
    now = stack.sql("SELECT now()")[0][0]
    delay = (inst["next_attempt_at"] - now).total_seconds()
    assert 0 < delay <= 1.0, delay                      # base 1 s * 2^0
    assert owed(stack, sid) == []                        # the sweep waits out the backoff
    wait_until(lambda: owed(stack, sid), timeout=3, what="owed after backoff")
    assert owed(stack, sid) == [("create", "provision-instance", {"subscription_id": sid})]

    # A second failure doubles the backoff.
    prov.next("fail")
    assert provision(stack, sid).status == 202
    wait_until(lambda: instance(stack, sid)["attempts"] == 2 and not instance(stack, sid)["claimed_by"],
               what="second failure")
    inst = instance(stack, sid)
    now = stack.sql("SELECT now()")[0][0]
    assert 1.0 < (inst["next_attempt_at"] - now).total_seconds() <= 2.0

    # The retry (what the sweep does once it is due) succeeds with the same app.
    assert provision(stack, sid).status == 202
    inst = wait_status(stack, sid, "running")
    assert inst["attempts"] == 0 and inst["last_error"] is None and inst["next_attempt_at"] is None
    assert len(creates_for(prov, inst["dokku_app_name"])) == 3
    assert list(prov.apps) == [inst["dokku_app_name"]]


def test_provisioner_4xx_is_recorded_and_not_retried_blindly(stack, prov):
    sid = new_subscription(stack, "starter")
    prov.next("reject")
    r = provision(stack, sid, wait=True)
    assert r.status == 502, r
    assert r.json["error"]["code"] == "provisioner_rejected"
    assert r.json["instance"]["status"] == "failed"
    inst = instance(stack, sid)
    assert inst["last_error"].startswith("rejected: ") and "400" in inst["last_error"]
    assert inst["next_attempt_at"] is None and inst["attempts"] == 1
    time.sleep(1.2)
    assert owed(stack, sid) == []                        # left for an operator


def test_provisioner_hanging_past_its_deadline_fails_without_holding_the_caller(stack, prov):
    sid = new_subscription(stack, "starter")
    prov.behave("hang")
    t0 = time.monotonic()
    r = provision(stack, sid)
    assert r.status == 202 and time.monotonic() - t0 < 1.0, r
    inst = wait_status(stack, sid, "failed", timeout=5)
    assert time.monotonic() - t0 < 4.0                   # the 1.5 s deadline, not the hang
    assert "timed out" in inst["last_error"].lower() or "timeout" in inst["last_error"].lower()
    assert inst["next_attempt_at"] is not None
    prov.release()


def test_with_every_job_slot_busy_calls_still_answer_at_once_and_leave_work_owed(stack, prov):
    # MR_WORKERS=2 -> one job slot: while it hangs on the provisioner, the other
    # worker still answers, and leaves new work owed (unclaimed) for the sweep.
    a, b = new_subscription(stack, "starter"), new_subscription(stack, "starter")
    prov.behave("hang")
    assert provision(stack, a).status == 202
    prov.wait_for(lambda p: p.create_calls(), timeout=3)
    t0 = time.monotonic()
    r = provision(stack, b)
    assert r.status == 202 and time.monotonic() - t0 < 0.5, r
    assert r.json["instance"]["status"] == "provisioning" and r.json["instance"]["busy"] is False
    assert owed(stack, b) == [("create", "provision-instance", {"subscription_id": b})]
    r = provision(stack, b, wait=True)
    assert r.status == 503 and r.json["error"]["code"] == "busy", r
    prov.release()
    wait_status(stack, a, "failed", timeout=5)
    r = provision(stack, b, wait=True)                   # the slot is free again
    assert r.status == 200 and r.json["instance"]["status"] == "running", r


def test_wait_true_reports_a_failure_as_503_with_the_instance_error(stack, prov):
    sid = new_subscription(stack, "starter")
    prov.next("fail")
    r = provision(stack, sid, wait=True)
    assert r.status == 503, r
    assert r.json["error"]["code"] == "provisioner_unavailable"
    assert "500" in r.json["error"]["message"]
    assert r.json["instance"]["status"] == "failed"


def test_a_worker_killed_mid_provision_leaves_a_lease_that_expires(stack, prov):
    sid = new_subscription(stack, "starter")
    kill_workers_mid_provision(stack, prov, sid)
    inst = instance(stack, sid)
    assert inst["status"] == "provisioning" and inst["claimed_by"] is not None

    # While the dead worker's lease is live, nobody repeats the call.
    r = provision(stack, sid)
    assert r.status == 202 and r.json["instance"]["busy"] is True
    assert owed(stack, sid) == []
    time.sleep(0.3)
    assert len(prov.create_calls()) == 1

    # Once it expires, the sweep sees the work and a call finishes it with one app.
    wait_until(lambda: owed(stack, sid), timeout=6, what="lease expiry")
    assert owed(stack, sid)[0][0] == "create"
    assert provision(stack, sid).status == 202
    inst = wait_status(stack, sid, "running")
    assert list(prov.apps) == [inst["dokku_app_name"]]
    assert len(creates_for(prov, inst["dokku_app_name"])) == 2


def test_resend_down_keeps_the_instance_running_and_the_email_owed(stack, prov, resend):
    sid = new_subscription(stack, "starter")
    resend.behave("fail")
    assert provision(stack, sid).status == 202
    wait_until(lambda: instance(stack, sid)["welcome_email_error"], what="email failure")
    inst = wait_status(stack, sid, "running")
    assert inst["welcome_email_sent_at"] is None and "500" in inst["welcome_email_error"]
    assert inst["last_error"] is None
    assert len(resend.delivered) == 0

    # The sweep sees the owed email once its backoff has passed, and a call sends it.
    wait_until(lambda: owed(stack, sid), timeout=3, what="email owed")
    assert owed(stack, sid) == [("email", "provision-instance", {"subscription_id": sid})]
    resend.behave("ok")
    r = provision(stack, sid)
    assert r.status == 200, r                            # running: nothing to claim for the caller
    wait_until(lambda: instance(stack, sid)["welcome_email_sent_at"], what="email sent")
    assert len(resend.delivered) == 1
    n = len(resend.requests)
    assert provision(stack, sid).status == 200
    time.sleep(0.3)
    assert len(resend.requests) == n and owed(stack, sid) == []
    assert len(creates_for(prov, inst["dokku_app_name"])) == 1


# --- changes over a subscription's life ------------------------------------------------

def test_tier_upgrade_reaches_the_provisioner(stack, prov):
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    app = instance(stack, sid)["dokku_app_name"]
    # What the webhook writes on an upgrade; the trigger moves the instance's limits.
    stack.sql("UPDATE public.subscriptions SET tier = 'enterprise', "
              "stripe_price_id = 'price_enterprise' WHERE id = %s", sid)
    assert owed(stack, sid) == [("update", "provision-instance", {"subscription_id": sid})]
    r = provision(stack, sid)
    assert r.status == 202 and r.json["instance"]["status"] == "running", r
    wait_until(lambda: len(creates_for(prov, app)) == 2 and not instance(stack, sid)["claimed_by"],
               what="update")
    last = creates_for(prov, app)[-1].json
    assert (last["memory_mb"], float(last["cpu"])) == LIMITS["enterprise"]
    assert prov.apps[app]["memory_mb"] == 4096
    inst = instance(stack, sid)
    assert inst["status"] == "running" and inst["memory_limit_mb"] == 4096
    assert provision(stack, sid).status == 200


def test_stop_then_resume_the_same_app_then_destroy(stack, prov):
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    inst = instance(stack, sid)
    app = inst["dokku_app_name"]

    r = deprovision(stack, subscription_id=sid, mode="stop")
    assert r.status == 202 and r.json["mode"] == "stop", r
    wait_status(stack, sid, "stopped")
    assert prov.apps[app]["state"] == "stopped"
    assert instance(stack, sid)["desired_status"] == "stopped"
    n = len(prov.requests)
    r = deprovision(stack, subscription_id=sid, mode="stop")
    assert r.status == 200 and r.json["instance"]["status"] == "stopped"
    assert len(prov.requests) == n

    r = provision(stack, sid)
    assert r.status == 202, r
    back = wait_status(stack, sid, "running")
    assert back["dokku_app_name"] == app and back["id"] == inst["id"]
    assert prov.apps[app]["state"] == "running"
    assert prov.recorded("POST", "/apps/%s/start" % app)
    assert len(creates_for(prov, app)) == 1              # resumed, not re-created

    r = deprovision(stack, instance_id=str(inst["id"]), mode="destroy", wait=True)
    assert r.status == 200, r
    assert r.json["instance"]["status"] == "deprovisioned"
    done = instances(stack, sid)[0]
    assert done["status"] == "deprovisioned" and done["deprovisioned_at"] is not None
    assert app not in prov.apps
    n = len(prov.requests)
    for body in ({"instance_id": str(inst["id"])}, {"subscription_id": sid}):
        r = deprovision(stack, mode="destroy", **body)
        assert r.status == 200 and r.json["instance"]["status"] == "deprovisioned", r
    assert len(prov.requests) == n


def test_destroying_an_app_that_is_already_gone_succeeds(stack, prov):
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    app = instance(stack, sid)["dokku_app_name"]
    del prov.apps[app]                                   # removed by hand in Dokku
    r = deprovision(stack, subscription_id=sid, mode="destroy", wait=True)
    assert r.status == 200 and r.json["instance"]["status"] == "deprovisioned", r


def test_default_mode_destroys_cancelled_and_stops_otherwise(stack, prov):
    live = new_subscription(stack, "starter")
    gone = new_subscription(stack, "starter")
    for sid in (live, gone):
        provision(stack, sid, wait=True)
    stack.sql("UPDATE public.subscriptions SET status = 'cancelled' WHERE id = %s", gone)
    r = deprovision(stack, subscription_id=live, wait=True)
    assert r.status == 200 and r.json["mode"] == "stop" and r.json["instance"]["status"] == "stopped", r
    r = deprovision(stack, subscription_id=gone, wait=True)
    assert r.status == 200 and r.json["mode"] == "destroy", r
    assert r.json["instance"]["status"] == "deprovisioned"


def test_a_subscription_without_an_instance_has_nothing_to_deprovision(stack, prov):
    sid = new_subscription(stack, "starter", status="incomplete")
    r = deprovision(stack, subscription_id=sid)
    assert r.status == 200 and r.json["instance"] is None, r
    assert prov.requests == []


def test_environment_reaches_the_app_but_never_an_answer(stack, prov):
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    secret = "sk-live-" + "z" * 24
    stack.sql("UPDATE public.instances SET environment_vars = %s::jsonb WHERE subscription_id = %s",
              '{"OPENAI_API_KEY": "%s", "N": 3}' % secret, sid)
    r = provision(stack, sid, wait=True)                 # environment changed: an update
    assert r.status == 200, r
    assert secret not in r.text
    app = instance(stack, sid)["dokku_app_name"]
    env = creates_for(prov, app)[-1].json["env"]
    assert env["OPENAI_API_KEY"] == secret and env["N"] == "3"
    assert secret not in stack.log("provision-instance")


def test_failed_stop_keeps_running_and_is_retried(stack, prov):
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    prov.next("fail")
    r = deprovision(stack, subscription_id=sid, mode="stop", wait=True)
    assert r.status == 503, r
    inst = instance(stack, sid)
    assert inst["status"] == "running" and inst["desired_status"] == "stopped"
    assert inst["attempts"] == 1
    wait_until(lambda: owed(stack, sid), timeout=3, what="stop owed")
    assert owed(stack, sid) == [("stop", "deprovision-instance",
                                 {"instance_id": str(inst["id"]), "mode": "stop"})]
    r = deprovision(stack, instance_id=str(inst["id"]), mode="stop", wait=True)
    assert r.status == 200 and r.json["instance"]["status"] == "stopped", r


def test_no_resend_key_skips_the_email_with_a_log_line(pg, prov):
    with mr.Stack(pg, env=stack_env(prov), functions=["provision-instance"]) as s:
        sid = new_subscription(s, "starter")
        r = provision(s, sid, wait=True)
        assert r.status == 200 and r.json["instance"]["status"] == "running", r
        inst = instance(s, sid)
        assert inst["welcome_email_sent_at"] is None
        assert "RESEND_API_KEY is not set" in s.log("provision-instance")
        # The worker's loop ends at "running" (no email step); the next call records
        # the skip, so the sweep does not ask again every minute.
        assert owed(s, sid) == [("email", "provision-instance", {"subscription_id": sid})]
        assert provision(s, sid).status == 200
        assert instance(s, sid)["welcome_email_error"].startswith("skipped: ")
        assert owed(s, sid) == []
