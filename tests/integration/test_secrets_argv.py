"""No secret on a command line: every local user can read every process's
arguments (/proc/<pid>/cmdline, `ps`). While mindroomctl signs, calls and queries,
and while scripts/stack.sh starts a whole stack, a watcher reads every process's
command line over and over; none may hold a secret, a token or a password, and
the watcher must have seen the curl and psql processes it was watching for."""
import json
import os
import re
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

import mr
from lifecycle_helpers import PRICES, WORKER, new_account, new_subscription, stack_env

CTL = str(mr.ROOT / "scripts/mindroomctl")


class Watcher:
    """Reads /proc/*/cmdline in a loop until stopped; .seen holds every distinct one."""

    def __init__(self):
        self.seen = set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            for d in os.listdir("/proc"):
                if not d.isdigit() or int(d) == me:
                    continue
                try:
                    with open("/proc/%s/cmdline" % d, "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if cmd:
                    self.seen.add(cmd.replace(b"\0", b" ").decode(errors="replace"))

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)

    def holding(self, *needles):
        return [c for c in self.seen for n in needles if n and n in c]

    def ran(self, program):
        return [c for c in self.seen if re.match(r"(\S*/)?%s( |$)" % re.escape(program), c)]


@pytest.fixture(scope="module")
def stack(pg, prov, resend):
    with mr.Stack(pg, env=stack_env(prov, resend),
                  functions=["handle-stripe-webhook", "provision-instance", WORKER]) as s:
        yield s


def test_mindroomctl_passes_no_secret_in_arguments(stack, prov, tmp_path):
    password = "pw-" + uuid.uuid4().hex
    env_file = tmp_path / "ops.env"
    # A DATABASE_URL with a password, as a managed database's would have (the local
    # cluster authenticates by peer and ignores it).
    env_file.write_text("SUPABASE_JWT_SECRET='%s'\nSTRIPE_WEBHOOK_SECRET='%s'\n"
                        "DATABASE_URL='%s password=%s'\nFUNCTIONS_URL='%s/functions/v1'\n"
                        "MINDROOM_SECRETS_KEY='%s'\n" % (
                            stack.env["SUPABASE_JWT_SECRET"], stack.env["STRIPE_WEBHOOK_SECRET"],
                            stack.env["DATABASE_URL"], password, stack.base_url,
                            stack.env["MINDROOM_SECRETS_KEY"]))
    if stack.env.get("DATABASE_POOLER"):   # the pooler suite: mr-secrets must know it
        with env_file.open("a") as f:
            f.write("DATABASE_POOLER='%s'\n" % stack.env["DATABASE_POOLER"])
    tenant_secret = "sk-" + uuid.uuid4().hex
    account, _ = new_account(stack)
    t = int(time.time())
    ev = {"id": "evt_" + uuid.uuid4().hex, "object": "event", "type": "customer.subscription.created",
          "created": t, "api_version": "2025-03-31.basil", "livemode": False,
          "data": {"object": {"id": "sub_" + uuid.uuid4().hex[:12], "object": "subscription",
                              "customer": "cus_" + uuid.uuid4().hex[:12], "status": "active",
                              "metadata": {"account_id": account}, "cancel_at_period_end": False,
                              "items": {"object": "list", "data": [{
                                  "id": "si_x", "price": {"id": PRICES["starter"], "object": "price"},
                                  "current_period_end": t + 86400}]}}}}
    event = tmp_path / "event.json"
    event.write_text(json.dumps(ev))
    sid = new_subscription(stack, "starter")
    e = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    e.update(MR_RUN_DIR="/nonexistent", MR_ENV_FILE=str(env_file), MR_BIN_DIR=str(mr.build_dir() / "bin"))

    def ctl(*args, stdin=None):
        p = subprocess.run([CTL] + list(args), env=e, input=stdin, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, (args, p.stdout, p.stderr)
        return p

    prov.next(("slow", 1.0))  # the provisioning call, and so curl, lasts a while
    with Watcher() as w:
        ctl("replay", str(event))
        ctl("provision", sid, "--wait")   # curl with a token, psql polling the progress
        ctl("status")
        ctl("concurrency")
        (iid,) = stack.sql("SELECT id::text FROM public.instances WHERE subscription_id = %s", sid)[0]
        ctl("env", "set", iid, "OPENAI_API_KEY", stdin=tenant_secret)   # sealed by mr-secrets
        assert "OPENAI_API_KEY" in ctl("env", "list", iid).stdout
        time.sleep(0.2)
    assert w.ran("curl") and w.ran("psql"), sorted(w.seen)[:50]
    leaks = w.holding(password, stack.env["SUPABASE_JWT_SECRET"], stack.env["STRIPE_WEBHOOK_SECRET"],
                      stack.env["MINDROOM_SECRETS_KEY"], tenant_secret,
                      "Bearer", "eyJ", "Stripe-Signature", "v1=")
    assert leaks == [], leaks


def test_stack_sh_passes_no_secret_in_arguments():
    base = Path(tempfile.mkdtemp(prefix="mr-argv-"))
    os.chmod(base, 0o755)   # PostgreSQL runs as postgres when we are root
    run = base / "run"
    ports = mr.free_ports(4)
    env = dict(os.environ, MR_RUN_DIR=str(run), MR_ENV_FILE="/dev/null",
               MR_BUILD=os.environ.get("MR_BUILD", "build/san"), MR_WORKERS="1",
               MR_API_LISTEN="127.0.0.1:%d" % ports[0], MR_PROVISIONER_LISTEN="127.0.0.1:%d" % ports[1],
               MR_PG_PORT=str(ports[2]), MR_ADMIN_LISTEN="127.0.0.1:%d" % ports[3])
    for k in ("DATABASE_URL", "SUPABASE_URL", "FUNCTIONS_URL", "DOKKU_PROVISIONER_URL"):
        env.pop(k, None)
    from test_stack_script import start, stop
    p = None
    try:
        with Watcher() as w:
            p, _ = start(run, env)
            stop(run, env, p)
            p = None
        secrets = [l.split("=", 1)[1] for l in (run / "secrets.env").read_text().split()]
        assert len(secrets) == 6 and all(len(s) >= 32 for s in secrets)
        assert w.ran("psql") or w.holding("pg.sh"), sorted(w.seen)[:50]
        assert w.holding("mr-jwt") and w.holding("nginx")
        leaks = w.holding(*secrets)
        assert leaks == [], leaks
    finally:
        if p is not None:
            stop(run, env, p)
        subprocess.run(["rm", "-rf", str(base)])


def test_migrate_sh_keeps_database_url_off_the_command_line():
    """migrate.sh's default connection string, $DATABASE_URL with its password,
    reaches psql (once per migration) without appearing on any command line."""
    from schema_cluster import MIGRATE, Cluster
    cluster = Cluster()
    try:
        db = cluster.new_db()
        secret = "pw-" + uuid.uuid4().hex
        # Peer authentication on the socket ignores the password, so the run succeeds;
        # what matters is where the string travels.
        env = dict(os.environ, DATABASE_URL=cluster.conninfo(db) + " password=" + secret)
        with Watcher() as w:
            p = subprocess.run([MIGRATE], env=env, capture_output=True, text=True, timeout=300)
            time.sleep(0.2)
        assert p.returncode == 0, p.stderr
        assert re.search(r"migrate: [1-9][0-9]* applied", p.stdout), p.stdout
        assert w.ran("psql"), sorted(w.seen)[:50]
        leaks = w.holding(secret)
        assert leaks == [], leaks
    finally:
        cluster.close()
