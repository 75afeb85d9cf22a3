"""scripts/mindroomctl against a real stack: every subcommand, and the errors an
operator meets (no .env, stack down, wrong id, wrong secret, database down).

mindroomctl runs as a subprocess with a scrubbed environment and its own .env
file written by the test (as an operator's would be), and a stack directory
(MR_RUN_DIR, as scripts/stack.sh names it) that is empty unless a test fills it, so a developer's
own .env or .run/ cannot leak in. The last test runs it against scripts/stack.sh
itself (what `make run` starts) with no configuration at all.
"""
import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import time
import uuid

import pytest

import mr
from lifecycle_helpers import (FAST_ENV, LIMITS, LINK_CUSTOMER_SQL, PRICES, WORKER, instance, new_account,
                               new_subscription, wait_until)

CTL = str(mr.ROOT / "scripts/mindroomctl")
COMMANDS = ("token", "provision", "deprovision", "health", "replay", "status",
            "failed-events", "refused-links", "disputes", "stuck", "concurrency",
            "rotate-instance-token", "target")


@pytest.fixture(scope="module")
def stack(pg, prov, resend):
    env = dict(FAST_ENV, DOKKU_PROVISIONER_URL=prov.url, DOKKU_PROVISIONER_TOKEN=prov.token,
               RESEND_BASE_URL=resend.url, RESEND_API_KEY=resend.token,
               MINDROOM_BASE_DOMAIN="mindroom.test", HEALTH_ALLOW_LOOPBACK="1",
               HEALTH_TIMEOUT_MS="1000",
               # A deploy may take a few seconds here (--wait's progress is watched).
               MR_PROVISION_TIMEOUT_MS="6000", MR_LIFECYCLE_LEASE_S="12")
    funcs = ["handle-stripe-webhook", "provision-instance", "deprovision-instance",
             "check-instance-health", WORKER]
    with mr.Stack(pg, env=env, functions=funcs) as s:
        yield s


@pytest.fixture
def envfile(stack, tmp_path):
    """An operator's .env for this stack: the functions' own values, and where
    nginx serves them."""
    f = tmp_path / "ops.env"
    keys = ("SUPABASE_JWT_SECRET", "STRIPE_WEBHOOK_SECRET", "DATABASE_URL")
    f.write_text("".join("%s='%s'\n" % (k, stack.env[k]) for k in keys) +
                 "FUNCTIONS_URL='%s/functions/v1'\n" % stack.base_url)
    return f


