"""Health checks through real nginx and PostgreSQL, against the health stand-in
(tests/standins/health.py) and the provisioner stand-in.

check-instance-health only probes and records; the lifecycle worker
(mindroom-lifecycle) runs the periodic round and does the redeploy the failure
threshold makes owed. What a user or operator would notice: the rows' health
columns, the threshold turning an instance into a redeploy that the worker carries
out once with nobody asking, a tenant's own probes never moving an instance toward
a redeploy, failures counted at most once per HEALTH_INTERVAL_S however often an
operator probes, the periodic round run once per interval across every worker
process and host, tenants seeing only their own instances, and a backend outside
the base domain never contacted.
"""
import json
import threading
import time
import uuid

import psycopg2
import pytest

import mr
from lifecycle_helpers import WORKER, stack_env, wait_until

TIMEOUT_MS = 1000
THRESHOLD = 3
PROBE_ENV = {"MINDROOM_BASE_DOMAIN": "mindroom.test", "HEALTH_ALLOW_LOOPBACK": "1",
             "HEALTH_TIMEOUT_MS": str(TIMEOUT_MS)}


@pytest.fixture(scope="module")
def stack(pg, prov):
    """check-instance-health and the worker. HEALTH_INTERVAL_S is mr.Stack's day:
    the worker's own round ran once at start-up (on no instances) and does not run
    again here, so every probe in these tests is one a test asked for."""
    env = stack_env(prov, HEALTH_FAILURE_THRESHOLD=str(THRESHOLD), **PROBE_ENV)
    with mr.Stack(pg, env=env, functions=["check-instance-health", WORKER, "mindroom-admin"]) as s:
        yield s


@pytest.fixture(autouse=True)
def clean(request):
    """Each test starts with no instances (they would be probed too), and leaves
    none behind in a stack whose worker probes by itself."""
    stacks = []
    for name in ("stack", "interval_stack", "round_stack", "periodic"):
        if name in request.fixturenames:
            s = request.getfixturevalue(name)
            stacks.append(s[0] if isinstance(s, tuple) else s)
    for s in stacks:
        s.wipe_instances()
    if "prov" in request.fixturenames:
        request.getfixturevalue("prov").reset()
    yield
    for s in stacks:
        s.wipe_instances()


def make_account(s, email=None):
    uid = str(uuid.uuid4())
    s.sql("INSERT INTO auth.users (id, aud, role, email) VALUES (%s, 'authenticated', "
          "'authenticated', %s)", uid, email or ("u-%s@example.com" % uid[:8]))
    return uid


def make_instance(s, account, backend_url, status="running"):
    """A subscription of `account` and its instance, as a finished deploy leaves
    them: configuration applied, welcome email sent, desired status what it is.
    Nothing is owed, so the worker has nothing to do with it unless a test makes
    it so. One INSERT: a row owing work even for a moment would wake the worker."""
    sid = str(uuid.uuid4())
    s.sql("INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) "
          "VALUES (%s, %s, 'price_starter', 'starter', 'active')", sid, account)
    return s.sql(
        "INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, "
        "desired_status, backend_url, applied_config_version, welcome_email_sent_at) "
        "SELECT %s, n.dokku_app_name, n.subdomain, %s, %s, %s, 1, now() "
        "FROM public.instance_names(%s) n RETURNING id::text",
        sid, status, status, backend_url, sid)[0][0]


def row(s, iid):
    cols = ("status", "health_status", "error_message", "consecutive_failures",
            "last_health_check", "next_attempt_at", "last_error", "backend_url",
            "dokku_app_name", "claimed_by", "owed_action")
    r = s.sql("SELECT %s FROM public.instances WHERE id = %%s" % ", ".join(cols), iid)[0]
    return dict(zip(cols, r))


def check(s, query="", token=None, method="GET", json=None):
    return s.call(method, "check-instance-health" + query, json=json,
                  token=token or s.jwt(), timeout=60)


def by_id(resp):
    return {r["instance_id"]: r for r in resp.json["results"]}


def an_interval_passes(s, iid):
    """As if HEALTH_INTERVAL_S had passed since the instance's last counted failure
    (the module's interval is a day: moving the record back beats waiting)."""
    s.sql("UPDATE public.instances SET health_counted_at = health_counted_at - interval '1 day' "
          "WHERE id = %s", iid)


def creates_for(prov, app):
    return [c for c in prov.create_calls() if c.json and c.json.get("app") == app]


