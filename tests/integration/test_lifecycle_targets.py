"""Several provisioner targets, through the real lifecycle worker: operators add,
drain, pin, disable and enable targets with `mindroomctl target`; provision-instance
places each new instance by the rule (the enabled, undrained target with the most
free memory after the plan's reservation, ties by id); the worker calls each
instance's own target with that target's token, never another's; a disabled
target's owed work and teardowns wait, saying why; a target's concurrency limit
holds across worker processes. Each target is a provisioner stand-in
(tests/standins/provisioner.py) that answers only its own token."""
import contextlib
import os
import subprocess
import time

import pytest

import mr
from lifecycle_helpers import (FAST_ENV, WORKER, deprovision, instance, new_account,
                               new_subscription, provision, wait_status, wait_until)
from provisioner import ProvisionerStandin

FUNCS = ["provision-instance", "deprovision-instance", WORKER]
NAMES = ("alpha", "beta", "gamma", "solo")
# Capacities: alpha 20000 MB freer than beta and gamma, which are equal.
CAPACITY = {"alpha": 100000, "beta": 80000, "gamma": 80000}


@pytest.fixture(scope="module")
def targets():
    """name -> a provisioner stand-in with its own token."""
    out = {}
    try:
        for n in NAMES:
            out[n] = ProvisionerStandin().start()
        yield out
    finally:
        for p in out.values():
            p.stop()


@pytest.fixture(scope="module")
def stack(pg, prov, resend, targets, tmp_path_factory):
    # beta's token is read from a file (file:/path), the others' from the worker's
    # environment (env:NAME); the legacy host's is DOKKU_PROVISIONER_TOKEN's value.
    token_file = tmp_path_factory.mktemp("targets") / "beta.token"
    token_file.write_text(targets["beta"].token + "\n")
    os.chmod(token_file, 0o600)
    env = dict(FAST_ENV)
    env.update(DOKKU_PROVISIONER_URL=prov.url, DOKKU_PROVISIONER_TOKEN=prov.token,
               RESEND_BASE_URL=resend.url, RESEND_API_KEY=resend.token,
               LEGACY_TOKEN=prov.token, ALPHA_TOKEN=targets["alpha"].token,
               GAMMA_TOKEN=targets["gamma"].token, SOLO_TOKEN=targets["solo"].token,
               # Four worker processes: a target's own limit, not the number of
               # workers, is what holds its steps back.
               MR_LIFECYCLE_WORKERS="4", MR_LIFECYCLE_POLL_MS="1000",
               MR_PROVISION_TIMEOUT_MS="20000", MR_LIFECYCLE_LEASE_S="40",
               MR_PROVISION_WAIT_MS="30000", SWEEP_INTERVAL_S="2")
    with mr.Stack(pg, env=env, functions=FUNCS, test_target=False) as s:
        s.beta_token_file = str(token_file)
        s.sql("UPDATE public.lifecycle_limits SET max_in_flight = 32 WHERE scope = 'global'")
        yield s


def ctl(stack, *args):
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": stack.env["DATABASE_URL"],
           "DATABASE_POOLER": stack.env.get("DATABASE_POOLER"),
           "MR_BIN_DIR": str(mr.build_dir() / "bin"),
           "MR_RUN_DIR": "/nonexistent-run", "MR_ENV_FILE": "/nonexistent.env"}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([str(mr.ROOT / "scripts/mindroomctl"), *[str(a) for a in args]],
                          env=env, capture_output=True, text=True, timeout=60)


def ok(p):
    assert p.returncode == 0, "exit %d\nstdout: %s\nstderr: %s" % (p.returncode, p.stdout, p.stderr)
    return p.stdout


def rows_of(out):
    """psql's aligned table as lists of stripped cells (header and rows)."""
    return [[c.strip() for c in line.split("|")] for line in out.splitlines() if "|" in line]


@contextlib.contextmanager
def own_targets(pg, resend, targets, wrappers=None, **env):
    """A stack whose only provisioners are `targets` ((name, stand-in) pairs, added in
    that order with mindroomctl's defaults, each token in the worker's environment as
    NAME_TOKEN; DOKKU_PROVISIONER_URL a closed port): two workers polling every second,
    calls that may hang for 30 s under a 60 s lease; env overrides any of it, wrappers
    is mr.Stack's."""
    e = dict(FAST_ENV)
    e.update(DOKKU_PROVISIONER_URL="http://127.0.0.1:9", DOKKU_PROVISIONER_TOKEN="unused-legacy-token-0123",
             RESEND_BASE_URL=resend.url, RESEND_API_KEY=resend.token,
             MR_LIFECYCLE_WORKERS="2", MR_LIFECYCLE_POLL_MS="1000",
             MR_PROVISION_TIMEOUT_MS="30000", MR_LIFECYCLE_LEASE_S="60",
             MR_PROVISION_WAIT_MS="30000")
    e.update({name.upper() + "_TOKEN": p.token for name, p in targets})
    e.update(env)
    with mr.Stack(pg, env=e, functions=FUNCS, test_target=False, wrappers=wrappers) as s:
        for name, p in targets:
            ok(ctl(s, "target", "add", name, "--url", p.url, "--token-ref",
                   "env:%s_TOKEN" % name.upper(), "--capacity-mb", 100000))
        yield s


def target_rows(stack):
    return {r[0]: r for r in stack.sql(
        "SELECT name, url, token_ref, scheduler, capacity_mb, max_in_flight, enabled, drained, "
        "pinned FROM public.provisioner_targets")}


def target_of(stack, sid):
    rows = stack.sql("SELECT t.name FROM public.instances i LEFT JOIN public.provisioner_targets t "
                     "ON t.id = i.target_id WHERE i.subscription_id = %s "
                     "AND i.status <> 'deprovisioned'", sid)
    return rows[0][0]


def running(stack, sid, timeout=20):
    return wait_until(lambda: (lambda i: i if i["status"] == "running" and not i["claimed_by"]
                               and i["owed_action"] in (None, "email") else None)(
        instance(stack, sid)), timeout, interval=0.05, what="instance of %s running" % sid)


# ---- mindroomctl target ----------------------------------------------------------------

