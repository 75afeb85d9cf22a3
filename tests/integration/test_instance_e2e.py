"""An instance is a working, durable MindRoom: from a signed Stripe event through the
webhook, the lifecycle worker, nginx's provisioner listener and the real
dokku-provisioner to the stand-in `dokku` (tests/standins/dokku, local mode, which
keeps each storage entry's files and each app's container). Both components'
health endpoints are the health stand-in (PROVISIONER_BACKEND_URL and
PROVISIONER_MATRIX_URL point there), so the worker's periodic health round probes
them for real. Only Dokku, Stripe's delivery and the instances' HTTP are stood in."""
import base64
import json
import os
import re
import secrets
import subprocess
import time
import uuid

import pytest

import mr
from health import HealthStandin
from lifecycle_helpers import (deploy_env, LIMITS, PRICES, WORKER, instance, new_account,
                               wait_status, wait_until)
from provisioner_helpers import DOMAIN, Dokku, hs_internal_url, imported, mem, names

FUNCS = ["handle-stripe-webhook", "deprovision-instance", "check-instance-health",
         "dokku-provisioner", WORKER]
HEALTH_INTERVAL = 1
THRESHOLD = 2
MINDROOM_FILE = "/mindroom_data/agents/memory.db"
HOMESERVER_FILE = "/data/media_store/local_content/ab/cd/upload"
SECRET_FILES = ("signing.key", "registration_shared_secret", "macaroon_secret_key",
                "form_secret")


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
    env = deploy_env(dokku, health, HEALTH_INTERVAL_S=HEALTH_INTERVAL,
                     HEALTH_FAILURE_THRESHOLD=THRESHOLD, SWEEP_INTERVAL_S=2)
    with mr.Stack(pg, env=env, functions=FUNCS) as s:
        yield s


class Customer:
    """A Stripe customer we created for an account (accounts.stripe_customer_id),
    with one subscription; each event is newer than the last."""

    def __init__(self, stack, tier="starter"):
        self.stack = stack
        self.account, self.email = new_account(stack)
        self.customer = "cus_" + uuid.uuid4().hex[:14]
        self.sub = "sub_" + uuid.uuid4().hex[:14]
        self.tier = tier
        self.t = int(time.time()) - 1000
        stack.sql("UPDATE public.accounts SET stripe_customer_id = %s WHERE id = %s",
                  self.customer, self.account)

    def send(self, type_, status, tier=None, **fields):
        """fields: more of the subscription object's members (cancel_at_period_end...)."""
        self.t += 1
        self.tier = tier or self.tier
        obj = {"id": self.sub, "object": "subscription", "customer": self.customer,
               "status": status, "metadata": {"account_id": self.account},
               "cancel_at_period_end": False,
               "items": {"object": "list", "data": [{
                   "id": "si_" + uuid.uuid4().hex[:10],
                   "price": {"id": PRICES[self.tier], "object": "price"},
                   "current_period_end": self.t + 30 * 86400}]}}
        obj.update(fields)
        raw = json.dumps({"id": "evt_" + uuid.uuid4().hex, "object": "event", "type": type_,
                          "created": self.t, "api_version": "2025-03-31.basil",
                          "livemode": False, "data": {"object": obj}}).encode()
        r = self.stack.call("POST", "handle-stripe-webhook", body=raw,
                            headers=self.stack.stripe_headers(raw))
        assert r.status == 200, r

    @property
    def sid(self):
        return str(self.stack.sql("SELECT id FROM public.subscriptions WHERE "
                                  "stripe_subscription_id = %s", self.sub)[0][0])


def running(stack, sid, timeout=45):
    """The instance once running with nothing owed but maybe its email."""
    return wait_until(lambda: (lambda i: i if i["status"] == "running" and not i["claimed_by"]
                               and i["owed_action"] in (None, "email") else None)(
        instance(stack, sid)), timeout, interval=0.1, what="instance running, nothing owed")


def row(stack, sql, *params):
    rows = stack.sql(sql, *params)
    return rows[0] if rows else None


def first_index(calls, pred):
    return next((i for i, c in enumerate(calls) if pred(c)), None)


def health_now(stack, iid):
    r = stack.call("GET", "check-instance-health?instance_id=%s" % iid, token=stack.jwt())
    assert r.status == 200, r
    return r.json["results"][0]