def went_failed(s, iid):
    return s.sql("SELECT count(*) FROM public.audit_logs WHERE action = 'instance.status_changed' "
                 "AND details->>'instance_id' = %s AND details->>'to' = 'failed'", iid)[0][0]


# ---- probing and recording ---------------------------------------------------------------

def test_outcomes_recorded(stack, health_standin):
    acct = make_account(stack)
    ok = make_instance(stack, acct, health_standin.url("ok1", "ok"))
    bad = make_instance(stack, acct, health_standin.url("bad1", "500"))
    # As the provisioner answers it by default: MindRoom's API base.
    hang = make_instance(stack, acct, health_standin.url("hang1", "hang") + "/api/")
    refused = make_instance(stack, acct, health_standin.refused_url("ref1"))
    redirect = make_instance(stack, acct, health_standin.url("redir1", "redirect"))
    big = make_instance(stack, acct, health_standin.url("big1", "big"))
    stopped = make_instance(stack, acct, health_standin.url("stopped1", "ok"), status="stopped")
    health_standin.reset()

    t0 = time.monotonic()
    r = check(stack)
    took = time.monotonic() - t0
    assert r.status == 200, r
    assert r.headers.get("Content-Type", "").startswith("application/json")
    j = r.json
    assert (j["checked"], j["healthy"], j["unhealthy"], j["unreachable"]) == (6, 1, 3, 2), j
    assert j["counted"] is True and "sweep" not in j
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
    # The health path was appended once to the API base (a trailing slash on
    # backend_url is fine): MindRoom's /api/health; the redirect was not followed.
    assert [q["path"] for q in health_standin.requests("hang1")] == ["/i/hang1/api/health"]
    assert health_standin.hits("stopped1") == 0
    assert health_standin.hits(None) == 5  # ok, 500, hang, redirect, big: refused never connects

    # A healthy answer later resets the count.
    health_standin.set_mode("bad1", "ok")
    r = check(stack, "?instance_id=" + bad)
    assert r.status == 200 and r.json["checked"] == 1, r
    assert row(stack, bad)["consecutive_failures"] == 0
    assert row(stack, bad)["health_status"] == "healthy"


def test_metrics_count_the_running_instances_by_their_last_check(stack, health_standin):
    """An operator's /metrics says how many running instances pass their checks, fail
    them, or have not been checked since they started: what an alert on failing
    instances reads."""
    acct = make_account(stack)
    ok = make_instance(stack, acct, health_standin.url("mok", "ok"))
    bad = make_instance(stack, acct, health_standin.url("mbad", "500"))
    make_instance(stack, acct, health_standin.url("mnew", "ok"))
    make_instance(stack, acct, health_standin.url("mstopped", "500"), status="stopped")
    for iid in (ok, bad):
        assert check(stack, "?instance_id=" + iid).json["checked"] == 1

    def running_by_health():
        r = stack.call_admin("/metrics")
        assert r.status == 200, r
        return {h: mr.metric_value(r.text, "mindroom_instances_running", health=h)
                for h in ("healthy", "failing", "unchecked")}

    assert running_by_health() == {"healthy": 1, "failing": 1, "unchecked": 1}
    health_standin.set_mode("mbad", "ok")
    assert check(stack, "?instance_id=" + bad).json["healthy"] == 1
    assert running_by_health() == {"healthy": 2, "failing": 0, "unchecked": 1}


