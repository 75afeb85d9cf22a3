"""Each process keeps only its own secrets. An install hands every process the same
environment file (/etc/mindroom/mindroom.env, or one environment for the whole
stack here), so each is started holding every secret. Before it serves, a process
wipes the secret settings it did not read (their bytes too, which
/proc/PID/environ shows) and becomes non-dumpable: a public function taken over
holds neither the key that opens every instance's secrets nor the Stripe key, and
no other process of its user reads its memory or its environment.

On a stack of every function and the lifecycle worker with every secret set, each
process's environment is read as root (master and workers); then a function run
as an unprivileged user is read by another process of that user."""
import base64
import json
import os
import secrets
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import mr
from lifecycle_helpers import stack_env

# The settings that hold secrets: a process that does not name one below as its
# own must not hold its value.
SECRETS = ("DATABASE_URL", "DATABASE_LISTEN_URL", "SUPABASE_SECRET_KEYS", "SUPABASE_JWT_SECRET",
           "SUPABASE_JWT_SECRET_PREVIOUS", "MINDROOM_INTERNAL_SECRET", "MINDROOM_SECRETS_KEY",
           "MINDROOM_SECRETS_KEY_PREVIOUS", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET",
           "RESEND_API_KEY", "DOKKU_PROVISIONER_TOKEN",
           # a provisioner target's token (token_ref env:CLUSTER_1_TOKEN)
           "CLUSTER_1_TOKEN")
AUTH = {"DATABASE_URL", "SUPABASE_JWT_SECRET", "SUPABASE_JWT_SECRET_PREVIOUS",
        "MINDROOM_INTERNAL_SECRET"}
# What each process may keep (the legacy auth mode the stack runs: its JWT secrets).
KEEPS = {
    "handle-stripe-webhook": {"DATABASE_URL", "STRIPE_WEBHOOK_SECRET"},
    "provision-instance": AUTH,
    "deprovision-instance": AUTH,
    "check-instance-health": AUTH,
    "my-instance": AUTH,
    "create-checkout-session": AUTH | {"STRIPE_SECRET_KEY"},
    "create-portal-session": AUTH | {"STRIPE_SECRET_KEY"},
    "list-plans": {"DATABASE_URL"},
    "track-usage": {"DATABASE_URL"},
    "mindroom-admin": {"DATABASE_URL"},
    "dokku-provisioner": {"DATABASE_URL", "DOKKU_PROVISIONER_TOKEN"},
    "mindroom-lifecycle": {"DATABASE_URL", "DATABASE_LISTEN_URL", "MINDROOM_SECRETS_KEY",
                           "MINDROOM_SECRETS_KEY_PREVIOUS", "STRIPE_SECRET_KEY",
                           "RESEND_API_KEY", "DOKKU_PROVISIONER_TOKEN", "CLUSTER_1_TOKEN"},
}
NOBODY = 65534


