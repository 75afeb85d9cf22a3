"""The instance lifecycle through real nginx and PostgreSQL: provision-instance and
deprovision-instance record what an operator asks, the lifecycle worker
(mindroom-lifecycle) does it against the provisioner and Resend stand-ins
(tests/standins)."""
import concurrent.futures
import os
import signal
import time

import psycopg2
import pytest

import mr
from lifecycle_helpers import (WORKER, kill_workers_mid_provision, LIMITS, deprovision, env_set,
                               instance, instances, new_account, new_subscription, owed,
                               provision, stack_env, wait_status, wait_until)

FUNCS = ["provision-instance", "deprovision-instance", WORKER]


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
    assert r.json["instance"]["owed_action"] == "create"
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
    assert r2.json["instance"]["owed_action"] is None
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


def test_a_misspelt_or_repeated_member_is_refused_not_ignored(stack, prov):
    # An operator's misspelt option must not be dropped (a token believed rotated is
    # not), nor a repeated one read as either: 400 naming the member, nothing done.
    sid = new_subscription(stack, "starter")
    r = provision(stack, sid, rotate_tokens=True)
    assert r.status == 400 and r.json["error"]["code"] == "invalid_body", r
    assert r.json["error"]["message"] == (
        'unknown member "rotate_tokens": the body has only "subscription_id", "wait" and '
        '"rotate_token"')
    assert instances(stack, sid) == []
    assert provision(stack, sid).status == 202
    iid = wait_status(stack, sid, "running")["id"]
    for body in (b'{"instance_id": "%s", "mode": "stop", "mode": "destroy"}' % iid.encode(),
                 b'{"instance_id": "%s", "mode": "stop", "dry": true}' % iid.encode()):
        r = stack.call("POST", "deprovision-instance", body=body, token=stack.jwt(),
                       headers={"Content-Type": "application/json"})
        assert r.status == 400 and r.json["error"]["code"] == "invalid_body", (body, r)
    assert r.json["error"]["message"].startswith('unknown member "dry"')
    assert owed(stack, sid) is None
    assert instance(stack, sid)["desired_status"] == "running"


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


def test_a_refused_provision_says_an_operators_stop_still_holds(stack, prov):
    # An operator stopped the instance; the subscription then went unpaid. The
    # operator's provision is refused, and its answer says the stop still holds:
    # the customer paying again will not resume the instance, a provision will.
    sid = new_subscription(stack, "starter")
    assert provision(stack, sid).status == 202
    wait_status(stack, sid, "running", timeout=5)
    assert deprovision(stack, subscription_id=sid, mode="stop").status == 202
    wait_status(stack, sid, "stopped", timeout=5)
    stack.sql("UPDATE public.subscriptions SET status = 'unpaid' WHERE id = %s", sid)
    r = provision(stack, sid)
    assert r.status == 409, r
    assert r.json["error"]["code"] == "not_entitled"
    msg = r.json["error"]["message"]
    assert "unpaid" in msg and "stays stopped by an operator" in msg and "provision again" in msg, msg
    assert stack.sql("SELECT operator_stopped_at IS NOT NULL, desired_status::text FROM public.instances "
                     "WHERE subscription_id = %s", sid) == [(True, "stopped")]
    # Without an operator's stop the refusal says nothing of one.
    other = new_subscription(stack, "starter", status="unpaid")
    assert "operator" not in provision(stack, other).json["error"]["message"]


@pytest.mark.parametrize("fn", ["provision-instance", "deprovision-instance"])
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

def test_provisioner_500_fails_with_backoff_and_the_worker_retries_by_itself(stack, prov):
    sid = new_subscription(stack, "starter")
    prov.next("fail", "fail")
    assert provision(stack, sid).status == 202
    inst = wait_until(lambda: (lambda i: i if i["attempts"] == 1 and not i["claimed_by"] else None)(
        instance(stack, sid)), what="first failure")
    assert inst["status"] == "failed"
    assert "500" in inst["last_error"]                   # the operators' text
    assert inst["error_message"] == "Setting up your instance failed: it is tried again automatically."
    now = stack.sql("SELECT now()")[0][0]
    assert 0 < (inst["next_attempt_at"] - now).total_seconds() <= 1.0   # base 1 s * 2^0
    assert owed(stack, sid) == ("create", False)          # owed, held by the backoff
    assert inst["owed_due_at"] == inst["next_attempt_at"]

    # The worker retries once the backoff has passed; the second failure doubles it.
    inst = wait_until(lambda: (lambda i: i if i["attempts"] == 2 and not i["claimed_by"] else None)(
        instance(stack, sid)), timeout=4, what="second failure")
    now = stack.sql("SELECT now()")[0][0]
    assert 1.0 < (inst["next_attempt_at"] - now).total_seconds() <= 2.0

    # The third try succeeds with the same app; nothing asked for it.
    inst = wait_status(stack, sid, "running", timeout=5)
    assert inst["attempts"] == 0 and inst["last_error"] is None and inst["next_attempt_at"] is None
    assert len(creates_for(prov, inst["dokku_app_name"])) == 3
    assert list(prov.apps) == [inst["dokku_app_name"]]