def test_a_round_over_many_instances_records_every_one(stack, health_standin):
    """520 running instances: a round records them in batches (256 per transaction),
    and every instance, in the first batch or the last, gets its row written and its
    count and threshold in the answer. The two failing ones sort first and last."""
    acct = make_account(stack)
    n = 518
    stack.sql("INSERT INTO public.subscriptions (account_id, stripe_price_id, tier, status) "
              "SELECT %s, 'price_starter', 'starter', 'active' FROM generate_series(1, %s)", acct, n + 2)
    ok_url, bad_url = health_standin.url("many-ok", "ok"), health_standin.url("many-bad", "500")
    first, last = "00000000-0000-4000-8000-000000000001", "ffffffff-ffff-4fff-bfff-ffffffffffff"
    stack.sql(
        "INSERT INTO public.instances (id, subscription_id, dokku_app_name, subdomain, status, "
        "desired_status, backend_url, applied_config_version, welcome_email_sent_at) "
        "SELECT CASE r WHEN 1 THEN %s::uuid WHEN 2 THEN %s::uuid ELSE gen_random_uuid() END, "
        "       s.id, nm.dokku_app_name, nm.subdomain, 'running', 'running', "
        "       CASE WHEN r <= 2 THEN %s ELSE %s END, 1, now() "
        "  FROM (SELECT id, row_number() OVER (ORDER BY id) AS r FROM public.subscriptions "
        "         WHERE account_id = %s) s CROSS JOIN LATERAL public.instance_names(s.id) nm",
        first, last, bad_url, ok_url, acct)
    health_standin.reset()
    for k in range(1, THRESHOLD + 1):
        r = check(stack)
        assert r.status == 200, r
        j = r.json
        assert (j["checked"], j["healthy"], j["unhealthy"]) == (n + 2, n, 2), {x: j[x] for x in j if x != "results"}
        res = by_id(r)
        assert all("consecutive_failures" in x for x in res.values())
        for iid in (first, last):
            assert res[iid]["consecutive_failures"] == k
            assert res[iid]["marked_failed"] is (k == THRESHOLD)
            an_interval_passes(stack, iid)
        assert j["marked_failed"] == (2 if k == THRESHOLD else 0)
        if k == 1:  # every row written, whichever batch it was in
            assert stack.sql("SELECT count(*) FROM public.instances WHERE last_health_check IS NULL"
                             " OR health_status IS NULL")[0][0] == 0
            assert stack.sql("SELECT count(*) FROM public.instances WHERE consecutive_failures = 1"
                             " AND health_status = 'unhealthy: HTTP 500'")[0][0] == 2
    assert went_failed(stack, first) == 1 and went_failed(stack, last) == 1
    assert stack.sql("SELECT count(*) FROM public.instances WHERE health_status = 'healthy' "
                     "AND consecutive_failures = 0 AND last_health_check IS NOT NULL")[0][0] == n


# ---- counting toward a redeploy ------------------------------------------------------------

def test_threshold_marks_failed_and_the_worker_redeploys_once(stack, health_standin, prov):
    acct = make_account(stack)
    iid = make_instance(stack, acct, health_standin.url("flaky", "500"))
    app = row(stack, iid)["dokku_app_name"]
    for n in range(1, THRESHOLD):
        r = check(stack)
        assert r.status == 200, r
        assert by_id(r)[iid]["marked_failed"] is False
        assert by_id(r)[iid]["consecutive_failures"] == n
        assert row(stack, iid)["status"] == "running"
        an_interval_passes(stack, iid)
    assert creates_for(prov, app) == []

    r = check(stack)
    assert by_id(r)[iid]["marked_failed"] is True and r.json["marked_failed"] == 1
    assert by_id(r)[iid]["consecutive_failures"] == THRESHOLD
    assert went_failed(stack, iid) == 1
    reason = stack.sql("SELECT details FROM public.audit_logs WHERE action = 'instance.status_changed' "
                       "AND details->>'instance_id' = %s AND details->>'to' = 'failed'", iid)[0][0]
    assert reason["from"] == "running", reason

    # Nobody calls anything: the commit that marked it failed wakes the worker, which
    # redeploys it.
    rw = wait_until(lambda: (lambda x: x if x["status"] == "running" and not x["claimed_by"] else None)(
        row(stack, iid)), timeout=5, what="redeployed by the worker")
    assert len(creates_for(prov, app)) == 1
    assert rw["consecutive_failures"] == 0 and rw["last_error"] is None and rw["owed_action"] is None
    assert rw["backend_url"] == "https://api.%s.mindroom.test" % app.replace("mindroom-", "m")
    assert "instance %s: create succeeded" % iid in stack.log(WORKER)
    time.sleep(0.5)                                      # and no second redeploy follows
    assert len(creates_for(prov, app)) == 1 and went_failed(stack, iid) == 1