def test_a_paid_subscription_becomes_a_working_instance_whose_data_survives_everything_routine(
        stack, dokku, health):
    c = Customer(stack, "starter")
    dokku.mark()
    t0 = time.monotonic()
    c.send("customer.subscription.created", "active")
    inst = running(stack, c.sid)
    took = time.monotonic() - t0
    app, sub = inst["dokku_app_name"], inst["subdomain"]
    n = names(app)
    calls = dokku.new_calls()

    # Two apps, each with its storage entry mounted before its first deploy; the
    # homeserver's configuration written into its entry before its first deploy.
    assert dokku.exists(n["app"]) and dokku.exists(n["hs"])
    for a, entry in ((n["app"], n["data"]), (n["hs"], n["hs_data"])):
        deploy = first_index(calls, lambda x: x[0] == "git:from-image" and x[1] == a)
        mount = first_index(calls, lambda x: x[0] == "storage:mount" and x[1:3] == [a, entry])
        assert deploy is not None and mount is not None and mount < deploy, (a, calls)
    config = first_index(calls, lambda x: x[0] == "storage:exec" and x[1] == n["hs_data"])
    hs_deploy = first_index(calls, lambda x: x[0] == "git:from-image" and x[1] == n["hs"])
    assert config is not None and config < hs_deploy, calls
    hs_dir = dokku.host_dir(n["hs_data"])
    assert ('server_name: "%s-matrix.%s"' % (sub, DOMAIN)) in (hs_dir / "homeserver.yaml").read_text()
    for f in SECRET_FILES:
        assert (hs_dir / f).stat().st_size > 0, f
    # Each component gets its own share of the plan.
    for a, (mb, cpu) in ((n["app"], LIMITS["starter"]), (n["hs"], (512, 0.5))):
        lim = next(x for x in calls if x[0] == "resource:limit" and x[-1] == a)
        assert lim[lim.index("--memory") + 1] == mem("%dm" % mb) and float(lim[lim.index("--cpu") + 1]) == cpu
    # MindRoom's environment: the contract (docs/instance.md).
    env = imported(next(x for x in calls if x[0] == "config:import" and n["app"] in x))
    assert env["MINDROOM_INSTANCE_ID"] == str(inst["id"]) and env["MINDROOM_TIER"] == "starter"
    assert (env["MAX_AGENTS"], env["MAX_MESSAGES_PER_DAY"], env["MAX_STORAGE_GB"]) == ("3", "1000", "5")
    assert env["MATRIX_HOMESERVER"] == hs_internal_url(n["app"])
    assert env["MATRIX_REGISTRATION_SHARED_SECRET"] == \
        (hs_dir / "registration_shared_secret").read_text().strip()
    # Three URLs; the homeserver's name recorded once.
    assert inst["frontend_url"] == "http://%s.%s" % (sub, DOMAIN)
    assert inst["backend_url"].endswith("/i/%s/api" % sub)  # the API base, as by default
    assert inst["matrix_server_url"].endswith("/i/%s-matrix.%s" % (sub, DOMAIN))
    assert row(stack, "SELECT matrix_server_name FROM public.instances WHERE id = %s",
               inst["id"])[0] == "%s-matrix.%s" % (sub, DOMAIN)
    print("\nsigned subscription.created -> two apps running with storage: %.1f s" % took)

    # Health probes both components.
    health.reset()
    h = health_now(stack, inst["id"])
    assert h["status"] == "healthy" and h["failed_component"] is None, h
    assert h["components"]["mindroom"]["status"] == "healthy"
    assert h["components"]["homeserver"]["status"] == "healthy"
    assert health.hits(sub) >= 1 and health.hits("%s-matrix.%s" % (sub, DOMAIN)) >= 1
    # MindRoom's health endpoint is /api/health at its domain's root.
    assert {q["path"] for q in health.requests(sub)} == {"/i/%s/api/health" % sub}

    # Customer data in both components.
    dokku.container_write(n["app"], MINDROOM_FILE, "agents' memory")
    dokku.container_write(n["hs"], HOMESERVER_FILE, "an uploaded image")
    dokku.container_write(n["app"], "/tmp/scratch", "not kept")

    def data_kept(what):
        assert dokku.container_read(n["app"], MINDROOM_FILE) == "agents' memory", what
        assert dokku.container_read(n["hs"], HOMESERVER_FILE) == "an uploaded image", what

    # 1. A plan change: both apps get the new shares, the data stays.
    dokku.mark()
    c.send("customer.subscription.updated", "active", tier="professional")
    wait_until(lambda: any(x[0] == "resource:limit" and x[-1] == n["app"] and mem("2048m") in x
                           for x in dokku.all_calls()), timeout=45, what="professional limits")
    running(stack, c.sid)
    calls = dokku.new_calls()
    assert not any(x[0] in ("apps:create", "storage:create", "storage:unmount", "apps:destroy",
                            "storage:destroy") for x in calls), calls
    assert dokku.container_read(n["app"], "/tmp/scratch") is None  # a new container
    data_kept("after a plan change")
    env = imported([x for x in calls if x[0] == "config:import" and n["app"] in x][-1])
    assert (env["MAX_AGENTS"], env["MINDROOM_TIER"]) == ("10", "professional")

    # 2. Unpaid stops both apps; paid again starts them: the same apps, the same data.
    c.send("customer.subscription.updated", "unpaid")
    wait_status(stack, c.sid, "stopped", timeout=30)
    assert dokku.app(n["app"], "running") != "true" and dokku.app(n["hs"], "running") != "true"
    c.send("customer.subscription.updated", "active")
    running(stack, c.sid)
    calls = dokku.new_calls()
    # The stop revoked the instance's control-plane token, so the start applies the
    # configuration with a new one (POST /apps of the same apps, which starts them).
    assert dokku.app(n["app"], "running") == "true" and dokku.app(n["hs"], "running") == "true"
    started_env = imported([x for x in calls if x[0] == "config:import" and n["app"] in x][-1])
    assert started_env["MINDROOM_CONTROL_PLANE_TOKEN"] != env["MINDROOM_CONTROL_PLANE_TOKEN"]
    assert not any(x[0] in ("apps:create", "storage:create") for x in calls), calls
    data_kept("after stop and start")

    # 3. A homeserver that stops answering: the health round marks the instance
    # failed after THRESHOLD rounds and the worker redeploys it; the data stays.
    hs_key = "%s-matrix.%s" % (sub, DOMAIN)
    health.set_mode(hs_key, "500")
    h = health_now(stack, inst["id"])
    assert h["failed_component"] == "homeserver" and h["status"].startswith("homeserver: "), h
    assert h["components"]["mindroom"]["status"] == "healthy", h
    wait_until(lambda: row(stack, "SELECT count(*) FROM public.audit_logs WHERE action = "
                                  "'instance.status_changed' AND details->>'instance_id' = %s "
                                  "AND details->>'to' = 'failed'", str(inst["id"]))[0] >= 1
               or instance(stack, c.sid)["status"] == "failed",
               timeout=(THRESHOLD + 3) * HEALTH_INTERVAL + 10, what="marked failed")
    health.set_mode(hs_key, "ok")
    wait_until(lambda: any(x[0] in ("git:from-image", "ps:rebuild", "ps:restart")
                           for x in dokku.new_calls()), timeout=45, what="a redeploy")
    running(stack, c.sid)
    data_kept("after a health-driven redeploy")

    # 4. Cancelled: both apps destroyed, the data kept for the retention period...
    c.send("customer.subscription.deleted", "canceled")
    wait_status(stack, c.sid, "deprovisioned", timeout=30)
    assert not dokku.exists(n["app"]) and not dokku.exists(n["hs"])
    assert dokku.entry(n["data"]) is not None and dokku.entry(n["hs_data"]) is not None
    assert (dokku.host_dir(n["data"]) / "agents" / "memory.db").read_text() == "agents' memory"
    after = row(stack, "SELECT storage_destroy_after - now(), storage_destroyed_at, owed_action "
                       "FROM public.instances WHERE id = %s", inst["id"])
    assert after[0].days in (29, 30) and after[1] is None and after[2] == "destroy_storage", after
    # ... then destroyed (the retention period made to end now).
    stack.sql("UPDATE public.instances SET storage_destroy_after = now() WHERE id = %s", inst["id"])
    wait_until(lambda: row(stack, "SELECT storage_destroyed_at FROM public.instances WHERE id = %s",
                           inst["id"])[0], timeout=30, what="storage destroyed")
    assert dokku.entry(n["data"]) is None and dokku.entry(n["hs_data"]) is None
    assert not dokku.host_dir(n["data"]).exists() and not hs_dir.exists()
    assert row(stack, "SELECT count(*) FROM public.audit_logs WHERE action = "
                      "'instance.storage_destroyed' AND details->>'instance_id' = %s",
               str(inst["id"]))[0] == 1