def cpu_seconds(pids):
    """User and system CPU the processes have used, in seconds."""
    total = 0
    for pid in pids:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def test_due_work_held_by_another_transaction_is_asked_for_again_not_spun_on(stack, prov):
    """An instance whose work is due but whose row another transaction holds (an
    edge's, an operator's psql session) is claimed once that transaction ends; in
    the meantime the workers ask again every few milliseconds, not in a loop that
    spends a core on claims."""
    sid = new_subscription(stack, "starter")
    prov.next("fail")
    assert provision(stack, sid).status == 202
    inst = wait_until(lambda: (lambda i: i if i["attempts"] == 1 and not i["claimed_by"] else None)(
        instance(stack, sid)), what="first failure")
    holder = psycopg2.connect(stack.pg.conninfo(stack.db))
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM public.instances WHERE id = %s FOR UPDATE", (inst["id"],))
            # The retry falls due under the lock: wait past it, then measure.
            due_in = stack.sql("SELECT extract(epoch FROM owed_due_at - now()) FROM "
                               "public.instances WHERE id = %s", inst["id"])[0][0]
            time.sleep(max(0.0, float(due_in)) + 0.2)
            pids = stack.workers(WORKER)
            before = cpu_seconds(pids)
            time.sleep(1.5)
            spent = cpu_seconds(pids) - before
            assert instance(stack, sid)["attempts"] == 1      # not claimed while held
    finally:
        holder.rollback()
        holder.close()
    # Spinning on the claim took 0.56 s of the (sanitizer-built) workers' CPU here.
    assert spent < 0.15, "the workers spent %.2f s of CPU claiming a held row" % spent
    wait_status(stack, sid, "running", timeout=3)


def claims(s):
    """The lifecycle worker's claims so far (mindroom_lifecycle_claims_total), by answer."""
    r = s.call_admin("/metrics")
    assert r.status == 200, r
    return {k: int(mr.metric_value(r.text, "mindroom_lifecycle_claims_total", function=WORKER, outcome=k))
            for k in ("claimed", "none", "full")}


def test_one_claim_a_wake_up_however_many_processes_and_due_work_still_shared(pg, prov):
    """Every worker process listens, so one commit wakes each idle one. One of them
    claims for it, not each: with six processes, instances provisioned one at a time
    cost at most three claims each (the one that takes the step, one more for the
    processes woken while it claimed, one after the step), where each process
    claiming made seven. Instances that fall due in one commit (one notification)
    are still worked on at once, one a process: the claim that takes one says more
    is due and wakes another process."""
    env = stack_env(prov, MR_LIFECYCLE_WORKERS="6")
    with mr.Stack(pg, env=env, functions=["provision-instance", WORKER, "mindroom-admin"]) as s:
        assert len(s.workers(WORKER)) == 6
        wait_until(lambda: sum(claims(s).values()) > 0, what="the start-up claims")
        time.sleep(0.3)
        before = claims(s)
        for _ in range(5):
            sid = new_subscription(s, "starter")
            assert provision(s, sid).status == 202
            wait_status(s, sid, "running", timeout=3)
        time.sleep(0.3)
        after = claims(s)
        made = {k: after[k] - before[k] for k in after}
        assert made["claimed"] == 5, made
        # One a process and one after the step made 30 that found nothing; asking for
        # a periodic job's turn (every 15 s a process here) may add a few.
        assert made["none"] <= 2 * 5 + 6, made

        prov.behave(("slow", 1.0))
        sids = [new_subscription(s, "starter") for _ in range(4)]
        t0 = time.monotonic()
        s.sql("SELECT public.lifecycle_provision(x) FROM unnest(%s::uuid[]) x", sids)
        for sid in sids:
            wait_status(s, sid, "running", timeout=3.5)
        took = time.monotonic() - t0
        assert prov.max_in_flight == 4, prov.max_in_flight
        assert took < 2.5, "four creates of 1 s each, due in one commit, took %.1f s" % took


def test_provisioner_4xx_is_recorded_and_waits_for_an_operator(stack, prov):
    sid = new_subscription(stack, "starter")
    prov.next("reject")
    r = provision(stack, sid, wait=True)
    assert r.status == 502, r
    assert r.json["error"]["code"] == "provisioner_rejected"
    assert r.json["instance"]["status"] == "failed"
    inst = instance(stack, sid)
    assert inst["last_error"].startswith("rejected: ") and "400" in inst["last_error"]
    assert inst["next_attempt_at"] is None and inst["attempts"] == 1
    assert owed(stack, sid) == ("create", None)            # owed, held for an operator
    time.sleep(1.5)
    assert len(prov.create_calls()) == 1                   # never retried blindly

    # An operator asks again (after fixing the cause): the hold is lifted at once.
    r = provision(stack, sid, wait=True)
    assert r.status == 200 and r.json["instance"]["status"] == "running", r
    assert len(prov.create_calls()) == 2


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


def test_the_concurrency_limit_lives_in_the_database(stack, prov):
    # One step at a time across every worker: while it hangs, the edges still
    # answer at once and the other instance stays owed, unclaimed.
    stack.sql("UPDATE public.lifecycle_limits SET max_in_flight = 1 WHERE scope = 'global'")
    try:
        a, b = new_subscription(stack, "starter"), new_subscription(stack, "starter")
        prov.behave("hang")
        assert provision(stack, a).status == 202
        prov.wait_for(lambda p: p.create_calls(), timeout=3)
        t0 = time.monotonic()
        r = provision(stack, b)
        assert r.status == 202 and time.monotonic() - t0 < 0.5, r
        assert r.json["instance"]["owed_action"] == "create"
        time.sleep(0.5)
        assert r.json["instance"]["busy"] is False and not instance(stack, b)["claimed_by"]
        assert len(prov.create_calls()) == 1                # b waits for a's step
        assert owed(stack, b) == ("create", True)
        prov.release()
        # a's hung call fails at its deadline; b is claimed as soon as it is free.
        wait_status(stack, b, "running", timeout=6)
        wait_status(stack, a, "running", timeout=6)
    finally:
        stack.sql("UPDATE public.lifecycle_limits SET max_in_flight = 8 WHERE scope = 'global'")


