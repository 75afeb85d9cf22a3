"""Shared helpers of the lifecycle tests (test_lifecycle*.py)."""
import os
import signal
import subprocess
import time
import uuid

import mr

PRICES = {"free": "price_free", "starter": "price_starter",
          "professional": "price_professional", "enterprise": "price_enterprise"}
LIMITS = {"free": (512, 0.5), "starter": (1024, 1.0),
          "professional": (2048, 2.0), "enterprise": (4096, 4.0)}

# Short deadlines so failure paths finish in seconds: one provisioner call may take
# 1.5 s, a lease lasts 4 s, backoff starts at 1 s, a stopping worker gives a step
# 1 s. MR_LIFECYCLE_POLL_MS is long on purpose: the worker must be woken by the
# notification of the commit that made work owed, not find it by polling.
FAST_ENV = {
    "MR_PROVISION_TIMEOUT_MS": "1500",
    "MR_PROVISION_CONNECT_TIMEOUT_MS": "500",
    "MR_LIFECYCLE_LEASE_S": "4",
    "MR_LIFECYCLE_STOP_GRACE_MS": "1000",
    "MR_LIFECYCLE_POLL_MS": "60000",
    "MR_PROVISION_BACKOFF_BASE_S": "1",
    "MR_PROVISION_BACKOFF_CAP_S": "8",
    "MR_PROVISION_WAIT_MS": "8000",
    "MR_RESEND_TIMEOUT_MS": "1000",
    "RESEND_FROM": "MindRoom <hello@mindroom.test>",
}
WORKER = "mindroom-lifecycle"

INSTANCE_COLS = ("id", "subscription_id", "status", "desired_status", "dokku_app_name",
                 "subdomain", "backend_url", "frontend_url", "matrix_server_url",
                 "memory_limit_mb", "cpu_limit", "attempts", "next_attempt_at",
                 "last_error", "error_message", "provisioned_at", "deprovisioned_at",
                 "welcome_email_sent_at", "welcome_email_error", "claimed_by",
                 "claim_expires_at", "owed_action", "owed_due_at")



def deploy_env(dokku, health, **extra):
    """FAST_ENV for a stack whose worker really deploys through the real provisioner
    and the stand-in dokku (`provisioner_helpers.Dokku`), both of an instance's
    components answering health probes at the stand-in `health`. Deploying two apps
    takes a few seconds, so the call deadline, the lease (kept above it, as the
    worker's start-up check demands) and the edges' wait are longer."""
    env = dict(FAST_ENV)
    env.update(MR_PROVISION_TIMEOUT_MS="30000", MR_LIFECYCLE_LEASE_S="60",
               MR_PROVISION_WAIT_MS="45000", MR_LIFECYCLE_POLL_MS="1000",
               HEALTH_ALLOW_LOOPBACK="1", HEALTH_TIMEOUT_MS="1000")
    env.update({k: str(v) for k, v in extra.items()})
    env.update(dokku.env(
        PROVISIONER_BACKEND_URL="http://127.0.0.1:%d/i/{subdomain}/api" % health.port,
        PROVISIONER_MATRIX_URL="http://127.0.0.1:%d/i/{matrix_host}" % health.port))
    return env

def stack_env(prov, resend=None, **extra):
    env = dict(FAST_ENV)
    env["DOKKU_PROVISIONER_URL"] = prov.url
    env["DOKKU_PROVISIONER_TOKEN"] = prov.token
    if resend is not None:
        env["RESEND_BASE_URL"] = resend.url
        env["RESEND_API_KEY"] = resend.token
    env.update(extra)
    return env


def new_account(s, customer=None):
    """A Supabase Auth user (the trigger makes the account), with `customer` as
    the Stripe customer we created for it when given; returns (id, email)."""
    uid = str(uuid.uuid4())
    email = "user-%s@example.com" % uid[:8]
    s.sql("INSERT INTO auth.users (id, aud, role, email) VALUES (%s, 'authenticated', "
          "'authenticated', %s)", uid, email)
    if customer:
        link_customer(s, uid, customer)
    return uid, email