def test_a_customer_who_subscribes_again_within_the_retention_gets_its_mindroom_back(stack, dokku):
    """A customer cancels, then subscribes again through Checkout: a new Stripe
    subscription. While the cancelled instance's data is kept (the retention period),
    the new instance is that instance again: its address, its agents' data, its
    homeserver (rooms, users, keys, server_name). Without that, the customer's data
    waited out the retention beside a new, empty MindRoom and was destroyed."""
    c = Customer(stack, "starter")
    c.send("customer.subscription.created", "active")
    first = running(stack, c.sid)
    n = names(first["dokku_app_name"])
    hs_dir = dokku.host_dir(n["hs_data"])
    keys = {f: (hs_dir / f).read_text() for f in SECRET_FILES}
    dokku.container_write(n["app"], MINDROOM_FILE, "agents' memory")
    dokku.container_write(n["hs"], "/data/homeserver.db", "rooms and users")

    c.send("customer.subscription.deleted", "canceled")
    wait_status(stack, c.sid, "deprovisioned", timeout=30)
    assert not dokku.exists(n["app"]) and dokku.entry(n["data"]) is not None

    # A week later (within the 30 days) the same customer subscribes again, to another plan.
    c.sub = "sub_" + uuid.uuid4().hex[:14]
    c.send("customer.subscription.created", "active", tier="professional")
    second = running(stack, c.sid)
    assert str(second["id"]) != str(first["id"])
    assert (second["dokku_app_name"], second["subdomain"], second["frontend_url"]) == \
        (first["dokku_app_name"], first["subdomain"], first["frontend_url"]), second
    assert dokku.app(n["app"], "running") == "true" and dokku.app(n["hs"], "running") == "true"
    assert dokku.container_read(n["app"], MINDROOM_FILE) == "agents' memory"
    assert (hs_dir / "homeserver.db").read_text() == "rooms and users"
    assert {f: (hs_dir / f).read_text() for f in SECRET_FILES} == keys, "a new homeserver identity"
    assert row(stack, "SELECT matrix_server_name FROM public.instances WHERE id = %s",
               second["id"])[0] == "%s-matrix.%s" % (first["subdomain"], DOMAIN)
    assert row(stack, "SELECT storage_taken_by, owed_action FROM public.instances WHERE id = %s",
               first["id"]) == (second["id"], None), "the kept data is still owed its destruction"