def test_target_commands_refuse_bad_input_and_write_nothing(stack):
    out = ok(ctl(stack, "target", "--help"))
    assert out.startswith("usage: mindroomctl target list"), out
    for args, needle in (
            (("add", "t1", "--url", "http://10.0.0.1:8002", "--token-ref",
              "sk_live_0123456789abcdef0123", "--capacity-mb", "1000"),
             "--token-ref is env:NAME_TOKEN or file:/path.token (never the token itself)"),
            # The worker sends what it names to the target's URL: never another secret.
            (("add", "t1", "--url", "http://10.0.0.1:8002", "--token-ref", "env:MINDROOM_SECRETS_KEY",
              "--capacity-mb", "1000"), "--token-ref is env:NAME_TOKEN or file:/path.token"),
            (("add", "t1", "--url", "http://10.0.0.1:8002", "--token-ref", "file:/proc/self/environ",
              "--capacity-mb", "1000"), "--token-ref is env:NAME_TOKEN or file:/path.token"),
            (("add", "t1", "--url", "http://10.0.0.1:8002", "--token-ref", "env:T_TOKEN",
              "--capacity-mb", "1000", "--scheduler", "nomad"), "--scheduler is docker-local or k3s"),
            (("add", "T1", "--url", "http://10.0.0.1:8002", "--token-ref", "env:T_TOKEN",
              "--capacity-mb", "1000"), "NAME is [a-z][a-z0-9-]{0,39}"),
            (("add", "t1", "--url", "ftp://10.0.0.1", "--token-ref", "env:T_TOKEN",
              "--capacity-mb", "1000"), "--url is http(s)://host[:port][/path]"),
            (("add", "t1", "--url", "http://10.0.0.1:8002", "--token-ref", "env:T_TOKEN",
              "--capacity-mb", "0"), "--capacity-mb is a positive number"),
            # The worker would send the token (and instances' secrets) there: a cloud's
            # metadata service, in any spelling of its address, and the like.
            *((("add", "t1", "--url", url, "--token-ref", "env:T_TOKEN", "--capacity-mb", "1000"),
               "target add: --url: %s is a link-local, multicast, unspecified or reserved address"
               % ip)
              for url, ip in (("http://169.254.169.254:8002", "169.254.169.254"),
                              ("http://2852039166/prov", "169.254.169.254"),
                              ("https://0251.0376.0251.0376", "169.254.169.254"),
                              ("http://0.0.0.0:8002", "0.0.0.0"),
                              ("http://224.0.0.251:8002", "224.0.0.251"))),
            (("add", "t1", "--url", "http://10.0.0.1:8002", "--token-ref", "env:T_TOKEN",
              "--capacity-mb", "1000", "--max-in-flight", "-1"), "--max-in-flight is a number"),
            (("frobnicate",), "target: list, add, set, drain, pin, enable or disable"),
            (("set", "t1"), "target set: give --capacity-mb and/or --max-in-flight"),
            (("set", "t1", "--capacity-mb", "x"), "target set: --capacity-mb is a positive number"),
            (("set", "t1", "--max-in-flight", "1", "--url", "http://x"),
             "target set: unknown argument --url"),
            (("drain",), "target drain: NAME is required"),
            (("disable", "t1", "--undo"), "target disable: unknown argument --undo")):
        p = ctl(stack, "target", *args)
        assert p.returncode == 2 and needle in p.stderr, (args, p.returncode, p.stderr)
    for args in (("drain", "nowhere"), ("set", "nowhere", "--capacity-mb", "5")):
        p = ctl(stack, "target", *args)
        assert p.returncode == 1 and "no target named nowhere" in p.stderr, (args, p.stderr)
    assert target_rows(stack) == {}
    # No target yet: the list is empty and nothing waits.
    assert rows_of(ok(ctl(stack, "target", "list")))[0][:3] == ["id", "name", "scheduler"]


def test_registering_the_old_host_adopts_its_instances_and_a_drained_host_still_works_them(
        stack, prov):
    # An instance from before any target: worked through DOKKU_PROVISIONER_URL.
    sid = new_subscription(stack, "starter", account=new_account(stack)[0])
    assert provision(stack, sid).status == 202
    inst = running(stack, sid)
    assert target_of(stack, sid) is None
    out = ok(ctl(stack, "target", "add", "legacy", "--url", prov.url, "--token-ref", "env:LEGACY_TOKEN",
                 "--capacity-mb", 1000000, "--adopt"))
    assert target_of(stack, sid) == "legacy"
    header, legacy = rows_of(out)[0], rows_of(out)[1]
    row = dict(zip(header, legacy))
    assert (row["name"], row["scheduler"], row["url"], row["token_ref"], row["instances"],
            row["enabled"], row["drained"]) == ("legacy", "docker-local", prov.url, "env:LEGACY_TOKEN",
                                                "1", "t", "f")
    assert int(row["free_mb"]) == 1000000 - inst["memory_limit_mb"] - stack.sql(
        "SELECT homeserver_memory_mb FROM public.instances WHERE id = %s", inst["id"])[0][0]
    # The token is never in the database, only where to find it.
    assert prov.token not in repr(stack.sql("SELECT * FROM public.provisioner_targets"))
    # Added again: PostgreSQL's refusal, said once, is what the operator reads (not a
    # database said to be down), and nothing changes.
    before = target_rows(stack)
    p = ctl(stack, "target", "add", "legacy", "--url", "http://10.0.0.9:8002", "--token-ref",
            "env:LEGACY_TOKEN", "--capacity-mb", 5)
    assert p.returncode == 1 and p.stderr.count("duplicate key value violates unique constraint") == 1, p
    assert "mindroomctl: ERROR:" in p.stderr and "Key (name)=(legacy) already exists" in p.stderr, p.stderr
    assert "cannot reach the database" not in p.stderr and "cannot query" not in p.stderr, p.stderr
    assert p.stdout == "" and target_rows(stack) == before

    out = ok(ctl(stack, "target", "drain", "legacy"))
    assert target_rows(stack)["legacy"][7] is True
    # Drained: its instances stay and are worked on, through it, with its token.
    n = len(prov.requests)
    r = deprovision(stack, instance_id=str(inst["id"]), mode="stop", wait=True)
    assert r.status == 200 and r.json["instance"]["status"] == "stopped", r
    assert [x.path for x in prov.requests[n:]] == ["/apps/%s/stop" % inst["dokku_app_name"]]
    assert prov.unauthorized == 0