def test_an_instance_failed_again_after_its_redeploy_waits_before_the_next_one(
        stack, health_standin, prov):
    """A cause a redeploy does not cure (the instance fails at start, a certificate
    expired): the first redeploy is at once, the next one since the instance was last
    seen healthy waits (threshold x interval, here capped at an hour), instead of a
    redeploy and restart of the customer's instance every few minutes for ever. A
    healthy result ends the run: the next failure is redeployed at once again."""
    acct = make_account(stack)
    iid = make_instance(stack, acct, health_standin.url("relapse", "500"))
    app = row(stack, iid)["dokku_app_name"]

    def fail_to_threshold():
        # The redeploy answers the provisioner stand-in's URLs: back to the failing one
        # (and no homeserver's, which would not resolve).
        stack.sql("UPDATE public.instances SET backend_url = %s, matrix_server_url = NULL "
                  "WHERE id = %s", health_standin.url("relapse", "500"), iid)
        for _ in range(THRESHOLD):
            an_interval_passes(stack, iid)
            r = check(stack)
            assert r.status == 200, r
        assert by_id(r)[iid]["marked_failed"] is True, r.json

    def redeployed(n):
        wait_until(lambda: len(creates_for(prov, app)) == n and (lambda x: x["status"] == "running"
                   and not x["claimed_by"])(row(stack, iid)), timeout=5, what="redeploy %d" % n)

    fail_to_threshold()
    redeployed(1)                                        # the first: at once, as before
    fail_to_threshold()                                  # still failing after it
    assert went_failed(stack, iid) == 2
    rw = row(stack, iid)
    assert rw["status"] == "failed" and rw["owed_action"] == "create", rw
    (wait_s,) = stack.sql("SELECT extract(epoch FROM next_attempt_at - now())::int "
                          "FROM public.instances WHERE id = %s", iid)[0]
    assert 3500 <= wait_s <= 3600, wait_s                # min(3 x a day, an hour)
    time.sleep(1.0)
    assert len(creates_for(prov, app)) == 1, "redeployed again at once"
    assert row(stack, iid)["status"] == "failed"

    # Its time comes: redeployed; seen healthy, the run ends.
    stack.sql("UPDATE public.instances SET next_attempt_at = now() WHERE id = %s", iid)
    redeployed(2)
    stack.sql("UPDATE public.instances SET backend_url = %s, matrix_server_url = NULL "
              "WHERE id = %s", health_standin.url("relapse-ok", "ok"), iid)
    assert by_id(check(stack))[iid]["status"] == "healthy"
    fail_to_threshold()
    redeployed(3)                                        # at once again
    assert went_failed(stack, iid) == 3


def test_a_tenants_probes_are_recorded_but_never_count(stack, health_standin, prov):
    alice = make_account(stack)
    iid = make_instance(stack, alice, health_standin.url("tenant-probe", "500"))
    app = row(stack, iid)["dokku_app_name"]
    token = stack.jwt(role="authenticated", sub=alice)
    # Twice the threshold in a row, each one a probe a counting caller would have
    # counted (nothing was counted before, so no interval holds it back).
    for _ in range(2 * THRESHOLD):
        r = check(stack, token=token)
        assert r.status == 200 and r.json["counted"] is False, r
        res = by_id(r)[iid]
        assert res["status"] == "unhealthy: HTTP 500"
        assert res["consecutive_failures"] == 0 and res["marked_failed"] is False
    rw = row(stack, iid)
    assert rw["status"] == "running" and rw["consecutive_failures"] == 0
    assert rw["health_status"] == "unhealthy: HTTP 500" and rw["last_health_check"] is not None
    assert health_standin.hits("tenant-probe") == 2 * THRESHOLD
    time.sleep(0.5)
    assert creates_for(prov, app) == [] and went_failed(stack, iid) == 0

    # An operator's probe counts.
    r = check(stack)
    assert r.json["counted"] is True and by_id(r)[iid]["consecutive_failures"] == 1
    # A tenant's healthy probe is recorded, but cannot reset the count either.
    health_standin.set_mode("tenant-probe", "ok")
    r = check(stack, token=token)
    assert by_id(r)[iid]["status"] == "healthy" and by_id(r)[iid]["consecutive_failures"] == 1
    assert row(stack, iid)["health_status"] == "healthy"
    assert row(stack, iid)["consecutive_failures"] == 1
    r = check(stack)
    assert by_id(r)[iid]["consecutive_failures"] == 0


INTERVAL_S = 3


@pytest.fixture(scope="module")
def interval_stack(pg):
    """check-instance-health alone (no worker, so no periodic round) with a short
    HEALTH_INTERVAL_S, to see the once-per-interval rule in real time."""
    env = dict(PROBE_ENV, HEALTH_INTERVAL_S=str(INTERVAL_S), HEALTH_FAILURE_THRESHOLD="5")
    with mr.Stack(pg, env=env, functions=["check-instance-health"]) as s:
        yield s