def test_wait_true_reports_a_failure_as_503_with_the_instance_error(stack, prov):
    sid = new_subscription(stack, "starter")
    prov.next("fail")
    r = provision(stack, sid, wait=True)
    assert r.status == 503, r
    assert r.json["error"]["code"] == "provisioner_unavailable"
    assert "500" in r.json["error"]["message"]
    assert r.json["instance"]["status"] == "failed"


def test_wait_true_answers_202_when_the_work_outlasts_the_wait(pg, prov):
    env = stack_env(prov, MR_PROVISION_WAIT_MS="700")
    with mr.Stack(pg, env=env, functions=FUNCS) as s:
        sid = new_subscription(s, "starter")
        prov.behave("hang")
        t0 = time.monotonic()
        r = provision(s, sid, wait=True)
        assert r.status == 202 and 0.6 < time.monotonic() - t0 < 2.0, r
        assert r.json["instance"]["owed_action"] == "create" and r.json["instance"]["busy"] is True
        prov.release()


def test_wait_true_counts_from_the_request_s_arrival(pg, prov):
    """The wait is the request's, not what is left after its own work: a provision
    that waited 1.5 s for its subscription's lock (a webhook applying an event of
    it) answers 202 once the 0.7 s wait has passed since it arrived, not 0.7 s after
    the lock was given. (nginx's timeout runs from the arrival too.)"""
    env = stack_env(prov, MR_PROVISION_WAIT_MS="700")
    with mr.Stack(pg, env=env, functions=FUNCS) as s:
        sid = new_subscription(s, "starter")
        prov.behave("hang")
        holder = psycopg2.connect(s.pg.conninfo(s.db))
        try:
            with holder.cursor() as cur:
                cur.execute("SELECT 1 FROM public.subscriptions WHERE id = %s FOR UPDATE", (sid,))
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                t0 = time.monotonic()
                f = pool.submit(provision, s, sid, wait=True)
                time.sleep(1.5)
                holder.commit()
                r = f.result(timeout=30)
                took = time.monotonic() - t0
        finally:
            holder.close()
        assert r.status == 202 and r.json["instance"]["owed_action"] == "create", r
        assert 1.5 <= took < 1.9, took        # before: the lock's 1.5 s and then 0.7 more
        prov.release()


def test_a_worker_killed_mid_provision_leaves_a_lease_that_expires(stack, prov):
    sid = new_subscription(stack, "starter")
    kill_workers_mid_provision(stack, prov, sid)
    inst = instance(stack, sid)
    assert inst["status"] == "provisioning" and inst["claimed_by"] is not None

    # While the dead worker's lease is live, nobody repeats the call, even when asked.
    r = provision(stack, sid)
    assert r.status == 202 and r.json["instance"]["busy"] is True
    assert owed(stack, sid) == ("create", False)
    time.sleep(0.5)
    assert len(prov.create_calls()) == 1

    # Once it expires the work is due again and a worker finishes it, with one app.
    inst = wait_status(stack, sid, "running", timeout=8)
    assert list(prov.apps) == [inst["dokku_app_name"]]
    assert len(creates_for(prov, inst["dokku_app_name"])) == 2


def test_a_stopping_worker_gives_its_claim_back_within_the_grace(pg, prov):
    # A provisioner call allowed 10 s, a stop grace of 1 s: SIGTERM aborts the call
    # after the grace and gives the lease back instead of leaving it to expire.
    env = stack_env(prov, MR_PROVISION_TIMEOUT_MS="10000", MR_LIFECYCLE_LEASE_S="30")
    with mr.Stack(pg, env=env, functions=["provision-instance", WORKER]) as s:
        sid = new_subscription(s, "starter")
        prov.behave("hang")
        assert provision(s, sid).status == 202
        prov.wait_for(lambda p: p.create_calls(), timeout=3)
        assert instance(s, sid)["claimed_by"] is not None
        t0 = time.monotonic()
        assert s.stop_function(WORKER) == 0                # SIGTERM: a clean stop
        took = time.monotonic() - t0
        assert took < 4.0, took                           # the grace, not the 10 s call
        inst = instance(s, sid)
        assert inst["claimed_by"] is None                 # given back, not left to expire
        assert owed(s, sid) == ("create", True)
        assert "lease given back" in s.log(WORKER)
        prov.release()
        s.start_function(WORKER)
        inst = wait_status(s, sid, "running", timeout=5)
        assert len(creates_for(prov, inst["dokku_app_name"])) == 2
        prov.reset()