def test_purge_destroys_apps_and_data_at_once(stack, dokku):
    c = Customer(stack, "free")
    c.send("customer.subscription.created", "active")
    inst = running(stack, c.sid)
    n = names(inst["dokku_app_name"])
    dokku.container_write(n["app"], MINDROOM_FILE, "x")
    r = stack.call("POST", "deprovision-instance", token=stack.jwt(),
                   json={"instance_id": inst["id"], "mode": "destroy", "purge": True, "wait": True})
    assert r.status == 200 and r.json["instance"]["status"] == "deprovisioned", r
    assert r.json["instance"]["storage_destroyed_at"] is not None, r
    assert not dokku.exists(n["app"]) and not dokku.exists(n["hs"])
    assert dokku.entry(n["data"]) is None and dokku.entry(n["hs_data"]) is None
    acts = [a for (a,) in stack.sql("SELECT action FROM public.audit_logs WHERE details->>'instance_id' "
                                    "= %s ORDER BY created_at", inst["id"])]
    assert "instance.purge_requested" in acts and "instance.storage_destroyed" in acts, acts
    # purge without destroy is refused, writing nothing.
    r = stack.call("POST", "deprovision-instance", token=stack.jwt(),
                   json={"instance_id": inst["id"], "mode": "stop", "purge": True})
    assert r.status == 400 and "purge" in r.json["error"]["message"], r


def test_deleting_the_account_tears_down_apps_and_data(stack, dokku):
    c = Customer(stack, "free")
    c.send("customer.subscription.created", "active")
    inst = running(stack, c.sid)
    n = names(inst["dokku_app_name"])
    # Supabase Auth deletes the user: the cascade removes account, subscription, instance.
    stack.sql("DELETE FROM auth.users WHERE id = %s", c.account)
    assert stack.sql("SELECT count(*) FROM public.instances WHERE id = %s", inst["id"])[0][0] == 0
    wait_until(lambda: row(stack, "SELECT done_at FROM public.instance_teardowns WHERE instance_id = %s",
                           inst["id"])[0], timeout=30, what="teardown done")
    assert not dokku.exists(n["app"]) and not dokku.exists(n["hs"])
    assert dokku.entry(n["data"]) is None and dokku.entry(n["hs_data"]) is None
    acts = {a for (a,) in stack.sql("SELECT action FROM public.audit_logs WHERE details->>'instance_id' "
                                    "= %s", inst["id"])}
    assert {"instance.teardown_requested", "instance.storage_destroyed"} <= acts, acts


