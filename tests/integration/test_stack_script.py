"""scripts/stack.sh, the engine of `make run` / `make stop`, run for real in a
temporary directory on free ports: it comes up and prints a working curl, every
function answers through nginx, `stop` ends everything it started, and the
database survives a restart."""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import mr

FUNCS = ("handle-stripe-webhook", "provision-instance", "deprovision-instance",
         "check-instance-health")


def start(run, env):
    """Starts stack.sh run; returns (Popen, its output so far) once it is up."""
    outfile = run.parent / "stack.out"
    seen = outfile.read_text().count("control plane is up") if outfile.exists() else 0
    with open(outfile, "ab") as out:
        # As from a terminal: Ctrl-C (SIGINT) not ignored, whoever runs the tests (a
        # shell's background job ignores it, and bash cannot trap what it was
        # started ignoring).
        p = subprocess.Popen([str(mr.ROOT / "scripts/stack.sh"), "run"], env=env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = outfile.read_text()
        if text.count("control plane is up") > seen:
            return p, text
        if p.poll() is not None:
            raise AssertionError("stack.sh exited %s:\n%s" % (p.returncode, text))
        time.sleep(0.2)
    raise AssertionError("stack.sh not up:\n" + (run.parent / "stack.out").read_text())


def exits_within(run, p, seconds):
    """p's exit status if stack.sh ended within `seconds`; otherwise fails with what
    it printed once it did end (or 60 s more), which names a component that had to
    be killed, and the tail of every component's log."""
    try:
        return p.wait(seconds)
    except subprocess.TimeoutExpired:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            pass
        logs = "".join("---- %s\n%s\n" % (f.name, f.read_text(errors="replace")[-2000:])
                       for f in sorted((run / "log").glob("*.log")))
        raise AssertionError("stack.sh did not end within %d s:\n%s\n%s" % (
            seconds, (run.parent / "stack.out").read_text()[-3000:], logs))


def stop(run, env, p):
    r = subprocess.run([str(mr.ROOT / "scripts/stack.sh"), "stop"], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 0, r.stdout
    assert exits_within(run, p, 30) == 0


def running_under(run):
    """Pids of processes whose command line mentions the run directory."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open("/proc/%s/cmdline" % d, "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(run) in cmd:
                pids.append((int(d), cmd))
    return pids


@pytest.fixture
def stack_env():
    # Not pytest's tmp_path: PostgreSQL runs as `postgres` when we are root and
    # must reach the run directory.
    base = Path(tempfile.mkdtemp(prefix="mr-stacksh-"))
    os.chmod(base, 0o755)
    run = base / "run"
    ports = mr.free_ports(4)
    env = dict(os.environ, MR_RUN_DIR=str(run), MR_ENV_FILE="/dev/null",
               MR_BUILD=os.environ.get("MR_BUILD", "build/san"), MR_WORKERS="1",
               MR_API_LISTEN="127.0.0.1:%d" % ports[0],
               MR_PROVISIONER_LISTEN="127.0.0.1:%d" % ports[1], MR_PG_PORT=str(ports[2]),
               MR_ADMIN_LISTEN="127.0.0.1:%d" % ports[3])
    for k in ("DATABASE_URL", "SUPABASE_URL", "FUNCTIONS_URL", "DOKKU_PROVISIONER_URL"):
        env.pop(k, None)
    yield run, env, ports
    subprocess.run([str(mr.ROOT / "scripts/stack.sh"), "stop"], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(base, ignore_errors=True)


def test_run_prints_a_working_curl_and_stop_ends_everything(stack_env):
    run, env, ports = stack_env
    p, text = start(run, env)
    api = "http://127.0.0.1:%d" % ports[0]
    assert api + "/functions/v1/" in text
    token = re.search(r"export TOKEN=(\S+)", text).group(1)
    curl = re.search(r"(curl -s .*?-d '\{\}')", text, re.S).group(1).replace("\\\n", " ")
    r = subprocess.run(["bash", "-c", curl], env=dict(env, TOKEN=token),
                       stdout=subprocess.PIPE, text=True, timeout=60)
    # The printed curl reaches check-instance-health as service_role.
    assert '"error":{"code":"unauthorized"' not in r.stdout and r.stdout.startswith("{"), r.stdout
    for name in FUNCS:
        resp = mr.http("POST", api + "/functions/v1/" + name, json={}, token=token)
        assert resp.status not in (401, 403, 404, 405, 502), (name, resp)
    resp = mr.http("POST", api + "/functions/v1/provision-instance", json={})
    assert resp.status == 401
    # No STRIPE_SECRET_KEY by default: the session functions say so, the catalogue answers.
    for name in ("create-checkout-session", "create-portal-session"):
        resp = mr.http("POST", api + "/functions/v1/" + name, json={}, token=token)
        assert resp.status == 503 and resp.json["error"]["code"] == "stripe_not_configured", resp
    resp = mr.http("GET", api + "/functions/v1/list-plans")
    assert resp.status == 200 and len(resp.json["plans"]) == 7, resp
    # The provisioner listener reaches dokku-provisioner, with its token.
    secrets = dict(l.split("=", 1) for l in (run / "secrets.env").read_text().split())
    resp = mr.http("GET", "http://127.0.0.1:%d/apps/mindroom-000000000000" % ports[1],
                   token=secrets["DOKKU_PROVISIONER_TOKEN"])
    assert resp.status not in (401, 502), resp
    # The tenant edges are routed: a user's session reaches my-instance (this user has
    # no instance), and track-usage takes nothing but an instance's own token.
    user = mr.make_jwt({"role": "authenticated", "sub": str(uuid.uuid4()), "aud": "authenticated",
                        "exp": int(time.time()) + 600}, secrets["SUPABASE_JWT_SECRET"])
    resp = mr.http("GET", api + "/functions/v1/my-instance", token=user)
    assert resp.status == 404 and resp.json["error"]["code"] == "not_found", resp
    resp = mr.http("POST", api + "/functions/v1/track-usage", json={}, token=token)
    assert resp.status == 401 and "instance token" in resp.json["error"]["message"], resp
    # PostgreSQL on the TCP port, with the generated password only, schema applied.
    conn = "host=127.0.0.1 port=%d dbname=mindroom user=postgres" % ports[2]
    rows = subprocess.run(["psql", conn, "-XtAc", "select count(*) from supabase_migrations.schema_migrations"],
                          env=dict(env, PGPASSFILE=str(run / "pgpass")),
                          stdout=subprocess.PIPE, text=True, check=True).stdout
    assert int(rows) >= 1
    assert oct((run / "pgpass").stat().st_mode & 0o777) == "0o600"
    nopw = subprocess.run(["psql", conn, "-w", "-XtAc", "select 1"], env=dict(env, PGPASSFILE="/dev/null"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert nopw.returncode != 0 and "password" in nopw.stderr, nopw.stderr
    # mindroom-admin on its own listener.
    assert mr.http("GET", "http://127.0.0.1:%d/ready" % ports[3]).status == 200
    assert running_under(run)

    stop(run, env, p)
    assert running_under(run) == []
    assert not (run / "pids").exists() and not (run / "sock").exists()


def test_restart_keeps_data_and_tokens(stack_env):
    run, env, ports = stack_env
    p, text = start(run, env)
    token = re.search(r"export TOKEN=(\S+)", text).group(1)
    conn = "host=127.0.0.1 port=%d dbname=mindroom user=postgres" % ports[2]
    pgenv = dict(env, PGPASSFILE=str(run / "pgpass"))
    subprocess.run(["psql", conn, "-Xqc", "create table survives(x int); insert into survives values (42)"],
                   env=pgenv, check=True)
    stop(run, env, p)

    p, text = start(run, env)
    assert "migrate: 0 applied" in text.split("control plane is up")[-2]
    assert subprocess.run(["psql", conn, "-XtAc", "select x from survives"], stdout=subprocess.PIPE,
                          env=pgenv, text=True, check=True).stdout.strip() == "42"
    # The secrets were reused: a token minted by the first run still works.
    resp = mr.http("POST", "http://127.0.0.1:%d/functions/v1/provision-instance" % ports[0],
                   json={}, token=token)
    assert resp.status not in (401, 403), resp
    # Ctrl-C: SIGINT to the foreground script stops everything too.
    os.kill(p.pid, signal.SIGINT)
    assert exits_within(run, p, 60) == 0
    assert running_under(run) == []


def test_make_run_with_a_dokku_on_path_deploys_a_real_instance(stack_env):
    """`make run` on a machine with `dokku` (here the stand-in, first on PATH): local
    mode; a signed subscription.created becomes two apps with storage mounted before
    their first deploy, and a running instance with three URLs."""
    import json
    import uuid
    from provisioner_helpers import IMAGE, MATRIX_IMAGE, Dokku, names
    run, env, ports = stack_env
    dokku = Dokku()
    bindir = run.parent / "bin"
    bindir.mkdir()
    (bindir / "dokku").symlink_to(mr.ROOT / "tests" / "standins" / "dokku")
    env = dict(env, PATH="%s:%s" % (bindir, env["PATH"]), DOKKU_MODE="",
               DOKKU_STANDIN_DIR=str(dokku.dir), PROVISIONER_CHILD_ENV="DOKKU_STANDIN_DIR",
               MINDROOM_IMAGE=IMAGE, MATRIX_IMAGE=MATRIX_IMAGE, MINDROOM_BASE_DOMAIN="mr.test",
               DOKKU_COMMAND_TIMEOUT_MS="30000", DOKKU_DEPLOY_TIMEOUT_MS="30000")
    p, text = start(run, env)
    assert "mode local" in (run / "log" / "dokku-provisioner.log").read_text()
    conn = "host=127.0.0.1 port=%d dbname=mindroom user=postgres" % ports[2]

    def sql(q):
        return subprocess.run(["psql", conn, "-XtAc", q], stdout=subprocess.PIPE, text=True,
                              env=dict(env, PGPASSFILE=str(run / "pgpass")), check=True).stdout.strip()
    account, customer, sub = str(uuid.uuid4()), "cus_" + uuid.uuid4().hex[:12], "sub_" + uuid.uuid4().hex[:12]
    sql("INSERT INTO auth.users (id, aud, role, email) VALUES ('%s', 'authenticated', "
        "'authenticated', 'run-%s@example.com')" % (account, account[:8]))
    sql("UPDATE public.accounts SET stripe_customer_id = '%s' WHERE id = '%s'" % (customer, account))
    now = int(time.time())
    event = {"id": "evt_" + uuid.uuid4().hex, "object": "event", "type": "customer.subscription.created",
             "created": now, "livemode": False, "data": {"object": {
                 "id": sub, "object": "subscription", "customer": customer, "status": "active",
                 "metadata": {"account_id": account}, "cancel_at_period_end": False,
                 "items": {"object": "list", "data": [{"id": "si_x", "price": {"id": "price_starter"},
                                                       "current_period_end": now + 86400}]}}}}
    raw = json.dumps(event).encode()
    secrets = dict(l.split("=", 1) for l in (run / "secrets.env").read_text().split())
    resp = mr.http("POST", "http://127.0.0.1:%d/functions/v1/handle-stripe-webhook" % ports[0], body=raw,
                   headers={"Content-Type": "application/json",
                            "Stripe-Signature": mr.stripe_sign(raw, secrets["STRIPE_WEBHOOK_SECRET"])})
    assert resp.status == 200, resp
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        row = sql("SELECT i.status || ' ' || coalesce(i.dokku_app_name, '') || ' ' || "
                  "(frontend_url IS NOT NULL AND backend_url IS NOT NULL AND matrix_server_url IS NOT NULL) "
                  "FROM public.instances i JOIN public.subscriptions s ON s.id = i.subscription_id "
                  "WHERE s.stripe_subscription_id = '%s'" % sub)
        if row.startswith("running "):
            break
        time.sleep(0.5)
    status, app, urls = row.split()
    assert status == "running" and urls == "true", row
    n = names(app)
    calls = dokku.all_calls()
    for a, entry in ((n["app"], n["data"]), (n["hs"], n["hs_data"])):
        deploy = next(i for i, c in enumerate(calls) if c[:2] == ["git:from-image", a])
        mount = next(i for i, c in enumerate(calls) if c[:3] == ["storage:mount", a, entry])
        assert mount < deploy, calls
    # MindRoom's environment (its last config:import) carries its own control-plane token,
    # this stack's URL and its plan's limits; with the token, track-usage counts.
    from provisioner_helpers import imported
    api = "http://127.0.0.1:%d" % ports[0]
    menv = imported([c for c in calls if c[0] == "config:import" and n["app"] in c][-1])
    assert menv["MINDROOM_CONTROL_PLANE_URL"] == api, menv
    assert (menv["MAX_AGENTS"], menv["MAX_MESSAGES_PER_DAY"]) == ("3", "1000"), menv
    resp = mr.http("POST", api + "/functions/v1/track-usage", json={"agent": "general"},
                   token=menv["MINDROOM_CONTROL_PLANE_TOKEN"])
    assert resp.status == 200 and resp.json["remaining"] == 999, resp
    assert sql("SELECT messages_sent FROM public.usage_metrics u JOIN public.instances i "
               "ON i.id = u.instance_id WHERE i.dokku_app_name = '%s'" % app) == "1"
    dokku.assert_documented()
    stop(run, env, p)


def test_an_exported_secret_wins_over_secrets_env_as_documented(stack_env, tmp_path):
    """docs/operations.md: "Configuration, lowest precedence first (the order
    `scripts/stack.sh` uses): `.run/secrets.env`, `.env`, the environment", and
    mindroomctl applies that order. The same exported value must therefore reach
    both: a token mindroomctl signs with an exported MINDROOM_INTERNAL_SECRET is
    one the stack started with that export accepts."""
    run, env, ports = stack_env
    secret = "e" * 40
    env = dict(env, MINDROOM_INTERNAL_SECRET=secret)
    p, text = start(run, env)
    try:
        ctl_env = {k: env[k] for k in ("PATH", "HOME", "MR_RUN_DIR", "MR_ENV_FILE",
                                       "MR_API_LISTEN", "MR_PG_PORT", "MINDROOM_INTERNAL_SECRET")
                   if k in env}
        r = subprocess.run([str(mr.ROOT / "scripts/mindroomctl"), "health"], env=ctl_env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        assert r.returncode == 0, "exit %d: %s" % (r.returncode, r.stderr)
    finally:
        stop(run, env, p)