def test_a_stopping_worker_leaves_a_storage_destruction_leased_so_nothing_takes_it_over(pg, prov):
    # The storage of a destroyed instance is past its retention (0 days) and its
    # DELETE hangs at the provisioner when the worker is stopped. The aborted call may
    # still be removing the data there, so its lease is not given back: the instance
    # made again under the same names does not take that storage over (it would be
    # told it holds data that is gone) but waits for the destruction, then starts on
    # new, empty storage.
    env = stack_env(prov, MR_PROVISION_TIMEOUT_MS="4000", MR_LIFECYCLE_LEASE_S="10",
                    MINDROOM_RETENTION_DAYS="0")
    with mr.Stack(pg, env=env, functions=["provision-instance", WORKER]) as s:
        sid = new_subscription(s, "starter")
        assert provision(s, sid).status in (200, 202)
        old = wait_status(s, sid, "running", timeout=8)
        storage = "/apps/%s/storage" % old["dokku_app_name"]
        prov.behave("hang")
        prov.next("ok")                                   # the apps' DELETE; the storage's hangs
        s.sql("UPDATE public.instances SET desired_status = 'deprovisioned' WHERE id = %s",
              old["id"])
        prov.wait_for(lambda p: p.recorded("DELETE", storage), timeout=5)
        assert s.stop_function(WORKER) == 0               # SIGTERM: a routine restart
        lease = s.sql("SELECT claimed_by IS NOT NULL, claim_action FROM public.instances "
                      "WHERE id = %s", old["id"])[0]
        assert lease == (True, "destroy_storage")         # not given back
        assert "lease left to expire" in s.log(WORKER)

        assert provision(s, sid).status in (200, 202)     # the subscription provisioned again
        new = [i for i in instances(s, sid) if i["id"] != old["id"]][0]
        assert s.sql("SELECT storage_taken_by FROM public.instances WHERE id = %s",
                     old["id"])[0][0] is None
        assert s.sql("SELECT public.lifecycle_target_wait(i) FROM public.instances i "
                     "WHERE id = %s", new["id"])[0][0] == "purge_pending"

        # Once the lease expires a worker destroys the storage again, then creates the
        # new instance on new storage.
        prov.release()
        s.start_function(WORKER)
        wait_until(lambda: s.sql("SELECT storage_destroyed_at IS NOT NULL FROM public.instances "
                                 "WHERE id = %s", old["id"])[0][0], timeout=15,
                   what="the old storage destroyed")
        wait_until(lambda: [i for i in instances(s, sid)
                            if i["id"] == new["id"] and i["status"] == "running"], timeout=8,
                   what="the new instance running")
        assert s.sql("SELECT storage_taken_by FROM public.instances WHERE id = %s",
                     old["id"])[0][0] is None
        assert len(prov.recorded("DELETE", storage)) == 2
        prov.reset()

def test_resend_down_keeps_the_instance_running_and_the_email_owed(stack, prov, resend):
    sid = new_subscription(stack, "starter")
    resend.behave("fail")
    assert provision(stack, sid).status == 202
    wait_until(lambda: instance(stack, sid)["welcome_email_error"], what="email failure")
    inst = wait_status(stack, sid, "running")
    assert inst["welcome_email_sent_at"] is None and "500" in inst["welcome_email_error"]
    assert inst["last_error"] is None
    assert len(resend.delivered) == 0
    assert owed(stack, sid) == ("email", False)           # its own backoff
    assert provision(stack, sid).status == 200            # running: done for the caller

    # Once Resend is back, the worker sends it after the backoff, once.
    resend.behave("ok")
    wait_until(lambda: instance(stack, sid)["welcome_email_sent_at"], timeout=5, what="email sent")
    assert len(resend.delivered) == 1
    n = len(resend.requests)
    assert provision(stack, sid).status == 200
    time.sleep(0.3)
    assert len(resend.requests) == n and owed(stack, sid) is None
    assert len(creates_for(prov, inst["dokku_app_name"])) == 1


def test_an_email_resend_refuses_is_held_not_sent_again_and_again(stack, prov, resend):
    """A 4xx that refuses the email itself (an address Resend will not send to, an
    unverified domain) is recorded in Resend's words and held, not sent again at
    every backoff; an operator who fixed the cause lifts it with provision."""
    sid = new_subscription(stack, "starter")
    resend.behave(("resend", 403, "validation_error",
                   "The mindroom.test domain is not verified. Please, add and verify your domain."))
    assert provision(stack, sid).status == 202
    wait_until(lambda: instance(stack, sid)["welcome_email_error"], what="email refusal")
    time.sleep(3)                                         # past backoffs of 1 s and 2 s
    err = instance(stack, sid)["welcome_email_error"]
    assert err.startswith("rejected: ") and "validation_error" in err
    assert "domain is not verified" in err
    assert len(resend.requests) == 1 and len(resend.delivered) == 0
    assert owed(stack, sid) == ("email", None)            # waits for an operator

    resend.behave("ok")
    assert provision(stack, sid).status in (200, 202)     # the operator's lift
    wait_until(lambda: instance(stack, sid)["welcome_email_sent_at"], timeout=5, what="email sent")
    assert len(resend.delivered) == 1 and owed(stack, sid) is None


def test_resends_rate_limit_and_a_concurrent_idempotent_request_are_waited_out(stack, prov, resend):
    """A 429 waits Resend's retry-after, not our shorter backoff; a 409
    concurrent_idempotent_requests (the same key still in progress) and a refused API
    key are retried, not held as a refusal of the email."""
    sid = new_subscription(stack, "starter")
    resend.next(("resend", 429, "rate_limit_exceeded", "Too many requests.", {"retry-after": "30"}))
    assert provision(stack, sid).status == 202
    wait_until(lambda: instance(stack, sid)["welcome_email_error"], what="the rate limit")
    ((wait_s,),) = stack.sql("SELECT extract(epoch FROM welcome_email_next_at - now()) "
                             "FROM public.instances WHERE subscription_id = %s", sid)
    assert 25 < wait_s <= 30
    assert owed(stack, sid) == ("email", False)

    for answer in [(409, "concurrent_idempotent_requests",
                    "Same idempotency key used while original request is still in progress."),
                   (403, "invalid_api_key", "API key is invalid")]:
        resend.next(("resend",) + answer)
        stack.sql("UPDATE public.instances SET welcome_email_next_at = now() "
                  "WHERE subscription_id = %s", sid)
        wait_until(lambda: answer[1] in (instance(stack, sid)["welcome_email_error"] or ""),
                   what=answer[1])
        assert not instance(stack, sid)["welcome_email_error"].startswith("rejected: ")
        assert owed(stack, sid) == ("email", False)       # its backoff, then again
    stack.sql("UPDATE public.instances SET welcome_email_next_at = now() "
              "WHERE subscription_id = %s", sid)
    wait_until(lambda: instance(stack, sid)["welcome_email_sent_at"], timeout=5, what="email sent")
    assert len(resend.delivered) == 1


