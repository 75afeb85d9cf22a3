"""check-instance-health through real nginx and PostgreSQL, against the health
stand-in (tests/standins/health.py) and the provisioner stand-in.

What a user or operator would notice: the rows' health columns, the failure
threshold turning an instance into a redeploy, tenants seeing only their own
instances, a backend outside the base domain never contacted, and a stuck
provisioning finished exactly once however many sweeps run at once.
"""
import os
import threading
import time
import uuid

import pytest

import mr

TIMEOUT_MS = 1000


@pytest.fixture(scope="module")
def stack(pg, prov):
    env = {
        "MINDROOM_BASE_DOMAIN": "mindroom.test",
        "HEALTH_ALLOW_LOOPBACK": "1",
        "HEALTH_TIMEOUT_MS": str(TIMEOUT_MS),
        "HEALTH_FAILURE_THRESHOLD": "3",
        "DOKKU_PROVISIONER_URL": prov.url,
        "DOKKU_PROVISIONER_TOKEN": prov.token,
    }
    with mr.Stack(pg, env=env) as s:
        yield s


@pytest.fixture(autouse=True)
def clean(request):
    """Each test starts with no instances (they would be probed and swept)."""
    if "stack" in request.fixturenames:
        request.getfixturevalue("stack").sql("DELETE FROM public.instances")
    yield


def make_account(s, email=None):
    uid = str(uuid.uuid4())
    s.sql("INSERT INTO auth.users (id, aud, role, email) VALUES (%s, 'authenticated', "
          "'authenticated', %s)", uid, email or ("u-%s@example.com" % uid[:8]))
    return uid


def make_instance(s, account, backend_url, status="running", sub_status="active"):
    """A subscription of `account` and its instance, as a finished deploy leaves
    them (config applied, welcome email sent: nothing owed unless status says so)."""
    sid = str(uuid.uuid4())
    s.sql("INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) "
          "VALUES (%s, %s, 'price_starter', 'starter', %s)", sid, account, sub_status)
    iid = s.sql(
        "INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, backend_url) "
        "SELECT %s, n.dokku_app_name, n.subdomain, %s, %s FROM public.instance_names(%s) n "
        "RETURNING id::text", sid, status, backend_url, sid)[0][0]
    s.sql("UPDATE public.instances i SET applied_config_hash = public.lifecycle_config_hash(i), "
          "welcome_email_sent_at = now() WHERE id = %s", iid)
    return iid


def row(s, iid):
    cols = ("status", "health_status", "error_message", "consecutive_failures",
            "last_health_check", "next_attempt_at", "last_error", "backend_url")
    r = s.sql("SELECT %s FROM public.instances WHERE id = %%s" % ", ".join(cols), iid)[0]
    return dict(zip(cols, r))


def check(s, query="", token=None, method="GET", json=None):
    return s.call(method, "check-instance-health" + query, json=json,
                  token=token or s.jwt(), timeout=60)


def by_id(resp):
    return {r["instance_id"]: r for r in resp.json["results"]}