def test_an_operators_failures_count_once_per_interval(interval_stack, health_standin):
    s = interval_stack
    iid = make_instance(s, make_account(s), health_standin.url("once", "500"))
    t0 = time.monotonic()
    for _ in range(4):
        r = check(s)
        assert r.status == 200 and r.json["counted"] is True, r
        assert by_id(r)[iid]["consecutive_failures"] == 1
    # (The rule's premise: those four probes fell inside one interval.)
    assert time.monotonic() - t0 < INTERVAL_S
    assert health_standin.hits("once") == 4

    # One interval after the counted failure (the database's clock), a probe counts.
    wait_until(lambda: s.sql("SELECT now() - health_counted_at >= make_interval(secs => %s) "
                             "FROM public.instances WHERE id = %s", INTERVAL_S, iid)[0][0],
               timeout=INTERVAL_S + 5, interval=0.1, what="one interval")
    r = check(s)
    assert by_id(r)[iid]["consecutive_failures"] == 2
    r = check(s)
    assert by_id(r)[iid]["consecutive_failures"] == 2
    assert row(s, iid)["status"] == "running"


ROUND_MS = 4800


@pytest.fixture(scope="module")
def round_stack(pg):
    """check-instance-health alone, one probe at a time (1 s each), a round's probing
    cut at HEALTH_ROUND_MS, 4.8 s: no instance's probes start after 2.8 s."""
    env = dict(PROBE_ENV, HEALTH_CONCURRENCY="1", HEALTH_ROUND_MS=str(ROUND_MS))
    with mr.Stack(pg, env=env, functions=["check-instance-health"]) as s:
        yield s


def test_a_round_that_runs_out_of_time_leaves_the_rest_to_the_next_one(round_stack, health_standin):
    """More hanging instances than a round's time can probe: the round answers within
    HEALTH_ROUND_MS (so that an operator's round over every instance answers before
    nginx's timeout, whatever hangs), probes an instance's two parts together or not
    at all, records only what it probed, says how many it left, and the next round
    probes those first. Three instances whose MindRoom and homeserver both hang, one
    probe at a time: the first two instances take 4 s, the third would start after
    the cut."""
    s = round_stack
    acct = make_account(s)
    ids = []
    for i in range(3):
        iid = make_instance(s, acct, health_standin.url("rt%d" % i, "hang"))
        s.sql("UPDATE public.instances SET matrix_server_url = %s WHERE id = %s",
              health_standin.url("rt%d-matrix" % i, "hang"), iid)
        ids.append(iid)
    health_standin.reset()

    t0 = time.monotonic()
    r = check(s)
    took = time.monotonic() - t0
    assert r.status == 200, r
    assert (r.json["checked"], r.json["not_probed"], r.json["unreachable"]) == (2, 1, 2), r.json
    assert took < ROUND_MS / 1000 + 0.5, took
    first = by_id(r)
    left = set(ids) - set(first)
    assert len(left) == 1
    for iid, res in first.items():
        assert res["failed_component"] == "mindroom" and res["consecutive_failures"] == 1, res
        assert res["components"]["homeserver"]["status"] == "unreachable: timeout after %d ms" % TIMEOUT_MS
        assert row(s, iid)["health_status"] == "unreachable: timeout after %d ms" % TIMEOUT_MS
    for iid in left:  # never contacted, nothing recorded
        rw = row(s, iid)
        assert (rw["last_health_check"], rw["health_status"], rw["consecutive_failures"]) == (None, None, 0)
    assert health_standin.hits(None) == 4
    assert "1 of 3 instances not probed" in s.log("check-instance-health")

    # The next round takes the one never checked first, then the oldest check; every
    # instance it probed gets its count (a failure counts once per interval).
    r = check(s)
    assert (r.json["checked"], r.json["not_probed"]) == (2, 1), r.json
    second = by_id(r)
    assert left <= set(second), (left, set(second))
    assert all(res["consecutive_failures"] == 1 for res in second.values()), second
    assert s.sql("SELECT count(*) FROM public.instances WHERE last_health_check IS NULL")[0][0] == 0