def test_placement_spreads_100_new_instances_over_three_targets_by_the_rule(stack, prov, targets):
    for name, sched, ref in (("alpha", "docker-local", "env:ALPHA_TOKEN"),
                             ("beta", "k3s", "file:" + stack.beta_token_file),
                             ("gamma", "k3s", "env:GAMMA_TOKEN")):
        ok(ctl(stack, "target", "add", name, "--url", targets[name].url, "--token-ref", ref,
               "--capacity-mb", CAPACITY[name], "--scheduler", sched, "--max-in-flight", 4))
    rows = target_rows(stack)
    assert (rows["beta"][2], rows["beta"][3]) == ("file:" + stack.beta_token_file, "k3s")
    ids = {n: i for n, i in stack.sql("SELECT name, id FROM public.provisioner_targets")}
    reserve = stack.sql("SELECT memory_limit_mb + homeserver_memory_mb FROM public.plans "
                        "WHERE stripe_price_id = 'price_starter'")[0][0]
    # The rule, computed here on its own: legacy is drained (and has by far the most
    # free memory); among the others the most free after the reservation, ties by id.
    free = {n: CAPACITY[n] for n in CAPACITY}
    want = []
    for _ in range(100):
        best = sorted((n for n in free if free[n] - reserve >= 0),
                      key=lambda n: (-(free[n] - reserve), ids[n]))[0]
        free[best] -= reserve
        want.append(best)
    legacy_before = len(prov.requests)

    sids = []
    for _ in range(100):
        sid = new_subscription(stack, "starter", account=new_account(stack)[0])
        r = provision(stack, sid)
        assert r.status == 202, r
        sids.append(sid)
    got = [target_of(stack, sid) for sid in sids]
    assert got == want
    counts = {n: got.count(n) for n in ("alpha", "beta", "gamma", "legacy")}
    assert counts["legacy"] == 0 and min(counts["alpha"], counts["beta"], counts["gamma"]) > 0, counts
    assert sum(counts.values()) == 100

    # The worker deploys each on its own target, with that target's token.
    for sid in sids:
        running(stack, sid, timeout=60)
    for name in ("alpha", "beta", "gamma"):
        apps = {r.json["app"] for r in targets[name].create_calls()}
        mine = {instance(stack, sid)["dokku_app_name"] for sid, t in zip(sids, got) if t == name}
        assert apps == mine, name
        assert targets[name].unauthorized == 0, name
    assert len(prov.requests) == legacy_before, prov.requests[legacy_before:]
    assert targets["solo"].requests == []

    listed = {r[1]: r for r in rows_of(ok(ctl(stack, "target", "list")))[1:] if len(r) > 10}
    for name in ("alpha", "beta", "gamma"):
        assert listed[name][7] == str(counts[name]), listed[name]
        assert int(listed[name][6]) == CAPACITY[name] - counts[name] * reserve


def test_a_disabled_targets_owed_work_waits_with_a_clear_status(stack, targets, resend):
    beta = targets["beta"]
    sid, app = stack.sql("SELECT i.subscription_id::text, i.dokku_app_name FROM public.instances i "
                         "JOIN public.provisioner_targets t ON t.id = i.target_id "
                         "WHERE t.name = 'beta' AND i.status = 'running' ORDER BY i.created_at "
                         "LIMIT 1")[0]
    ok(ctl(stack, "target", "disable", "beta"))
    n = len(beta.requests)
    r = deprovision(stack, subscription_id=sid, mode="stop")
    assert r.status == 202, r
    # Longer than the poll and a notification's wake-up: nothing reaches beta.
    time.sleep(2.5)
    assert beta.requests[n:] == []
    inst = instance(stack, sid)
    assert (inst["status"], inst["owed_action"], inst["claimed_by"]) == ("running", "stop", None)
    waiting = rows_of(ok(ctl(stack, "target", "list")))
    assert ["beta", "target_disabled", "stop", "1"] in [w[:4] for w in waiting], waiting
    stuck = ok(ctl(stack, "stuck"))
    line = next(x for x in stuck.splitlines() if app in x)
    assert "waits: target_disabled" in line, stuck
    # A new instance is not placed on a disabled target.
    new = new_subscription(stack, "starter", account=new_account(stack)[0])
    assert provision(stack, new).status == 202
    assert target_of(stack, new) not in ("beta", "legacy", None)
    running(stack, new)

    ok(ctl(stack, "target", "enable", "beta"))
    wait_status(stack, sid, "stopped", timeout=10)
    assert [x.path for x in beta.requests[n:]] == ["/apps/%s/stop" % app]
    assert not [w for w in rows_of(ok(ctl(stack, "target", "list"))) if "target_disabled" in w]


def test_a_token_file_open_to_other_users_is_refused_until_it_is_made_private(stack, targets):
    beta = targets["beta"]
    sid, app = stack.sql("SELECT i.subscription_id::text, i.dokku_app_name FROM public.instances i "
                         "JOIN public.provisioner_targets t ON t.id = i.target_id "
                         "WHERE t.name = 'beta' AND i.status = 'running' AND i.owed_action IS NULL "
                         "ORDER BY i.created_at LIMIT 1")[0]
    n = len(beta.requests)
    os.chmod(stack.beta_token_file, 0o644)
    try:
        assert deprovision(stack, subscription_id=sid, mode="stop").status == 202
        err = wait_until(lambda: (lambda e: e if e and "open to other users" in e else None)(
            instance(stack, sid)["last_error"]), timeout=10, interval=0.05,
            what="the step refused over the token file's mode")
        assert stack.beta_token_file in err and "mode 0644" in err, err
        # The token was never sent anywhere.
        assert beta.requests[n:] == []
        assert instance(stack, sid)["status"] == "running"
    finally:
        os.chmod(stack.beta_token_file, 0o600)
    wait_status(stack, sid, "stopped", timeout=30)
    assert [x.path for x in beta.requests[n:]] == ["/apps/%s/stop" % app]