def test_outcomes_recorded(stack, health_standin):
    acct = make_account(stack)
    ok = make_instance(stack, acct, health_standin.url("ok1", "ok"))
    bad = make_instance(stack, acct, health_standin.url("bad1", "500"))
    hang = make_instance(stack, acct, health_standin.url("hang1", "hang") + "/")
    refused = make_instance(stack, acct, health_standin.refused_url("ref1"))
    redirect = make_instance(stack, acct, health_standin.url("redir1", "redirect"))
    big = make_instance(stack, acct, health_standin.url("big1", "big"))
    stopped = make_instance(stack, acct, health_standin.url("stopped1", "ok"), status="stopped")
    health_standin.reset()

    t0 = time.monotonic()
    r = check(stack, "?sweep=0")
    took = time.monotonic() - t0
    assert r.status == 200, r
    assert r.headers.get("Content-Type", "").startswith("application/json")
    j = r.json
    assert (j["checked"], j["healthy"], j["unhealthy"], j["unreachable"]) == (6, 1, 3, 2), j
    assert j["sweep"] is None
    res = by_id(r)
    assert stopped not in res
    assert res[ok]["status"] == "healthy" and res[ok]["http_status"] == 200 and res[ok]["error"] is None
    assert res[bad]["status"] == "unhealthy: HTTP 500" and res[bad]["http_status"] == 500
    assert res[hang]["status"] == "unreachable: timeout after %d ms" % TIMEOUT_MS
    assert res[hang]["latency_ms"] >= TIMEOUT_MS - 50
    assert res[refused]["status"] == "unreachable: connection refused"
    assert res[redirect]["status"] == "unhealthy: HTTP 302"
    assert res[big]["status"].startswith("unhealthy: response over")
    # All at once: one deadline, not the sum of them.
    assert took < TIMEOUT_MS / 1000 + 1.0, took

    # The rows say the same.
    assert row(stack, ok)["health_status"] == "healthy"
    assert row(stack, ok)["error_message"] is None
    assert row(stack, ok)["consecutive_failures"] == 0
    for iid, hs in ((bad, "unhealthy: HTTP 500"),
                    (hang, "unreachable: timeout after %d ms" % TIMEOUT_MS),
                    (refused, "unreachable: connection refused"),
                    (redirect, "unhealthy: HTTP 302")):
        rw = row(stack, iid)
        assert rw["health_status"] == hs
        assert rw["error_message"]
        assert rw["consecutive_failures"] == 1
        assert rw["status"] == "running"
        assert rw["last_health_check"] is not None
    assert row(stack, stopped)["last_health_check"] is None
    # The health path was appended once (a trailing slash on backend_url is fine),
    # and the redirect was not followed.
    assert [q["path"] for q in health_standin.requests("hang1")] == ["/i/hang1/api/health"]
    assert health_standin.hits("stopped1") == 0
    assert health_standin.hits(None) == 5  # ok, 500, hang, redirect, big: refused never connects

    # A healthy answer later resets the count.
    health_standin.set_mode("bad1", "ok")
    r = check(stack, "?sweep=0&instance_id=" + bad)
    assert r.status == 200 and r.json["checked"] == 1, r
    assert row(stack, bad)["consecutive_failures"] == 0
    assert row(stack, bad)["health_status"] == "healthy"