# --- changes over a subscription's life ------------------------------------------------

def test_tier_upgrade_reaches_the_provisioner(stack, prov):
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    app = instance(stack, sid)["dokku_app_name"]
    # What the webhook writes on an upgrade; the trigger moves the instance's limits.
    # The commit makes an update owed and wakes the worker; nobody calls anything.
    stack.sql("UPDATE public.subscriptions SET tier = 'enterprise', "
              "stripe_price_id = 'price_enterprise' WHERE id = %s", sid)
    wait_until(lambda: len(creates_for(prov, app)) == 2 and not instance(stack, sid)["claimed_by"],
               what="update")
    last = creates_for(prov, app)[-1].json
    assert (last["memory_mb"], float(last["cpu"])) == LIMITS["enterprise"]
    assert prov.apps[app]["memory_mb"] == 4096
    inst = instance(stack, sid)
    assert inst["status"] == "running" and inst["memory_limit_mb"] == 4096
    assert provision(stack, sid).status == 200


def test_a_restart_owed_with_an_update_follows_it(stack, prov):
    """A tenant's restart asked while an update is owed: the update's POST /apps
    restarts only what changed (an app whose configuration did not is left running),
    so the restart follows it, and is recorded done only then."""
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    iid, app = instance(stack, sid)["id"], instance(stack, sid)["dokku_app_name"]
    prov.reset()
    stack.sql("UPDATE public.instances SET memory_limit_mb = memory_limit_mb + 1, "
              "restart_version = restart_version + 1, restart_requested_at = now() WHERE id = %s", iid)
    wait_until(lambda: owed(stack, sid) is None and not instance(stack, sid)["claimed_by"],
               what="the owed work")
    assert [(r.method, r.path) for r in prov.requests] == [
        ("POST", "/apps"), ("POST", "/apps/%s/restart" % app)]
    ((applied, asked, restarted_at),) = stack.sql(
        "SELECT applied_restart_version, restart_version, restarted_at FROM public.instances "
        "WHERE id = %s", iid)
    assert applied == asked and restarted_at is not None


def test_a_long_chain_of_steps_gives_its_next_step_back_at_its_limit(pg, prov):
    """Owed work that keeps arriving while each step runs (here a restart asked again
    during every restart, until the ninth) is chained by the finish, up to the
    worker's limit of steps per claim; the step chained past that limit is given
    back, due at once, not left leased to a worker that will not run it until the
    lease (30 s here) runs out."""
    env = stack_env(prov, MR_LIFECYCLE_LEASE_S="30")
    with mr.Stack(pg, env=env, functions=["provision-instance", WORKER]) as s:
        sid = new_subscription(s, "starter")
        provision(s, sid, wait=True)
        iid, app = instance(s, sid)["id"], instance(s, sid)["dokku_app_name"]
        prov.reset()
        # Whenever a restart is recorded done, another one has been asked meanwhile
        # (before the owed-work trigger, which runs in name order after this one).
        s.sql("""CREATE FUNCTION public.test_restart_again() RETURNS trigger LANGUAGE plpgsql
                 SET search_path = '' AS $$
                 BEGIN
                     IF NEW.applied_restart_version > OLD.applied_restart_version
                        AND NEW.applied_restart_version < 9 THEN
                         NEW.restart_version := NEW.applied_restart_version + 1;
                     END IF;
                     RETURN NEW;
                 END $$;
                 CREATE TRIGGER instances_a_test_restart_again BEFORE UPDATE ON public.instances
                     FOR EACH ROW EXECUTE FUNCTION public.test_restart_again()""")
        s.sql("UPDATE public.instances SET restart_version = 1 WHERE id = %s", iid)
        wait_until(lambda: s.sql("SELECT applied_restart_version = 9 AND restart_version = 9 "
                                 "AND claimed_by IS NULL FROM public.instances WHERE id = %s",
                                 iid)[0][0], timeout=8, what="the ninth restart")
        restarts = [r for r in prov.requests if r.path == "/apps/%s/restart" % app]
        assert len(restarts) == 9                         # each once
        s.sql("DROP TRIGGER instances_a_test_restart_again ON public.instances; "
              "DROP FUNCTION public.test_restart_again()")


def test_stop_then_resume_the_same_app_then_destroy(stack, prov):
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    inst = instance(stack, sid)
    app = inst["dokku_app_name"]

    r = deprovision(stack, subscription_id=sid, mode="stop")
    assert r.status == 202 and r.json["mode"] == "stop", r
    assert r.json["instance"]["owed_action"] == "stop"
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
    # The stop revoked the instance's control-plane token: the start applies the same
    # app's configuration with a new one (POST /apps, create-or-update), nothing else.
    creates = creates_for(prov, app)
    assert len(creates) == 2 and not prov.recorded("POST", "/apps/%s/start" % app)
    assert (creates[1].json["env"]["MINDROOM_CONTROL_PLANE_TOKEN"]
            != creates[0].json["env"]["MINDROOM_CONTROL_PLANE_TOKEN"])

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