def test_failures_recorded_at_once_count_once(stack):
    """Two probers record a failure of one instance in the same interval at the same
    time (the worker's round and an operator's probe): it counts once. The second
    recording waits for the first one's row lock, then must decide on the row as the
    first left it, not on what it read before it waited."""
    s = stack
    iid = make_instance(s, make_account(s), "http://%s.mindroom.test/" % uuid.uuid4().hex[:8])
    results = json.dumps([{"instance_id": iid, "ok": False, "health_status": "unreachable",
                           "error": "timeout"}])
    record = ("SELECT consecutive_failures FROM public.health_record(%s::jsonb, 3, true, NULL, "
              "86400)")
    first = psycopg2.connect(s.pg.conninfo(s.db))
    second = psycopg2.connect(s.pg.conninfo(s.db))
    try:
        with first.cursor() as c:
            c.execute("SET ROLE service_role")
            c.execute(record, (results,))
            assert c.fetchone()[0] == 1
        # The first recording holds the row; the second one starts meanwhile.
        with second.cursor() as c:
            c.execute("SET ROLE service_role")
            c.execute("SELECT pg_backend_pid()")
            pid = c.fetchone()[0]
        got = []

        def run():
            with second.cursor() as c:
                c.execute(record, (results,))
                got.append(c.fetchone()[0])
            second.commit()
        t = threading.Thread(target=run)
        t.start()
        wait_until(lambda: s.sql("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                 pid) == [(True,)], timeout=10, what="the second recording waiting")
        first.commit()
        t.join(10)
        assert got == [1], got
        r = row(s, iid)
        assert r["consecutive_failures"] == 1
        assert r["status"] == "running"
    finally:
        first.close()
        second.close()


# ---- who sees what ------------------------------------------------------------------------

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
    assert check(stack, method="POST", json={"instance_id": 5}).status == 400
    assert check(stack, method="POST", json={"instance_id": ""}).status == 400
    r = stack.call("POST", "check-instance-health", body="[1,2]", token=stack.jwt(),
                   headers={"Content-Type": "application/json"})
    assert r.status == 400, r
    assert stack.call("GET", "check-instance-health").status == 401
    assert check(stack, token=stack.jwt(role="anon")).status in (401, 403)
    assert stack.call("DELETE", "check-instance-health", token=stack.jwt()).status == 405
    assert check(stack, "?instance_id=" + str(uuid.uuid4())).status == 404
    acct = make_account(stack)
    stopped = make_instance(stack, acct, "http://127.0.0.1:9/x", status="stopped")
    r = check(stack, "?instance_id=" + stopped)
    assert r.status == 409 and r.json["error"]["code"] == "not_running", r


def test_an_empty_instance_id_is_400_not_a_round_over_every_instance(stack, health_standin):
    """A script whose variable is unset asks for ?instance_id= : it means one
    instance, so it is refused like any other non-UUID, and nothing is probed."""
    iid = make_instance(stack, make_account(stack), health_standin.url("empty-id", "ok"))
    for query in ("?instance_id=", "?instance_id", "?instance_id=%20"):
        r = check(stack, query)
        assert r.status == 400 and r.json["error"]["code"] == "invalid_instance_id", (query, r)
    r = check(stack, method="POST", json={"instance_id": ""})
    assert r.status == 400 and r.json["error"]["code"] == "invalid_instance_id", r
    assert row(stack, iid)["last_health_check"] is None


def test_a_null_repeated_or_doubled_instance_id_is_400_not_a_round_over_every_instance(
        stack, health_standin):
    iid = make_instance(stack, make_account(stack), health_standin.url("null-id", "ok"))
    other = str(uuid.uuid4())
    json_h = {"Content-Type": "application/json"}
    for query, body, code in (
            ("", b'{"instance_id": null}', "invalid_instance_id"),
            ("", b'{"instance_id": "%s", "instance_id": "%s"}' % (iid.encode(), other.encode()),
             "invalid_body"),
            ("", b'{"foo": 1}', "invalid_body"),
            ("?instance_id=%s&instance_id=%s" % (iid, other), b"", "invalid_instance_id"),
            ("?instance_id=%s" % other, b'{"instance_id": "%s"}' % iid.encode(), "invalid_body")):
        r = stack.call("POST", "check-instance-health" + query, body=body, token=stack.jwt(),
                       headers=json_h, timeout=60)
        assert r.status == 400 and r.json["error"]["code"] == code, (query, body, r)
    assert row(stack, iid)["last_health_check"] is None


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
    s.wipe_instances()
    acct = make_account(s)
    literal = make_instance(s, acct, health_standin.url("ssrf-literal", "ok"))
    rebinding = make_instance(s, acct, "http://m1.localhost:%d/i/ssrf-name" % health_standin.port)
    metadata = make_instance(s, acct, "http://169.254.169.254/latest")
    scheme = make_instance(s, acct, "file:///etc/passwd")
    health_standin.reset()
    r = s.call("GET", "check-instance-health", token=s.jwt())
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


# ---- the periodic round, in the worker ------------------------------------------------------

PERIOD_S = 2


@pytest.fixture(scope="module")
def periodic(pg, prov):
    """Two hosts' worth of workers on one database, two worker processes each, with
    a 2 s health interval; no check-instance-health anywhere, so every probe is the
    worker's own round."""
    env = stack_env(prov, HEALTH_INTERVAL_S=str(PERIOD_S), HEALTH_FAILURE_THRESHOLD="2",
                    MR_LIFECYCLE_WORKERS="2", **PROBE_ENV)
    with mr.Stack(pg, env=env, functions=[WORKER]) as s:
        with mr.Stack(pg, env=env, functions=[WORKER], db=s.db) as other_host:
            yield s, other_host


def test_the_worker_probes_by_itself_and_redeploys_at_the_threshold(periodic, health_standin, prov):
    s, _ = periodic
    acct = make_account(s)
    good = make_instance(s, acct, health_standin.url("p-good", "ok"))
    bad = make_instance(s, acct, health_standin.url("p-bad", "500"))
    app = row(s, bad)["dokku_app_name"]

    rw = wait_until(lambda: (lambda x: x if x["last_health_check"] else None)(row(s, good)),
                    timeout=3 * PERIOD_S + 5, what="the worker's round")
    assert rw["health_status"] == "healthy" and rw["consecutive_failures"] == 0

    # Two rounds at least an interval apart count twice: failed, and the worker
    # redeploys it once.
    wait_until(lambda: went_failed(s, bad), timeout=4 * PERIOD_S + 5, what="marked failed")
    rw = wait_until(lambda: (lambda x: x if x["status"] == "running" and not x["claimed_by"] else None)(
        row(s, bad)), timeout=5, what="redeployed")
    assert len(creates_for(prov, app)) == 1
    assert rw["consecutive_failures"] == 0
    # The redeployed app's URL is the provisioner stand-in's (no such host): point it
    # back at a healthy endpoint before two more rounds would fail it again.
    s.sql("UPDATE public.instances SET backend_url = %s WHERE id = %s",
          health_standin.url("p-bad", "ok"), bad)
    assert health_standin.hits("p-bad") >= 2


def test_the_round_runs_once_per_interval_across_workers_and_hosts(periodic, health_standin):
    s, other_host = periodic
    assert len(s.workers(WORKER)) == 2 and len(other_host.workers(WORKER)) == 2
    make_instance(s, make_account(s), health_standin.url("p-once", "ok"))
    wait_until(lambda: health_standin.hits("p-once"), timeout=3 * PERIOD_S + 5, what="first probe")

    def runs():
        return s.sql("SELECT runs FROM public.scheduled_jobs WHERE name = 'health'")[0][0]

    window = 5 * PERIOD_S
    runs0, hits0 = runs(), health_standin.hits("p-once")
    time.sleep(window)
    rounds, probes = runs() - runs0, health_standin.hits("p-once") - hits0
    print("\nhealth rounds in %d s with a %d s interval and 4 worker processes: %d (%d probes)"
          % (window, PERIOD_S, rounds, probes))
    # Four processes each ask every second; the lease lets one round through per
    # interval (plus one whose start fell at the window's edge).
    assert 2 <= rounds <= window // PERIOD_S + 1, rounds
    assert abs(probes - rounds) <= 1, (probes, rounds)

    # Every run the lease let through ran exactly once, in one process: the workers'
    # logs hold one "health round:" line per run. Read while no round is in flight
    # and none can start for a while.
    def settled():
        r = s.sql("SELECT runs FROM public.scheduled_jobs WHERE name = 'health' "
                  "AND last_finished_at >= last_started_at AND until > now() + interval '0.5 s'")
        return r[0][0] if r else None
    total = wait_until(settled, timeout=3 * PERIOD_S, interval=0.02, what="a settled lease")
    logged = sum(x.log(WORKER).count('"msg":"health round: ') for x in (s, other_host))
    assert logged == total, (logged, total)