def test_a_targets_concurrency_limit_holds_across_workers(stack, targets):
    solo = targets["solo"]
    ok(ctl(stack, "target", "add", "solo", "--url", solo.url, "--token-ref", "env:SOLO_TOKEN",
           "--capacity-mb", 1000, "--scheduler", "k3s", "--max-in-flight", 4))
    ok(ctl(stack, "target", "set", "solo", "--max-in-flight", 1))
    ok(ctl(stack, "target", "set", "solo", "--capacity-mb", 50000))
    assert target_rows(stack)["solo"][4:6] == (50000, 1)
    out = ok(ctl(stack, "target", "pin", "solo"))
    assert target_rows(stack)["solo"][8] is True, out
    solo.reset()
    solo.behave(("slow", 1.0))
    sids = [new_subscription(stack, "starter", account=new_account(stack)[0]) for _ in range(3)]
    for sid in sids:
        assert provision(stack, sid).status == 202
    # Pinned: every new instance goes there, though others have more free memory.
    assert [target_of(stack, sid) for sid in sids] == ["solo"] * 3
    # While one deploys, the others wait for the target's slot, and say so.
    seen = wait_until(lambda: stack.sql(
        "SELECT count(*) FROM public.lifecycle_waiting() WHERE target = 'solo' "
        "AND reason = 'target_busy'")[0][0] >= 1, timeout=10, interval=0.05,
        what="solo's work waiting: target_busy")
    assert seen
    claimed = stack.sql("SELECT count(*) FROM public.instances i JOIN public.provisioner_targets t "
                        "ON t.id = i.target_id WHERE t.name = 'solo' AND i.claimed_by IS NOT NULL "
                        "AND i.claim_expires_at > now()")[0][0]
    assert claimed <= 1
    for sid in sids:
        running(stack, sid, timeout=30)
    # Three deploys of a second each, never two at once, with four workers free.
    assert len(solo.create_calls()) == 3 and solo.max_in_flight == 1
    ok(ctl(stack, "target", "pin", "solo", "--undo"))
    assert target_rows(stack)["solo"][8] is False


def test_a_teardown_goes_to_the_instances_own_target_and_waits_while_it_is_disabled(
        stack, prov, targets):
    gamma = targets["gamma"]
    acc, app, iid = stack.sql(
        "SELECT s.account_id::text, i.dokku_app_name, i.id::text FROM public.instances i "
        "JOIN public.subscriptions s ON s.id = i.subscription_id "
        "JOIN public.provisioner_targets t ON t.id = i.target_id "
        "WHERE t.name = 'gamma' AND i.status = 'running' ORDER BY i.created_at LIMIT 1")[0]
    others = {n: len(targets[n].requests) for n in targets}
    legacy = len(prov.requests)
    ok(ctl(stack, "target", "disable", "gamma"))
    # The account is erased: the cascade deletes the instance row; its apps and data
    # are on gamma.
    stack.sql("DELETE FROM auth.users WHERE id = %s", acc)
    assert stack.sql("SELECT target_id IS NOT NULL FROM public.instance_teardowns "
                     "WHERE instance_id = %s", iid)[0][0]
    time.sleep(4.5)   # two teardown intervals (SWEEP_INTERVAL_S=2)
    assert stack.sql("SELECT attempts, done_at FROM public.instance_teardowns WHERE instance_id = %s",
                     iid)[0] == (0, None)
    assert len(gamma.requests) == others["gamma"]
    assert ["gamma", "target_disabled", "teardown", "1"] in [
        w[:4] for w in rows_of(ok(ctl(stack, "target", "list")))]

    ok(ctl(stack, "target", "enable", "gamma"))
    wait_until(lambda: stack.sql("SELECT done_at FROM public.instance_teardowns WHERE instance_id = %s",
                                 iid)[0][0], timeout=15, what="teardown done")
    assert [(r.method, r.path) for r in gamma.requests[others["gamma"]:]] == [
        ("DELETE", "/apps/%s?purge=true" % app)]
    assert gamma.unauthorized == 0
    for n in ("alpha", "beta", "solo"):
        assert len(targets[n].requests) == others[n], n
    assert len(prov.requests) == legacy


def test_an_instance_waiting_for_room_is_stopped_or_destroyed_without_calling_a_provisioner(
        stack, prov, targets):
    if "solo" not in target_rows(stack):   # run on its own
        ok(ctl(stack, "target", "add", "solo", "--url", targets["solo"].url, "--token-ref",
               "env:SOLO_TOKEN", "--capacity-mb", 50000))
    # No target takes a new instance: every one is drained.
    others = [n for n, row in target_rows(stack).items() if not row[7]]
    for name in others:
        ok(ctl(stack, "target", "drain", name))
    try:
        seen = {n: len(targets[n].requests) for n in targets}
        legacy = len(prov.requests)
        cancelled, paused = (new_subscription(stack, "starter", account=new_account(stack)[0])
                             for _ in range(2))
        for sid in (cancelled, paused):
            assert provision(stack, sid).status == 202
            assert target_of(stack, sid) is None
        waiting = {r[0]: r[1] for r in stack.sql(
            "SELECT instance_id::text, reason FROM public.lifecycle_waiting()")}
        first = instance(stack, cancelled)
        assert waiting.get(str(first["id"])) == "no_capacity", waiting

        # Its create never ran: nothing of it exists anywhere, so its destroy or stop
        # is done at once, and no provisioner (not even DOKKU_PROVISIONER_URL) is asked.
        assert deprovision(stack, subscription_id=cancelled, mode="destroy").status == 202
        assert deprovision(stack, subscription_id=paused, mode="stop").status == 202
        gone = wait_status(stack, cancelled, "deprovisioned", timeout=10)
        assert gone["owed_action"] is None
        wait_status(stack, paused, "stopped", timeout=10)
        assert {n: len(targets[n].requests) for n in targets} == seen
        assert len(prov.requests) == legacy
        # The cancelled subscription is not stuck "being destroyed".
        assert provision(stack, cancelled).status == 202
    finally:
        for name in others:
            ok(ctl(stack, "target", "drain", name, "--undo"))

    # Room again: the new instance is created and the paused one, resumed, made
    # (its start finds no app on its target and creates it there).
    assert provision(stack, paused).status == 202
    for sid in (cancelled, paused):
        name = wait_until(lambda: target_of(stack, sid), timeout=20, what="%s placed" % sid)
        wait_until(lambda: stack.sql(
            "SELECT status = 'running' AND claimed_by IS NULL FROM public.instances "
            "WHERE subscription_id = %s AND status <> 'deprovisioned'", sid)[0][0],
                   timeout=30, what="%s running" % sid)
        app = stack.sql("SELECT dokku_app_name FROM public.instances WHERE subscription_id = %s "
                        "AND status <> 'deprovisioned'", sid)[0][0]
        assert app in targets[name].apps, (name, app)
    assert len(prov.requests) == legacy