# Parameters: the account id, the customer id.
LINK_CUSTOMER_SQL = (
    "SET ROLE service_role; SELECT public.billing_attempt_succeeded("
    "(public.billing_attempt_begin(%s, 'customer', repeat('0', 64)) ->> 'attempt_id')::uuid,"
    " %s, NULL, NULL, false)")


def link_customer(s, account, customer):
    """Records `customer` as the Stripe customer we created for `account`, the
    way create-checkout-session records it (a customer attempt begun, then
    succeeded with Stripe's id, as service_role): the only way a customer is
    linked to an account; the webhook never links one from an event's claim."""
    s.sql(LINK_CUSTOMER_SQL, account, customer)
    return customer


def new_subscription(s, tier="starter", status="active", account=None):
    """An account (new unless given) with one subscription; returns the subscription id."""
    acc = account or new_account(s)[0]
    sid = str(uuid.uuid4())
    s.sql("INSERT INTO public.subscriptions (id, account_id, stripe_subscription_id, "
          "stripe_price_id, tier, status) VALUES (%s, %s, %s, %s, %s, %s)",
          sid, acc, "sub_" + sid[:12], PRICES[tier], tier, status)
    return sid


def instances(s, sid):
    rows = s.sql("SELECT %s FROM public.instances WHERE subscription_id = %%s "
                 "ORDER BY created_at" % ", ".join(INSTANCE_COLS), sid)
    return [dict(zip(INSTANCE_COLS, r)) for r in rows]


def instance(s, sid):
    rows = instances(s, sid)
    assert len(rows) == 1, rows
    return rows[0]


def provision(s, sid, token=None, **body):
    body = dict(body, subscription_id=sid)
    return s.call("POST", "provision-instance", json=body,
                  token=s.jwt() if token is None else token)


def deprovision(s, token=None, **body):
    return s.call("POST", "deprovision-instance", json=body,
                  token=s.jwt() if token is None else token)


def env_set(s, iid, name, value):
    """`mindroomctl env set` of one instance's variable: mr-secrets, the value on stdin."""
    e = dict(os.environ, DATABASE_URL=s.env["DATABASE_URL"],
             MINDROOM_SECRETS_KEY=s.env["MINDROOM_SECRETS_KEY"])
    if s.env.get("DATABASE_POOLER"):  # through PgBouncer, as the stack's functions
        e["DATABASE_POOLER"] = s.env["DATABASE_POOLER"]
    p = subprocess.run([str(mr.build_dir() / "bin/mr-secrets"), "set", iid, name], input=value,
                       capture_output=True, text=True, env=e, timeout=30)
    assert p.returncode == 0, p


def wait_until(fn, timeout=5.0, interval=0.05, what="condition"):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError("timed out after %.1fs waiting for %s (last: %r)" % (timeout, what, last))


def wait_status(s, sid, status, timeout=5.0):
    return wait_until(lambda: (lambda i: i if i["status"] == status and not live_claim(i) else None)(
        instance(s, sid)), timeout, what="instance of %s to be %s" % (sid, status))


def live_claim(inst):
    return inst["claimed_by"] is not None


def owed(s, sid):
    """What the instance of sid owes and whether it is due now: (action, due_now), or
    None when nothing is owed. due_now is False while a lease or a backoff holds it,
    None while it waits for an operator (a rejected step)."""
    rows = s.sql("SELECT owed_action, CASE WHEN owed_due_at IS NULL THEN NULL "
                 "ELSE owed_due_at <= now() END FROM public.instances "
                 "WHERE subscription_id = %s AND status <> 'deprovisioned'", sid)
    if not rows or rows[0][0] is None:
        return None
    return rows[0][0], rows[0][1]


def kill_workers_mid_provision(stack, prov, sid):
    """Starts a provision the stand-in hangs on, then SIGKILLs every lifecycle
    worker process (one of them is inside the provisioner call) and waits for their
    replacements; the dead worker's lease stays on the row."""
    prov.behave("hang")
    assert provision(stack, sid).status == 202
    prov.wait_for(lambda p: p.create_calls(), timeout=3)
    old = stack.workers(WORKER)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    stack.wait_workers(WORKER, exclude=old)
    prov.release()