def test_a_404_that_does_not_say_the_app_is_missing_stops_and_destroys_nothing(stack, prov):
    """Only the provisioner's 404 not_found (no such app) makes a stop or a destroy
    done: a 404 from anything else (a wrong route or base path, a proxy's own page)
    is a failure, so a misconfigured URL never records an instance stopped,
    destroyed or purged while its apps and data are still there."""
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    app = instance(stack, sid)["dokku_app_name"]
    for mode, purge in (("stop", False), ("destroy", True)):
        prov.next(("status", 404))
        body = dict(subscription_id=sid, mode=mode, wait=True)
        if purge:
            body["purge"] = True
        r = deprovision(stack, **body)
        assert r.status == 502 and r.json["error"]["code"] == "provisioner_rejected", r
        inst = instance(stack, sid)
        assert inst["status"] not in ("stopped", "deprovisioned"), inst
        assert inst["last_error"].startswith("rejected: ") and "404" in inst["last_error"]
        assert stack.sql("SELECT storage_destroyed_at FROM public.instances"
                         " WHERE subscription_id = %s", sid) == [(None,)]
        assert app in prov.apps
        # The operator asks again once the URL is right: done.
        r = deprovision(stack, **body)
        assert r.status == 200, r
    inst = instance(stack, sid)
    assert inst["status"] == "deprovisioned" and app not in prov.apps


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
    # Values that are not strings reach the app as the text they were written as.
    stack.sql("UPDATE public.instances SET environment_vars = %s::jsonb WHERE subscription_id = %s",
              '{"OPENAI_API_KEY": "%s", "N": 3, "RATE": 1.10, "BIG": 123456789012345678}' % secret, sid)
    r = provision(stack, sid, wait=True)                 # environment changed: an update
    assert r.status == 200, r
    assert secret not in r.text
    app = instance(stack, sid)["dokku_app_name"]
    env = creates_for(prov, app)[-1].json["env"]
    assert env["OPENAI_API_KEY"] == secret and env["N"] == "3"
    assert env["RATE"] == "1.10" and env["BIG"] == "123456789012345678", env
    assert secret not in stack.log("provision-instance")


def test_failed_stop_keeps_running_and_is_retried(stack, prov):
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    prov.next("fail")
    r = deprovision(stack, subscription_id=sid, mode="stop", wait=True)
    assert r.status == 503, r
    assert r.json["error"]["code"] == "provisioner_unavailable"
    inst = instance(stack, sid)
    assert inst["status"] == "running" and inst["desired_status"] == "stopped"
    assert inst["attempts"] == 1
    assert owed(stack, sid)[0] == "stop"
    # The worker retries it after the backoff.
    wait_status(stack, sid, "stopped", timeout=4)
    assert len(prov.recorded("POST", "/apps/%s/stop" % inst["dokku_app_name"])) == 2


def test_a_stop_after_a_lost_create_stops_what_the_create_left(pg, prov):
    # The worker's call times out (1.5 s) while the provisioner goes on and brings
    # the app up (2.5 s): the instance is failed, the app runs. A stop asked now
    # must reach the app, not be skipped because the instance "never ran".
    with mr.Stack(pg, env=stack_env(prov, MR_PROVISION_BACKOFF_BASE_S="5"),
                  functions=["deprovision-instance", "provision-instance", WORKER]) as s:
        prov.reset()
        sid = new_subscription(s, "starter")
        prov.behave(("slow", 2.5))
        assert provision(s, sid).status == 202
        inst = wait_status(s, sid, "failed", timeout=5)
        app = inst["dokku_app_name"]
        prov.wait_for(lambda p: app in p.apps and p.apps[app]["state"] == "running", timeout=5)
        prov.behave("ok")
        r = deprovision(s, subscription_id=sid, mode="stop", wait=True)
        assert r.status == 200 and r.json["instance"]["status"] == "stopped", r
        assert prov.apps[app]["state"] == "stopped"
        assert owed(s, sid) is None
        # Paid again: the same app is started.
        r = provision(s, sid, wait=True)
        assert r.status == 200 and r.json["instance"]["status"] == "running", r
        assert prov.apps[app]["state"] == "running"
        prov.reset()


def test_a_hanging_resend_holds_each_worker_for_one_deadline_not_one_per_email(stack, prov, resend):
    """While Resend hangs, a worker whose call waited out its deadline (1 s here) sends
    no email for six deadlines: the emails due meanwhile wait with the reason, instead
    of each holding a worker (and the instances behind it) for a deadline. After the
    window Resend is asked again, and every email goes out once."""
    resend.behave("hang")
    sids = [new_subscription(stack, "starter") for _ in range(6)]
    for sid in sids:
        assert provision(stack, sid).status == 202
    wait_until(lambda: all(i["status"] == "running" and i["welcome_email_error"]
                           for i in (instance(stack, sid) for sid in sids)),
               timeout=8, what="six instances running, each email tried")
    assert len(resend.requests) <= 2, len(resend.requests)     # a call per worker at most
    errors = [instance(stack, sid)["welcome_email_error"] for sid in sids]
    waited = [e for e in errors if "Resend did not answer this worker's last call" in e]
    assert len(waited) >= len(sids) - 2, errors
    assert all(owed(stack, sid) == ("email", False) for sid in sids)

    resend.release()                                            # answers again
    wait_until(lambda: all(instance(stack, sid)["welcome_email_sent_at"] for sid in sids),
               timeout=20, what="every email sent after the window")
    assert len(resend.delivered) == len(sids)
    assert "Resend did not answer" in stack.log(WORKER)