def test_adopting_the_old_host_keeps_its_owed_teardown_ahead_of_a_new_instance_there(pg, resend):
    # Registering today's host with --adopt gives it what DOKKU_PROVISIONER_URL holds:
    # its instances, and the teardowns still owed there. A new instance of the same
    # names placed there waits for the teardown, which would destroy its apps and data.
    host = ProvisionerStandin().start()
    try:
        env = dict(FAST_ENV)
        env.update(DOKKU_PROVISIONER_URL=host.url, DOKKU_PROVISIONER_TOKEN=host.token,
                   RESEND_BASE_URL=resend.url, RESEND_API_KEY=resend.token,
                   HOST_TOKEN=host.token, SWEEP_INTERVAL_S="1")
        with mr.Stack(pg, env=env, functions=FUNCS, test_target=False) as s:
            sid = new_subscription(s, "starter", account=new_account(s)[0])
            assert provision(s, sid).status == 202
            first = running(s, sid)
            app = first["dokku_app_name"]
            assert deprovision(s, instance_id=str(first["id"]), mode="destroy", wait=True).status == 200
            # The host fails for a while; meanwhile an operator clears the destroyed
            # row, which leaves its kept data to a teardown on DOKKU_PROVISIONER_URL.
            host.behave("fail")
            s.sql("DELETE FROM public.instances WHERE id = %s", first["id"])
            wait_until(lambda: s.sql("SELECT attempts FROM public.instance_teardowns "
                                     "WHERE instance_id = %s", first["id"])[0][0] >= 1,
                       timeout=10, what="the teardown tried and failed")
            ok(ctl(s, "target", "add", "host-1", "--url", host.url, "--token-ref", "env:HOST_TOKEN",
                   "--capacity-mb", 100000, "--adopt"))
            assert s.sql("SELECT t.name FROM public.instance_teardowns d JOIN public.provisioner_targets t "
                         "ON t.id = d.target_id WHERE d.instance_id = %s", first["id"]) == [("host-1",)]
            assert provision(s, sid).status == 202
            assert target_of(s, sid) == "host-1"
            second = instance(s, sid)
            assert s.sql("SELECT public.lifecycle_target_wait(i) FROM public.instances i WHERE id = %s",
                         second["id"])[0][0] == "teardown_pending"
            host.behave("ok")
            running(s, sid, timeout=30)
            wait_until(lambda: s.sql("SELECT done_at FROM public.instance_teardowns "
                                     "WHERE instance_id = %s", first["id"])[0][0],
                       timeout=20, what="the teardown done")
            # The teardown erased the old data before the new instance's apps were
            # made, and they are still there.
            calls = [(r.method, r.path) for r in host.requests]
            purged = max(n for n, c in enumerate(calls)
                         if c == ("DELETE", "/apps/%s?purge=true" % app))
            assert ("POST", "/apps") in calls[purged + 1:], calls
            assert app in host.apps, calls
    finally:
        host.stop()


def test_adopting_takes_no_instance_waiting_for_room(pg, resend):
    # --adopt gives a registered host what DOKKU_PROVISIONER_URL holds. An instance
    # that waits for room on the targets there are was never made anywhere: placement
    # places it where its plan fits, never adopt onto a host without room.
    h1, h2 = ProvisionerStandin().start(), ProvisionerStandin().start()
    try:
        with own_targets(pg, resend, [("h1", h1)], H2_TOKEN=h2.token) as s:
            ok(ctl(s, "target", "set", "h1", "--capacity-mb", 500))
            sid = new_subscription(s, "starter", account=new_account(s)[0])
            assert provision(s, sid).status == 202
            wait_until(lambda: s.sql("SELECT public.lifecycle_target_wait(i) FROM public.instances i "
                                     "WHERE subscription_id = %s", sid)[0][0] == "no_capacity",
                       timeout=10, what="waiting for room")
            ok(ctl(s, "target", "add", "h2", "--url", h2.url, "--token-ref", "env:H2_TOKEN",
                   "--capacity-mb", 500, "--adopt"))
            assert target_of(s, sid) is None
            assert s.sql("SELECT free_mb FROM public.target_summary() WHERE name = 'h2'") == [(500,)]
            # Room on h2: placed there by the rule, and made.
            ok(ctl(s, "target", "set", "h2", "--capacity-mb", 100000))
            s.sql("SELECT public.lifecycle_wake()")
            inst = running(s, sid, timeout=30)
            assert target_of(s, sid) == "h2"
            assert inst["dokku_app_name"] in h2.apps and not h1.requests
    finally:
        h1.stop()
        h2.stop()


def test_a_hung_target_leaves_the_workers_free_for_a_healthy_one(pg, resend):
    # Two targets added with mindroomctl's defaults and the worker's default of two
    # processes (a two-core host). One target accepts connections and never answers:
    # its steps hold a worker each until the call's deadline. A new customer placed
    # on the healthy target is served meanwhile, not after that deadline.
    hung, good = ProvisionerStandin().start(), ProvisionerStandin().start()
    try:
        with own_targets(pg, resend, [("hung", hung), ("good", good)]) as s:
            assert [target_rows(s)[n][5] for n in ("hung", "good")] == [1, 1]
            hung.behave("hang")
            ok(ctl(s, "target", "pin", "hung"))
            stuck = [new_subscription(s, "starter", account=new_account(s)[0]) for _ in range(3)]
            for sid in stuck:
                assert provision(s, sid).status == 202
            assert [target_of(s, sid) for sid in stuck] == ["hung"] * 3
            hung.wait_for(lambda p: p.create_calls(), timeout=5)
            time.sleep(1.5)  # every worker that would take a hung step has taken one
            ok(ctl(s, "target", "pin", "hung", "--undo"))
            ok(ctl(s, "target", "drain", "hung"))
            sid = new_subscription(s, "starter", account=new_account(s)[0])
            assert provision(s, sid).status == 202
            assert target_of(s, sid) == "good"
            # Served within seconds, long before the hung calls' 30 s deadline.
            running(s, sid, timeout=8)
            assert len(good.create_calls()) == 1
            hung.behave("ok")
            hung.release()
            for x in stuck:
                running(s, x, timeout=30)
    finally:
        hung.stop()
        good.stop()


def teardown_hanging(s, hung):
    """A running instance on `hung` whose row is deleted while `hung` hangs: returns
    the instance once the worker's teardown call (DELETE) hangs there."""
    sid = new_subscription(s, "starter", account=new_account(s)[0])
    assert provision(s, sid).status == 202
    inst = running(s, sid)
    hung.behave("hang")
    s.sql("DELETE FROM public.instances WHERE id = %s", inst["id"])
    hung.wait_for(lambda p: p.recorded("DELETE"), timeout=10)
    return inst