def test_threshold_fails_and_sweep_redeploys(stack, health_standin, prov):
    acct = make_account(stack)
    iid = make_instance(stack, acct, health_standin.url("flaky", "500"))
    app = stack.sql("SELECT dokku_app_name FROM public.instances WHERE id = %s", iid)[0][0]
    for n in (1, 2):
        r = check(stack, "?sweep=0")
        assert r.status == 200, r
        assert by_id(r)[iid]["marked_failed"] is False
        assert row(stack, iid)["status"] == "running"
        assert row(stack, iid)["consecutive_failures"] == n
    r = check(stack, "?sweep=0")
    assert by_id(r)[iid]["marked_failed"] is True and r.json["marked_failed"] == 1
    rw = row(stack, iid)
    assert rw["status"] == "failed"
    assert rw["last_error"].startswith("health: unhealthy: HTTP 500")
    assert prov.create_calls() == [] or all(
        c.json.get("app") != app for c in prov.create_calls())

    # The sweep (on by default) asks provision-instance, which redeploys it.
    r = check(stack)
    assert r.status == 200, r
    sweep = r.json["sweep"]
    items = [i for i in sweep["items"] if i["instance_id"] == iid]
    assert items and items[0]["action"] == "create" and items[0]["function"] == "provision-instance"
    assert items[0]["http_status"] == 202, sweep
    deadline = time.monotonic() + 20
    while row(stack, iid)["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    rw = row(stack, iid)
    assert rw["status"] == "running", rw
    assert rw["consecutive_failures"] == 0
    assert [c.json["app"] for c in prov.create_calls()].count(app) == 1
    assert rw["backend_url"] == "https://api.%s.mindroom.test" % app.replace("mindroom-", "m")


def test_user_sees_only_own(stack, health_standin):
    alice, bob = make_account(stack), make_account(stack)
    a1 = make_instance(stack, alice, health_standin.url("alice1", "ok"))
    a2 = make_instance(stack, alice, health_standin.url("alice2", "500"))
    b1 = make_instance(stack, bob, health_standin.url("bob1", "ok"))
    health_standin.reset()
    token = stack.jwt(role="authenticated", sub=alice)

    r = check(stack, token=token)
    assert r.status == 200, r
    assert set(by_id(r)) == {a1, a2}
    assert r.json["sweep"] is None  # tenants never sweep
    assert health_standin.hits("bob1") == 0
    assert row(stack, b1)["last_health_check"] is None
    assert row(stack, a2)["health_status"] == "unhealthy: HTTP 500"

    # Someone else's instance by id: invisible under RLS, so unknown, and not probed.
    r = check(stack, "?instance_id=" + b1, token=token)
    assert r.status == 404, r
    assert r.json["error"]["code"] == "not_found"
    assert health_standin.hits("bob1") == 0
    # POST with a body works the same as the query (supabase-js invoke()).
    r = check(stack, token=token, method="POST", json={"instance_id": a1})
    assert r.status == 200 and set(by_id(r)) == {a1}, r


def test_bad_requests(stack):
    assert check(stack, "?instance_id=nope").status == 400
    assert check(stack, "?sweep=maybe").status == 400
    assert check(stack, method="POST", json={"instance_id": 5}).status == 400
    r = stack.call("POST", "check-instance-health", body="[1,2]", token=stack.jwt(),
                   headers={"Content-Type": "application/json"})
    assert r.status == 400, r
    assert stack.call("GET", "check-instance-health").status == 401
    assert check(stack, token=stack.jwt(role="anon")).status in (401, 403)
    assert stack.call("DELETE", "check-instance-health", token=stack.jwt()).status == 405
    assert check(stack, "?instance_id=" + str(uuid.uuid4())).status == 404
    acct = make_account(stack)
    stopped = make_instance(stack, acct, "http://127.0.0.1:9/x", status="stopped")
    assert check(stack, "?instance_id=" + stopped).status == 409


def test_stuck_provisioning_finished_once_by_two_sweeps(stack, prov):
    acct = make_account(stack)
    iid = make_instance(stack, acct, None, status="provisioning")
    # A worker claimed it and died: the lease ran out long ago.
    stack.sql("UPDATE public.instances SET applied_config_hash = NULL, "
              "claimed_by = 'dead-worker', claim_action = 'create', "
              "claim_expires_at = now() - interval '5 minutes' WHERE id = %s", iid)
    app = stack.sql("SELECT dokku_app_name FROM public.instances WHERE id = %s", iid)[0][0]
    prov.behave(("slow", 1.5))  # both sweeps overlap with the deploy
    try:
        results = [None, None]
        go = threading.Barrier(2)

        def sweep(k):
            go.wait()
            results[k] = check(stack)

        ts = [threading.Thread(target=sweep, args=(k,)) for k in (0, 1)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        for r in results:
            assert r is not None and r.status == 200, r
        asked = [i for r in results for i in r.json["sweep"]["items"] if i["instance_id"] == iid]
        assert asked, [r.json["sweep"] for r in results]
        # Both may be told 202 (one claimed it, the other found the live lease).
        assert all(i["http_status"] in (200, 202) for i in asked), asked
        deadline = time.monotonic() + 20
        while row(stack, iid)["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert row(stack, iid)["status"] == "running"
        # One deploy: one provisioning -> running transition.
        assert stack.sql("SELECT count(*) FROM public.audit_logs WHERE action = 'instance.status_changed' "
                         "AND details->>'instance_id' = %s AND details->>'to' = 'running'", iid)[0][0] == 1
        # A third sweep now finds nothing owed for it.
        r = check(stack)
        assert not [i for i in r.json["sweep"]["items"] if i["instance_id"] == iid]
    finally:
        prov.behave("ok")
    assert [c.json["app"] for c in prov.create_calls()].count(app) == 1


@pytest.fixture(scope="module")
def strict_stack(pg):
    """Production-like rules: no loopback. "localhost" as the base domain makes a
    name that passes the URL rule but resolves to loopback (curl resolves
    *.localhost itself), to exercise the connect-time address check too."""
    env = {"MINDROOM_BASE_DOMAIN": "localhost", "HEALTH_ALLOW_LOOPBACK": "0",
           "HEALTH_TIMEOUT_MS": str(TIMEOUT_MS)}
    with mr.Stack(pg, env=env, functions=["check-instance-health"]) as s:
        yield s


def test_outside_base_domain_not_probed(strict_stack, health_standin):
    s = strict_stack
    s.sql("DELETE FROM public.instances")
    acct = make_account(s)
    literal = make_instance(s, acct, health_standin.url("ssrf-literal", "ok"))
    rebinding = make_instance(s, acct, "http://m1.localhost:%d/i/ssrf-name" % health_standin.port)
    metadata = make_instance(s, acct, "http://169.254.169.254/latest")
    scheme = make_instance(s, acct, "file:///etc/passwd")
    health_standin.reset()
    r = s.call("GET", "check-instance-health?sweep=0", token=s.jwt())
    assert r.status == 200, r
    res = by_id(r)
    assert res[literal]["status"] == "refused: outside base domain"
    assert res[metadata]["status"] == "refused: outside base domain"
    assert res[scheme]["status"] in ("refused: scheme not allowed", "refused: malformed URL")
    assert res[rebinding]["status"] == "refused: address not allowed"
    assert r.json["unhealthy"] == 4
    # Nothing reached the stand-in (it would have answered 200).
    assert health_standin.hits("ssrf-literal") == 0 and health_standin.hits("ssrf-name") == 0
    assert health_standin.hits(None) == 0
    rw = row(s, literal)
    assert rw["health_status"] == "refused: outside base domain"
    assert rw["consecutive_failures"] == 1


def test_sweep_reprocesses_deferred_stripe_event(stack, prov):
    """A subscription event for a customer not linked yet is stored deferred; once
    the account is linked, the sweep reprocesses it and, in the same run, asks
    provision-instance for the instance it made owed."""
    import json as jsonlib
    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
    with open(os.path.join(fixtures, "stripe_subscription_created_basil.json")) as f:
        e = jsonlib.load(f)
    cust, sub = "cus_" + uuid.uuid4().hex[:14], "sub_" + uuid.uuid4().hex[:14]
    e["id"], e["type"] = "evt_" + uuid.uuid4().hex[:14], "customer.subscription.created"
    o = e["data"]["object"]
    o["id"], o["customer"], o["status"], o["metadata"] = sub, cust, "active", {}
    for item in o["items"]["data"]:
        item["price"]["id"] = "price_starter"
        item["subscription"] = sub
        if "plan" in item:
            item["plan"]["id"] = "price_starter"
    body = jsonlib.dumps(e, separators=(",", ":")).encode()
    r = stack.call("POST", "handle-stripe-webhook", body=body, headers=stack.stripe_headers(body))
    assert r.status >= 500, r   # unknown account: deferred, Stripe should retry
    assert stack.sql("SELECT status FROM public.stripe_events WHERE id = %s", e["id"])[0][0] == "deferred"

    # Not due yet (backoff): the sweep leaves it.
    r = check(stack)
    assert r.json["sweep"]["stripe_events"]["reprocessed"] == 0, r.json["sweep"]

    acct = make_account(stack)
    stack.sql("UPDATE public.accounts SET stripe_customer_id = %s WHERE id = %s", cust, acct)
    # Two hours pass (the updated_at trigger would stamp now(): bypass it).
    stack.sql("SET session_replication_role = replica; "
              "UPDATE public.stripe_events SET updated_at = now() - interval '2 hours' WHERE id = %s; "
              "RESET session_replication_role", e["id"])
    r = check(stack)
    assert r.status == 200, r
    ev = r.json["sweep"]["stripe_events"]
    assert ev["reprocessed"] == 1 and ev["failed"] == 0, ev
    assert stack.sql("SELECT status FROM public.stripe_events WHERE id = %s", e["id"])[0][0] == "processed"
    iid, app = stack.sql(
        "SELECT i.id::text, i.dokku_app_name FROM public.instances i "
        "JOIN public.subscriptions s ON s.id = i.subscription_id WHERE s.stripe_subscription_id = %s", sub)[0]
    assert [i["instance_id"] for i in r.json["sweep"]["items"]] == [iid], r.json["sweep"]
    deadline = time.monotonic() + 20
    while row(stack, iid)["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert row(stack, iid)["status"] == "running"
    assert [c.json["app"] for c in prov.create_calls()].count(app) == 1