def environ(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def stack(pg, prov, resend):
    key = lambda: secrets.token_urlsafe(40)  # noqa: E731
    env = stack_env(prov, resend,
                    STRIPE_SECRET_KEY="sk_test_" + secrets.token_hex(16),
                    STRIPE_API_BASE="http://127.0.0.1:9",
                    STRIPE_CHECKOUT_SUCCESS_URL="https://app.mindroom.test/welcome",
                    STRIPE_CHECKOUT_CANCEL_URL="https://app.mindroom.test/pricing",
                    STRIPE_PORTAL_RETURN_URL="https://app.mindroom.test/account",
                    SUPABASE_JWT_SECRET_PREVIOUS=key(), MINDROOM_INTERNAL_SECRET=key(),
                    MINDROOM_SECRETS_KEY_PREVIOUS=base64key(), CLUSTER_1_TOKEN=key())
    with mr.Stack(pg, env=env, functions=list(KEEPS)) as s:
        yield s


def base64key():
    return base64.b64encode(secrets.token_bytes(32)).decode()


def test_every_process_holds_only_the_secrets_it_uses(stack):
    values = {n: stack.env[n].encode() for n in SECRETS if stack.env.get(n)}
    # Every secret the stack was given is one some process keeps, and is set.
    assert {"MINDROOM_SECRETS_KEY", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET",
            "RESEND_API_KEY", "DOKKU_PROVISIONER_TOKEN", "MINDROOM_INTERNAL_SECRET",
            "SUPABASE_JWT_SECRET", "CLUSTER_1_TOKEN"} <= set(values)
    held = {}
    for name in KEEPS:
        pids = [stack.master_pid(name)] + stack.workers(name)
        assert len(pids) >= 2, (name, pids)
        for pid in pids:
            env = environ(pid)
            held[(name, pid)] = {n for n, v in values.items() if v in env}
            # What is not a secret is left alone.
            assert b"MR_METRICS_DIR=" in env, name
    for (name, pid), names in held.items():
        assert names <= KEEPS[name], "%s (pid %d) holds %s" % (name, pid, sorted(names - KEEPS[name]))
    # ...and each still works with what it kept (the stack answered /ready-style
    # start-up; these hold the keys they need).
    assert "MINDROOM_SECRETS_KEY" in held[("mindroom-lifecycle", stack.workers("mindroom-lifecycle")[0])]
    assert "STRIPE_WEBHOOK_SECRET" in held[("handle-stripe-webhook",
                                            stack.master_pid("handle-stripe-webhook"))]
    # The webhook reads the Stripe key only for its mode, and does not keep it.
    assert "STRIPE_SECRET_KEY" not in held[("handle-stripe-webhook",
                                            stack.master_pid("handle-stripe-webhook"))]


def test_the_functions_still_serve_with_what_they_kept(stack):
    # The webhook verifies with its signing secret, and knows its mode from the
    # Stripe key it read and wiped: a test-mode event is recorded.
    event = json.dumps({"id": "evt_" + secrets.token_hex(8), "object": "event",
                        "type": "customer.updated", "created": int(time.time()),
                        "livemode": False, "data": {"object": {"id": "cus_x"}}}).encode()
    r = stack.call("POST", "handle-stripe-webhook", body=event, headers=stack.stripe_headers(event))
    assert r.status == 200, r
    # Checkout authenticates with the JWT secret it kept and has its Stripe key:
    # neither 401 nor "payments are not set up".
    r = stack.call("POST", "create-checkout-session", json={"price_id": "price_x"},
                   token=stack.jwt(role="authenticated", sub=str(uuid.uuid4())))
    assert r.status != 401 and "stripe_not_configured" not in r.text, r


def test_another_process_of_the_user_cannot_read_a_function(tmp_path):
    """The no-op function, run as an unprivileged user with every secret in its
    environment: it keeps the database's address alone, and a second process of
    the same user can read neither its environment nor its memory."""
    run = Path(tempfile.mkdtemp(prefix="mr-seal-"))
    os.chmod(run, 0o755)
    sock = run / "noop.sock"
    os.chown(run, NOBODY, NOBODY)
    values = {n: "seal-%s-%s" % (n.lower(), secrets.token_hex(8)) for n in SECRETS}
    values["DATABASE_URL"] = "host=/nonexistent dbname=none password=" + values["DATABASE_URL"]
    env = {k: os.environ[k] for k in mr.INHERITED_ENV if k in os.environ}
    env.update(values, MR_WORKERS="2", MR_SOCKET=str(sock), MR_LOG_LEVEL="info")
    log = tmp_path / "noop.log"
    p = mr.start_by_hand(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY,
                          "--clear-groups", "--", str(mr.build_dir() / "bin/noop")], env, log,
                         cwd=str(run), start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not (sock.exists() and len(mr.children(p.pid)) == 2):
            assert p.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.02)
        for pid in [p.pid] + mr.children(p.pid):
            env_now = environ(pid)
            assert values["DATABASE_URL"].encode() in env_now
            left = [n for n in SECRETS if n != "DATABASE_URL" and values[n].encode() in env_now]
            assert not left, left
            assert ("MR_WORKERS=2").encode() in env_now
            for what in ("environ", "mem"):
                r = subprocess.run(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY,
                                    "--clear-groups", "--", "head", "-c", "1",
                                    "/proc/%d/%s" % (pid, what)], capture_output=True, text=True)
                assert r.returncode != 0 and "Permission denied" in r.stderr, (what, r)
    finally:
        mr.Stack._terminate(p)
    mr.assert_no_sanitizer_report(log)