def presume_teardown_run_dead(s):
    """As ten intervals later: the teardown job's run is presumed dead, and another
    worker takes the job over."""
    s.sql("UPDATE public.scheduled_jobs SET last_started_at = now() - interval '1 hour', "
          "until = now() WHERE name = 'teardown'")


def test_a_teardown_in_flight_is_not_called_again_when_its_job_is_taken_over(pg, resend):
    # A teardown's call may last up to MR_PROVISION_TIMEOUT_MS, longer than the ten
    # intervals after which the teardown job's run is presumed dead and another
    # worker takes the job over. That worker must not call the same teardown while
    # the first call is still in flight; once the provisioner answers, it is done.
    hung = ProvisionerStandin().start()
    try:
        with own_targets(pg, resend, [("hung", hung)], SWEEP_INTERVAL_S="1") as s:
            inst = teardown_hanging(s, hung)
            runs = s.sql("SELECT runs FROM public.scheduled_jobs WHERE name = 'teardown'")[0][0]
            # The other worker takes the job over while the call hangs.
            presume_teardown_run_dead(s)
            wait_until(lambda: s.sql("SELECT runs FROM public.scheduled_jobs "
                                     "WHERE name = 'teardown'")[0][0] > runs,
                       timeout=10, what="the teardown job taken over")
            time.sleep(2)
            assert len(hung.recorded("DELETE")) == 1
            assert hung.max_in_flight == 1
            hung.behave("ok")
            hung.release()
            wait_until(lambda: s.sql("SELECT done_at FROM public.instance_teardowns "
                                     "WHERE instance_id = %s", inst["id"])[0][0],
                       timeout=15, what="the teardown done")
    finally:
        hung.stop()


def test_a_teardown_call_that_outlived_its_lease_does_not_record_its_failure_over_the_next(
        pg, resend):
    # A call that outlives the teardown's lease (MR_LIFECYCLE_LEASE_S) lets another
    # worker take the teardown over and call it again. When both calls then fail,
    # only the one under the lease in force is recorded: one attempt, and the first
    # worker says why its outcome was left out.
    hung = ProvisionerStandin().start()
    try:
        with own_targets(pg, resend, [("hung", hung)], SWEEP_INTERVAL_S="1") as s:
            inst = teardown_hanging(s, hung)
            # The lease runs out and the job's run is presumed dead while the call
            # hangs: the other worker takes both over and calls the teardown again.
            s.sql("UPDATE public.instance_teardowns SET claimed_until = now() - interval '1 second' "
                  "WHERE instance_id = %s", inst["id"])
            presume_teardown_run_dead(s)
            hung.wait_for(lambda p: len(p.recorded("DELETE")) == 2, timeout=10)
            # Both calls answer 500; the calls after them hang again, so that the
            # retry, due a second after the failure recorded, records nothing here.
            hung.release(then="hang")
            wait_until(lambda: "not recorded: its lease ran out" in s.log(WORKER),
                       timeout=10, what="the first worker's failure left out")
            wait_until(lambda: s.sql("SELECT attempts FROM public.instance_teardowns "
                                     "WHERE instance_id = %s", inst["id"])[0][0] >= 1,
                       timeout=10, what="the second worker's failure recorded")
            time.sleep(1)
            row = s.sql("SELECT attempts, done_at, last_error IS NOT NULL FROM public.instance_teardowns "
                        "WHERE instance_id = %s", inst["id"])[0]
            assert row == (1, None, True)
    finally:
        hung.stop()


def test_teardowns_on_a_hung_target_count_against_its_limit(pg, resend):
    # A target with the default limit of 1 stops answering while it owes two
    # teardowns (deleted accounts) and a stop. Its teardowns and its steps together
    # hold one worker, never the second one: a new customer placed on the healthy
    # target is served meanwhile, not after the hung calls' deadline.
    hung, good = ProvisionerStandin().start(), ProvisionerStandin().start()
    try:
        with own_targets(pg, resend, [("hung", hung), ("good", good)], SWEEP_INTERVAL_S="1") as s:
            ok(ctl(s, "target", "pin", "hung"))
            sids = [new_subscription(s, "starter", account=new_account(s)[0]) for _ in range(3)]
            for sid in sids:
                assert provision(s, sid).status == 202
            insts = [running(s, sid) for sid in sids]
            hung.reset()
            hung.behave("hang")
            for i in insts[:2]:
                s.sql("DELETE FROM public.instances WHERE id = %s", i["id"])
            assert deprovision(s, subscription_id=sids[2], mode="stop").status == 202
            hung.wait_for(lambda p: p.in_flight, timeout=5)
            time.sleep(3)  # every worker that would take a hung call has taken one
            assert hung.max_in_flight == 1
            hung_target = rows_of(ok(ctl(s, "target", "list")))
            assert [r[8:10] for r in hung_target if len(r) > 9 and r[1] == "hung"] == [["1", "1"]]
            ok(ctl(s, "target", "pin", "hung", "--undo"))
            ok(ctl(s, "target", "drain", "hung"))
            sid = new_subscription(s, "starter", account=new_account(s)[0])
            assert provision(s, sid).status == 202
            assert target_of(s, sid) == "good"
            # Served within seconds, long before the hung call's 30 s deadline.
            running(s, sid, timeout=8)
            hung.behave("ok")
            hung.release()
            wait_until(lambda: s.sql("SELECT count(*) FROM public.instance_teardowns "
                                     "WHERE done_at IS NULL")[0][0] == 0,
                       timeout=30, what="both teardowns done")
            wait_status(s, sids[2], "stopped", timeout=30)
    finally:
        hung.stop()
        good.stop()