def test_no_resend_key_leaves_the_email_owed_for_an_hour(pg, prov):
    with mr.Stack(pg, env=stack_env(prov), functions=["provision-instance", WORKER]) as s:
        sid = new_subscription(s, "starter")
        r = provision(s, sid, wait=True)
        assert r.status == 200 and r.json["instance"]["status"] == "running", r
        inst = wait_until(lambda: (lambda i: i if i["welcome_email_error"] else None)(
            instance(s, sid)), what="email skipped")
        assert inst["welcome_email_sent_at"] is None
        assert inst["welcome_email_error"] == "skipped: RESEND_API_KEY is not set"
        assert "RESEND_API_KEY is not set" in s.log(WORKER)
        assert owed(s, sid) == ("email", False)
        now = s.sql("SELECT now()")[0][0]
        assert 3500 < (inst["owed_due_at"] - now).total_seconds() <= 3600


def test_the_commit_wakes_the_worker_and_a_pooler_without_listen_polls(pg, prov):
    # FAST_ENV polls once a minute: a create done within a second was woken by the
    # commit's notification. Behind a transaction-mode pooler (no LISTEN) the
    # worker polls instead, at MR_LIFECYCLE_POLL_MS.
    with mr.Stack(pg, env=stack_env(prov), functions=["provision-instance", WORKER]) as s:
        sid = new_subscription(s, "starter")
        t0 = time.monotonic()
        assert provision(s, sid).status == 202
        wait_status(s, sid, "running", timeout=3)
        assert time.monotonic() - t0 < 1.0
    env = stack_env(prov, DATABASE_POOLER="transaction", MR_LIFECYCLE_POLL_MS="1500",
                    DATABASE_LISTEN_URL=None)
    with mr.Stack(pg, env=env, functions=["provision-instance", WORKER]) as s:
        assert "polling every 1500 ms" in s.log(WORKER)
        sid = new_subscription(s, "starter")
        assert provision(s, sid).status == 202
        wait_status(s, sid, "running", timeout=4)


def test_a_legacy_environment_is_not_lost_when_sealing_it_fails(stack, prov):
    """The legacy plaintext environment_vars is emptied only once every value is
    sealed and stored: a value whose name instance_secrets refuses fails the step
    with the column as it was, nothing lost."""
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    stack.sql("UPDATE public.instances SET environment_vars = %s::jsonb WHERE subscription_id = %s",
              '{"A_KEY": "sk-a", "b-key": "sk-b", "C_KEY": "sk-c"}', sid)
    provision(stack, sid, wait=True)
    iid = instance(stack, sid)["id"]
    left = stack.sql("SELECT environment_vars FROM public.instances WHERE id = %s", iid)[0][0]
    sealed = [n for (n,) in stack.sql("SELECT name FROM public.instance_secrets WHERE "
                                      "instance_id = %s AND kind = 'env'", iid)]
    # Every legacy value is still in the column (and whatever was sealed is sealed).
    assert left == {"A_KEY": "sk-a", "b-key": "sk-b", "C_KEY": "sk-c"}, (left, sealed)
    # Once the operator renames the bad one, the next step seals all and empties it.
    stack.sql("UPDATE public.instances SET environment_vars = %s::jsonb WHERE id = %s",
              '{"A_KEY": "sk-a", "B_KEY": "sk-b", "C_KEY": "sk-c"}', iid)
    provision(stack, sid, wait=True)
    left = stack.sql("SELECT environment_vars FROM public.instances WHERE id = %s", iid)[0][0]
    sealed = {n for (n,) in stack.sql("SELECT name FROM public.instance_secrets WHERE "
                                      "instance_id = %s AND kind = 'env'", iid)}
    assert left == {} and {"A_KEY", "B_KEY", "C_KEY"} <= sealed, (left, sealed)


def test_a_legacy_environment_never_reaches_the_database_s_log(stack, prov, pg):
    """Sealing the legacy plaintext environment_vars sends PostgreSQL no plaintext:
    a server that logs every statement with its parameters (log_statement = 'all')
    logs the move, and no legacy value is in that log."""
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    secret = "sk-legacy-" + "q" * 24
    log = pg.dir / "postgres.log"
    start = log.stat().st_size
    pg.sql("ALTER SYSTEM SET log_statement = 'all'")
    pg.sql("SELECT pg_reload_conf()")
    try:
        # The value is made by the server, so that this statement's own text does not
        # hold it; the change owes an update, whose step moves it.
        stack.sql("UPDATE public.instances SET environment_vars = jsonb_build_object("
                  "'OPENAI_API_KEY', 'sk-legacy-' || repeat('q', 24)) WHERE subscription_id = %s",
                  sid)
        assert provision(stack, sid, wait=True).status == 200
    finally:
        pg.sql("ALTER SYSTEM RESET log_statement")
        pg.sql("SELECT pg_reload_conf()")
    iid = instance(stack, sid)["id"]
    assert stack.sql("SELECT environment_vars FROM public.instances WHERE id = %s", iid) == [({},)]
    assert creates_for(prov, instance(stack, sid)["dokku_app_name"])[-1].json["env"][
        "OPENAI_API_KEY"] == secret
    with open(log, "rb") as f:
        f.seek(start)
        logged = f.read().decode("utf-8", "replace")
    assert "instance_plain_env_sealed" in logged        # the move was logged, with its parameters
    assert secret not in logged


def wait_deployed(stack, prov, sid, app, n, what):
    """The env of the POST /apps after the first n, once nothing is owed or claimed."""
    wait_until(lambda: len(creates_for(prov, app)) > n and owed(stack, sid) is None
               and instance(stack, sid)["claimed_by"] is None, timeout=8, what=what)
    return creates_for(prov, app)[-1].json["env"]