def ctl(stack, *args, stdin=None, extra=None):
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": stack.env["DATABASE_URL"],
           "DATABASE_POOLER": stack.env.get("DATABASE_POOLER"),
           "MINDROOM_SECRETS_KEY": stack.env["MINDROOM_SECRETS_KEY"],
           "MR_BIN_DIR": str(mr.build_dir() / "bin"),
           "MR_RUN_DIR": "/nonexistent-run", "MR_ENV_FILE": "/nonexistent.env"}
    env.update(extra or {})
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([str(mr.ROOT / "scripts/mindroomctl"), *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=60)


def kids(stack):
    return {ct.split(":")[1] for (ct,) in stack.sql("SELECT ciphertext FROM public.instance_secrets")}


def test_secrets_are_sealed_set_without_redeploy_when_unchanged_and_survive_a_key_rotation(
        stack, dokku):
    c = Customer(stack, "starter")
    c.send("customer.subscription.created", "active")
    inst = running(stack, c.sid)
    iid, n = str(inst["id"]), names(inst["dokku_app_name"])
    hs_dir = dokku.host_dir(n["hs_data"])
    hs_secret = (hs_dir / "registration_shared_secret").read_text().strip()

    # An operator's API key, through mindroomctl (the value on stdin).
    api_key = "sk-" + secrets.token_hex(20)
    dokku.mark()
    p = ctl(stack, "env", "set", iid, "OPENAI_API_KEY", stdin=api_key + "\n")
    assert p.returncode == 0 and "owes an update" in p.stdout, p
    assert api_key not in p.stdout + p.stderr
    wait_until(lambda: any(x[0] == "config:import" and n["app"] in x for x in dokku.all_calls()[dokku._seen:]),
               timeout=45, what="config:import with the new key")
    running(stack, c.sid)
    env = imported([x for x in dokku.new_calls() if x[0] == "config:import" and n["app"] in x][-1])
    assert env["OPENAI_API_KEY"] == api_key
    # The same value again: nothing owed, nothing called.
    p = ctl(stack, "env", "set", iid, "OPENAI_API_KEY", stdin=api_key)
    assert p.returncode == 0 and "unchanged" in p.stdout, p
    assert instance(stack, c.sid)["owed_action"] in (None, "email")
    p = ctl(stack, "env", "list", iid)
    assert p.returncode == 0 and "OPENAI_API_KEY" in p.stdout and api_key not in p.stdout, p
    # Bad input: a reserved or malformed name, an unknown instance; nothing written.
    for args, code in ((("env", "set", iid, "DOKKU_X"), 2), (("env", "set", iid, "lower"), 2),
                       (("env", "set", str(uuid.uuid4()), "GOOD"), 1)):
        p = ctl(stack, *args, stdin="v")
        assert p.returncode == code, (args, p)
    # A legacy plaintext variable is sealed away by the worker at its next step.
    legacy = "legacy-" + secrets.token_hex(16)
    stack.sql("UPDATE public.instances SET environment_vars = %s WHERE id = %s",
              json.dumps({"LEGACY_TOKEN": legacy}), iid)
    wait_until(lambda: row(stack, "SELECT environment_vars = '{}'::jsonb FROM public.instances "
                                  "WHERE id = %s", iid)[0], timeout=45, what="legacy env sealed")
    running(stack, c.sid)
    env = imported([x for x in dokku.new_calls() if x[0] == "config:import" and n["app"] in x][-1])
    assert env["LEGACY_TOKEN"] == legacy and env["OPENAI_API_KEY"] == api_key

    # No dump of the database holds any of them.
    known = [api_key, legacy, hs_secret] + [
        (hs_dir / f).read_text().strip().split()[-1] for f in SECRET_FILES]
    dump = subprocess.run(["pg_dump", "--data-only", stack.pg.conninfo(stack.db, "postgres")],
                          check=True, capture_output=True, text=True).stdout
    assert "instance_secrets" in dump and "mrs1:" in dump
    for k in known:
        assert k not in dump, "a secret is in the dump"
        assert base64.b64encode(k.encode()).decode() not in dump

    # Rotation: workers learn the new key, then seal with it; rotate-secrets-key
    # re-seals everything; nothing is redeployed; the old key can then go.
    old_key, new_key = stack.env["MINDROOM_SECRETS_KEY"], base64.b64encode(os.urandom(32)).decode()
    before = kids(stack)
    assert len(before) == 1
    versions = row(stack, "SELECT config_version, applied_config_version FROM public.instances "
                          "WHERE id = %s", iid)
    dokku.mark()
    stack.env.update(MINDROOM_SECRETS_KEY=new_key, MINDROOM_SECRETS_KEY_PREVIOUS=old_key)
    stack.restart_function(WORKER)
    p = ctl(stack, "rotate-secrets-key", extra={"MINDROOM_SECRETS_KEY": new_key,
                                                "MINDROOM_SECRETS_KEY_PREVIOUS": old_key})
    assert p.returncode == 0 and re.search(r"\b(\d+) re-sealed", p.stdout), p
    after = kids(stack)
    assert len(after) == 1 and after != before
    p = ctl(stack, "rotate-secrets-key", extra={"MINDROOM_SECRETS_KEY": new_key,
                                                "MINDROOM_SECRETS_KEY_PREVIOUS": old_key})
    assert p.returncode == 0 and " 0 re-sealed" in p.stdout, p       # idempotent
    assert row(stack, "SELECT config_version, applied_config_version FROM public.instances "
                      "WHERE id = %s", iid) == versions
    time.sleep(1.0)
    assert dokku.new_calls() == []                                     # nothing redeployed
    # The old key gone: the next update opens everything with the new one alone,
    # and the homeserver keeps its keys.
    stack.env.update(MINDROOM_SECRETS_KEY_PREVIOUS=None)
    stack.restart_function(WORKER)
    p = ctl(stack, "env", "set", iid, "SECOND_KEY", stdin="v2",
            extra={"MINDROOM_SECRETS_KEY": new_key})
    assert p.returncode == 0, p
    wait_until(lambda: any(x[0] == "config:import" and n["app"] in x for x in dokku.all_calls()[dokku._seen:]),
               timeout=45, what="update after rotation")
    running(stack, c.sid)
    env = imported([x for x in dokku.new_calls() if x[0] == "config:import" and n["app"] in x][-1])
    assert env["OPENAI_API_KEY"] == api_key and env["SECOND_KEY"] == "v2"
    assert env["MATRIX_REGISTRATION_SHARED_SECRET"] == hs_secret
    assert (hs_dir / "registration_shared_secret").read_text().strip() == hs_secret


def test_variables_at_their_limit_are_deployed_as_they_were_set(stack, dokku):
    """What `env set` takes, the instance gets: variables filling the 24 KiB an instance
    may have (counted as they are deployed, a control character six bytes in JSON) reach
    MindRoom's config:import intact through the provisioner's request, and the instance
    is running with nothing owed, never held on a request too large (413)."""
    c = Customer(stack, "starter")
    c.send("customer.subscription.created", "active")
    inst = running(stack, c.sid)
    iid, n = str(inst["id"]), names(inst["dokku_app_name"])
    a = "\x01\x1f" * 1000                                # 12,000 bytes as deployed
    b = "\x7f\"\\\n" + "\x02" * 2089 + "xyz\u00e9"      # the rest: 24,576 in all
    deployed = json.dumps({"CONTROL_A": a, "CONTROL_B": b}, ensure_ascii=False,
                          separators=(",", ":")).encode()
    assert len(deployed) - 2 + 1 == 24 * 1024          # {...} as "K":"v", twice
    dokku.mark()
    for name, value in (("CONTROL_A", a), ("CONTROL_B", b)):
        p = ctl(stack, "env", "set", iid, name, stdin=value)
        assert p.returncode == 0 and "owes an update" in p.stdout, p
    p = ctl(stack, "env", "set", iid, "ONE_MORE", stdin="x")
    assert p.returncode == 2 and "over 24576" in p.stderr, p
    wait_until(lambda: dokku.config(n["app"]).get("CONTROL_B") == b, timeout=45,
               what="both variables deployed")
    inst = running(stack, c.sid)
    assert inst["last_error"] is None, inst["last_error"]
    env = imported([x for x in dokku.new_calls() if x[0] == "config:import" and n["app"] in x][-1])
    assert env["CONTROL_A"] == a and env["CONTROL_B"] == b and "ONE_MORE" not in env


def test_the_worker_refuses_to_start_without_a_secrets_key(pg):
    for key, why in ((None, "MINDROOM_SECRETS_KEY is required"),
                     (base64.b64encode(b"short").decode(), "MINDROOM_SECRETS_KEY")):
        with pytest.raises(RuntimeError) as e:
            with mr.Stack(pg, env={"MINDROOM_SECRETS_KEY": key}, functions=[WORKER]):
                pass
        assert why in str(e.value) and "exited 2" in str(e.value)


def test_an_instance_created_again_on_kept_storage_keeps_its_homeserver_identity(stack, dokku):
    """An instance destroyed with its data kept, then created again under the same
    names (its subscription provisioned again), mounts the same storage entries and
    takes them over (docs/lifecycle.md, 124_kept_storage_taken.sql): the homeserver's
    database, rooms and users are those of the first instance. Its keys must be too:
    docs/instance.md says the homeserver's keys are generated once per instance "so
    a re-created app ... gets the same identity", and docs/provisioner.md that
    replacing the signing key changes the homeserver's federation identity. And
    MindRoom, on its kept data, must come back with the variables an operator set on
    the first instance (its model providers' API keys): nobody is told to set them
    again."""
    c = Customer(stack, "starter")
    c.send("customer.subscription.created", "active")
    first = running(stack, c.sid)
    n = names(first["dokku_app_name"])
    hs_dir = dokku.host_dir(n["hs_data"])
    api_key = "sk-" + secrets.token_hex(20)
    p = ctl(stack, "env", "set", str(first["id"]), "OPENAI_API_KEY", stdin=api_key)
    assert p.returncode == 0 and "owes an update" in p.stdout, p
    wait_until(lambda: dokku.config(n["app"]).get("OPENAI_API_KEY") == api_key, timeout=45,
               what="the key deployed")
    first = running(stack, c.sid)
    before = {f: (hs_dir / f).read_text() for f in SECRET_FILES}
    dokku.container_write(n["hs"], "/data/homeserver.db", "rooms, users, events signed by "
                          + before["signing.key"].split()[1])

    r = stack.call("POST", "deprovision-instance", token=stack.jwt(),
                   json={"instance_id": first["id"], "mode": "destroy", "wait": True})
    assert r.status == 200 and r.json["instance"]["status"] == "deprovisioned", r
    assert dokku.entry(n["hs_data"]) is not None            # the data is kept
    # Its homeserver was named under an earlier PROVISIONER_MATRIX_HOST: the name in
    # its database is the recorded one, not today's default.
    old_name = "%s-chat.%s" % (first["subdomain"], DOMAIN)
    stack.sql("UPDATE public.instances SET matrix_server_name = %s WHERE id = %s",
              old_name, first["id"])
    # The subscription is still paid for: its next event asks for an instance again.
    dokku.mark()
    c.send("customer.subscription.updated", "active")
    second = wait_until(lambda: row(
        stack, "SELECT id FROM public.instances WHERE subscription_id = %s AND status = "
               "'running' AND claimed_by IS NULL", c.sid), timeout=45, what="running again")[0]
    assert str(second) != str(first["id"])
    sets = [x for x in dokku.new_calls() if x[0] == "config:import" and n["app"] in x]
    assert sets, "the re-created MindRoom was never configured"
    assert imported(sets[-1]).get("OPENAI_API_KEY") == api_key, \
        "the re-created MindRoom lost the operator's OPENAI_API_KEY"
    p = ctl(stack, "env", "list", str(second))
    assert p.returncode == 0 and "OPENAI_API_KEY" in p.stdout and api_key not in p.stdout, p
    log = stack.log(WORKER)
    assert ("instance %s: variables OPENAI_API_KEY carried over from instance %s"
            % (second, first["id"])) in log and api_key not in log
    assert row(stack, "SELECT storage_taken_by FROM public.instances WHERE id = %s",
               first["id"])[0] == second
    assert (hs_dir / "homeserver.db").read_text().startswith("rooms, users")
    assert ('server_name: "%s"' % old_name) in (hs_dir / "homeserver.yaml").read_text()
    assert row(stack, "SELECT matrix_server_name FROM public.instances WHERE id = %s",
               second)[0] == old_name
    after = {f: (hs_dir / f).read_text() for f in SECRET_FILES}
    changed = sorted(f for f in SECRET_FILES if after[f] != before[f])
    assert changed == [], "the kept homeserver's %s were replaced" % ", ".join(changed)


def test_kept_homeserver_keys_that_do_not_open_fail_the_create_and_replace_nothing(stack, dokku):
    """The keys of the instance whose storage a new one took over must open: new keys
    would change the kept homeserver's identity under its database. The create fails,
    names that instance, writes nothing into the kept storage, and goes through once
    the keys open again (the operator restored the key that sealed them)."""
    c = Customer(stack, "starter")
    c.send("customer.subscription.created", "active")
    first = running(stack, c.sid)
    n = names(first["dokku_app_name"])
    hs_dir = dokku.host_dir(n["hs_data"])
    before = {f: (hs_dir / f).read_text() for f in SECRET_FILES}
    r = stack.call("POST", "deprovision-instance", token=stack.jwt(),
                   json={"instance_id": first["id"], "mode": "destroy", "wait": True})
    assert r.status == 200 and r.json["instance"]["status"] == "deprovisioned", r
    # Its signing key no longer opens (as under a key that was rotated away): another
    # row's ciphertext, authenticated for another context.
    good = row(stack, "SELECT ciphertext FROM public.instance_secrets WHERE instance_id = %s "
                      "AND kind = 'homeserver' AND name = 'signing_key'", first["id"])[0]
    stack.sql("UPDATE public.instance_secrets SET ciphertext = (SELECT ciphertext FROM "
              "public.instance_secrets WHERE instance_id = %s AND kind = 'homeserver' AND "
              "name = 'form_secret') WHERE instance_id = %s AND kind = 'homeserver' AND "
              "name = 'signing_key'", first["id"], first["id"])

    c.send("customer.subscription.updated", "active")
    second, error = wait_until(lambda: row(
        stack, "SELECT id, last_error FROM public.instances WHERE subscription_id = %s AND "
               "status <> 'deprovisioned' AND last_error IS NOT NULL", c.sid),
        timeout=45, what="the create failed")
    assert ("homeserver keys of instance %s" % first["id"]) in error, error
    assert row(stack, "SELECT count(*) FROM public.instance_secrets WHERE instance_id = %s "
                      "AND kind = 'homeserver'", second)[0] == 0
    assert {f: (hs_dir / f).read_text() for f in SECRET_FILES} == before

    stack.sql("UPDATE public.instance_secrets SET ciphertext = %s WHERE instance_id = %s AND "
              "kind = 'homeserver' AND name = 'signing_key'", good, first["id"])
    stack.sql("UPDATE public.instances SET next_attempt_at = now() WHERE id = %s", second)
    wait_until(lambda: row(stack, "SELECT 1 FROM public.instances WHERE id = %s AND status = "
                                  "'running' AND claimed_by IS NULL", second),
               timeout=45, what="running once the keys open")
    assert {f: (hs_dir / f).read_text() for f in SECRET_FILES} == before


def test_kept_variables_that_do_not_open_fail_the_create_and_store_nothing(stack, dokku):
    """The variables of the instance whose storage a new one took over must open too:
    started without one of its API keys, MindRoom comes back on its data broken and
    nobody is told. The create fails, names that instance and the variable (never its
    value), stores nothing for the new instance, and goes through with every variable
    once they open again."""
    c = Customer(stack, "starter")
    c.send("customer.subscription.created", "active")
    first = running(stack, c.sid)
    fid, n = str(first["id"]), names(first["dokku_app_name"])
    values = {"OPENAI_API_KEY": "sk-" + secrets.token_hex(20), "SECOND_KEY": "v-" + secrets.token_hex(8)}
    for name, value in values.items():
        p = ctl(stack, "env", "set", fid, name, stdin=value)
        assert p.returncode == 0, p
    r = stack.call("POST", "deprovision-instance", token=stack.jwt(),
                   json={"instance_id": fid, "mode": "destroy", "wait": True})
    assert r.status == 200 and r.json["instance"]["status"] == "deprovisioned", r
    # OPENAI_API_KEY no longer opens: another row's ciphertext, authenticated for
    # another context.
    good = row(stack, "SELECT ciphertext FROM public.instance_secrets WHERE instance_id = %s "
                      "AND kind = 'env' AND name = 'OPENAI_API_KEY'", fid)[0]
    stack.sql("UPDATE public.instance_secrets SET ciphertext = (SELECT ciphertext FROM "
              "public.instance_secrets WHERE instance_id = %s AND kind = 'env' AND "
              "name = 'SECOND_KEY') WHERE instance_id = %s AND kind = 'env' AND "
              "name = 'OPENAI_API_KEY'", fid, fid)

    dokku.mark()
    c.send("customer.subscription.updated", "active")
    second, error = wait_until(lambda: row(
        stack, "SELECT id, last_error FROM public.instances WHERE subscription_id = %s AND "
               "status <> 'deprovisioned' AND last_error IS NOT NULL", c.sid),
        timeout=45, what="the create failed")
    assert ("OPENAI_API_KEY of instance %s" % fid) in error, error
    assert all(v not in error for v in values.values())
    assert row(stack, "SELECT count(*) FROM public.instance_secrets WHERE instance_id = %s "
                      "AND kind IN ('env', 'homeserver')", second)[0] == 0
    assert not [x for x in dokku.new_calls() if x[0] == "config:import" and n["app"] in x]

    stack.sql("UPDATE public.instance_secrets SET ciphertext = %s WHERE instance_id = %s AND "
              "kind = 'env' AND name = 'OPENAI_API_KEY'", good, fid)
    stack.sql("UPDATE public.instances SET next_attempt_at = now() WHERE id = %s", second)
    wait_until(lambda: row(stack, "SELECT 1 FROM public.instances WHERE id = %s AND status = "
                                  "'running' AND claimed_by IS NULL", second),
               timeout=45, what="running once the variables open")
    env = imported([x for x in dokku.new_calls() if x[0] == "config:import" and n["app"] in x][-1])
    assert {k: env.get(k) for k in values} == values


def test_an_unset_variable_leaves_the_instance_with_the_update_it_owes(stack, dokku):
    """`mindroomctl env unset` removes an operator's variable (a leaked model-provider
    key being revoked, say): "removed; the instance owes an update", and the update
    redeploys MindRoom "with the new environment" (docs/lifecycle.md). The variable
    must be gone from MindRoom's environment once that update is applied; the
    provisioner's config:import only adds and overwrites, so Dokku keeps the old value."""
    c = Customer(stack, "starter")
    c.send("customer.subscription.created", "active")
    inst = running(stack, c.sid)
    iid, n = str(inst["id"]), names(inst["dokku_app_name"])
    leaked = "sk-" + secrets.token_hex(20)
    p = ctl(stack, "env", "set", iid, "OPENAI_API_KEY", stdin=leaked)
    assert p.returncode == 0 and "owes an update" in p.stdout, p
    wait_until(lambda: dokku.config(n["app"]).get("OPENAI_API_KEY") == leaked, timeout=45,
               what="the key deployed")
    running(stack, c.sid)

    p = ctl(stack, "env", "unset", iid, "OPENAI_API_KEY")
    assert p.returncode == 0 and "removed; the instance owes an update" in p.stdout, p
    wait_until(lambda: (lambda v: v[0] == v[1] or None)(row(
        stack, "SELECT config_version, applied_config_version FROM public.instances "
               "WHERE id = %s", iid)), timeout=45, what="the update applied")
    running(stack, c.sid)
    assert "OPENAI_API_KEY" not in dokku.config(n["app"]), \
        "the removed key is still in MindRoom's environment after the update"