def test_a_welcome_email_in_flight_holds_no_deploy_of_its_target_back(pg, resend):
    # A target with mindroomctl's default of one slot, and Resend not answering. The
    # first customer's instance is made and its welcome email hangs: a second
    # customer placed on the same target is made meanwhile, not once the email's
    # call has reached its deadline. The email is sent once Resend answers.
    solo = ProvisionerStandin().start()
    resend.reset()
    try:
        with own_targets(pg, resend, [("solo", solo)], MR_RESEND_TIMEOUT_MS="30000",
                         MR_PROVISION_TIMEOUT_MS="20000") as s:
            assert target_rows(s)["solo"][5] == 1
            resend.behave("hang")
            first = new_subscription(s, "starter", account=new_account(s)[0])
            assert provision(s, first).status == 202
            resend.wait_for(lambda r: r.in_flight, timeout=10)
            assert s.sql("SELECT status::text, claim_action FROM public.instances "
                         "WHERE subscription_id = %s", first) == [("running", "email")]
            second = new_subscription(s, "starter", account=new_account(s)[0])
            assert provision(s, second).status == 202
            assert target_of(s, second) == "solo"
            # Made within seconds, long before the first email's 30 s deadline (its own
            # email then hangs too).
            wait_until(lambda: instance(s, second)["provisioned_at"], timeout=8,
                       what="the second customer's instance made")
            assert instance(s, second)["status"] == "running"
            assert len(solo.create_calls()) == 2
            assert not resend.delivered and instance(s, first)["welcome_email_sent_at"] is None
            resend.behave("ok")
            resend.release()
            wait_until(lambda: instance(s, first)["welcome_email_sent_at"], timeout=30,
                       what="the first customer's welcome email sent")
    finally:
        resend.behave("ok")
        resend.release()
        solo.stop()


def test_a_target_that_stops_answering_holds_a_teardown_round_for_one_call(pg, resend):
    # Four accounts are erased together: three of their instances live on a target
    # that has stopped answering, one on a healthy target, and the round takes the
    # hung target's first. Once one call there has gone unanswered to its deadline,
    # the round leaves that target's other teardowns for the next round (nothing
    # counted) and does the healthy target's at once, instead of waiting out one
    # deadline per teardown before it.
    hung, good = ProvisionerStandin().start(), ProvisionerStandin().start()
    try:
        with own_targets(pg, resend, [("hung", hung), ("good", good)], SWEEP_INTERVAL_S="1",
                         MR_PROVISION_TIMEOUT_MS="3000") as s:
            placed = {}
            for name, n in (("hung", 3), ("good", 1)):
                ok(ctl(s, "target", "pin", name))
                for _ in range(n):
                    sid = new_subscription(s, "starter", account=new_account(s)[0])
                    assert provision(s, sid).status == 202
                    placed.setdefault(name, []).append(running(s, sid)["id"])
                    assert target_of(s, sid) == name
                ok(ctl(s, "target", "pin", name, "--undo"))
            hung.reset()
            good.reset()
            hung.behave("hang")
            # One transaction: every teardown is recorded, the hung target's first in
            # the round's order, before any round sees them.
            s.sql("DELETE FROM public.instances WHERE id = ANY(%s::uuid[]); "
                  "UPDATE public.instance_teardowns SET not_before = now() - interval '1 minute' "
                  "WHERE instance_id = ANY(%s::uuid[])", placed["hung"] + placed["good"],
                  placed["hung"])
            wait_until(lambda: s.sql("SELECT done_at FROM public.instance_teardowns "
                                     "WHERE instance_id = %s", placed["good"][0])[0][0],
                       timeout=20, what="the healthy target's teardown done")
            # Each later call to the hung target needs its 3 s deadline to be counted:
            # what is counted now is what the round did before the healthy teardown.
            attempts = [r[0] for r in s.sql(
                "SELECT attempts FROM public.instance_teardowns WHERE instance_id = ANY(%s::uuid[]) "
                "ORDER BY attempts", placed["hung"])]
            assert attempts == [0, 0, 1]
            assert len(good.recorded("DELETE")) == 1
            # The others are asked again in later rounds, and done once it answers.
            hung.behave("ok")
            hung.release()
            wait_until(lambda: s.sql("SELECT count(*) FROM public.instance_teardowns "
                                     "WHERE done_at IS NULL")[0][0] == 0,
                       timeout=40, what="every teardown done")
    finally:
        hung.stop()
        good.stop()


@pytest.mark.parametrize("down", ["hang", "unreachable"])
def test_new_customers_go_to_a_target_that_answers_while_another_does_not(pg, resend, down):
    # By the rule new instances go to "first", which has the more room. It stops
    # answering ("hang": its provisioner does not answer; "unreachable": its
    # provisioner answers that its Dokku host is out of reach): the call of the
    # instance placed there meanwhile goes unanswered, the worker records it, and
    # the customers who sign up next are placed on "second" and served, not left to
    # wait on a host that is down. Once "first" answers again, its own instance is
    # made and new customers go by the rule again.
    first, second = ProvisionerStandin().start(), ProvisionerStandin().start()
    try:
        with own_targets(pg, resend, [("first", first), ("second", second)],
                         MR_PROVISION_TIMEOUT_MS="2000") as s:
            def unanswered_since():
                return s.sql("SELECT unanswered_since FROM public.provisioner_targets "
                             "WHERE name = 'first'")[0][0]

            ok(ctl(s, "target", "set", "first", "--capacity-mb", 200000))
            sid = new_subscription(s, "starter", account=new_account(s)[0])
            assert provision(s, sid).status == 202
            assert target_of(s, sid) == "first"
            running(s, sid)
            assert unanswered_since() is None

            first.behave(down)
            stuck = new_subscription(s, "starter", account=new_account(s)[0])
            assert provision(s, stuck).status == 202
            assert target_of(s, stuck) == "first"
            wait_until(unanswered_since, timeout=10, what="first recorded as not answering")
            listed = {r[1]: r for r in rows_of(ok(ctl(s, "target", "list")))[1:] if len(r) > 13}
            assert listed["first"][13] != "-" and listed["second"][13] == "-"
            assert "provisioner target first does not answer" in s.log(WORKER)

            later = []
            for _ in range(3):
                x = new_subscription(s, "starter", account=new_account(s)[0])
                assert provision(s, x).status == 202
                later.append(x)
            assert [target_of(s, x) for x in later] == ["second"] * 3
            for x in later:
                running(s, x, timeout=10)
            assert instance(s, stuck)["provisioned_at"] is None  # still waiting on first

            first.behave("ok")
            first.release()
            running(s, stuck, timeout=30)
            wait_until(lambda: unanswered_since() is None, timeout=10,
                       what="first recorded as answering again")
            assert "provisioner target first answers again" in s.log(WORKER)
            nxt = new_subscription(s, "starter", account=new_account(s)[0])
            assert provision(s, nxt).status == 202
            assert target_of(s, nxt) == "first"
            running(s, nxt)
    finally:
        first.stop()
        second.stop()