def test_a_value_set_after_an_upgrade_is_not_replaced_by_the_legacy_one(stack, prov):
    """An instance from before sealed secrets still has its plaintext
    environment_vars (deployed, nothing owed). The operator rotates a leaked key
    with `mindroomctl env set`: the update that follows (which moves the legacy
    column too) deploys the new value and keeps it, not the stale legacy one."""
    sid = new_subscription(stack, "starter")
    assert provision(stack, sid, wait=True).status == 200
    iid, app = str(instance(stack, sid)["id"]), instance(stack, sid)["dokku_app_name"]
    # The row as an upgrade leaves it: legacy plaintext deployed, nothing owed.
    stack.sql("UPDATE public.instances SET environment_vars = %s::jsonb, "
              "config_version = config_version + 1, applied_config_version = config_version + 1 "
              "WHERE id = %s", '{"OPENAI_API_KEY": "sk-old-leaked", "OTHER": "kept"}', iid)
    assert owed(stack, sid) is None
    n = len(creates_for(prov, app))

    env_set(stack, iid, "OPENAI_API_KEY", "sk-new-rotated")     # owes an update
    env = wait_deployed(stack, prov, sid, app, n, "the update")
    assert (env["OPENAI_API_KEY"], env["OTHER"]) == ("sk-new-rotated", "kept")
    assert stack.sql("SELECT environment_vars FROM public.instances WHERE id = %s", iid) == [({},)]
    # The next deploy (any configuration change) sends what is stored now.
    n = len(creates_for(prov, app))
    stack.sql("UPDATE public.instances SET memory_limit_mb = memory_limit_mb + 1 WHERE id = %s", iid)
    env = wait_deployed(stack, prov, sid, app, n, "the next update")
    assert (env["OPENAI_API_KEY"], env["OTHER"]) == ("sk-new-rotated", "kept")


def test_a_value_set_between_two_attempts_of_the_move_is_kept(stack, prov):
    """A step stored part of the legacy environment and failed before emptying the
    column (here: a name instance_secrets refuses, as a worker stopped mid-step
    would leave it). A value the operator sets before the step runs again is the
    one deployed and kept, not the legacy value stored by the first attempt."""
    sid = new_subscription(stack, "starter")
    provision(stack, sid, wait=True)
    iid, app = str(instance(stack, sid)["id"]), instance(stack, sid)["dokku_app_name"]
    stack.sql("UPDATE public.instances SET environment_vars = %s::jsonb WHERE id = %s",
              '{"A_KEY": "sk-a-old", "b-key": "sk-b"}', iid)
    provision(stack, sid, wait=True)
    assert stack.sql("SELECT count(*) FROM public.instance_secrets WHERE instance_id = %s "
                     "AND kind = 'env' AND name = 'A_KEY'", iid) == [(1,)]
    env_set(stack, iid, "A_KEY", "sk-a-new")
    # The operator renames the bad one; the next attempt completes the move.
    n = len(creates_for(prov, app))
    stack.sql("UPDATE public.instances SET environment_vars = %s::jsonb WHERE id = %s",
              '{"A_KEY": "sk-a-old", "B_KEY": "sk-b"}', iid)
    provision(stack, sid, wait=True)
    env = wait_deployed(stack, prov, sid, app, n, "the completed move")
    assert (env["A_KEY"], env["B_KEY"]) == ("sk-a-new", "sk-b")
    assert stack.sql("SELECT environment_vars FROM public.instances WHERE id = %s", iid) == [({},)]
    n = len(creates_for(prov, app))
    stack.sql("UPDATE public.instances SET memory_limit_mb = memory_limit_mb + 1 WHERE id = %s", iid)
    env = wait_deployed(stack, prov, sid, app, n, "the next update")
    assert (env["A_KEY"], env["B_KEY"]) == ("sk-a-new", "sk-b")


def test_a_stored_variable_an_operator_may_not_set_never_reaches_the_app(stack, prov):
    """A variable stored before `env set` refused such names (here: a legacy plaintext
    environment_vars) is kept, sealed, but never sent: PATH or LD_PRELOAD would change
    what runs in MindRoom's process, MAX_AGENTS would stand in for the plan's, a
    lower-case name the provisioner refuses would fail every update of the instance.
    The instance deploys with the others, and the plan's own values."""
    sid = new_subscription(stack, "starter")
    assert provision(stack, sid, wait=True).status == 200
    iid, app = str(instance(stack, sid)["id"]), instance(stack, sid)["dokku_app_name"]
    n = len(creates_for(prov, app))
    plan = creates_for(prov, app)[-1].json["env"]
    stack.sql("UPDATE public.instances SET environment_vars = %s::jsonb WHERE id = %s",
              '{"PATH": "/evil", "LD_PRELOAD": "/tmp/evil.so", "MAX_AGENTS": "9999", '
              '"lower_key": "v", "GOOD_KEY": "kept"}', iid)
    provision(stack, sid, wait=True)
    env = wait_deployed(stack, prov, sid, app, n, "the update")
    assert env["GOOD_KEY"] == "kept" and env["MAX_AGENTS"] == plan["MAX_AGENTS"], env
    assert not {"PATH", "LD_PRELOAD", "lower_key"} & set(env), env
    assert instance(stack, sid)["status"] == "running"
    # Kept (sealed), so that `mindroomctl env unset` is what removes them.
    sealed = {n for (n,) in stack.sql("SELECT name FROM public.instance_secrets WHERE "
                                      "instance_id = %s AND kind = 'env'", iid)}
    assert {"PATH", "LD_PRELOAD", "MAX_AGENTS", "lower_key", "GOOD_KEY"} <= sealed, sealed