def ctl(*args, env=None, stack_dir=None, timeout=60, stdout=subprocess.PIPE, input=None,
        preexec_fn=None):
    """Runs mindroomctl; returns CompletedProcess (text). Only PATH and HOME are
    inherited; env adds variables as an exported shell would. stdin is input, else
    empty."""
    e = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    e["MR_RUN_DIR"] = str(stack_dir or "/nonexistent-mindroomctl-stack")
    e["MR_ENV_FILE"] = "/nonexistent-mindroomctl.env"
    e.update(env or {})
    return subprocess.run([CTL] + [str(a) for a in args], env=e,
                          stdin=subprocess.DEVNULL if input is None else None, input=input,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def ctl_to_a_gone_reader(*args, ignore_sigpipe=False, **kw):
    """ctl with stdout a pipe whose reader is already gone (`mindroomctl ... | head -1`
    once head has what it wanted): every write is refused. With SIGPIPE at its
    default the writer dies of it; ignored (ignore_sigpipe), the writer is told
    "Broken pipe"."""
    r, w = os.pipe()
    os.close(r)
    pre = (lambda: signal.signal(signal.SIGPIPE, signal.SIG_IGN)) if ignore_sigpipe else None
    try:
        return ctl(*args, stdout=w, preexec_fn=pre, **kw)
    finally:
        os.close(w)


def ok(p):
    assert p.returncode == 0, "exit %d\nstdout: %s\nstderr: %s" % (p.returncode, p.stdout, p.stderr)
    return p.stdout


def fails(p, code, *needles):
    assert p.returncode == code, "exit %d (wanted %d)\nstdout: %s\nstderr: %s" % (
        p.returncode, code, p.stdout, p.stderr)
    for n in needles:
        assert n in p.stderr, "%r not in stderr: %s" % (n, p.stderr)
    return p.stderr


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def sub_event(account, customer, sub, status="active", tier="starter", created=None,
              type_="customer.subscription.created", price=None):
    t = int(time.time()) if created is None else created
    obj = {"id": sub, "object": "subscription", "customer": customer, "status": status,
           "metadata": {"account_id": account} if account else {}, "cancel_at_period_end": False,
           "items": {"object": "list", "data": [{
               "id": "si_" + uuid.uuid4().hex[:10],
               "price": {"id": price or PRICES[tier], "object": "price"},
               "current_period_end": t + 30 * 86400}]}}
    return {"id": "evt_" + uuid.uuid4().hex, "object": "event", "type": type_, "created": t,
            "api_version": "2025-03-31.basil", "livemode": False, "data": {"object": obj}}


def write_event(tmp_path, ev):
    f = tmp_path / ("%s.json" % ev["id"])
    f.write_bytes(json.dumps(ev, indent=2).encode())   # Stripe's bytes are pretty-printed too
    return f


def customer_running(stack, prov, envfile, tmp_path, tier="starter"):
    """A new account whose subscription.created (replayed by mindroomctl) ends running."""
    customer = "cus_" + uuid.uuid4().hex[:12]
    account, email = new_account(stack, customer)
    ev = sub_event(account, customer, "sub_" + uuid.uuid4().hex[:12], tier=tier)
    out = ok(ctl("--env", envfile, "replay", write_event(tmp_path, ev)))
    assert json.loads(out) == {"received": True}
    sid = stack.sql("SELECT id::text FROM public.subscriptions WHERE stripe_subscription_id = %s",
                    ev["data"]["object"]["id"])[0][0]
    inst = wait_until(lambda: (lambda i: i if i["status"] == "running" and not i["claimed_by"] else None)(
        instance(stack, sid)), timeout=10, what="running")
    return account, email, sid, inst


# ---- help ---------------------------------------------------------------------

def test_help_lists_every_command_and_each_has_its_own():
    top = ok(ctl("--help"))
    for c in COMMANDS:
        assert "\n  %s" % c in top, c
    for c in COMMANDS:
        out = ok(ctl(c, "--help"))
        assert out.startswith("usage: mindroomctl %s" % c), out
    p = ctl()
    assert p.returncode == 2 and "usage: mindroomctl" in p.stderr
    fails(ctl("frobnicate"), 2, "unknown command: frobnicate")


def test_deprovision_and_purge_take_one_target_only():
    """Two targets (or one named twice) are refused before anything is sent: the
    last must not silently win, a purge cannot be undone."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    for cmd in (("purge", "--instance", a, "--subscription", b),
                ("purge", "--instance", a, "--instance", b),
                ("deprovision", "--mode", "destroy", "--subscription", a, "--instance", b)):
        fails(ctl(*cmd), 2, "give one --instance ID or --subscription ID")


def test_version_is_the_builds():
    want = subprocess.run([str(mr.ROOT / "scripts/version.sh")], stdout=subprocess.PIPE,
                          text=True, check=True).stdout.strip()
    assert ok(ctl("version")) == "mindroomctl %s\n" % want
    assert ok(ctl("--version")) == "mindroomctl %s\n" % want


# ---- token ----------------------------------------------------------------------

def test_token_is_accepted_by_the_stack_and_carries_the_claims(stack, envfile):
    tok = ok(ctl("--env", envfile, "token")).strip()
    r = stack.call("GET", "check-instance-health", token=tok)
    assert r.status == 200, r
    uid = str(uuid.uuid4())
    tok = ok(ctl("--env", envfile, "token", "--role", "authenticated", "--sub", uid, "--exp", "60")).strip()
    h, p, s = tok.split(".")
    want = hmac.new(stack.env["SUPABASE_JWT_SECRET"].encode(), (h + "." + p).encode(),
                    hashlib.sha256).digest()
    assert hmac.compare_digest(b64d(s), want)
    claims = json.loads(b64d(p))
    assert claims["role"] == "authenticated" and claims["sub"] == uid
    assert 55 <= claims["exp"] - int(time.time()) <= 61
    fails(ctl("--env", envfile, "token", "--sub", "nope"), 2, "--sub takes a user uuid")
    fails(ctl("--env", envfile, "token", "--exp", "-5"), 2, "--exp takes a number")


def test_environment_wins_over_env_file_which_wins_over_stack_secrets(stack, envfile, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "secrets.env").write_text("SUPABASE_JWT_SECRET=%s\n" % ("s" * 40))
    # Only the stack's generated secrets: they are used.
    tok = ok(ctl("token", stack_dir=run)).strip()
    h, p, s = tok.split(".")
    assert hmac.compare_digest(b64d(s), hmac.new(b"s" * 40, (h + "." + p).encode(), hashlib.sha256).digest())
    # .env overrides them: the stack accepts the token.
    tok = ok(ctl("--env", envfile, "token", stack_dir=run)).strip()
    assert stack.call("GET", "check-instance-health", token=tok).status == 200
    # An exported variable overrides .env: the stack refuses the token.
    tok = ok(ctl("--env", envfile, "token", stack_dir=run,
                 env={"SUPABASE_JWT_SECRET": "e" * 40})).strip()
    assert stack.call("GET", "check-instance-health", token=tok).status == 401


# ---- replay, status, provision, deprovision, health ---------------------------------

def test_replay_status_and_a_duplicate(stack, prov, envfile, tmp_path):
    account, email, sid, inst = customer_running(stack, prov, envfile, tmp_path, "professional")
    assert len([c for c in prov.create_calls() if c.json["app"] == inst["dokku_app_name"]]) == 1
    out = ok(ctl("--env", envfile, "status"))
    line = next(l for l in out.splitlines() if email in l)
    for want in ("professional", "active", "running", inst["frontend_url"], inst["dokku_app_name"], sid):
        assert want in line, (want, line)
    # Replaying the very same file again is a duplicate: nothing changes.
    f = sorted(tmp_path.glob("evt_*.json"))[-1]
    out = ok(ctl("--env", envfile, "replay", f))
    assert json.loads(out) == {"received": True, "duplicate": True}
    assert len([c for c in prov.create_calls() if c.json["app"] == inst["dokku_app_name"]]) == 1


def test_replay_with_the_wrong_secret_is_refused_and_writes_nothing(stack, envfile, tmp_path):
    account, _ = new_account(stack)
    ev = sub_event(account, "cus_x" + uuid.uuid4().hex[:8], "sub_x" + uuid.uuid4().hex[:8])
    p = ctl("--env", envfile, "replay", write_event(tmp_path, ev),
            env={"STRIPE_WEBHOOK_SECRET": "whsec_" + "0" * 48})
    # Explained as the 401 is: the setting to check, once, on one line.
    err = fails(p, 1, "handle-stripe-webhook refused the signature (400 invalid_signature)",
                "STRIPE_WEBHOOK_SECRET")
    assert err.count("STRIPE_WEBHOOK_SECRET") == 1 and "answered HTTP 400" not in err, err
    assert stack.sql("SELECT count(*) FROM public.stripe_events WHERE id = %s", ev["id"]) == [(0,)]


def test_deprovision_stop_then_provision_resumes_then_destroy(stack, prov, envfile, tmp_path):
    _, _, sid, inst = customer_running(stack, prov, envfile, tmp_path)
    app = inst["dokku_app_name"]
    out = json.loads(ok(ctl("--env", envfile, "deprovision", "--subscription", sid, "--mode", "stop", "--wait")))
    assert instance(stack, sid)["status"] == "stopped", out
    assert prov.recorded("POST", "/apps/%s/stop" % app)
    out = ok(ctl("--env", envfile, "provision", sid, "--wait"))
    i = instance(stack, sid)
    assert i["status"] == "running" and i["dokku_app_name"] == app, out
    # Destroy by instance id; a second time is a no-op success.
    ok(ctl("--env", envfile, "deprovision", "--instance", inst["id"], "--mode", "destroy", "--wait"))
    i = instance(stack, sid)
    assert i["status"] == "deprovisioned" and i["deprovisioned_at"] is not None
    assert app not in prov.apps
    ok(ctl("--env", envfile, "deprovision", "--instance", inst["id"], "--mode", "destroy", "--wait"))
    assert instance(stack, sid)["status"] == "deprovisioned"


def test_an_operators_stop_holds_through_billing_until_provision(stack, prov, envfile, tmp_path):
    # An operator stops an instance (to move its storage, or to suspend it): the
    # monthly renewal and a plan change go through the webhook, and the worker
    # leaves it stopped; only the operator's provision starts it, at its new size.
    customer = "cus_" + uuid.uuid4().hex[:12]
    account, email = new_account(stack, customer)
    sub = "sub_" + uuid.uuid4().hex[:12]
    t = int(time.time()) - 100
    ok(ctl("--env", envfile, "replay", write_event(tmp_path, sub_event(account, customer, sub, created=t))))
    sid = stack.sql("SELECT id::text FROM public.subscriptions WHERE stripe_subscription_id = %s", sub)[0][0]
    inst = wait_until(lambda: (lambda i: i if i["status"] == "running" and not i["claimed_by"] else None)(
        instance(stack, sid)), timeout=10, what="running")
    app, iid = inst["dokku_app_name"], str(inst["id"])
    p = ctl("--env", envfile, "deprovision", "--instance", iid, "--mode", "stop", "--wait")
    assert json.loads(ok(p))["instance"]["status"] == "stopped"
    assert "stopped by an operator until provision" in p.stderr, p.stderr
    assert prov.apps[app]["state"] == "stopped"
    line = next(l for l in ok(ctl("--env", envfile, "status")).splitlines() if email in l)
    assert " operator " in line, line

    n = len(prov.requests)
    renewal = sub_event(account, customer, sub, created=t + 1, type_="customer.subscription.updated")
    upgrade = sub_event(account, customer, sub, created=t + 2, tier="professional",
                        type_="customer.subscription.updated")
    for ev in (renewal, upgrade):
        assert json.loads(ok(ctl("--env", envfile, "replay", write_event(tmp_path, ev)))) == {"received": True}
        assert stack.sql("SELECT status FROM public.stripe_events WHERE id = %s", ev["id"]) == [("processed",)]
    s = stack.sql("SELECT tier::text, status::text FROM public.subscriptions WHERE id = %s", sid)
    assert s == [("professional", "active")]
    time.sleep(1.5)   # the webhook's commit woke the worker: whatever it was given is done
    i = instance(stack, sid)
    assert (i["status"], i["desired_status"], i["owed_action"]) == ("stopped", "stopped", None), i
    assert i["memory_limit_mb"] == LIMITS["professional"][0]
    assert prov.apps[app]["state"] == "stopped"
    assert not [r for r in prov.requests[n:] if app in r.path or app in str(r.body)], \
        prov.requests[n:]

    # The operator's provision ends the hold: running, sized for the plan paid for.
    ok(ctl("--env", envfile, "provision", sid, "--wait"))
    i = instance(stack, sid)
    assert i["status"] == "running", i
    assert stack.sql("SELECT operator_stopped_at FROM public.instances WHERE id = %s", iid) == [(None,)]
    assert prov.apps[app]["state"] == "running" and prov.apps[app]["memory_mb"] == LIMITS["professional"][0]
    line = next(l for l in ok(ctl("--env", envfile, "status")).splitlines() if email in l)
    assert " operator " not in line, line

    # Stopped by an operator again, then cancelled: billing that ends it still destroys it.
    ok(ctl("--env", envfile, "deprovision", "--subscription", sid, "--mode", "stop", "--wait"))
    ok(ctl("--env", envfile, "replay", write_event(tmp_path, sub_event(
        account, customer, sub, status="canceled", tier="professional", created=t + 3,
        type_="customer.subscription.deleted"))))
    wait_until(lambda: instance(stack, sid)["status"] == "deprovisioned", timeout=10, what="destroyed")
    assert app not in prov.apps


def test_wait_shows_the_state_changes_as_they_happen(stack, prov, envfile):
    # A deploy that takes a while: the operator sees the instance being worked on,
    # then running, instead of a silent wait.
    sid = new_subscription(stack, "starter")
    # Long enough for a few of mindroomctl's polls (one a second) on a loaded machine,
    # after the worker's own steps before the deploy (the homeserver's keys).
    prov.next(("slow", 3.0))
    p = ctl("--env", envfile, "provision", sid, "--wait", timeout=60)
    out = json.loads(ok(p))
    assert out["instance"]["status"] == "running", out
    iid = str(instance(stack, sid)["id"])
    lines = [l for l in p.stderr.splitlines() if " instance " in l]
    assert len(lines) >= 2, p.stderr
    assert any("owed create, a worker is on it" in l for l in lines), p.stderr
    assert lines[-1].endswith("instance %s: running" % iid), p.stderr
    for l in lines:   # "HH:MM:SS instance <id>: <status>...", each a change
        assert l[2] == ":" and l[5] == ":" and iid in l, l
    assert len(set(l[9:] for l in lines)) == len(lines), p.stderr
    # Without a database to ask, it says so instead of showing nothing.
    sid2 = new_subscription(stack, "starter")
    p = ctl("--env", envfile, "provision", sid2, "--wait", env={"DATABASE_URL": ""}, timeout=60)
    ok(p)
    assert "no progress shown" in p.stderr


def test_health_of_one_instance_records_the_probe(stack, prov, health_standin, envfile, tmp_path):
    _, _, sid, inst = customer_running(stack, prov, envfile, tmp_path)
    key = "ctl" + uuid.uuid4().hex[:8]
    # Both components answer from the health stand-in; MindRoom's is the one failing.
    stack.sql("UPDATE public.instances SET backend_url = %s, matrix_server_url = %s WHERE id = %s",
              health_standin.url(key), health_standin.url(key + "-hs", "ok"), inst["id"])
    health_standin.set_mode(key, "500")
    out = json.loads(ok(ctl("--env", envfile, "health", inst["id"])))
    assert health_standin.hits(key) == 1
    (status, failures) = stack.sql("SELECT health_status, consecutive_failures FROM public.instances "
                                   "WHERE id = %s", inst["id"])[0]
    assert status and status.startswith("unhealthy"), (status, out)
    assert inst["id"] in json.dumps(out) and out["counted"] is True
    assert failures == 1                                  # an operator's probe counts
    health_standin.set_mode(key, "ok")
    ok(ctl("--env", envfile, "health", inst["id"]))
    assert stack.sql("SELECT health_status, consecutive_failures FROM public.instances WHERE id = %s",
                     inst["id"]) == [("healthy", 0)]
    # Probing is all it does: the sweep and its switch are gone.
    fails(ctl("--env", envfile, "health", "--no-sweep"), 2, "health: unknown option --no-sweep")


# ---- failed-events and stuck ----------------------------------------------------------

def test_failed_events_lists_unknown_price_and_deferred_account(stack, envfile, tmp_path):
    customer = "cus_p" + uuid.uuid4().hex[:8]
    account, _ = new_account(stack, customer)
    bad_price = sub_event(account, customer, "sub_p" + uuid.uuid4().hex[:8],
                          price="price_does_not_exist")
    out = json.loads(ok(ctl("--env", envfile, "replay", write_event(tmp_path, bad_price))))
    assert out["received"] is True and "failed" in out
    nobody = sub_event(None, "cus_n" + uuid.uuid4().hex[:8], "sub_n" + uuid.uuid4().hex[:8])
    fails(ctl("--env", envfile, "replay", write_event(tmp_path, nobody)), 1,
          "handle-stripe-webhook answered HTTP 503")
    out = ok(ctl("--env", envfile, "failed-events"))
    lines = out.splitlines()
    bp = next(l for l in lines if bad_price["id"] in l)
    assert "failed" in bp and "price" in bp, bp
    nb = next(l for l in lines if nobody["id"] in l)
    assert "deferred" in nb, nb
    out = ok(ctl("--env", envfile, "failed-events", "--limit", "1"))
    assert "(1 row)" in out
    fails(ctl("--env", envfile, "failed-events", "--limit", "x"), 2, "--limit takes a number")


def test_refused_links_counts_and_lists_forged_claims(stack, envfile, tmp_path):
    def totals():
        out = ok(ctl("--env", envfile, "refused-links")).splitlines()
        return [int(x) for x in out[2].split("|")]     # last hour, day, week, total
    before = totals()
    victim, _ = new_account(stack)
    forged = sub_event(victim, "cus_f" + uuid.uuid4().hex[:8], "sub_f" + uuid.uuid4().hex[:8])
    out = json.loads(ok(ctl("--env", envfile, "replay", write_event(tmp_path, forged))))
    assert out == {"received": True,
                   "refused": "account link refused: the account it names has no Stripe customer of ours"}
    assert totals() == [n + 1 for n in before]
    line = next(l for l in ok(ctl("--env", envfile, "refused-links")).splitlines() if forged["id"] in l)
    assert forged["data"]["object"]["customer"] in line and victim in line, line
    fails(ctl("--env", envfile, "refused-links", "--limit", "x"), 2, "--limit takes a number")


def test_disputes_lists_the_open_ones_first_by_when_their_evidence_is_due(stack, envfile, tmp_path):
    def dispute(dp, type_, status, due):
        ev = json.loads((mr.ROOT / "tests/fixtures/stripe_charge_dispute_created.json").read_text())
        ev["id"] = "evt_" + uuid.uuid4().hex
        ev["type"] = type_
        o = ev["data"]["object"]
        o.update(id=dp, status=status, charge="ch_" + dp)
        o["evidence_details"]["due_by"] = due
        assert json.loads(ok(ctl("--env", envfile, "replay", write_event(tmp_path, ev)))) == {
            "received": True}
    tag = uuid.uuid4().hex[:8]
    late, soon, closed = ("dp_%s_%s" % (w, tag) for w in ("late", "soon", "closed"))
    now = int(time.time())
    dispute(late, "charge.dispute.created", "needs_response", now + 20 * 86400)
    # Closed, and its closing delivered before its opening (Stripe promises no order).
    dispute(closed, "charge.dispute.closed", "lost", now + 1 * 86400)
    dispute(closed, "charge.dispute.created", "needs_response", now + 1 * 86400)
    dispute(soon, "charge.dispute.created", "warning_needs_response", now + 5 * 86400)
    out = ok(ctl("--env", envfile, "disputes"))
    rows = [[c.strip() for c in l.split("|")] for l in out.splitlines() if tag in l]
    assert [r[0] for r in rows] == [soon, late, closed], out
    assert [r[1:3] for r in rows] == [["f", "warning_needs_response"], ["f", "needs_response"],
                                      ["t", "lost"]], out
    assert rows[0][4:8] == ["ch_" + soon, "2000", "usd", "fraudulent"], rows[0]
    fails(ctl("--env", envfile, "disputes", "--limit", "x"), 2, "--limit takes a number")


def stuck_line(envfile, iid):
    """The line of `mindroomctl stuck` naming instance iid, or None; and the whole output."""
    out = ok(ctl("--env", envfile, "stuck"))
    return next((l for l in out.splitlines() if iid in l), None), out


def test_stuck_lists_failing_held_and_long_owed_work_until_it_is_done(stack, prov, envfile, tmp_path):
    # A resume the provisioner keeps failing: listed with its error while the worker
    # retries it by itself, gone once the provisioner is back and the worker is done.
    _, _, sid, inst = customer_running(stack, prov, envfile, tmp_path)
    ok(ctl("--env", envfile, "deprovision", "--subscription", sid, "--mode", "stop", "--wait"))
    # And owed work a dead worker's lease has held for ten minutes. The update goes
    # around the triggers so that the row can say how long it has been owed.
    _, _, sid2, inst2 = customer_running(stack, prov, envfile, tmp_path)
    stack.sql("SET session_replication_role = replica; "
              "UPDATE public.instances SET status = 'provisioning', owed_action = 'create', "
              "owed_since = now() - interval '10 minutes', owed_due_at = now() + interval '9 minutes', "
              "claimed_by = 'dead-worker', claim_action = 'create', "
              "claim_expires_at = now() + interval '9 minutes' WHERE id = %s; "
              "RESET session_replication_role", inst2["id"])
    prov.behave("fail")
    try:
        assert json.loads(ok(ctl("--env", envfile, "provision", sid)))["instance"]["owed_action"] == "start"
        wait_until(lambda: (instance(stack, sid)["last_error"] or "").find("500") >= 0,
                   timeout=10, what="a failed resume")
        line, out = stuck_line(envfile, inst["id"])
        assert line and "500" in line and (" create " in line or " start " in line), out
        long_owed, _ = stuck_line(envfile, inst2["id"])
        assert long_owed and " create " in long_owed and " busy " in long_owed, out
        assert "00:10:" in long_owed, long_owed                # owed for ten minutes
        # Longest owed first.
        assert out.index(inst2["id"]) < out.index(inst["id"]), out
    finally:
        prov.behave("ok")
    wait_until(lambda: (lambda i: i["status"] == "running" and not i["claimed_by"])(instance(stack, sid)),
               timeout=15, what="the worker's retry")
    assert stuck_line(envfile, inst["id"])[0] is None
    # The dead worker's lease runs out: the work is due, a worker is woken and does it.
    stack.sql("UPDATE public.instances SET claim_expires_at = now() - interval '1 second' "
              "WHERE id = %s", inst2["id"])
    wait_until(lambda: (lambda i: i["status"] == "running" and not i["claimed_by"])(instance(stack, sid2)),
               timeout=10, what="the expired lease's work")
    assert stuck_line(envfile, inst2["id"])[0] is None


def test_stuck_lists_a_step_held_for_an_operator_until_asked_again(stack, prov, envfile):
    sid = new_subscription(stack, "starter")
    prov.next("reject")
    fails(ctl("--env", envfile, "provision", sid, "--wait"), 1, "provision-instance answered HTTP 502")
    iid = str(instance(stack, sid)["id"])
    line, out = stuck_line(envfile, iid)
    assert line and " failed " in line and " held " in line and "rejected: " in line, out
    # Nobody retries it blindly; an operator's request does, at once.
    time.sleep(1.5)
    assert " held " in stuck_line(envfile, iid)[0]
    assert len([c for c in prov.create_calls() if c.json["app"] == instance(stack, sid)["dokku_app_name"]]) == 1
    ok(ctl("--env", envfile, "provision", sid, "--wait"))
    assert instance(stack, sid)["status"] == "running"
    assert stuck_line(envfile, iid)[0] is None


def test_stuck_lists_a_destroyed_instances_held_purge_not_its_kept_data(stack, prov, envfile, tmp_path):
    # A destroyed instance's data, kept for its retention, is owed nothing an operator
    # must see; a purge of it the provisioner rejected is held for one, and listed.
    _, _, sid, inst = customer_running(stack, prov, envfile, tmp_path)
    iid = str(inst["id"])
    ok(ctl("--env", envfile, "deprovision", "--instance", iid, "--mode", "destroy", "--wait"))
    assert instance(stack, sid)["owed_action"] == "destroy_storage"
    assert stuck_line(envfile, iid)[0] is None
    prov.next("reject")
    fails(ctl("--env", envfile, "purge", "--instance", iid, "--wait"), 1,
          "deprovision-instance answered HTTP 502")
    line, out = stuck_line(envfile, iid)
    assert line and " deprovisioned " in line and " destroy_storage " in line, out
    assert " held " in line and "rejected: " in line, out
    ok(ctl("--env", envfile, "purge", "--instance", iid, "--wait"))
    assert stack.sql("SELECT storage_destroyed_at IS NOT NULL FROM public.instances WHERE id = %s",
                     iid) == [(True,)]
    assert stuck_line(envfile, iid)[0] is None


def test_stuck_lists_a_running_instance_whose_last_health_check_failed(stack, prov, envfile, tmp_path):
    # What the documented alert on failing checks sends the operator to: the instance
    # and what failed, for as long as its last check failed.
    _, _, sid, inst = customer_running(stack, prov, envfile, tmp_path)

    def record(ok_, status, error=None):
        stack.sql("SELECT * FROM public.health_record(%s::jsonb, 3, true, NULL, 60)", json.dumps(
            [{"instance_id": str(inst["id"]), "ok": ok_, "health_status": status, "error": error}]))
    record(False, "unhealthy: HTTP 500", "HTTP 500 from /api/health")
    line, out = stuck_line(envfile, str(inst["id"]))
    assert line and " running " in line and "HTTP 500 from /api/health" in line, out
    record(True, "healthy")
    assert stuck_line(envfile, str(inst["id"]))[0] is None


def concurrency(envfile, *args):
    """max_in_flight and in_flight as `mindroomctl concurrency` prints them."""
    out = ok(ctl("--env", envfile, "concurrency", *args))
    line = next(l for l in out.splitlines() if l.strip().startswith("global"))
    fields = [f.strip() for f in line.split("|")]
    return int(fields[1]), int(fields[2])


def test_stuck_lists_a_deleted_accounts_subscription_stripe_still_charges(stack, envfile):
    # This stack's worker has no STRIPE_SECRET_KEY: the cancellation stays owed.
    acc, _ = new_account(stack, "cus_d" + uuid.uuid4().hex[:8])
    sub = "sub_d" + uuid.uuid4().hex[:20]
    stack.sql("INSERT INTO public.subscriptions (account_id, stripe_subscription_id, stripe_price_id, "
              "tier, status) VALUES (%s, %s, 'price_starter', 'starter', 'active')", acc, sub)
    customer = stack.sql("SELECT stripe_customer_id FROM public.accounts WHERE id = %s", acc)[0][0]
    stack.sql("DELETE FROM auth.users WHERE id = %s", acc)
    out = ok(ctl("--env", envfile, "stuck"))
    assert sub not in out and "Stripe subscriptions" not in out, out   # just deleted
    stack.sql("UPDATE public.stripe_cancellations SET created_at = now() - interval '10 minutes' "
              "WHERE stripe_subscription_id = %s", sub)
    out = ok(ctl("--env", envfile, "stuck"))
    assert "Stripe subscriptions of deleted accounts not cancelled yet" in out, out
    line = next((l for l in out.splitlines() if sub in l), None)
    assert line and customer in line and acc in line and "00:10:" in line, out
    # Done (a worker with a key cancelled it): no longer listed.
    stack.sql("SELECT public.stripe_cancellation_finish(%s, 'cancelled', NULL, 1, 1)", sub)
    out = ok(ctl("--env", envfile, "stuck"))
    assert sub not in out, out


def test_a_wait_that_ends_with_the_work_still_owed_exits_1(stack, prov, envfile):
    # --wait answers only when done: the function's own wait (MR_PROVISION_WAIT_MS,
    # 8 s here) running out with the step still owed is not success.
    try:
        assert concurrency(envfile, "0") == (0, 0)
        sid = new_subscription(stack, "starter")
        t0 = time.monotonic()
        p = ctl("--env", envfile, "provision", sid, "--wait", timeout=60)
        assert time.monotonic() - t0 >= 8.0
        fails(p, 1, "provision-instance waited and the work is still owed", "mindroomctl stuck")
        answer = json.loads(p.stdout)
        assert answer["instance"]["status"] == "provisioning", answer
        assert answer["instance"]["owed_action"] == "create", answer
    finally:
        stack.sql("UPDATE public.lifecycle_limits SET max_in_flight = 8 WHERE scope = 'global'")
        stack.sql("SELECT public.lifecycle_wake()")
    wait_until(lambda: instance(stack, sid)["status"] == "running", timeout=15, what="running")
    # Without --wait, a 202 is the request recorded: success.
    iid = str(instance(stack, sid)["id"])
    r = json.loads(ok(ctl("--env", envfile, "deprovision", "--instance", iid, "--mode", "stop")))
    assert r["instance"]["owed_action"] == "stop", r


def test_concurrency_shows_sets_and_a_raised_limit_is_used_at_once(stack, prov, envfile):
    assert concurrency(envfile)[0] == 8
    try:
        # 0: nothing new is claimed; the request is recorded and stays owed.
        assert concurrency(envfile, "0") == (0, 0)
        assert stack.sql("SELECT max_in_flight FROM public.lifecycle_limits "
                         "WHERE scope = 'global'") == [(0,)]
        sid = new_subscription(stack, "starter")
        r = json.loads(ok(ctl("--env", envfile, "provision", sid)))
        assert r["instance"]["owed_action"] == "create"
        time.sleep(1.0)
        i = instance(stack, sid)
        assert i["status"] == "provisioning" and i["claimed_by"] is None
        assert not [c for c in prov.create_calls() if c.json["app"] == i["dokku_app_name"]]
        # Raised: the workers are woken at once (they would otherwise look again at
        # their next periodic job's turn, up to 15 s later).
        t0 = time.monotonic()
        assert concurrency(envfile, "3")[0] == 3
        wait_until(lambda: instance(stack, sid)["status"] == "running", timeout=10, what="claimed")
        assert time.monotonic() - t0 < 3.0
    finally:
        stack.sql("UPDATE public.lifecycle_limits SET max_in_flight = 8 WHERE scope = 'global'")
    for bad in ("-1", "10001", "x", "1.5"):
        fails(ctl("--env", envfile, "concurrency", bad), 2, "concurrency:")
    fails(ctl("--env", envfile, "concurrency", "1", "2"), 2, "one N only")


# ---- errors an operator meets ---------------------------------------------------------

def test_missing_env_file_is_explained(tmp_path):
    fails(ctl("--env", tmp_path / "nope.env", "status"), 2, "no such env file")
    # No .env anywhere and no local stack: the variable, and where it was looked for.
    p = ctl("token", env={"HOME": str(tmp_path)})
    fails(p, 2, "SUPABASE_JWT_SECRET is required", ".env", "make run")
    fails(ctl("replay", "/etc/hostname"), 2, "STRIPE_WEBHOOK_SECRET is required")
    fails(ctl("status"), 2, "DATABASE_URL is required")


def test_unreachable_stack_is_explained(envfile):
    closed = mr.free_port()
    p = ctl("--env", envfile, "provision", str(uuid.uuid4()),
            env={"FUNCTIONS_URL": "http://127.0.0.1:%d/functions/v1" % closed})
    fails(p, 1, "cannot reach the stack at http://127.0.0.1:%d" % closed)


def test_a_function_that_is_down_is_told_from_one_that_answered(stack, envfile):
    # The provisioner's refusal (the function's own 502) was checked above; here
    # nginx answers 502 because nothing listens on the function's socket.
    stack.stop_function("deprovision-instance")
    try:
        fails(ctl("--env", envfile, "deprovision", "--instance", str(uuid.uuid4())), 1,
              "nginx answered 502: the deprovision-instance function is not running")
    finally:
        stack.start_function("deprovision-instance")


def test_database_down_or_wrong_is_explained(envfile, stack):
    p = ctl("--env", envfile, "status", env={"DATABASE_URL": "host=127.0.0.1 port=%d dbname=x" % mr.free_port()})
    fails(p, 1, "cannot reach the database at DATABASE_URL", "Connection refused")


def test_a_reader_that_stops_reading_is_no_error(stack, envfile):
    """`mindroomctl target list | head -1`: the reader has what it wanted and closed
    the pipe. That is no failure of the command and no sign of a database down:
    it stops, silent, exit 0."""
    for args in (("target", "list"), ("status",), ("concurrency",)):
        p = ctl_to_a_gone_reader("--env", envfile, *args)
        assert p.returncode == 0 and p.stderr == "", (args, p.returncode, p.stderr)
    p = subprocess.run(["bash", "-o", "pipefail", "-c", '"$0" --env "$1" target list | head -1',
                        CTL, str(envfile)], env=dict(os.environ, MR_RUN_DIR="/nonexistent-mindroomctl-stack",
                                                     MR_ENV_FILE="/nonexistent-mindroomctl.env"),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "" and "name" in p.stdout, p


def test_a_reader_that_stops_reading_a_stack_call_is_no_error(stack, prov, envfile):
    """`mindroomctl health | head -1`: as for the database commands, a reader that
    closed the pipe has what it wanted. The call was made (the instance is provisioned
    and probed); the command stops there, silent, exit 0: with SIGPIPE at its default
    (the writer dies of it) and ignored (the writer is told "Broken pipe"), with and
    without --wait."""
    sid = new_subscription(stack, "starter")
    for ignore in (False, True):
        for args in (("provision", sid), ("provision", sid, "--wait"), ("health", "{iid}")):
            if "{iid}" in args:
                args = ("health", str(instance(stack, sid)["id"]))
            p = ctl_to_a_gone_reader("--env", envfile, *args, ignore_sigpipe=ignore)
            # --wait shows the instance's progress on stderr; nothing else is said.
            err = [l for l in p.stderr.splitlines() if " instance " not in l]
            assert p.returncode == 0 and err == [], (ignore, args, p.returncode, p.stderr)
        assert instance(stack, sid)["status"] == "running"


def test_a_reader_that_stops_reading_is_no_error_for_any_command(stack, envfile):
    """docs/operations.md: for every command, a reader that closed the pipe
    (`mindroomctl token | head -1`) has what it wanted. What the command does is
    done (a value set stays set, a token rotated stays rotated); it stops there,
    silent, exit 0, with SIGPIPE at its default and ignored: also for what our
    tools print (mr-jwt, mr-secrets), what the shell prints itself, and help."""
    sid = new_subscription(stack, "starter")
    iid = stack.sql("SELECT (public.lifecycle_provision(%s) #>> '{instance,id}')", sid)[0][0]
    env = {"MINDROOM_SECRETS_KEY": stack.env["MINDROOM_SECRETS_KEY"],
           "MR_BIN_DIR": str(mr.build_dir() / "bin")}
    if stack.env.get("DATABASE_POOLER"):
        env["DATABASE_POOLER"] = stack.env["DATABASE_POOLER"]

    def stored():
        return stack.sql("SELECT count(*) FROM public.instance_secrets WHERE instance_id = %s "
                         "AND name = 'GONE_READER_KEY'", iid)[0][0]

    def rotations():
        return stack.sql("SELECT count(*) FROM public.audit_logs WHERE action = 'instance.token_rotated' "
                         "AND details ->> 'instance_id' = %s", iid)[0][0]

    for ignore in (False, True):
        for args in (("token",), ("token", "--role", "authenticated"), ("version",), ("--version",),
                     ("--help",), ("help",), ("status", "--help"), ("env", "--help"),
                     ("env", "list", iid), ("rotate-secrets-key",)):
            p = ctl_to_a_gone_reader("--env", envfile, *args, env=env, ignore_sigpipe=ignore)
            assert p.returncode == 0 and p.stderr == "", (ignore, args, p.returncode, p.stderr)
        p = ctl_to_a_gone_reader("--env", envfile, "env", "set", iid, "GONE_READER_KEY", env=env,
                                 input="sk-%s\n" % ignore, ignore_sigpipe=ignore)
        assert p.returncode == 0 and p.stderr == "", (ignore, p.returncode, p.stderr)
        assert stored() == 1
        p = ctl_to_a_gone_reader("--env", envfile, "env", "unset", iid, "GONE_READER_KEY", env=env,
                                 ignore_sigpipe=ignore)
        assert p.returncode == 0 and p.stderr == "", (ignore, p.returncode, p.stderr)
        assert stored() == 0
        before = rotations()
        p = ctl_to_a_gone_reader("--env", envfile, "rotate-instance-token", iid, ignore_sigpipe=ignore)
        assert p.returncode == 0 and p.stderr == "", (ignore, p.returncode, p.stderr)
        assert rotations() == before + 1
    # A command that fails still says so, and its status stands: the rule is the reader's only.
    p = ctl_to_a_gone_reader("--env", envfile, "rotate-instance-token", str(uuid.uuid4()))
    assert p.returncode == 1 and "no such instance" in p.stderr, (p.returncode, p.stderr)
    p = ctl_to_a_gone_reader("--env", envfile, "env", "set", iid, "PATH", env=env, input="/x")
    assert p.returncode == 2 and "not a name an operator may set" in p.stderr, (p.returncode, p.stderr)


def test_a_malformed_stack_setting_is_bad_configuration():
    """docs/operations.md: exit status 2 is bad usage or configuration, a setting
    missing or malformed. A FUNCTIONS_URL that is no URL, or a MINDROOMCTL_TIMEOUT that
    is no number of seconds, is that (not a refusal or failure of the stack): 2, naming
    the setting, with and without --wait."""
    base = {"SUPABASE_JWT_SECRET": "s" * 40, "DATABASE_URL": ""}
    sub = str(uuid.uuid4())
    for env, needle in (({"FUNCTIONS_URL": "http://exa mple/functions/v1"}, "FUNCTIONS_URL"),
                        ({"FUNCTIONS_URL": "http://"}, "FUNCTIONS_URL"),
                        ({"FUNCTIONS_URL": "htp://127.0.0.1:1/functions/v1"}, "FUNCTIONS_URL"),
                        ({"FUNCTIONS_URL": "http://127.0.0.1:99999/functions/v1"}, "FUNCTIONS_URL"),
                        ({"FUNCTIONS_URL": "http://127.0.0.1:%d/functions/v1" % mr.free_port(),
                          "MINDROOMCTL_TIMEOUT": "ten"}, "MINDROOMCTL_TIMEOUT")):
        for args in (("health",), ("provision", sub, "--wait")):
            fails(ctl(*args, env=dict(base, **env)), 2, needle)
    # A well-formed URL where nothing listens is the stack not reached: 1.
    fails(ctl("health", env=dict(base, FUNCTIONS_URL="http://127.0.0.1:%d/functions/v1" % mr.free_port(),
                                 MINDROOMCTL_TIMEOUT="30")), 1, "cannot reach the stack")


def test_wrong_ids_are_explained(stack, envfile):
    fails(ctl("--env", envfile, "provision", "not-a-uuid"), 2, "must be a uuid")
    fails(ctl("--env", envfile, "provision"), 2, "SUBSCRIPTION_ID is missing")
    nobody = str(uuid.uuid4())
    fails(ctl("--env", envfile, "provision", nobody), 1, "no such subscription: " + nobody)
    fails(ctl("--env", envfile, "deprovision", "--instance", nobody), 1, "no such instance: " + nobody)
    fails(ctl("--env", envfile, "deprovision", "--subscription", nobody, "--mode", "stop"), 1,
          "no such subscription: " + nobody)
    fails(ctl("--env", envfile, "deprovision", "--instance", nobody, "--mode", "pause"), 2,
          "--mode is stop or destroy")
    fails(ctl("--env", envfile, "health", nobody), 1, "no such instance: " + nobody)
    fails(ctl("--env", envfile, "replay", "/nonexistent.json"), 2, "no such file")
    # A secret that is not the stack's: the 401 says which setting to look at.
    p = ctl("--env", envfile, "health", env={"SUPABASE_JWT_SECRET": "x" * 40})
    fails(p, 1, "401", "SUPABASE_JWT_SECRET")


# ---- against scripts/stack.sh (what `make run` starts), with no configuration -------------

def test_every_subcommand_against_the_make_run_stack(tmp_path):
    """stack.sh on free ports in a temporary run directory (MR_RUN_DIR, as in
    test_stack_script.py); mindroomctl gets only the same MR_* variables an
    operator's shell would have and finds secrets, API and database itself
    (docs/operations.md: "without `DATABASE_URL` it uses the local cluster in
    `.run/pg`"), also for what it hands to mr-secrets (env, rotate-secrets-key)."""
    import shutil
    import tempfile
    from pathlib import Path
    from test_stack_script import start, stop

    base = Path(tempfile.mkdtemp(prefix="mr-ctl-stacksh-"))
    os.chmod(base, 0o755)   # PostgreSQL runs as postgres when we are root
    run = base / "run"
    ports = mr.free_ports(4)
    mr_vars = {"MR_RUN_DIR": str(run), "MR_ENV_FILE": "/dev/null",
               "MR_API_LISTEN": "127.0.0.1:%d" % ports[0], "MR_PG_PORT": str(ports[2])}
    env = dict(os.environ, MR_BUILD=os.environ.get("MR_BUILD", "build/san"), MR_WORKERS="1",
               MR_PROVISIONER_LISTEN="127.0.0.1:%d" % ports[1],
               MR_ADMIN_LISTEN="127.0.0.1:%d" % ports[3], **mr_vars)
    for k in ("DATABASE_URL", "SUPABASE_URL", "FUNCTIONS_URL", "DOKKU_PROVISIONER_URL",
              "SUPABASE_JWT_SECRET", "STRIPE_WEBHOOK_SECRET", "MINDROOM_SECRETS_KEY"):
        env.pop(k, None)
    p = None
    try:
        p, _ = start(run, env)

        def c(*args, **kw):
            e = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
            e.update(mr_vars, MR_BIN_DIR=str(mr.build_dir() / "bin"))
            return subprocess.run([CTL] + [str(a) for a in args], env=e, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, timeout=kw.get("timeout", 120))

        superuser = "host=%s port=%s dbname=mindroom user=postgres" % (run / "pg", ports[2])

        def q(sql, *params):
            import psycopg2
            conn = psycopg2.connect(superuser)
            conn.autocommit = True
            with conn, conn.cursor() as cur:
                cur.execute(sql, params or None)
                return cur.fetchall() if cur.description else []

        def statuses(sub):
            return q("SELECT status::text FROM public.instances WHERE subscription_id = %s", sub)

        ok(c("token"))
        out = json.loads(ok(c("health")))
        assert "checked" in out
        # The README's tour, as written: the seeded subscription provisioned, and the
        # example event (the seeded account's customer) delivered, then again.
        seeded = "5eed5eed-0000-4000-8000-000000000101"
        ok(c("provision", seeded, "--wait"))
        assert statuses(seeded) == [("running",)]
        example = mr.ROOT / "docs/examples/customer.subscription.created.json"
        # The example is the basil fixture but for what names it and its customer: a
        # change to the fixture's shape has to reach the example too.
        shaped = json.loads((mr.ROOT / "tests/fixtures/stripe_subscription_created_basil.json")
                            .read_text())
        tour_ev = json.loads(example.read_text())
        o, t = shaped["data"]["object"], tour_ev["data"]["object"]
        shaped["id"], shaped["request"] = tour_ev["id"], tour_ev["request"]
        for k in ("id", "customer", "metadata", "latest_invoice", "default_payment_method"):
            o[k] = t[k]
        o["items"]["url"] = t["items"]["url"]
        item, titem = o["items"]["data"][0], t["items"]["data"][0]
        item["id"], item["subscription"] = titem["id"], titem["subscription"]
        for k in ("id", "product", "unit_amount", "unit_amount_decimal"):
            item["price"][k] = titem["price"][k]
        assert shaped == tour_ev
        assert (t["customer"], t["metadata"]["account_id"], titem["price"]["id"]) == (
            "cus_test123", "5eed5eed-0000-4000-8000-000000000001", "price_professional")
        assert json.loads(ok(c("replay", example))) == {"received": True}
        wait_until(lambda: q("SELECT s.tier::text, i.status::text FROM public.subscriptions s "
                             "JOIN public.instances i ON i.subscription_id = s.id "
                             "JOIN public.accounts a ON a.id = s.account_id "
                             "WHERE s.stripe_subscription_id = 'sub_1TourSubscription00001' "
                             "AND a.email = 'test@example.com'") == [("professional", "running")],
                   timeout=30, what="the tour's event: a professional instance running")
        assert json.loads(ok(c("replay", example))) == {"received": True, "duplicate": True}
        tour = ok(c("status"))
        assert "professional" in tour and "starter" in tour, tour
        # Nothing serves a dry-run instance: the tour's health call probes none.
        assert json.loads(ok(c("health")))["checked"] == 0
        uid = str(uuid.uuid4())
        q("INSERT INTO auth.users (id, aud, role, email) VALUES (%s, 'authenticated', "
          "'authenticated', %s)", uid, "ctl-%s@example.com" % uid[:8])
        customer = "cus_s" + uuid.uuid4().hex[:8]
        q(LINK_CUSTOMER_SQL, uid, customer)
        ev = sub_event(uid, customer, "sub_s" + uuid.uuid4().hex[:8])
        assert json.loads(ok(c("replay", write_event(tmp_path, ev)))) == {"received": True}
        sid = q("SELECT id::text FROM public.subscriptions WHERE stripe_subscription_id = %s",
                ev["data"]["object"]["id"])[0][0]
        # The dokku-provisioner of `make run` (dry-run) provisions it.
        wait_until(lambda: statuses(sid) == [("running",)], timeout=30,
                   what="running via make run's stack")
        assert "ctl-%s" % uid[:8] in ok(c("status"))
        ok(c("deprovision", "--subscription", sid, "--mode", "stop", "--wait"))
        assert statuses(sid) == [("stopped",)]
        ok(c("provision", sid, "--wait"))
        assert statuses(sid) == [("running",)]
        ok(c("health"))
        # mr-secrets gets the same local cluster (DATABASE_URL exported to it).
        out = ok(c("rotate-secrets-key"))
        assert "re-sealed" in out, out
        nobody = str(uuid.uuid4())
        fails(c("env", "list", nobody), 1, "no instance " + nobody)
        ok(c("failed-events"))
        ok(c("stuck"))
        assert "global" in ok(c("concurrency"))
        fails(c("provision", str(uuid.uuid4())), 1, "no such subscription")
    finally:
        if p is not None:
            stop(run, env, p)
        shutil.rmtree(base, ignore_errors=True)


# ---- operator commands that would do other than asked -----------------------------

def test_deprovision_refuses_a_mode_given_twice():
    """`--mode stop ... --mode destroy` names two different things; the last one
    silently winning destroys an instance the operator may have meant to stop.
    Refused before anything is sent, as two targets are."""
    a = str(uuid.uuid4())
    for cmd in (("deprovision", "--instance", a, "--mode", "stop", "--mode", "destroy"),
                ("deprovision", "--subscription", a, "--mode", "destroy", "--mode", "stop")):
        fails(ctl(*cmd), 2, "deprovision: give --mode once")


def test_purge_takes_no_mode_and_speaks_as_purge():
    """purge is deprovision --mode destroy --purge: a --mode of the operator's own is
    refused (a purge always destroys), and every refusal names purge, the command
    typed, not the deprovision it runs."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    for mode in ("stop", "destroy"):
        err = fails(ctl("purge", "--instance", a, "--mode", mode), 2, "purge takes no --mode")
        assert "deprovision" not in err.replace("deprovision --mode stop", ""), err
    for cmd, needle in ((("purge",), "purge: give --instance ID or --subscription ID"),
                        (("purge", "--wait"), "purge: give --instance ID or --subscription ID"),
                        (("purge", "--instance", a, "--subscription", b),
                         "purge: give one --instance ID or --subscription ID"),
                        (("purge", "--instance", "nope"), "purge: the id must be a uuid"),
                        (("purge", "--instance"), "purge: --instance needs a value"),
                        (("purge", "--instance", a, "--frob"), "purge: unknown argument --frob")):
        err = fails(ctl(*cmd), 2, needle)
        assert "deprovision" not in err, (cmd, err)



def test_env_set_on_a_destroyed_instance_is_refused_naming_the_live_one(stack):
    """`status` shows a destroyed subscription's last instance id; a value set on that
    row would reach nothing (a destroyed instance is never deployed again, and the one
    a later `provision` creates is another row), so `env set` and `env unset` refuse
    it, store nothing, and name the subscription's live instance when there is one."""
    sid = new_subscription(stack, "starter", status="cancelled")
    dead = str(uuid.uuid4())
    stack.sql("INSERT INTO public.instances (id, subscription_id, dokku_app_name, subdomain, status, "
              "desired_status, provisioned_at, deprovisioned_at, storage_destroy_after) "
              "SELECT %s, %s, n.dokku_app_name, n.subdomain, 'deprovisioned', 'deprovisioned', now(), "
              "now(), now() + interval '30 days' FROM public.instance_names(%s) n", dead, sid, sid)
    env = {"DATABASE_URL": stack.env["DATABASE_URL"],
           "MINDROOM_SECRETS_KEY": stack.env["MINDROOM_SECRETS_KEY"],
           "MR_BIN_DIR": str(mr.build_dir() / "bin")}
    if stack.env.get("DATABASE_POOLER"):
        env["DATABASE_POOLER"] = stack.env["DATABASE_POOLER"]
    e = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    e.update(env, MR_RUN_DIR="/nonexistent-mindroomctl-stack", MR_ENV_FILE="/nonexistent-mindroomctl.env")

    def env_cmd(*args):
        return subprocess.run([CTL, "env", *args], input="sk-" + "x" * 30, env=e,
                              capture_output=True, text=True, timeout=60)

    def version(iid):
        return stack.sql("SELECT config_version FROM public.instances WHERE id = %s", iid)[0][0]

    before = version(dead)
    p = env_cmd("set", dead, "OPENAI_API_KEY")
    assert p.returncode == 1 and "owes an update" not in p.stdout, (p.returncode, p.stdout, p.stderr)
    assert "instance %s is destroyed" % dead in p.stderr and "no live instance" in p.stderr, p.stderr
    assert stack.sql("SELECT count(*) FROM public.instance_secrets WHERE instance_id = %s", dead)[0][0] == 0
    assert version(dead) == before

    # Provisioned again: the refusal names the instance to set it on, which takes it.
    stack.sql("UPDATE public.subscriptions SET status = 'active' WHERE id = %s", sid)
    live = stack.sql("SELECT (public.lifecycle_provision(%s) #>> '{instance,id}')", sid)[0][0]
    for verb in (("set", dead, "OPENAI_API_KEY"), ("unset", dead, "OPENAI_API_KEY")):
        p = env_cmd(*verb)
        assert p.returncode == 1 and "live instance is %s" % live in p.stderr, (verb, p.stderr)
    p = env_cmd("set", live, "OPENAI_API_KEY")
    assert p.returncode == 0 and "owes an update" in p.stdout, (p.returncode, p.stdout, p.stderr)
    # Listing a destroyed instance's secrets still works.
    assert env_cmd("list", dead).returncode == 0


def secrets_env(stack):
    """mindroomctl's environment for `env set`, `unset` and `list` alone: the
    stack's database and secrets key, no stack to call and no env file."""
    e = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    e.update(DATABASE_URL=stack.env["DATABASE_URL"],
             MINDROOM_SECRETS_KEY=stack.env["MINDROOM_SECRETS_KEY"],
             MR_BIN_DIR=str(mr.build_dir() / "bin"), MR_RUN_DIR="/nonexistent-mindroomctl-stack",
             MR_ENV_FILE="/nonexistent-mindroomctl.env")
    if stack.env.get("DATABASE_POOLER"):
        e["DATABASE_POOLER"] = stack.env["DATABASE_POOLER"]
    return e


def test_env_set_refuses_a_value_that_is_not_utf8(stack):
    """The app's environment reaches Dokku as JSON (config:import), which carries only
    UTF-8 text, and the provisioner refuses anything else: a value `env set` stored
    anyway would make every later update of the instance fail for good. It is
    refused at once (exit 2, as bad input), nothing stored, nothing owed; UTF-8 text
    beyond ASCII is taken."""
    sid = new_subscription(stack, "starter")
    iid = stack.sql("SELECT (public.lifecycle_provision(%s) #>> '{instance,id}')", sid)[0][0]
    e = secrets_env(stack)

    def env_set(value):
        return subprocess.run([CTL, "env", "set", iid, "LATIN1_PASSWORD"], input=value, env=e,
                              capture_output=True, timeout=60)

    before = stack.sql("SELECT config_version FROM public.instances WHERE id = %s", iid)[0][0]
    for bad in (b"caf\xe9-secret", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\xff"):
        p = env_set(bad)
        assert p.returncode == 2 and b"not UTF-8" in p.stderr, (bad, p.returncode, p.stderr)
        assert bad not in p.stderr
    assert stack.sql("SELECT count(*) FROM public.instance_secrets WHERE instance_id = %s "
                     "AND name = 'LATIN1_PASSWORD'", iid)[0][0] == 0
    assert stack.sql("SELECT config_version FROM public.instances WHERE id = %s", iid)[0][0] == before
    p = env_set("café-sécret ✓".encode())
    assert p.returncode == 0 and b"owes an update" in p.stdout, (p.returncode, p.stdout, p.stderr)


def test_env_set_refuses_every_bad_value_alike(stack):
    """A value `env set` does not take is the operator's input, refused as a name or a
    value that is not UTF-8 is (docs/operations.md: exit 2, bad usage): one with a NUL
    byte, or over 24 KiB, too. Nothing stored, nothing owed. Stdin that cannot be read
    is a failure (1), not bad input."""
    sid = new_subscription(stack, "starter")
    iid = stack.sql("SELECT (public.lifecycle_provision(%s) #>> '{instance,id}')", sid)[0][0]
    e = secrets_env(stack)

    def env_set(value=None, stdin=None):
        kw = {"input": value} if stdin is None else {"stdin": stdin}
        return subprocess.run([CTL, "env", "set", iid, "BAD_VALUE"], env=e, capture_output=True,
                              timeout=60, **kw)

    def stored():
        return stack.sql("SELECT count(*) FROM public.instance_secrets WHERE instance_id = %s "
                         "AND name = 'BAD_VALUE'", iid)[0][0]

    before = stack.sql("SELECT config_version FROM public.instances WHERE id = %s", iid)[0][0]
    for bad, needle in ((b"sk-\x00-secret", b"NUL byte"), (b"x" * (24 * 1024 + 1), b"over 24576 bytes"),
                        (b"caf\xe9", b"not UTF-8")):
        p = env_set(bad)
        assert p.returncode == 2 and needle in p.stderr and b"nothing stored" in p.stderr, \
            (bad[:16], p.returncode, p.stderr)
    assert stored() == 0
    assert stack.sql("SELECT config_version FROM public.instances WHERE id = %s", iid)[0][0] == before
    fd = os.open("/", os.O_RDONLY)       # a directory: every read fails
    try:
        p = env_set(stdin=fd)
    finally:
        os.close(fd)
    assert p.returncode == 1 and b"cannot read the value" in p.stderr, (p.returncode, p.stderr)
    assert stored() == 0
    p = env_set(b"sk-" + b"x" * 60)
    assert p.returncode == 0 and b"owes an update" in p.stdout, (p.returncode, p.stdout, p.stderr)


def test_env_set_takes_24_kib_and_its_line_end(stack):
    """An instance's variables may take 24 KiB as they are deployed (JSON: "NAME":"value",),
    what a create or update always carries. One trailing newline (as `echo` adds), or CR
    LF, is dropped before the value is counted. A value that fills the 24 KiB is taken
    with either; one byte more is refused (exit 2, nothing stored), line end or not."""
    sid = new_subscription(stack, "starter")
    iid = stack.sql("SELECT (public.lifecycle_provision(%s) #>> '{instance,id}')", sid)[0][0]
    env = {"DATABASE_URL": stack.env["DATABASE_URL"],
           "MINDROOM_SECRETS_KEY": stack.env["MINDROOM_SECRETS_KEY"],
           "MR_BIN_DIR": str(mr.build_dir() / "bin")}
    if stack.env.get("DATABASE_POOLER"):
        env["DATABASE_POOLER"] = stack.env["DATABASE_POOLER"]

    def env_set(name, value):
        return ctl("env", "set", iid, name, env=env, input=value)

    def stored(name):
        return stack.sql("SELECT count(*) FROM public.instance_secrets WHERE instance_id = %s "
                         "AND name = %s", iid, name)[0][0]

    full = "x" * (24 * 1024 - len('"FULL_VALUE":"",'))
    for over in (full + "y", full + "y\n", full + "y\r\n", full + "\n\n"):
        fails(env_set("FULL_VALUE", over), 2, "over 24576", "nothing stored")
    assert stored("FULL_VALUE") == 0
    assert "owes an update" in ok(env_set("FULL_VALUE", full + "\n"))
    # The line end was not stored: the same value without one, or with CR LF, is no change.
    for same in (full, full + "\r\n"):
        assert ok(env_set("FULL_VALUE", same)) == "FULL_VALUE: unchanged\n"


def test_env_set_keeps_an_instance_s_variables_within_what_a_deploy_carries(stack):
    """The 24 KiB are the instance's variables together, counted as they are deployed:
    a control character takes six bytes in JSON. A value that would take them over is
    refused (exit 2, nothing stored, nothing owed), whichever variable it is; unset
    makes room, and a variable set again is counted once. At most 100 variables."""
    sid = new_subscription(stack, "starter")
    iid = stack.sql("SELECT (public.lifecycle_provision(%s) #>> '{instance,id}')", sid)[0][0]
    e = secrets_env(stack)

    def env_set(name, value):
        return subprocess.run([CTL, "env", "set", iid, name], input=value, env=e,
                              capture_output=True, text=True, timeout=60)

    def version():
        return stack.sql("SELECT config_version FROM public.instances WHERE id = %s", iid)[0][0]

    def names():
        return [n for (n,) in stack.sql("SELECT name FROM public.instance_secrets WHERE "
                                        "instance_id = %s AND kind = 'env' ORDER BY name", iid)]

    # 2,000 control characters are 12,000 bytes as deployed ("CONTROL_A":"…", 12,015):
    # two fit, with 546 bytes left.
    ok(env_set("CONTROL_A", "\x01" * 2000))
    ok(env_set("CONTROL_B", "\x02" * 2000))
    before = version()
    fails(env_set("SMALL_C", "\x03" * 100), 2, "24643 bytes", "over 24576", "nothing stored")
    fails(env_set("SMALL_C", "y" * 600), 2, "over 24576", "nothing stored")
    # A variable set again is counted with its new value, not its old one as well.
    fails(env_set("CONTROL_B", "\x02" * 2092), 2, "24582 bytes", "nothing stored")
    assert version() == before and names() == ["CONTROL_A", "CONTROL_B"]
    ok(env_set("CONTROL_B", "\x02" * 2091))                   # 24,576 exactly
    ok(env_set("CONTROL_B", "\x02" * 1000))
    ok(env_set("SMALL_C", "y" * 600))
    ok(subprocess.run([CTL, "env", "unset", iid, "CONTROL_A"], env=e, capture_output=True,
                      text=True, timeout=60))
    ok(env_set("CONTROL_B", "\x02" * 3800))
    assert names() == ["CONTROL_B", "SMALL_C"]

    # The count: 100 variables in all.
    for i in range(98):
        ok(env_set("V%03d" % i, "v"))
    before = version()
    fails(env_set("ONE_MORE", "v"), 2, "101 variables", "over 100", "nothing stored")
    assert version() == before and len(names()) == 100
    assert "unchanged" in ok(env_set("V000", "v"))
    ok(env_set("V000", "w"))


def test_env_set_refuses_a_name_the_instance_must_not_get_from_an_operator(stack):
    """A variable set with `env set` reaches MindRoom's process: PATH, HOME or LD_PRELOAD
    would change what runs in it, PORT where Dokku routes to, and a name the control
    plane sets (its token, the plan's limits) would never be sent (the control plane's
    wins), while `env set` said the instance owes an update with it. Each is refused
    (exit 2, as bad input), nothing stored, nothing owed; an ordinary name is taken."""
    sid = new_subscription(stack, "starter")
    iid = stack.sql("SELECT (public.lifecycle_provision(%s) #>> '{instance,id}')", sid)[0][0]
    e = secrets_env(stack)

    def env_set(name):
        return subprocess.run([CTL, "env", "set", iid, name], input="/tmp/x", env=e,
                              capture_output=True, text=True, timeout=60)

    before = stack.sql("SELECT config_version FROM public.instances WHERE id = %s", iid)[0][0]
    # Every name the control plane's step gives the app, read from the schema that
    # builds it (public.lifecycle_step_json), so that a name added there and not to
    # lib/mr_appenv.c's list fails here.
    ours = [r[0] for r in stack.sql(
        "SELECT jsonb_object_keys(public.lifecycle_step_json(jsonb_populate_record(i, "
        "'{\"claim_action\": \"create\"}')) #> '{payload,env}') "
        "FROM public.instances i WHERE i.id = %s", iid)]
    assert "MAX_AGENTS" in ours and "MINDROOM_INSTANCE_ID" in ours, ours
    for name in ["PATH", "HOME", "LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PORT",
                 "DOKKU_APP_TYPE", "MATRIX_HOMESERVER", "MINDROOM_STORAGE_PATH",
                 "MINDROOM_CONTROL_PLANE_TOKEN", "MINDROOM_CONTROL_PLANE_URL"] + ours:
        p = env_set(name)
        assert p.returncode == 2 and "%s is not a name an operator may set" % name in p.stderr, \
            (name, p.returncode, p.stdout, p.stderr)
        assert "owes an update" not in p.stdout
    assert stack.sql("SELECT count(*) FROM public.instance_secrets WHERE instance_id = %s "
                     "AND kind = 'env'", iid)[0][0] == 0
    assert stack.sql("SELECT config_version FROM public.instances WHERE id = %s", iid)[0][0] == before
    p = env_set("ANTHROPIC_API_KEY")
    assert p.returncode == 0 and "owes an update" in p.stdout, (p.returncode, p.stdout, p.stderr)


def test_a_malformed_secrets_key_is_bad_configuration():
    """docs/operations.md: exit status 2 is bad usage or configuration, 1 a refusal
    or failure of the stack or database. A MINDROOM_SECRETS_KEY (or _PREVIOUS) that
    is not 32 bytes in base64 is configuration: 2, naming the variable, before any
    database is asked."""
    short = base64.b64encode(b"short").decode()
    good = base64.b64encode(os.urandom(32)).decode()
    base = {"DATABASE_URL": "host=127.0.0.1 port=%d dbname=x" % mr.free_port(),
            "MR_BIN_DIR": str(mr.build_dir() / "bin")}
    for keys, needle in (({"MINDROOM_SECRETS_KEY": "short"}, "MINDROOM_SECRETS_KEY must be 32 bytes"),
                         ({"MINDROOM_SECRETS_KEY": short}, "MINDROOM_SECRETS_KEY must be 32 bytes"),
                         ({"MINDROOM_SECRETS_KEY": good, "MINDROOM_SECRETS_KEY_PREVIOUS": short},
                          "MINDROOM_SECRETS_KEY_PREVIOUS key #1 must be 32 bytes")):
        env = dict(base, **keys)
        fails(ctl("rotate-secrets-key", env=env), 2, needle)
        fails(ctl("env", "set", str(uuid.uuid4()), "FOO", env=env), 2, needle)


def test_wait_with_no_secret_is_missing_configuration_not_a_refusal(stack):
    """docs/operations.md: exit status 2 is bad usage or configuration (missing here).
    Without --wait a missing signing secret is exit 2 and nothing is sent; with
    --wait the same must hold (no unauthenticated request, no 401 blamed on a
    secret that was never there)."""
    env = {"FUNCTIONS_URL": stack.base_url + "/functions/v1"}
    sub = str(uuid.uuid4())
    fails(ctl("provision", sub, env=env), 2, "is required")
    p = ctl("provision", sub, "--wait", env=env)
    fails(p, 2, "is required")
    assert "refused the token" not in p.stderr, p.stderr
    p = ctl("deprovision", "--subscription", sub, "--mode", "stop", "--wait", env=env)
    fails(p, 2, "is required")