def test_a_target_whose_answer_is_too_large_to_read_still_answers(pg, resend):
    # A target that answers, if wrongly (here a 500 larger than the worker reads),
    # is not down: the create fails and backs off as after any error status, and the
    # target is not recorded as one that does not answer (placement would pass it
    # over). Once its answers are right, the instance is made there.
    solo = ProvisionerStandin().start()
    try:
        with own_targets(pg, resend, [("solo", solo)], MR_PROVISION_TIMEOUT_MS="2000") as s:
            solo.behave(("huge", 200000))
            sid = new_subscription(s, "starter", account=new_account(s)[0])
            assert provision(s, sid).status == 202
            wait_until(lambda: instance(s, sid)["last_error"], timeout=15,
                       what="the create failed")
            assert "larger than" in instance(s, sid)["last_error"]
            assert s.sql("SELECT unanswered_since FROM public.provisioner_targets")[0][0] is None
            assert "does not answer" not in s.log(WORKER)
            solo.behave("ok")
            assert provision(s, sid).status == 202
            running(s, sid, timeout=10)
    finally:
        solo.stop()


def test_once_a_target_answers_again_its_instances_backing_off_are_made_at_once(pg, resend):
    # Two customers' creates fail on a target that does not answer and back off for a
    # minute or more. When it answers again (an operator's explicit provision of the
    # first reaches it), the second's create is retried at once, not at the end of its
    # backoff.
    solo = ProvisionerStandin().start()
    try:
        with own_targets(pg, resend, [("solo", solo)], MR_PROVISION_TIMEOUT_MS="1500",
                         MR_PROVISION_BACKOFF_BASE_S="120", MR_PROVISION_BACKOFF_CAP_S="3600") as s:
            solo.behave("hang")
            a, b = (new_subscription(s, "starter", account=new_account(s)[0]) for _ in range(2))
            for sid in (a, b):
                assert provision(s, sid).status == 202
            for sid in (a, b):
                wait_until(lambda: (lambda i: i["last_error"] and i["next_attempt_at"])(instance(s, sid)),
                           timeout=15, what="the create of %s failed and backing off" % sid)
            assert s.sql("SELECT unanswered_since IS NOT NULL FROM public.provisioner_targets")[0][0]
            backoff_b = s.sql("SELECT next_attempt_at - now() FROM public.instances "
                              "WHERE subscription_id = %s", b)[0][0]
            assert backoff_b.total_seconds() > 60
            solo.behave("ok")
            solo.release()
            assert provision(s, a).status == 202
            running(s, a, timeout=10)
            running(s, b, timeout=10)
            assert s.sql("SELECT unanswered_since FROM public.provisioner_targets")[0][0] is None
    finally:
        solo.stop()


def private_hosts(tmp_path, lines):
    """An argv prefix that runs a binary with its own /etc/hosts (`lines` after
    localhost's), bind-mounted in a mount namespace of its own: the system's resolver,
    answering names as the tests say. The suite runs as root (CI does); without a
    mount namespace this test fails rather than pass unchecked."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + lines)
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    probe = subprocess.run(argv + ["getent", "hosts", lines.split()[1]], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0 or lines.split()[0] not in probe.stdout:
        pytest.fail("no private /etc/hosts here (a mount namespace needs root): %s" % probe.stderr)
    return argv


@pytest.mark.parametrize("how", ["name", "literal"])
def test_a_target_at_a_metadata_address_is_never_called_and_reads_as_not_answering(
        pg, resend, tmp_path, how):
    # A target's URL names a host that resolves to 169.254.169.254 (a cloud's metadata
    # service: "name", registered by mindroomctl, which cannot know what a name will
    # resolve to), or names that address itself ("literal": a row written by hand,
    # past mindroomctl's check). The worker refuses to connect there, so neither the
    # token nor the instance's secrets are sent; the target reads as not answering,
    # with the reason in the instance's error, the worker's log and the target list;
    # the create waits, and is made once the operator points the target back at its
    # provisioner.
    solo = ProvisionerStandin().start()
    port = solo.url.rsplit(":", 1)[1]
    wrappers = None
    if how == "name":
        wrappers = {WORKER: private_hosts(tmp_path, "169.254.169.254 prov-1.internal.test\n")}
    try:
        with own_targets(pg, resend, [], wrappers=wrappers, MR_PROVISION_TIMEOUT_MS="2000",
                         SOLO_TOKEN=solo.token) as s:
            if how == "name":
                ok(ctl(s, "target", "add", "solo", "--url", "http://prov-1.internal.test:" + port,
                       "--token-ref", "env:SOLO_TOKEN", "--capacity-mb", 100000))
            else:
                ok(ctl(s, "target", "add", "solo", "--url", solo.url, "--token-ref",
                       "env:SOLO_TOKEN", "--capacity-mb", 100000))
                s.sql("UPDATE public.provisioner_targets SET url = %s WHERE name = 'solo'",
                      "http://169.254.169.254:" + port)
            sid = new_subscription(s, "starter", account=new_account(s)[0])
            assert provision(s, sid).status == 202
            assert target_of(s, sid) == "solo"
            why = ("not connected to 169.254.169.254: it is a link-local, multicast, "
                   "unspecified or reserved address")
            wait_until(lambda: instance(s, sid)["last_error"], timeout=15, what="the create failed")
            i = instance(s, sid)
            assert why in i["last_error"], i
            assert i["owed_action"] == "create" and i["provisioned_at"] is None, i
            assert s.sql("SELECT unanswered_since IS NOT NULL FROM public.provisioner_targets")[0][0]
            listed = {r[1]: r for r in rows_of(ok(ctl(s, "target", "list")))[1:] if len(r) > 13}
            assert listed["solo"][13] != "-"
            log = s.log(WORKER)
            assert "provisioner target solo does not answer" in log and why in log, log[-2000:]
            assert solo.recorded() == []
            assert solo.token not in log
            # The operator points it at the provisioner: the create is made there.
            s.sql("UPDATE public.provisioner_targets SET url = %s WHERE name = 'solo'", solo.url)
            assert provision(s, sid).status == 202
            running(s, sid, timeout=15)
            assert s.sql("SELECT unanswered_since FROM public.provisioner_targets")[0][0] is None
    finally:
        solo.stop()
