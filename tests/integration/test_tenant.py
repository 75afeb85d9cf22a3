"""Instances and customers talk to the control plane: an instance's own token and the
control plane's URL in its environment, usage reports through track-usage, the
tenant API (my-instance, my-instance/restart), audit rows saying who and from where.

Everything real but Dokku, Stripe's delivery and the instances' HTTP: signed events
through the webhook, the lifecycle worker, nginx's provisioner listener and the real
dokku-provisioner driving the stand-in `dokku` (local mode), nginx with real_ip
trusting 127.0.0.2 only (a client on 127.0.0.1 plays the Internet)."""
import base64
import hashlib
import os
import re
import subprocess
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

import mr
from health import HealthStandin
from lifecycle_helpers import (WORKER, deploy_env, instance, new_account, provision, wait_status,
                               wait_until)
from provisioner_helpers import Dokku, imported, names
from test_instance_e2e import Customer, ctl, running

FUNCS = ["handle-stripe-webhook", "provision-instance", "deprovision-instance", "check-instance-health",
         "dokku-provisioner", "track-usage", "my-instance", WORKER]
# mri_<key id>_<secret>; the secret is base64url, so it may itself contain "_".
TOKEN_RE = re.compile(r"^mri_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
PROXY = "127.0.0.2"     # the one address nginx believes X-Forwarded-For from
UA = "MindRoom/1.4 (tenant test)"
MINDROOM_FILE = "/mindroom_data/agents/memory.db"


@pytest.fixture(scope="module")
def dokku():
    d = Dokku()
    yield d
    d.assert_documented()


@pytest.fixture(scope="module")
def health():
    with HealthStandin() as h:
        yield h


@pytest.fixture(scope="module")
def stack(pg, dokku, health):
    env = deploy_env(dokku, health)
    with mr.Stack(pg, env=env, functions=FUNCS, trusted_proxies=(PROXY,)) as s:
        yield s


def mindroom_env(dokku, app, calls=None):
    """MindRoom's environment as the last config:import (of `calls`, else all) set it."""
    calls = dokku.all_calls() if calls is None else calls
    sets = [c for c in calls if c[0] == "config:import" and app in c]
    assert sets, "no config:import for %s" % app
    return imported(sets[-1])


def report(stack, token, body=None, headers=None, source=None):
    h = {"User-Agent": UA}
    h.update(headers or {})
    return stack.call("POST", "track-usage", json=body, token=token, headers=h, source=source)


def usage(stack, iid):
    rows = stack.sql("SELECT messages_sent, agents_used, tools_used FROM public.usage_metrics "
                     "WHERE instance_id = %s AND date = CURRENT_DATE", iid)
    return rows[0] if rows else (0, {}, {})


def user_jwt(stack, account):
    return stack.jwt(role="authenticated", sub=account, aud="authenticated")


def audit(stack, action, **details):
    where = "".join(" AND details->>'%s' = %%s" % k for k in details)
    cols = ("account_id", "actor_role", "actor_user_id", "actor_instance_id", "ip_address",
            "user_agent", "request_id", "details")
    rows = stack.sql("SELECT %s FROM public.audit_logs WHERE action = %%s%s ORDER BY created_at"
                     % (", ".join(cols), where), action, *[str(v) for v in details.values()])
    return [dict(zip(cols, r)) for r in rows]


def live_instance(stack, tier="starter"):
    """A customer whose subscription.created made a running instance; returns
    (customer, instance row, its token from the recorded config:import)."""
    c = Customer(stack, tier)
    c.send("customer.subscription.created", "active")
    inst = running(stack, c.sid)
    return c, inst


def token_of(dokku, inst):
    return mindroom_env(dokku, inst["dokku_app_name"])["MINDROOM_CONTROL_PLANE_TOKEN"]


def test_the_environment_carries_token_url_and_limits_and_reports_count(stack, dokku):
    c, inst = live_instance(stack, "starter")
    iid, app = str(inst["id"]), inst["dokku_app_name"]
    env = mindroom_env(dokku, app)
    # The environment contract: the control plane's URL, the instance's own token, its limits.
    assert env["MINDROOM_CONTROL_PLANE_URL"] == stack.base_url
    token = env["MINDROOM_CONTROL_PLANE_TOKEN"]
    m = TOKEN_RE.match(token)
    assert m, token
    assert (env["MAX_AGENTS"], env["MAX_MESSAGES_PER_DAY"], env["MAX_STORAGE_GB"]) == ("3", "1000", "5")
    # PostgreSQL holds its key id and hash, and the token sealed; never the token.
    assert stack.sql("SELECT key_id, token_hash FROM public.instance_tokens WHERE instance_id = %s",
                     iid) == [(m.group(1), hashlib.sha256(token.encode()).hexdigest())]
    (ct,) = stack.sql("SELECT ciphertext FROM public.instance_secrets WHERE instance_id = %s "
                      "AND kind = 'control_plane'", iid)[0]
    assert ct.startswith("mrs1:")
    dump = subprocess.run(["pg_dump", "--data-only", stack.pg.conninfo(stack.db, "postgres")],
                          check=True, capture_output=True, text=True).stdout
    assert token not in dump and m.group(2) not in dump

    # With the token, a report counts and answers what is left today.
    r = report(stack, token, {"agent": "general", "tool": "web_search"})
    assert r.status == 200, r
    tomorrow = stack.sql("SELECT (CURRENT_DATE + 1)::timestamptz")[0][0]
    assert r.json["allowed"] is True and r.json["remaining"] == 999, r.json
    assert r.json["resets_at"].replace(" ", "T")[:19] == tomorrow.isoformat()[:19], r.json
    assert r.json["agents"] == {"used": 1, "max": 3}
    assert usage(stack, iid) == (1, {"general": 1}, {"web_search": 1})
    r = report(stack, token)                                   # no body: one message, no names
    assert r.status == 200 and r.json["remaining"] == 998, r
    assert usage(stack, iid)[0] == 2

    # Bad reports are refused and count nothing.
    for body in ({"agent": ""}, {"agent": "x" * 65}, {"agent": "drop table"}, {"agent": 7},
                 {"instance_id": iid}, {"agent": "a", "extra": 1}, [1]):
        r = report(stack, token, body)
        assert r.status == 400 and r.json["error"]["code"] == "invalid_report", (body, r)
    r = stack.call("POST", "track-usage", body='{"agent":"a","agent":"b"}', token=token,
                   headers={"Content-Type": "application/json"})
    assert r.status == 400, r
    assert usage(stack, iid)[0] == 2

    # At the daily limit: 429 with Retry-After, nothing counted.
    stack.sql("UPDATE public.subscriptions SET current_messages_today = 998 WHERE id = %s", c.sid)
    r = report(stack, token, {"agent": "general"})
    assert r.status == 200 and r.json["remaining"] == 1, r
    r = report(stack, token, {"agent": "general"})
    assert r.status == 200 and r.json["remaining"] == 0, r
    before = usage(stack, iid)
    r = report(stack, token, {"agent": "general"})
    assert r.status == 429, r
    assert r.json["allowed"] is False and r.json["remaining"] == 0 and r.json["limit"] == "messages"
    assert r.json["error"]["code"] == "limit_reached"
    retry = int(r.headers.get("Retry-After"))
    assert 0 < retry <= 86400 + 3600, retry
    assert usage(stack, iid) == before
    assert report(stack, token).status == 429                  # still refused

    # The plan's distinct agents per day: a fourth agent is refused, known ones are not.
    stack.sql("UPDATE public.subscriptions SET current_messages_today = 0 WHERE id = %s", c.sid)
    for agent in ("research", "writer"):
        r = report(stack, token, {"agent": agent})
        assert r.status == 200 and r.json["agents"]["used"] <= 3, r
    r = report(stack, token, {"agent": "fourth"})
    assert r.status == 429 and r.json["limit"] == "agents", r
    assert r.json["agents"] == {"used": 3, "max": 3}
    assert int(r.headers.get("Retry-After")) > 0
    assert "fourth" not in usage(stack, iid)[1]
    r = report(stack, token, {"agent": "writer"})
    assert r.status == 200, r

    # A subscription an operator set to no agent limit: the fourth agent counts, and the
    # answer says there is no maximum (null, as remaining says no daily limit), not 0.
    stack.sql("UPDATE public.subscriptions SET max_agents = NULL WHERE id = %s", c.sid)
    r = report(stack, token, {"agent": "fourth"})
    assert r.status == 200 and r.json["agents"] == {"used": 4, "max": None}, r
    stack.sql("UPDATE public.subscriptions SET max_agents = 3 WHERE id = %s", c.sid)

    # Each limit's first refusal of the day is audited, the instance as the actor.
    for limit in ("messages", "agents"):
        rows = audit(stack, "usage.limit_reached", instance_id=iid, limit=limit)
        assert len(rows) == 1, rows
        a = rows[0]
        assert (a["actor_role"], str(a["actor_instance_id"]), a["actor_user_id"]) == ("instance", iid, None)
        assert (a["ip_address"], a["user_agent"], str(a["account_id"])) == ("127.0.0.1", UA, c.account)
        assert a["request_id"]


def test_one_instance_token_never_reads_or_writes_another_instances_usage(stack, dokku):
    _, a = live_instance(stack, "professional")
    _, b = live_instance(stack, "professional")
    ta, tb = token_of(dokku, a), token_of(dokku, b)
    assert ta != tb
    before_b = usage(stack, str(b["id"]))
    r = report(stack, ta, {"agent": "a-agent"})
    assert r.status == 200, r
    assert usage(stack, str(a["id"]))[1] == {"a-agent": 1}
    assert usage(stack, str(b["id"])) == before_b
    # There is no way to name another instance: not in the body...
    r = report(stack, ta, {"instance_id": str(b["id"])})
    assert r.status == 400, r
    # ...and a token made of B's key id with A's secret is no token.
    forged = "mri_%s_%s" % (TOKEN_RE.match(tb).group(1), TOKEN_RE.match(ta).group(2))
    assert TOKEN_RE.match(forged) and forged not in (ta, tb)
    r = report(stack, forged, {"agent": "x"})
    assert r.status == 401, r
    assert usage(stack, str(b["id"])) == before_b


def test_jwts_and_keys_cannot_report(stack, dokku):
    c, inst = live_instance(stack, "free")
    before = usage(stack, str(inst["id"]))
    for cred in (stack.jwt(), user_jwt(stack, c.account), stack.jwt(role="anon"),
                 "sb_secret_" + "x" * 40, "mri_0123456789abcdef_" + "A" * 43, "garbage"):
        r = report(stack, cred)
        assert r.status == 401 and r.json["error"]["code"] == "unauthorized", (cred[:12], r)
        assert r.headers.get("WWW-Authenticate") == "Bearer"
    r = stack.call("POST", "track-usage", json={})
    assert r.status == 401, r
    r = stack.call("POST", "track-usage", json={}, headers={"apikey": stack.jwt()})
    assert r.status == 401, r
    r = stack.call("GET", "track-usage", token=token_of(dokku, inst))
    assert r.status == 405, r
    assert usage(stack, str(inst["id"])) == before


def test_wrong_secret_tokens_under_an_instances_key_id_do_not_spend_its_rate_limit(stack, dokku):
    """The key id is public. nginx counts a report before the function checks the
    secret: tokens with the instance's key id and a wrong secret are 401s that
    fill their own bucket up to 429, and the instance's own reports still count."""
    _, inst = live_instance(stack, "starter")
    token = token_of(dokku, inst)
    before = usage(stack, str(inst["id"]))[0]
    junk = "mri_%s_%s" % (TOKEN_RE.match(token).group(1), "A" * 42 + "E")  # well-formed, wrong secret
    assert TOKEN_RE.match(junk) and junk != token
    stop, limited, statuses = threading.Event(), threading.Event(), []

    def flood():
        while not stop.is_set():
            st = report(stack, junk).status
            statuses.append(st)
            if st == 429:
                limited.set()

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert limited.wait(60), "the wrong-secret token was never rate-limited"
        # While the junk keeps its own bucket full, the instance reports.
        mine = [report(stack, token) for _ in range(3)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(statuses) == {401, 429}, set(statuses)
    assert [r.status for r in mine] == [200] * 3, mine
    assert usage(stack, str(inst["id"]))[0] == before + 3


def test_a_rotated_token_stops_at_once_and_the_worker_delivers_a_new_one(stack, dokku):
    c, inst = live_instance(stack, "starter")
    iid, app = str(inst["id"]), inst["dokku_app_name"]
    old = token_of(dokku, inst)
    assert report(stack, old).status == 200
    dokku.mark()
    p = ctl(stack, "rotate-instance-token", iid)
    assert p.returncode == 0 and "revoked" in p.stdout and "update" in p.stdout, p
    # The old token is refused from the rotation's commit on (even by a worker that
    # has it verified in memory).
    for _ in range(4):
        r = report(stack, old)
        assert r.status == 401, r
    # The worker owes an update: it issues a new token and applies it, data kept.
    wait_until(lambda: any(x[0] == "config:import" and app in x for x in dokku.all_calls()[dokku._seen:]),
               timeout=45, what="config:import with a new token")
    running(stack, c.sid)
    new = mindroom_env(dokku, app, dokku.new_calls())["MINDROOM_CONTROL_PLANE_TOKEN"]
    assert TOKEN_RE.match(new) and new != old
    assert report(stack, new).status == 200
    assert report(stack, old).status == 401
    rows = audit(stack, "instance.token_rotated", instance_id=iid)
    assert len(rows) == 1 and rows[0]["details"]["revoked_key_id"] == TOKEN_RE.match(old).group(1)
    # An unknown instance: a clear refusal.
    p = ctl(stack, "rotate-instance-token", str(uuid.uuid4()))
    assert p.returncode == 1 and "no such instance" in p.stderr, p


def test_a_redeploy_that_asks_for_it_rotates_the_token(stack, dokku):
    c, inst = live_instance(stack, "starter")
    iid, app = str(inst["id"]), inst["dokku_app_name"]
    old = token_of(dokku, inst)
    # Without rotate_token a provision of a running instance changes nothing.
    r = stack.call("POST", "provision-instance", json={"subscription_id": c.sid}, token=stack.jwt())
    assert r.status == 200, r
    assert report(stack, old).status == 200
    r = stack.call("POST", "provision-instance", json={"subscription_id": c.sid, "rotate_token": 1},
                   token=stack.jwt())
    assert r.status == 400 and r.json["error"]["code"] == "invalid_rotate_token", r
    dokku.mark()
    r = stack.call("POST", "provision-instance",
                   json={"subscription_id": c.sid, "rotate_token": True, "wait": True},
                   token=stack.jwt())
    assert r.status == 200, r
    assert report(stack, old).status == 401
    new = mindroom_env(dokku, app, dokku.new_calls())["MINDROOM_CONTROL_PLANE_TOKEN"]
    assert TOKEN_RE.match(new) and new != old
    assert report(stack, new).status == 200
    assert len(audit(stack, "instance.token_rotated", instance_id=iid)) == 1
    # A subscription that is not entitled: refused, and its token is left alone.
    c2, inst2 = live_instance(stack, "free")
    t2 = token_of(dokku, inst2)
    stack.sql("UPDATE public.subscriptions SET status = 'incomplete' WHERE id = %s", c2.sid)
    r = stack.call("POST", "provision-instance", json={"subscription_id": c2.sid, "rotate_token": True},
                   token=stack.jwt())
    assert r.status == 409, r
    assert report(stack, t2).status == 200


def test_stopping_revokes_the_token_and_a_start_issues_a_new_one(stack, dokku):
    c, inst = live_instance(stack, "starter")
    iid, app = str(inst["id"]), inst["dokku_app_name"]
    n = names(app)
    old = token_of(dokku, inst)
    dokku.container_write(n["app"], MINDROOM_FILE, "kept")
    c.send("customer.subscription.updated", "unpaid")
    wait_status(stack, c.sid, "stopped", timeout=30)
    assert report(stack, old).status == 401
    assert stack.sql("SELECT count(*) FROM public.instance_tokens WHERE instance_id = %s", iid) == [(0,)]
    assert stack.sql("SELECT count(*) FROM public.instance_secrets WHERE instance_id = %s "
                     "AND kind = 'control_plane'", iid) == [(0,)]
    assert audit(stack, "instance.token_revoked", instance_id=iid)[0]["details"]["reason"] == "stopped"
    dokku.mark()
    c.send("customer.subscription.updated", "active")
    running(stack, c.sid)
    calls = dokku.new_calls()
    # The start applies the configuration with a new token in one go (POST /apps).
    new = mindroom_env(dokku, app, calls)["MINDROOM_CONTROL_PLANE_TOKEN"]
    assert new != old and report(stack, new).status == 200
    assert not any(x[0] in ("apps:create", "storage:create") for x in calls), calls
    assert dokku.app(n["app"], "running") == "true" and dokku.app(n["hs"], "running") == "true"
    assert dokku.container_read(n["app"], MINDROOM_FILE) == "kept"
    assert instance(stack, c.sid)["owed_action"] in (None, "email")


def test_an_instance_running_again_shows_no_health_from_before_until_it_is_checked(
        stack, dokku, health):
    """Started again (here after an unpaid stop; a health redeploy likewise), the
    instance has not been checked since it came back: my-instance says so (status and
    checked_at null), not the result of when it last ran, which would call a process
    still starting healthy (or a cured one unreachable)."""
    c, inst = live_instance(stack, "starter")
    iid = str(inst["id"])
    tok = user_jwt(stack, c.account)
    assert stack.call("GET", "check-instance-health?instance_id=%s" % iid,
                      token=stack.jwt()).status == 200
    assert stack.call("GET", "my-instance", token=tok).json["health"]["status"] == "healthy"
    c.send("customer.subscription.updated", "unpaid")
    wait_status(stack, c.sid, "stopped", timeout=30)
    c.send("customer.subscription.updated", "active")
    running(stack, c.sid)
    h = stack.call("GET", "my-instance", token=tok).json["health"]
    assert h == {"status": None, "checked_at": None, "error": None, "consecutive_failures": 0}, h
    assert stack.call("GET", "check-instance-health?instance_id=%s" % iid,
                      token=stack.jwt()).status == 200
    h = stack.call("GET", "my-instance", token=tok).json["health"]
    assert h["status"] == "healthy" and h["checked_at"], h


def test_a_user_reads_own_instance_and_usage_and_nobody_elses(stack, dokku, health):
    c, inst = live_instance(stack, "starter")
    iid = str(inst["id"])
    stack.sql("UPDATE public.subscriptions SET cancel_at_period_end = true, "
              "trial_ends_at = now() + interval '14 days' WHERE id = %s", c.sid)
    for agent in ("general", "general", "research"):
        assert report(stack, token_of(dokku, inst), {"agent": agent}).status == 200
    stack.sql("INSERT INTO public.usage_metrics (instance_id, date, messages_sent, agents_used) "
              "VALUES (%s, CURRENT_DATE - 3, 42, '{\"general\": 42}')", iid)
    health.reset()
    assert stack.call("GET", "check-instance-health?instance_id=%s" % iid, token=stack.jwt()).status == 200

    r = stack.call("GET", "my-instance", token=user_jwt(stack, c.account))
    assert r.status == 200, r
    j = r.json
    assert j["instance"]["id"] == iid and j["instance"]["status"] == "running"
    assert j["instance"]["frontend_url"] == inst["frontend_url"]
    assert j["instance"]["backend_url"] and j["instance"]["matrix_server_url"]
    assert j["plan"] == {"name": "Starter", "tier": "starter", "max_agents": 3,
                         "max_messages_per_day": 1000, "max_storage_gb": 5}
    assert j["subscription"]["cancel_at_period_end"] is True
    assert j["subscription"]["trial_ends_at"] and j["subscription"]["status"] == "active"
    today = j["usage"]["today"]
    assert (today["messages_sent"], today["agents_used"], today["remaining"]) == (
        3, {"general": 2, "research": 1}, 997), today
    days = j["usage"]["last_30_days"]
    assert len(days) == 30 and days[-1]["messages_sent"] == 3 and days[-4]["messages_sent"] == 42
    assert days[-1]["agents"] == 2
    assert j["health"]["status"] == "healthy" and j["health"]["checked_at"]
    assert j["instance"]["restart"] == {"pending": False, "held": False, "requested_at": None,
                                       "restarted_at": None}
    assert "environment_vars" not in r.text and "claimed_by" not in r.text and "mri_" not in r.text
    # The same by id; the id of someone else's instance is 404 like a made-up one.
    assert stack.call("GET", "my-instance?instance_id=%s" % iid,
                      token=user_jwt(stack, c.account)).json["instance"]["id"] == iid
    other, _ = new_account(stack)
    for who, path in ((other, "my-instance?instance_id=%s" % iid), (other, "my-instance"),
                      (c.account, "my-instance?instance_id=%s" % uuid.uuid4())):
        r = stack.call("GET", path, token=user_jwt(stack, who))
        assert r.status == 404 and r.json["error"]["code"] == "not_found", (path, r)
    r = stack.call("GET", "my-instance?instance_id=nope", token=user_jwt(stack, c.account))
    assert r.status == 400, r
    # Only a user's session: a service key has no "my", anon nothing, no token 401.
    assert stack.call("GET", "my-instance", token=stack.jwt()).status == 403
    assert stack.call("GET", "my-instance", token=stack.jwt(role="anon")).status == 403
    assert stack.call("GET", "my-instance").status == 401
    assert stack.call("DELETE", "my-instance", token=user_jwt(stack, c.account)).status == 405
    assert stack.call("GET", "my-instance/restart", token=user_jwt(stack, c.account)).status == 405
    assert stack.call("GET", "my-instance/elsewhere", token=user_jwt(stack, c.account)).status == 404


def test_a_user_whose_instance_failed_is_told_which_step_and_not_the_provisioners_text(stack, dokku):
    """A failed create: my-instance says which step failed and that it is retried;
    the provisioner's error (its address, the Dokku command) stays the operators'."""
    dokku.tell("fail", "git:from-image", times=1000, status=1)
    try:
        c = Customer(stack, "starter")
        c.send("customer.subscription.created", "active")
        # A failed create takes what a create takes: as long as running() waits for one.
        inst = wait_until(lambda: (lambda i: i if i["attempts"] >= 1 and not i["claimed_by"] else None)(
            instance(stack, c.sid)), timeout=45, what="a failed create")
        assert "git:from-image" in inst["last_error"], inst["last_error"]
        r = stack.call("GET", "my-instance", token=user_jwt(stack, c.account))
        assert r.status == 200, r
        assert r.json["instance"]["status"] == "failed"
        assert r.json["instance"]["error"] == \
            "Setting up your instance failed: it is tried again automatically.", r.json
        assert r.json["health"]["status"] == "not_checked"
        for leak in ("git:from-image", "dokku", "127.0.0.1", inst["last_error"]):
            assert leak not in r.text, (leak, r.text)
        # The provisioner's status, as a number of its own: ids and times may hold its digits.
        assert re.search(r"\b502\b", inst["last_error"]), inst["last_error"]
        assert not re.search(r"\b502\b", r.text), r.text
    finally:
        dokku.untell("fail", "git:from-image")
    # Retried once Dokku works: running, and nothing to tell any more.
    assert provision(stack, c.sid).status in (200, 202)
    running(stack, c.sid)
    r = stack.call("GET", "my-instance", token=user_jwt(stack, c.account))
    assert r.json["instance"]["status"] == "running" and r.json["instance"]["error"] is None, r.json


def test_a_user_whose_restart_fails_is_told_so_while_the_instance_runs(stack, dokku):
    """A restart that fails leaves the instance running: my-instance says the restart
    failed and is retried (instance.error) for as long as it fails, not as the
    health checks' error, and not the provisioner's text; once it is done, nothing."""
    c, inst = live_instance(stack, "starter")
    iid = str(inst["id"])
    tok = user_jwt(stack, c.account)
    dokku.tell("fail", "ps:restart", times=1000, status=1)
    try:
        r = stack.call("POST", "my-instance/restart", json={}, token=tok,
                       headers={"User-Agent": UA})
        assert r.status == 202, r
        wait_until(lambda: stack.sql("SELECT attempts >= 1 AND claimed_by IS NULL FROM public.instances "
                                     "WHERE id = %s", iid)[0][0], what="a failed restart")
        r = stack.call("GET", "my-instance", token=tok)
        assert r.status == 200, r
        assert r.json["instance"]["status"] == "running", r.json
        assert r.json["instance"]["error"] == \
            "Restarting your instance failed: it is tried again automatically.", r.json
        assert r.json["instance"]["restart"]["pending"] is True
        assert r.json["health"]["error"] is None, r.json
        last_error = stack.sql("SELECT last_error FROM public.instances WHERE id = %s", iid)[0][0]
        assert "ps:restart" in last_error, last_error  # the operators' text
        for leak in ("ps:restart", "exited", last_error):
            assert leak not in r.text, (leak, r.text)
    finally:
        dokku.untell("fail", "ps:restart")
    stack.sql("UPDATE public.instances SET next_attempt_at = now() WHERE id = %s", iid)
    wait_until(lambda: stack.sql("SELECT applied_restart_version = restart_version FROM public.instances "
                                 "WHERE id = %s", iid)[0][0], timeout=30, what="the restart done")
    r = stack.call("GET", "my-instance", token=tok)
    assert r.json["instance"]["error"] is None and r.json["health"]["error"] is None, r.json


def test_a_user_restarts_own_instance_four_times_is_too_many_others_are_404(stack, dokku):
    c, inst = live_instance(stack, "starter")
    iid, app = str(inst["id"]), inst["dokku_app_name"]
    n = names(app)
    dokku.container_write(n["app"], MINDROOM_FILE, "agents' memory")
    tok = user_jwt(stack, c.account)
    hdrs = {"User-Agent": UA, "X-Forwarded-For": "203.0.113.66"}   # spoofed: not a proxy

    # Someone else cannot restart it, nor learn that it exists.
    other, _ = new_account(stack)
    r = stack.call("POST", "my-instance/restart", json={"instance_id": iid},
                   token=user_jwt(stack, other))
    assert r.status == 404, r
    assert audit(stack, "instance.restart_requested", instance_id=iid) == []

    for k in range(1, 4):
        dokku.mark()
        r = stack.call("POST", "my-instance/restart", json={} if k != 2 else {"instance_id": iid},
                       token=tok, headers=hdrs)
        assert r.status == 202 and r.json["restart_requested"] is True, r
        assert r.json["instance"]["id"] == iid
        # The lifecycle worker carries it out: ps:restart of both apps, nothing else.
        wait_until(lambda: stack.sql("SELECT applied_restart_version FROM public.instances "
                                     "WHERE id = %s", iid)[0][0] == k, timeout=30,
                   what="restart %d done" % k)
        calls = dokku.new_calls()
        assert ["ps:restart", n["hs"]] in calls and ["ps:restart", n["app"]] in calls, calls
        assert not any(x[0] in ("apps:create", "storage:create", "apps:destroy", "config:import",
                                "git:from-image") for x in calls), calls
        assert dokku.container_read(n["app"], MINDROOM_FILE) == "agents' memory"
    r = stack.call("GET", "my-instance", token=tok)
    assert r.json["instance"]["restart"]["pending"] is False
    assert r.json["instance"]["restart"]["restarted_at"]

    # The fourth within 10 minutes: 429 with Retry-After, nothing recorded.
    r = stack.call("POST", "my-instance/restart", json={}, token=tok, headers=hdrs)
    assert r.status == 429 and r.json["error"]["code"] == "rate_limited", r
    assert 0 < int(r.headers.get("Retry-After")) <= 600
    # A dashboard in a browser (supabase-js, another origin) may read it too.
    exposed = {h.strip().lower() for h in r.headers.get("Access-Control-Expose-Headers", "").split(",")}
    assert "retry-after" in exposed, r.headers
    assert stack.sql("SELECT restart_version FROM public.instances WHERE id = %s", iid) == [(3,)]

    # Every restart has its audit row: who (the user), from where (the real peer,
    # not the spoofed X-Forwarded-For), with what; and the worker's.
    rows = audit(stack, "instance.restart_requested", instance_id=iid)
    assert len(rows) == 3, rows
    for a in rows:
        assert (a["actor_role"], str(a["actor_user_id"]), str(a["account_id"])) == (
            "authenticated", c.account, c.account)
        assert (a["ip_address"], a["user_agent"]) == ("127.0.0.1", UA), a
    assert len(audit(stack, "instance.restarted", instance_id=iid)) == 3

    # A stopped instance is not restarted (billing decides whether it runs).
    c.send("customer.subscription.updated", "unpaid")
    wait_status(stack, c.sid, "stopped", timeout=30)
    c2, inst2 = live_instance(stack, "free")
    c2.send("customer.subscription.updated", "unpaid")
    wait_status(stack, c2.sid, "stopped", timeout=30)
    r = stack.call("POST", "my-instance/restart", json={}, token=user_jwt(stack, c2.account))
    assert r.status == 409 and r.json["error"]["code"] == "not_running", r
    r = stack.call("POST", "my-instance/restart", body="[]", token=user_jwt(stack, c2.account),
                   headers={"Content-Type": "application/json"})
    assert r.status == 400, r
    assert stack.call("POST", "my-instance/restart", json={}, token=stack.jwt()).status == 403


def test_an_empty_instance_id_is_refused_never_taken_for_the_current_instance(stack, dokku):
    # A dashboard's unset variable must not restart (or show) whichever instance is
    # the user's current one: an instance_id given is a UUID, or the request is 400.
    c, inst = live_instance(stack, "starter")
    iid = str(inst["id"])
    tok = user_jwt(stack, c.account)
    for path, body in (("my-instance/restart", {"instance_id": ""}),
                       ("my-instance/restart?instance_id=", {})):
        r = stack.call("POST", path, json=body, token=tok)
        assert r.status == 400 and r.json["error"]["code"] == "invalid_instance_id", (path, body, r)
    for path in ("my-instance?instance_id=", "my-instance?instance_id"):
        r = stack.call("GET", path, token=tok)
        assert r.status == 400 and r.json["error"]["code"] == "invalid_instance_id", (path, r)
    assert stack.sql("SELECT restart_version FROM public.instances WHERE id = %s", iid) == [(0,)]
    assert audit(stack, "instance.restart_requested", instance_id=iid) == []


def test_a_null_repeated_or_doubled_instance_id_is_refused_never_read_as_none(stack, dokku):
    # null is what a dashboard's unset variable sends; an id given twice (in the
    # query, or in the query and the body) is ambiguous. Each is 400: neither the
    # current instance nor either id is restarted or shown.
    c, inst = live_instance(stack, "starter")
    iid = str(inst["id"])
    other = str(uuid.uuid4())
    tok = user_jwt(stack, c.account)
    json_h = {"Content-Type": "application/json"}
    for path, body, code in (
            ("my-instance/restart", b'{"instance_id": null}', "invalid_instance_id"),
            ("my-instance/restart", b'{"instance_id": "%s", "instance_id": "%s"}'
             % (iid.encode(), other.encode()), "invalid_body"),
            ("my-instance/restart", b'{"instance": "%s"}' % iid.encode(), "invalid_body"),
            ("my-instance/restart?instance_id=%s&instance_id=%s" % (iid, other), b"{}",
             "invalid_instance_id"),
            ("my-instance/restart?instance_id=%s" % other, b'{"instance_id": "%s"}' % iid.encode(),
             "invalid_body")):
        r = stack.call("POST", path, body=body, token=tok, headers=json_h)
        assert r.status == 400 and r.json["error"]["code"] == code, (path, body, r)
    r = stack.call("GET", "my-instance?instance_id=%s&instance_id=xyz" % iid, token=tok)
    assert r.status == 400 and r.json["error"]["code"] == "invalid_instance_id", r
    assert stack.sql("SELECT restart_version FROM public.instances WHERE id = %s", iid) == [(0,)]
    assert audit(stack, "instance.restart_requested", instance_id=iid) == []


def test_a_restart_of_an_instance_being_stopped_says_so(stack, dokku):
    # Billing asked for the stop (unpaid) and the worker is still stopping it: the
    # instance's status is still running, but the answer must not say it is.
    c, inst = live_instance(stack, "free")
    iid = str(inst["id"])
    dokku.tell("stall", "ps:stop", times=1, seconds=20)
    try:
        c.send("customer.subscription.updated", "unpaid")
        wait_until(lambda: stack.sql("SELECT status, desired_status FROM public.instances "
                                     "WHERE id = %s", iid) == [("running", "stopped")],
                   timeout=30, what="the stop asked for")
        r = stack.call("POST", "my-instance/restart", json={}, token=user_jwt(stack, c.account))
        assert r.status == 409 and r.json["error"]["code"] == "not_running", r
        assert r.json["error"]["message"].startswith("the instance is being stopped:"), r.json
        assert stack.sql("SELECT restart_version FROM public.instances WHERE id = %s", iid) == [(0,)]
    finally:
        dokku.untell("stall", "ps:stop")
    wait_status(stack, c.sid, "stopped", timeout=60)



# What my-instance's instance object may hold: nothing of the operators' (the provisioner's
# text, the lease, the target, the environment, the token).
INSTANCE_KEYS = {"id", "status", "desired_status", "owed_action", "owed_since", "subdomain",
                 "frontend_url", "backend_url", "matrix_server_url", "matrix_server_name",
                 "memory_limit_mb", "cpu_limit", "storage_gb", "created_at", "provisioned_at",
                 "deprovisioned_at", "storage_destroy_after", "restart", "error", "notice"}


def test_a_customer_is_told_what_happens_to_its_instance_and_what_to_do_in_every_state(
        stack, dokku, health):
    """A customer walked through its subscription's states: my-instance says in words
    what is happening (being created, payment failed, stopped and why, data kept until
    when) and what to do, a refused restart says it too, and nothing of the
    operators' or of another account's is in any answer."""
    _, theirs = live_instance(stack, "free")          # another account's, running
    c = Customer(stack, "starter")
    tok = user_jwt(stack, c.account)

    def mine(code):
        r = stack.call("GET", "my-instance", token=tok)
        assert r.status == 200, r
        inst = r.json["instance"]
        assert set(inst) == INSTANCE_KEYS, set(inst) ^ INSTANCE_KEYS
        assert str(theirs["id"]) not in r.text and theirs["subdomain"] not in r.text
        assert "mri_" not in r.text and "claimed_by" not in r.text
        assert (inst["notice"] or {}).get("code") == code, inst
        return r.json

    def refused(*words):
        r = stack.call("POST", "my-instance/restart", json={}, token=tok)
        assert r.status == 409 and r.json["error"]["code"] == "not_running", r
        for w in words:
            assert w in r.json["error"]["message"], (w, r.json)

    # Paid, being created: said so, and a restart is refused as such.
    dokku.tell("stall", "git:from-image", times=1, seconds=8)
    try:
        c.send("customer.subscription.created", "active")
        wait_until(lambda: stack.sql("SELECT status = 'provisioning' AND claimed_by IS NOT NULL "
                                     "FROM public.instances WHERE subscription_id = %s", c.sid)[0][0],
                   timeout=15, what="the create under way")
        j = mine("being_created")
        assert j["instance"]["status"] == "provisioning" and j["instance"]["error"] is None
        assert j["instance"]["notice"]["message"] == \
            "Your instance is being created: this takes a few minutes."
        refused("the instance is being set up:", "being created")
    finally:
        dokku.untell("stall", "git:from-image")
    inst = running(stack, c.sid)
    iid = str(inst["id"])

    # Running and paid: nothing to say; the health view is the user's own instance only.
    assert mine(None)["instance"]["status"] == "running"
    h = stack.call("GET", "check-instance-health", token=tok)
    assert h.status == 200 and [x["instance_id"] for x in h.json["results"]] == [iid], h.json

    # Payment failed (past_due): still running, and told to update the card.
    c.send("customer.subscription.updated", "past_due")
    j = mine("payment_failed")
    assert j["instance"]["status"] == "running" and j["subscription"]["status"] == "past_due"
    assert "update your payment method" in j["instance"]["notice"]["message"]

    # Cancelled at the period's end: runs until then, and says when.
    c.send("customer.subscription.updated", "active", cancel_at_period_end=True)
    j = mine("ends_at_period_end")
    end = j["subscription"]["current_period_end"][:10]
    assert j["instance"]["status"] == "running"
    assert j["instance"]["notice"]["message"] == \
        "Your subscription ends on %s (UTC): your instance runs until then." % end
    c.send("customer.subscription.updated", "active")
    assert mine(None)

    # Unpaid: stopped, why, and what brings it back; a restart says the same.
    c.send("customer.subscription.updated", "unpaid")
    wait_status(stack, c.sid, "stopped", timeout=30)
    assert "Update your payment method" in mine("unpaid")["instance"]["notice"]["message"]
    refused("the instance is stopped:", "your subscription is unpaid")
    c.send("customer.subscription.updated", "active")
    running(stack, c.sid)

    # Paused: stopped, and resuming brings it back.
    c.send("customer.subscription.updated", "paused")
    wait_status(stack, c.sid, "stopped", timeout=30)
    assert "Resume it" in mine("paused")["instance"]["notice"]["message"]
    c.send("customer.subscription.updated", "active")
    running(stack, c.sid)

    # An operator's stop: the subscription is paid, so paying is not the answer.
    r = stack.call("POST", "deprovision-instance", json={"instance_id": iid, "mode": "stop",
                                                          "wait": True}, token=stack.jwt())
    assert r.status == 200, r
    j = mine("stopped_by_operator")
    assert j["subscription"]["status"] == "active" and j["instance"]["status"] == "stopped"
    refused("the instance is stopped:", "contact support")
    assert provision(stack, c.sid, wait=True).status == 200
    running(stack, c.sid)

    # Cancelled: destroyed, the data kept until a date the customer is told.
    c.send("customer.subscription.deleted", "canceled")
    wait_status(stack, c.sid, "deprovisioned", timeout=30)
    j = mine("data_kept")
    kept = stack.sql("SELECT to_char(storage_destroy_after AT TIME ZONE 'UTC', 'YYYY-MM-DD') "
                     "FROM public.instances WHERE id = %s", iid)[0][0]
    assert "Its data is kept until %s (UTC)" % kept in j["instance"]["notice"]["message"], j
    assert j["health"]["status"] == "not_checked"
    refused("the instance is destroyed:", kept)
    h = stack.call("GET", "check-instance-health", token=tok)
    assert h.status == 200 and h.json["results"] == [], h.json
    assert stack.sql("SELECT restart_version FROM public.instances WHERE id = %s", iid) == [(0,)]


def test_a_customer_whose_first_payment_is_processing_is_told_its_instance_comes_when_it_clears(
        stack):
    """Paid by bank debit: the subscription stays incomplete and no instance exists until
    the debit clears. my-instance is still 404 not_found (clients branch on it), but says
    the payment is processing and the instance will come, so does a restart; a payment
    given up (incomplete_expired) says it did not complete; an account that never
    subscribed is told nothing more."""
    c = Customer(stack, "starter")
    tok = user_jwt(stack, c.account)
    c.send("customer.subscription.created", "incomplete")
    assert stack.sql("SELECT count(*) FROM public.instances WHERE subscription_id = %s", c.sid) == [(0,)]

    processing = {"code": "payment_processing",
                  "message": "Your first payment is still processing (a bank debit takes a few "
                             "days to clear): your instance is created as soon as it clears."}
    for r in (stack.call("GET", "my-instance", token=tok),
              stack.call("POST", "my-instance/restart", json={}, token=tok)):
        assert r.status == 404, r
        assert r.json == {"error": {"code": "not_found",
                                    "message": "you have no instance. " + processing["message"]},
                          "notice": processing}, r.json
    # Another id is still "not one of yours", with nothing about the account.
    r = stack.call("GET", "my-instance?instance_id=%s" % uuid.uuid4(), token=tok)
    assert r.status == 404 and "notice" not in r.json and "payment" not in r.text, r.json

    # The debit clears: the instance is created, and my-instance shows it.
    c.send("customer.subscription.updated", "active")
    inst = running(stack, c.sid)
    r = stack.call("GET", "my-instance", token=tok)
    assert r.status == 200 and r.json["instance"]["id"] == str(inst["id"]), r

    # Given up (another customer's debit): no instance will come; it may subscribe again.
    g = Customer(stack, "starter")
    g.send("customer.subscription.created", "incomplete")
    g.send("customer.subscription.updated", "incomplete_expired")
    r = stack.call("GET", "my-instance", token=user_jwt(stack, g.account))
    assert r.status == 404 and r.json["error"]["code"] == "not_found", r
    assert r.json["notice"] == {"code": "payment_not_completed",
                                "message": "Your first payment did not complete, so no instance "
                                           "was created: subscribe again to get one."}, r.json
    assert r.json["error"]["message"] == "you have no instance. " + r.json["notice"]["message"]

    # Never subscribed: the 404 as it always was.
    other, _ = new_account(stack)
    r = stack.call("GET", "my-instance", token=user_jwt(stack, other))
    assert r.status == 404 and r.json == {"error": {"code": "not_found",
                                                    "message": "you have no instance"}}, r.json


HEALTH_THRESHOLD = 3     # HEALTH_FAILURE_THRESHOLD's default: deploy_env leaves it


def marked_failed_by_health(stack, health, inst):
    """MindRoom's health endpoint answers 500 until the health check has counted
    HEALTH_FAILURE_THRESHOLD failures (an operator's probes, each as if a
    HEALTH_INTERVAL_S had passed since the last) and marked the instance failed;
    then it answers again, as a hung process does once it is replaced."""
    iid, sub = str(inst["id"]), inst["subdomain"]
    marked = 0
    health.set_mode(sub, "500")
    for _ in range(20):
        stack.sql("UPDATE public.instances SET health_counted_at = health_counted_at - "
                  "interval '1 day' WHERE id = %s AND status = 'running'", iid)
        r = stack.call("GET", "check-instance-health?instance_id=%s" % iid, token=stack.jwt())
        assert r.status == 200, r
        marked = r.json["marked_failed"]
        if marked:
            break
    health.set_mode(sub, "ok")
    assert marked == 1, r.json


def settled(stack, iid):
    """Running, no lease, nothing owed but maybe the email, every restart asked done."""
    def done():
        (status, claimed, owed, asked, applied), = stack.sql(
            "SELECT status, claimed_by, owed_action, restart_version, applied_restart_version "
            "FROM public.instances WHERE id = %s", iid)
        return (status == "running" and claimed is None and owed in (None, "email")
                and asked == applied)
    wait_until(done, timeout=45, interval=0.1, what="the instance running, nothing owed")


def new_processes(dokku, n, calls):
    """Each app's processes replaced exactly once by `calls` (a restart or a rebuild)."""
    for a in (n["hs"], n["app"]):
        got = [x for x in calls if x[:1] in (["ps:restart"], ["ps:rebuild"]) and x[1] == a]
        assert len(got) == 1, (a, calls)
        assert dokku.container_read(a, "/tmp/hung") is None, a     # a new container


def test_an_instance_whose_processes_hang_while_their_containers_run_is_restarted(
        stack, dokku, health):
    c, inst = live_instance(stack, "starter")
    iid, n = str(inst["id"]), names(inst["dokku_app_name"])
    dokku.container_write(n["app"], MINDROOM_FILE, "agents' memory")
    for a in (n["app"], n["hs"]):
        dokku.container_write(a, "/tmp/hung", "the process that stopped answering")
    assert dokku.app(n["app"], "running") == "true" and dokku.app(n["hs"], "running") == "true"
    dokku.mark()

    marked_failed_by_health(stack, health, inst)
    settled(stack, iid)
    calls = dokku.new_calls()
    # The redeploy's POST /apps changed nothing (the image and the configuration are
    # the same) and left both apps running as they were: the restart after it gives
    # both new processes, once each, on the same storage.
    assert any(x[:2] == ["git:from-image", n["app"]] for x in calls), calls
    new_processes(dokku, n, calls)
    assert not any(x[0] in ("apps:create", "storage:create", "apps:destroy") for x in calls), calls
    assert dokku.container_read(n["app"], MINDROOM_FILE) == "agents' memory"
    # Healthy again, and no second redeploy.
    r = stack.call("GET", "check-instance-health?instance_id=%s" % iid, token=stack.jwt())
    assert r.json["results"][0]["status"] == "healthy", r.json
    assert stack.sql("SELECT status, consecutive_failures FROM public.instances WHERE id = %s",
                     iid) == [("running", 0)]


def test_a_tenants_restart_owed_when_the_health_check_fails_the_instance_still_happens(
        stack, dokku, health):
    c, inst = live_instance(stack, "starter")
    iid, n = str(inst["id"]), names(inst["dokku_app_name"])
    for a in (n["app"], n["hs"]):
        dokku.container_write(a, "/tmp/hung", "the process that stopped answering")
    # The tenant's restart meets a Dokku that fails it: owed, retried later.
    dokku.tell("fail", "ps:restart", times=-1)
    try:
        r = stack.call("POST", "my-instance/restart", json={}, token=user_jwt(stack, c.account))
        assert r.status == 202, r
        wait_until(lambda: (stack.sql("SELECT last_error FROM public.instances WHERE id = %s",
                                      iid)[0][0] or "").find("ps:restart") >= 0,
                   timeout=30, what="the restart failed once")
        dokku.mark()
        # Meanwhile the health check marks the instance failed: the redeploy changes
        # nothing, so it is not the tenant's restart, which is still owed after it.
        back = len(audit(stack, "instance.status_changed", instance_id=iid, to="running"))
        marked_failed_by_health(stack, health, inst)
        wait_until(lambda: len(audit(stack, "instance.status_changed", instance_id=iid,
                                     to="running")) > back, timeout=45, what="redeployed")
        assert stack.sql("SELECT restart_version > applied_restart_version FROM public.instances "
                         "WHERE id = %s", iid) == [(True,)], "the restart is still owed"
    finally:
        dokku.untell("fail", "ps:restart")
    settled(stack, iid)
    # Carried out once Dokku works again: both apps have new processes.
    for a in (n["hs"], n["app"]):
        assert dokku.container_read(a, "/tmp/hung") is None, a
    assert ["ps:restart", n["app"]] in dokku.new_calls()
    assert len(audit(stack, "instance.restarted", instance_id=iid)) == 1


def test_audit_rows_record_the_real_client_behind_a_trusted_proxy_only(stack):
    """Stripe's deliveries (and any request) are recorded with the client's address:
    nginx's $remote_addr after real_ip, which believes X-Forwarded-For only from a
    configured proxy; the user agent and request id come along."""
    stripe_ip, spoofed = "3.18.12.63", "203.0.113.9"
    c1, c2 = Customer(stack, "free"), Customer(stack, "free")
    for c, source, xff in ((c1, PROXY, stripe_ip), (c2, "127.0.0.1", spoofed)):
        raw = ('{"id":"evt_%s","object":"event","type":"customer.subscription.created",'
               '"created":%d,"api_version":"2025-03-31.basil","livemode":false,"data":{"object":'
               '{"id":"%s","object":"subscription","customer":"%s","status":"active",'
               '"metadata":{"account_id":"%s"},"cancel_at_period_end":false,"items":{"object":"list",'
               '"data":[{"id":"si_x","price":{"id":"price_free","object":"price"},'
               '"current_period_end":%d}]}}}}') % (uuid.uuid4().hex, int(time.time()), c.sub,
                                                   c.customer, c.account, int(time.time()) + 86400)
        h = stack.stripe_headers(raw)
        h.update({"X-Forwarded-For": xff, "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                  "X-Request-Id": "req-" + c.sub})
        r = stack.call("POST", "handle-stripe-webhook", body=raw, headers=h, source=source)
        assert r.status == 200, r
    (a1,) = audit(stack, "subscription.created", subscription_id=c1.sid)
    (a2,) = audit(stack, "subscription.created", subscription_id=c2.sid)
    assert a1["ip_address"] == stripe_ip and a1["actor_role"] == "service_role", a1
    assert a1["user_agent"].startswith("Stripe/1.0") and a1["request_id"] == "req-" + c1.sub
    assert a2["ip_address"] == "127.0.0.1", a2          # the spoofed header is not the client
    # The worker's own rows (no request) say who but not from where.
    running(stack, c1.sid)
    rows = [a for a in audit(stack, "instance.status_changed")
            if a["details"]["subscription_id"] == c1.sid and a["details"]["to"] == "running"]
    assert rows and all(a["ip_address"] is None and a["actor_role"] == "service_role" for a in rows)


def test_a_report_with_a_raw_nul_in_a_name_is_refused_and_counts_nothing(stack, dokku):
    """A raw NUL byte (invalid JSON: control characters must be escaped) cuts a name
    short in C exactly like the \\u0000 escape the parser refuses: 400, nothing counted."""
    _, inst = live_instance(stack, "professional")
    iid, token = str(inst["id"]), token_of(dokku, inst)
    before = usage(stack, iid)
    r = stack.call("POST", "track-usage", token=token,
                   body=b'{"agent": "general\x00<not a name at all>"}',
                   headers={"Content-Type": "application/json", "User-Agent": UA})
    assert r.status == 400, r
    assert usage(stack, iid) == before


def test_a_report_sent_again_with_its_key_is_counted_once(stack, dokku):
    """An instance that got no answer cannot know whether its report was counted:
    sent again with the same Idempotency-Key it is answered as the first time, says
    so, and counts nothing. The key with another message is refused; a malformed key
    is a bad report; another key counts."""
    _, inst = live_instance(stack, "professional")
    iid, token = str(inst["id"]), token_of(dokku, inst)
    key = {"Idempotency-Key": "msg-" + uuid.uuid4().hex}
    first = report(stack, token, {"agent": "general", "tool": "search"}, headers=key)
    assert first.status == 200 and first.headers.get("Idempotent-Replayed") is None, first
    again = report(stack, token, {"agent": "general", "tool": "search"}, headers=key)
    assert again.status == 200 and again.headers.get("Idempotent-Replayed") == "true", again
    assert again.json == first.json
    assert usage(stack, iid)[0] == 1
    # The same key for another message: the instance's mistake, said, nothing counted.
    r = report(stack, token, {"agent": "research", "tool": "search"}, headers=key)
    assert r.status == 422 and r.json["error"]["code"] == "idempotency_key_reused", r
    for bad in ("", "a b", "x" * 256, "caf\u00e9".encode().decode("latin-1")):
        r = report(stack, token, {"agent": "general"}, headers={"Idempotency-Key": bad})
        assert r.status == 400 and "Idempotency-Key" in r.json["error"]["message"], (bad, r)
    assert usage(stack, iid)[0] == 1
    r = report(stack, token, {"agent": "general", "tool": "search"},
               headers={"Idempotency-Key": "msg-" + uuid.uuid4().hex})
    assert r.status == 200 and r.json["remaining"] == first.json["remaining"] - 1, r
    assert usage(stack, iid)[0] == 2


def test_a_report_refused_at_the_limit_and_sent_again_with_its_key_counts_once_the_limit_lifts(
        stack, dokku):
    """A report refused at the day's limit counted nothing. Sent again with its
    Idempotency-Key once the limit lifted (here a larger limit the same day), the
    message gets through, counted once; it is not refused again for good."""
    c, inst = live_instance(stack, "starter")
    iid, token = str(inst["id"]), token_of(dokku, inst)
    stack.sql("UPDATE public.subscriptions SET max_messages_per_day = 1 WHERE id = %s", c.sid)
    assert report(stack, token, {"agent": "general"},
                  headers={"Idempotency-Key": "msg-" + uuid.uuid4().hex}).status == 200
    key = {"Idempotency-Key": "msg-" + uuid.uuid4().hex}
    r = report(stack, token, {"agent": "general"}, headers=key)
    assert r.status == 429 and r.headers.get("Retry-After"), r
    stack.sql("UPDATE public.subscriptions SET max_messages_per_day = 5 WHERE id = %s", c.sid)
    again = report(stack, token, {"agent": "general"}, headers=key)
    assert again.status == 200 and again.headers.get("Idempotent-Replayed") is None, again
    assert again.json["remaining"] == 3, again
    assert usage(stack, iid)[0] == 2
    once_more = report(stack, token, {"agent": "general"}, headers=key)
    assert once_more.status == 200 and once_more.headers.get("Idempotent-Replayed") == "true", once_more
    assert usage(stack, iid)[0] == 2


def test_a_days_limit_resets_at_midnight_utc_whatever_the_databases_zone(pg):
    """The day an instance's messages count in, and when its limit resets, are UTC's,
    as every date the customer is told: not the database server's zone (here UTC+14,
    as a server set to its own zone, or a session given PGTZ, makes it)."""
    with mr.Stack(pg, env={"PGTZ": "Pacific/Kiritimati"},
                  functions=["track-usage", "my-instance"]) as s:
        uid, sid = str(uuid.uuid4()), str(uuid.uuid4())
        s.sql("INSERT INTO auth.users (id, aud, role, email) VALUES (%s, 'authenticated', "
              "'authenticated', %s)", uid, "utc-%s@example.com" % uid[:8])
        s.sql("INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) "
              "VALUES (%s, %s, 'price_starter', 'starter', 'active')", sid, uid)
        s.sql("UPDATE public.subscriptions SET max_messages_per_day = 2 WHERE id = %s", sid)
        iid = s.sql("INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, "
                    "status, desired_status, applied_config_version, welcome_email_sent_at) "
                    "SELECT %s, n.dokku_app_name, n.subdomain, 'running', 'running', 1, now() "
                    "FROM public.instance_names(%s) n RETURNING id::text", sid, sid)[0][0]
        key_id = uuid.uuid4().hex[:16]
        token = "mri_%s_%s" % (key_id, base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("="))
        s.sql("INSERT INTO public.instance_tokens (instance_id, key_id, token_hash) "
              "VALUES (%s, %s, %s)", iid, key_id, hashlib.sha256(token.encode()).hexdigest())

        now = datetime.now(timezone.utc)
        today = now.date()
        midnight = datetime.combine(today + timedelta(days=1), datetime.min.time(), timezone.utc)
        r = report(s, token, {"agent": "general"})
        assert r.status == 200 and r.json["remaining"] == 1, r
        assert r.json["resets_at"].endswith("+00:00"), r.json
        assert datetime.fromisoformat(r.json["resets_at"]) == midnight, r.json
        assert s.sql("SELECT date FROM public.usage_metrics WHERE instance_id = %s", iid) == [(today,)]
        assert report(s, token).status == 200
        r = report(s, token)
        assert r.status == 429 and r.json["limit"] == "messages", r
        left = (midnight - now).total_seconds()
        assert left - 60 <= int(r.headers["Retry-After"]) <= left + 1, (r.headers, left)

        j = s.call("GET", "my-instance", token=user_jwt(s, uid)).json
        t = j["usage"]["today"]
        assert (t["date"], t["messages_sent"], t["remaining"]) == (today.isoformat(), 2, 0), t
        assert datetime.fromisoformat(t["resets_at"]) == midnight, t
        assert j["usage"]["last_30_days"][-1] == {"date": today.isoformat(), "messages_sent": 2,
                                                  "agents": 1}, j["usage"]
