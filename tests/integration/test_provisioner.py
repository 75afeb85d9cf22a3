"""dokku-provisioner through real nginx (the provisioner listener) against the
stand-in dokku (local mode, per-app and per-storage state in files): the exact
commands that reach Dokku, what the instance's apps and storage hold after
them, and nothing on bad input."""

import base64
import json
import secrets
import stat
import threading

import pytest

import mr
from provisioner_helpers import (DOMAIN, DONE, HS_MAX_UPLOAD, HS_UID, IMAGE, K3S, LABEL,
                                 MATRIX_IMAGE, MINDROOM_CONFIG, MINDROOM_DIR, MINDROOM_OWN,
                                 MINDROOM_UID, TAR, Dokku, body, create_sequence,
                                 destroy_sequence, hs_internal_url, hs_secrets, imported,
                                 managed, match, matrix_host, mem, names,
                                 network_teardown, ports, record_bucket, state_record,
                                 storage_destroy, subcommand)

# The provisioner never connects to PostgreSQL: nothing here differs behind a pooler.
pytestmark = pytest.mark.database_free


@pytest.fixture(scope="module")
def dokku():
    d = Dokku()
    yield d
    d.assert_documented()


@pytest.fixture(scope="module")
def stack(pg, dokku):
    env = dokku.env(DOKKU_TLS="letsencrypt", DOKKU_LOCK_RETRIES="3", PROVISIONER_MAX_CPU="4",
                    PROVISIONER_MAX_MEMORY_MB="8192", PROVISIONER_MAX_STORAGE_GB="100",
                    # A secret-shaped variable a deny-list would let through.
                    SENTRY_DSN="https://public@sentry.example.com/1",
                    MINDROOM_SECRETS_KEY=base64.b64encode(b"k" * 32).decode())
    with mr.Stack(pg, env=env, functions=["dokku-provisioner"]) as s:
        yield s


def post(stack, payload, **kw):
    return stack.call_provisioner("POST", "/apps", json=payload, **kw)


def call(stack, method, path):
    return stack.call_provisioner(method, path)


# ---- create ------------------------------------------------------------------

def test_create_runs_the_exact_sequence(stack, dokku):
    dokku.mark()
    env = {"MINDROOM_TIER": "starter", "OPENAI_API_KEY": "sk-test-123"}
    sec = hs_secrets()
    r = post(stack, body("mindroom-create", "screate", 512, 0.5, env, secrets_=sec))
    assert r.status == 201, r
    assert r.json == {
        "app": "mindroom-create", "state": "running",
        "apps": {"mindroom": "running", "homeserver": "running"},
        "storage": {"mindroom": "present", "homeserver": "present"},
        "backend_url": "https://screate.%s/api" % DOMAIN,
        "frontend_url": "https://screate.%s" % DOMAIN,
        "matrix_server_url": "https://screate-matrix.%s" % DOMAIN,
        "matrix_server_name": "screate-matrix.%s" % DOMAIN,
        "created": True, "deployed": True, "restarted": False, "all_restarted": True,
        "dry_run": False}
    calls = dokku.new_calls()
    match(calls, create_sequence("mindroom-create", "screate", tls="letsencrypt"))

    # MindRoom's environment: the request's, plus its storage path and how to
    # reach its homeserver over the private network (not the public domain).
    cfg = [c for c in calls if c[0] == "config:import"][0]
    assert cfg == ["config:import", "--no-restart", "--format", "json", "mindroom-create", "-"]
    want = managed(dict(env, **MINDROOM_OWN,
                        MATRIX_HOMESERVER=hs_internal_url("mindroom-create"),
                        MATRIX_SERVER_NAME="screate-matrix." + DOMAIN,
                        MATRIX_REGISTRATION_SHARED_SECRET=sec["registration_shared_secret"]))
    assert imported(cfg) == want
    assert dokku.config("mindroom-create") == want
    assert dokku.config("mindroom-create-matrix") == {}
    assert dokku.reaches("mindroom-create", "mindroom-create-matrix.web")

    # Both apps: image, domain, limits, ports, certificate.
    for app, image, domain, mem_, cpu, port in (
            ("mindroom-create", IMAGE, "screate." + DOMAIN, "512m", "0.5", 8765),
            ("mindroom-create-matrix", MATRIX_IMAGE, "screate-matrix." + DOMAIN, "256m", "0.25",
             8008)):
        assert dokku.app(app, "image") == image
        assert dokku.app(app, "domains") == domain
        assert dokku.app_json(app, "resource.json") == {"memory": mem(mem_), "cpu": cpu}
        assert dokku.app(app, "ports") == ports(port, "letsencrypt")
        assert dokku.tls_active(app)
        if K3S:
            # Reserved as much as limited, so that no node takes more than it holds.
            assert dokku.app_json(app, "reserve.json") == {"memory": mem(mem_), "cpu": cpu}
            assert dokku.app(app, "scheduler") == "k3s"
            assert dokku.app_json(app, "network.json") is None
        else:
            assert dokku.app_json(app, "network.json") == {
                "attach-post-create": ["mindroom-create-net"]}


def test_storage_is_created_and_mounted_before_the_first_deploy(stack, dokku):
    dokku.mark()
    assert post(stack, body("mindroom-mounts")).status == 201
    calls = dokku.new_calls()
    n = names("mindroom-mounts")
    for app, entry, cdir in ((n["hs"], n["hs_data"], "/data"),
                             (n["app"], n["data"], MINDROOM_DIR)):
        deploy = calls.index(["git:from-image", app, MATRIX_IMAGE if app == n["hs"] else IMAGE])
        create = next(i for i, c in enumerate(calls) if c[:2] == ["storage:create", entry])
        mount = calls.index(["storage:mount", app, entry, "--container-dir", cdir])
        assert create < mount < deploy
        # The deploy's container was created with the mount.
        assert dokku.app_json(app, "container.json")["mounts"] == [
            {"entry": entry, "container_dir": cdir}]
    # Entries belong to the user each image runs as, 0700, sizes recorded.
    for entry, uid, gb in ((n["data"], MINDROOM_UID, "5"), (n["hs_data"], HS_UID, "3")):
        dokku.assert_entry_owned(entry, uid, gb)


def test_the_homeserver_is_configured_before_its_first_deploy(stack, dokku):
    sec = hs_secrets()
    dokku.mark()
    assert post(stack, body("mindroom-hsconf", "shsconf", secrets_=sec)).status == 201
    calls = dokku.new_calls()
    n = names("mindroom-hsconf")
    write = calls.index(["storage:exec", n["hs_data"]] + TAR)
    assert write < calls.index(["git:from-image", n["hs"], MATRIX_IMAGE])
    d = dokku.host_dir(n["hs_data"])
    files = {p.name: p for p in d.iterdir()}
    assert sorted(files) == ["form_secret", "homeserver.yaml", "macaroon_secret_key",
                             "registration_shared_secret", "signing.key"]
    yaml = files["homeserver.yaml"].read_text()
    host = matrix_host("shsconf")
    for line in ('server_name: "%s"' % host, 'public_baseurl: "https://%s/"' % host,
                 "  - port: 8008", "    x_forwarded: true", "  name: sqlite3",
                 "    database: /data/homeserver.db", "signing_key_path: /data/signing.key",
                 "registration_shared_secret_path: /data/registration_shared_secret",
                 "macaroon_secret_key_path: /data/macaroon_secret_key",
                 "form_secret_path: /data/form_secret", "enable_registration: false",
                 "report_stats: false"):
        assert line + "\n" in yaml, line
    # No secret in the configuration file; each in its own file, 0600, owned by Synapse's user.
    for key in ("registration_shared_secret", "macaroon_secret_key", "form_secret"):
        assert sec[key] not in yaml
        assert files[key].read_text() == sec[key]
    assert sec["signing_key"].split()[2] not in yaml
    assert files["signing.key"].read_text() == sec["signing_key"] + "\n"
    for name, p in files.items():
        st = p.stat()
        assert st.st_uid == HS_UID, name
        assert stat.S_IMODE(st.st_mode) == (0o644 if name == "homeserver.yaml" else 0o600), name
    # Synapse's container (the stand-in plays it) found its configuration and runs.
    assert dokku.app(n["hs"], "running") == "true"
    # No secret on any command line, and none in the provisioner's log.
    log = stack.log("dokku-provisioner")
    for c in calls:
        for a in c:
            for v in sec.values():
                assert v.split()[-1] not in a
    for v in sec.values():
        assert v.split()[-1] not in log
    assert "registration_shared_secret" not in log


def test_without_a_homeserver_only_mindroom_is_deployed(stack, dokku):
    dokku.mark()
    # Without a size where the scheduler allows it (k3s needs one).
    gb = 5 if K3S else None
    r = post(stack, body("mindroom-solo", "ssolo", hs=False, storage_gb=gb))
    assert r.status == 201, r
    assert r.json["apps"] == {"mindroom": "running", "homeserver": "missing"}
    assert r.json["storage"] == {"mindroom": "present"}
    match(dokku.new_calls(), create_sequence("mindroom-solo", "ssolo", hs=False, gb=gb,
                                             tls="letsencrypt"))
    assert dokku.config("mindroom-solo") == managed(dict({"MINDROOM_TIER": "starter"},
                                                         **MINDROOM_OWN))
    assert not dokku.exists("mindroom-solo-matrix")


def test_mindroom_keeps_its_configuration_in_its_storage(stack, dokku):
    """MindRoom reads and saves its config.yaml at MINDROOM_CONFIG_PATH (unset:
    the one in its working directory, inside the container): it is in the
    storage entry, so what the dashboard saved is still there after a plan
    change's rebuild and a restart."""
    app = "mindroom-cfgkept"
    assert post(stack, body(app, "scfgkept")).status == 201
    cfg = dokku.config(app)
    assert {k: cfg.get(k) for k in MINDROOM_OWN} == MINDROOM_OWN
    assert cfg["MINDROOM_CONFIG_PATH"].startswith(MINDROOM_DIR + "/")
    saved = "agents:\n  saved: {}\n"
    dokku.container_write(app, MINDROOM_CONFIG, saved)
    r = post(stack, body(app, "scfgkept", 768, 0.75))
    assert r.status == 200 and r.json["restarted"] is True, r
    assert call(stack, "POST", "/apps/%s/restart" % app).status == 200
    assert dokku.container_read(app, MINDROOM_CONFIG) == saved


def test_the_homeserver_takes_uploads_as_large_as_synapse_does(stack, dokku):
    """Dokku's nginx refuses a body over 1m by default; Synapse takes uploads up to
    its max_upload_size: the homeserver's public host lets that much through."""
    app = "mindroom-upload"
    assert post(stack, body(app, "supload")).status == 201
    n = names(app)
    yaml = (dokku.host_dir(n["hs_data"]) / "homeserver.yaml").read_text()
    assert "max_upload_size: %s\n" % HS_MAX_UPLOAD in yaml
    assert dokku.app_json(n["hs"], "nginx.json") == {"client-max-body-size": HS_MAX_UPLOAD}
    assert dokku.app_json(app, "nginx.json") is None


def test_no_deploy_starts_an_app_beside_its_running_container(stack, dokku):
    """One process at a time on each storage entry: Synapse assumes it alone
    writes its SQLite database, and MindRoom its state and Matrix sessions. Dokku's
    zero-downtime deploy would start the new container beside the old one. On k3s
    there is no such setting (docs/provisioner.md): none is sent."""
    app = "mindroom-overlap"
    assert post(stack, body(app, "soverlap")).status == 201
    # A plan change rebuilds both apps, a restart replaces both containers.
    r = post(stack, body(app, "soverlap", 768, 0.75, hs_memory_mb=384))
    assert r.status == 200 and r.json["restarted"] is True, r
    assert call(stack, "POST", "/apps/%s/restart" % app).status == 200
    n = names(app)
    for a in (n["hs"], n["app"]):
        assert dokku.app(a, "running") == "true"
        if K3S:
            assert not [c for c in dokku.all_calls() if c[0] == "checks:disable" and a in c], a
            continue
        assert dokku.app(a, "checks-disabled") == "_all_"
        assert dokku.app(a, "overlaps") is None, a


# ---- update, repeat ----------------------------------------------------------------

def test_create_twice_creates_once_and_does_not_restart(stack, dokku):
    payload = body("mindroom-twice", "stwice")
    assert post(stack, payload).status == 201
    dokku.mark()
    r = post(stack, payload)
    assert r.status == 200, r
    assert r.json["created"] is False and r.json["deployed"] is False
    assert r.json["restarted"] is False and r.json["state"] == "running"
    # Both apps were left running as they were: a caller owing a restart (a
    # health failure's, a tenant's) has it still to do.
    assert r.json["all_restarted"] is False
    match(dokku.new_calls(), create_sequence("mindroom-twice", "stwice", tls="letsencrypt",
                                             state={"hs": DONE, "mr": DONE, "net": True}))
    creates = [c for c in dokku.all_calls() if c[0] in ("apps:create", "storage:create",
                                                        "network:create")
               and "mindroom-twice" in c[1]]
    assert len(creates) == (4 if K3S else 5)      # no network on k3s


def test_update_with_new_limits_restarts_to_apply_them(stack, dokku):
    assert post(stack, body("mindroom-update", "supdate", 512, 0.5)).status == 201
    dokku.mark()
    r = post(stack, body("mindroom-update", "supdate", 2048, 1.25, storage_gb=20,
                         env={"MINDROOM_TIER": "professional"}, hs_memory_mb=1024, hs_cpu=0.75,
                         hs_storage_gb=10))
    assert r.status == 200, r
    assert r.json["restarted"] is True and r.json["created"] is False
    assert r.json["all_restarted"] is True
    changed = dict(DONE, spec_ok=False)
    match(dokku.new_calls(), create_sequence(
        "mindroom-update", "supdate", mem="2048m", cpu="1.25", gb=20, hs_mem="1024m",
        hs_cpu="0.75", hs_gb=10, tls="letsencrypt",
        state={"hs": changed, "mr": changed, "net": True}))
    assert dokku.config("mindroom-update")["MINDROOM_TIER"] == "professional"
    assert dokku.app_json("mindroom-update", "resource.json")["memory"] == mem("2048m")
    assert dokku.app_json("mindroom-update-matrix", "resource.json")["cpu"] == "0.75"
    assert dokku.entry("mindroom-update-data")["labels"] == {LABEL: "20"}


def test_an_update_restarts_only_the_app_whose_configuration_changed(stack, dokku):
    # Why an update does not count as a tenant's restart (docs/lifecycle.md): a
    # change of MindRoom's environment rebuilds MindRoom and leaves its homeserver
    # running as it was.
    payload = body("mindroom-onlymr", "sonlymr")
    assert post(stack, payload).status == 201
    dokku.mark()
    r = post(stack, dict(payload, env={"MINDROOM_TIER": "starter", "OPENAI_API_KEY": "sk-new"}))
    assert r.status == 200 and r.json["restarted"] is True, r
    assert r.json["all_restarted"] is False, r       # the homeserver kept its processes
    n = names("mindroom-onlymr")
    ps = [c for c in dokku.new_calls() if c[0].startswith("ps:") and c[0] != "ps:report"]
    assert ps == [["ps:rebuild", n["app"]]], ps


def test_a_stopped_app_is_started_again_by_create(stack, dokku):
    payload = body("mindroom-restart", "srestart")
    assert post(stack, payload).status == 201
    assert call(stack, "POST", "/apps/mindroom-restart/stop").status == 200
    dokku.mark()
    r = post(stack, payload)
    assert r.status == 200 and r.json["state"] == "running", r
    assert r.json["all_restarted"] is True, r        # both started from stopped
    stopped = dict(DONE, running=False)
    match(dokku.new_calls(), create_sequence("mindroom-restart", "srestart", tls="letsencrypt",
                                             state={"hs": stopped, "mr": stopped, "net": True}))
    assert dokku.app("mindroom-restart", "running") == "true"
    assert dokku.app("mindroom-restart-matrix", "running") == "true"


def test_values_with_newlines_and_shell_reach_the_app_intact(stack, dokku):
    env = {
        "MULTI": "line one\nline two\n",
        "CONTROL": "tab\there \x01\x1f\x7f end",
        "JSONISH": "{\"a\": [1, \"\\u0041\"]} \\n \u2028",
        "SHELL_BAIT": "$(touch /tmp/pwned); `id`; a && b | c > d",
        "QUOTES": "it's \"quoted\" \\ back",
        "EQUALS": "a=b=c",
        "UNICODE": "h\u00e9llo \u2603",
        "EMPTY": "",
        "SECRETISH": "supersecret-value-zz9",
    }
    dokku.mark()
    r = post(stack, body("mindroom-values", "svalues", env=env, hs=False))
    assert r.status == 201, r
    calls = dokku.new_calls()
    cfg = [c for c in calls if c[0] == "config:import"][0]
    assert imported(cfg) == managed(dict(env, **MINDROOM_OWN))
    # No value appears in clear anywhere on any command line ...
    for c in calls:
        for a in c:
            assert "line one" not in a and "touch" not in a and "supersecret" not in a
    assert dokku.config("mindroom-values") == imported(cfg)
    # ... nor in the provisioner's log (Dokku's config:import output echoes values).
    log = stack.log("dokku-provisioner")
    assert "supersecret-value-zz9" not in log
    assert "config:import --no-restart --format json mindroom-values -" in log


def test_no_secret_value_is_on_any_command_line(stack, dokku):
    """Every local user of the provisioner's host (and of the Dokku host) can read
    /proc/<pid>/cmdline. config:import reads MindRoom's environment on stdin, so
    no secret is on a command line, base64 or not: the stand-in records each
    child's argv, and none may hold a secret in any form, on a create or an update."""
    api_key = "sk-live-" + secrets.token_hex(16)
    token = "mri_k1_" + secrets.token_hex(16)
    sec = hs_secrets()
    dokku.mark()
    env = {"OPENAI_API_KEY": api_key, "MINDROOM_CONTROL_PLANE_TOKEN": token}
    r = post(stack, body("mindroom-argv", "sargv", env=env, secrets_=sec))
    assert r.status == 201, r
    api_key2 = "sk-live-" + secrets.token_hex(16)
    env["OPENAI_API_KEY"] = api_key2
    r = post(stack, body("mindroom-argv", "sargv", env=env, secrets_=sec))
    assert r.status == 200, r
    cfg = dokku.config("mindroom-argv")
    assert cfg["OPENAI_API_KEY"] == api_key2 and cfg["MINDROOM_CONTROL_PLANE_TOKEN"] == token
    plain = [api_key, api_key2, token] + list(sec.values())
    needles = plain + [base64.b64encode(p.encode()).decode() for p in plain]
    calls = dokku.new_calls()
    leaked = sorted({"%s ... %s" % (c[0], n[:12]) for c in calls for a in c
                     for n in needles if n in a})
    assert leaked == []
    assert [c[0] for c in calls].count("config:import") == 2, calls


# ---- resume after a failure at every step -------------------------------------------

def fail_at(dokku, expected, idx, status):
    """Tells the stand-in to fail expected[idx] (and no earlier call of its subcommand)."""
    sub = subcommand(expected[idx])
    dokku.tell("fail", sub, times=1, status=status,
               skip=sum(1 for c in expected[:idx] if subcommand(c) == sub))
    return sub


def test_a_failure_at_every_step_is_resumed_by_the_same_request(stack, dokku):
    """The create sequence fails at its first step; the same request again runs
    the sequence the documented rules give for what now exists (nothing created
    twice, storage never recreated or unmounted) and fails at the next step;
    and so on through the last step, after which it completes."""
    app, sub_ = "mindroom-resume", "sresume"
    n = names(app)
    payload = body(app, sub_, env={"TOKEN_LIKE": "do-not-echo-42"})
    full = create_sequence(app, sub_, tls="letsencrypt")
    for step, target in enumerate(full):
        state = dokku.observed(app)
        expected = create_sequence(app, sub_, tls="letsencrypt", state=state)
        idx = expected.index(target)
        failing = fail_at(dokku, expected, idx, 3)
        dokku.mark()
        try:
            r = post(stack, payload)
        finally:
            dokku.untell("fail", failing)
        assert r.status == 502, (step, target, r)
        assert r.json == {"error": {"code": "dokku_failed", "message": "%s exited 3" % failing}}
        assert "do-not-echo-42" not in r.text
        match(dokku.new_calls(), expected[:idx + 1])

    state = dokku.observed(app)
    dokku.mark()
    r = post(stack, payload)
    assert r.status == 200 and r.json["state"] == "running", r   # MindRoom's app existed
    match(dokku.new_calls(), create_sequence(app, sub_, tls="letsencrypt", state=state))
    for a, image in ((n["app"], IMAGE), (n["hs"], MATRIX_IMAGE)):
        assert dokku.app(a, "image") == image and dokku.app(a, "running") == "true"
        assert dokku.tls_active(a)
    assert dokku.mounts(n["app"]) == [{"entry": n["data"], "container_dir": MINDROOM_DIR}]
    assert dokku.mounts(n["hs"]) == [{"entry": n["hs_data"], "container_dir": "/data"}]
    assert dokku.config(n["app"])["TOKEN_LIKE"] == "do-not-echo-42"
    assert (dokku.host_dir(n["hs_data"]) / "homeserver.yaml").exists()
    assert dokku.reaches(app, n["hs"] + ".web")
    # Each resource was created once: a create that failed is the one repeat.
    for kind in ("apps:create", "storage:create", "network:create"):
        made = [c for c in dokku.all_calls() if c[0] == kind and c[1].startswith(app)]
        assert len(made) == 2 * len(set(c[1] for c in made)), made


def test_deploy_lock_contention_is_retried(stack, dokku):
    dokku.tell("lock", "git:from-image", times=2)
    dokku.mark()
    r = post(stack, body("mindroom-locked", "slocked", hs=False))
    assert r.status == 201, r
    calls = dokku.new_calls()
    assert calls.count(["git:from-image", "mindroom-locked", IMAGE]) == 3
    assert dokku.app("mindroom-locked", "image") == IMAGE
    assert "deploy lock held by another deploy; retry 2/3" in stack.log("dokku-provisioner")


def test_deploy_lock_held_too_long_is_a_502(stack, dokku):
    assert post(stack, body("mindroom-lockedout", "slockedout", hs=False)).status == 201
    dokku.tell("lock", "ps:stop", times=10)
    dokku.mark()
    r = call(stack, "POST", "/apps/mindroom-lockedout/stop")
    dokku.untell("lock", "ps:stop")
    assert r.status == 502, r
    assert r.json["error"] == {"code": "dokku_locked", "message": "ps:stop exited 1"}
    # DOKKU_LOCK_RETRIES=3: the first attempt and three retries.
    assert dokku.new_calls() == [["apps:exists", "mindroom-lockedout"],
                                 ["apps:exists", "mindroom-lockedout-matrix"]] + \
        [["ps:stop", "mindroom-lockedout"]] * 4


def test_concurrent_creates_of_one_instance_run_one_at_a_time(stack, dokku):
    dokku.mark()
    results = []
    payload = body("mindroom-race", "srace")

    def one():
        results.append(post(stack, payload, timeout=120))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in results) == [200, 200, 201], results
    calls = dokku.new_calls()
    assert calls.count(["apps:create", "mindroom-race"]) == 1
    assert len([c for c in calls if c[:2] == ["storage:create", "mindroom-race-data"]]) == 1
    # Each request's sequence starts with its first command (network:exists;
    # apps:exists of the homeserver on k3s) and is never interleaved with
    # another's: the runs are contiguous blocks.
    first = create_sequence("mindroom-race", "srace")[0]
    starts = [i for i, c in enumerate(calls) if c == first]
    assert len(starts) == 3 and starts[0] == 0
    match(calls[:starts[1]], create_sequence("mindroom-race", "srace", tls="letsencrypt"))


# ---- stop / start / state / destroy / purge ---------------------------------------

def test_stop_start_state_destroy_sequences(stack, dokku):
    app = "mindroom-life"
    n = names(app)
    assert post(stack, body(app, "slife")).status == 201

    dokku.mark()
    r = call(stack, "POST", "/apps/%s/stop" % app)
    assert r.status == 200, r
    assert r.json == {"app": app, "state": "stopped",
                      "apps": {"mindroom": "stopped", "homeserver": "stopped"}, "dry_run": False}
    assert dokku.new_calls() == [["apps:exists", app], ["apps:exists", n["hs"]],
                                 ["ps:stop", app], ["ps:stop", n["hs"]]]

    r = call(stack, "GET", "/apps/" + app)
    assert r.status == 200, r
    assert r.json == {"app": app, "state": "stopped",
                      "apps": {"mindroom": "stopped", "homeserver": "stopped"},
                      "storage": {"mindroom": "present", "homeserver": "present"},
                      "dry_run": False}
    assert dokku.new_calls() == [["apps:exists", app], ["apps:exists", n["hs"]],
                                 ["ps:report", app, "--deployed"], ["ps:report", app, "--running"],
                                 ["ps:report", n["hs"], "--deployed"],
                                 ["ps:report", n["hs"], "--running"],
                                 ["storage:info", n["data"]], ["storage:info", n["hs_data"]]]

    r = call(stack, "POST", "/apps/%s/start" % app)
    assert r.status == 200 and r.json["state"] == "running", r
    assert dokku.new_calls() == [["apps:exists", app], ["apps:exists", n["hs"]],
                                 ["ps:report", n["hs"], "--deployed"],
                                 ["ps:report", app, "--deployed"],
                                 ["ps:start", n["hs"]], ["ps:start", app]]
    assert call(stack, "GET", "/apps/" + app).json["state"] == "running"
    dokku.mark()

    r = call(stack, "DELETE", "/apps/" + app)
    assert r.status == 200, r
    assert r.json == {"app": app, "state": "destroyed",
                      "apps": {"mindroom": "missing", "homeserver": "missing"},
                      "storage": {"mindroom": "present", "homeserver": "present"},
                      "existed": True, "purged": False, "dry_run": False}
    assert dokku.new_calls() == [["apps:exists", app], ["apps:exists", n["hs"]],
                                 ["--force", "apps:destroy", app],
                                 ["--force", "apps:destroy", n["hs"]]] + network_teardown(app) + [
                                 ["storage:info", n["data"]], ["storage:info", n["hs_data"]]]
    assert not dokku.exists(app) and not dokku.exists(n["hs"]) and not dokku.network(n["net"])
    # Destroy keeps the storage: entries and data.
    assert dokku.entry(n["data"]) and (dokku.host_dir(n["hs_data"]) / "homeserver.yaml").exists()

    # The state of a destroyed instance whose storage is kept.
    r = call(stack, "GET", "/apps/" + app)
    assert r.status == 200 and r.json["state"] == "destroyed", r
    assert r.json["storage"] == {"mindroom": "present", "homeserver": "present"}

    # Destroying again is success and runs nothing destructive.
    dokku.mark()
    r = call(stack, "DELETE", "/apps/" + app)
    assert r.status == 200 and r.json["existed"] is False, r
    assert dokku.new_calls() == [["apps:exists", app], ["apps:exists", n["hs"]]] + \
        network_teardown(app, exists=False) + [
            ["storage:info", n["data"]], ["storage:info", n["hs_data"]]]

    for method, path in (("POST", "/apps/%s/stop" % app), ("POST", "/apps/%s/start" % app)):
        r = call(stack, method, path)
        assert r.status == 404 and r.json["error"]["code"] == "not_found", (path, r)


def test_restart_restarts_both_apps_on_their_storage(stack, dokku):
    app = "mindroom-reboot"
    n = names(app)
    assert post(stack, body(app, "sreboot")).status == 201
    dokku.container_write(app, MINDROOM_DIR + "/agents/memory.db", "agent memory")
    dokku.container_write(n["hs"], "/data/homeserver.db", "rooms")
    dokku.container_write(app, "/tmp/scratch", "ephemeral")
    dokku.mark()
    r = call(stack, "POST", "/apps/%s/restart" % app)
    assert r.status == 200, r
    assert r.json == {"app": app, "state": "running",
                      "apps": {"mindroom": "running", "homeserver": "running"}, "dry_run": False}
    # The homeserver first (MindRoom expects it when it starts); nothing else changes.
    assert dokku.new_calls() == [["apps:exists", app], ["apps:exists", n["hs"]],
                                 ["ps:report", n["hs"], "--deployed"],
                                 ["ps:report", app, "--deployed"],
                                 ["ps:restart", n["hs"]], ["ps:restart", app]]
    assert dokku.container_read(app, "/tmp/scratch") is None          # new containers
    assert dokku.container_read(app, MINDROOM_DIR + "/agents/memory.db") == "agent memory"
    assert dokku.container_read(n["hs"], "/data/homeserver.db") == "rooms"
    # A stopped instance is started by a restart (ps:restart starts a stopped app).
    assert call(stack, "POST", "/apps/%s/stop" % app).status == 200
    assert call(stack, "POST", "/apps/%s/restart" % app).status == 200
    assert dokku.app(app, "running") == "true" and dokku.app(n["hs"], "running") == "true"
    # A missing instance is 404, a half-created one not_deployed; GET is 405.
    dokku.mark()
    r = call(stack, "POST", "/apps/mindroom-nosuch/restart")
    assert r.status == 404 and r.json["error"]["code"] == "not_found", r
    assert dokku.new_calls() == [["apps:exists", "mindroom-nosuch"],
                                 ["apps:exists", "mindroom-nosuch-matrix"]]
    dokku.tell("fail", "resource:limit", times=1, skip=1)
    assert post(stack, body("mindroom-halfr", "shalfr")).status == 502
    r = call(stack, "POST", "/apps/mindroom-halfr/restart")
    assert r.status == 404 and r.json["error"]["code"] == "not_deployed", r
    assert not [c for c in dokku.new_calls() if c[0] == "ps:restart"]
    assert call(stack, "GET", "/apps/%s/restart" % app).status == 405


def test_purge_destroys_apps_and_storage_data(stack, dokku):
    app = "mindroom-purge"
    n = names(app)
    assert post(stack, body(app, "spurge")).status == 201
    dokku.mark()
    r = call(stack, "DELETE", "/apps/%s?purge=true" % app)
    assert r.status == 200, r
    assert r.json["purged"] is True and r.json["existed"] is True
    assert r.json["storage"] == {"mindroom": "missing", "homeserver": "missing"}
    assert dokku.new_calls() == [
        ["apps:exists", app], ["apps:exists", n["hs"]],
        ["--force", "apps:destroy", app], ["--force", "apps:destroy", n["hs"]]] + \
        network_teardown(app) + [
        ["storage:info", n["data"]], storage_destroy(n["data"]),
        ["storage:info", n["hs_data"]], storage_destroy(n["hs_data"])]
    assert dokku.entry(n["data"]) is None and not dokku.host_dir(n["data"]).exists()
    assert dokku.entry(n["hs_data"]) is None and not dokku.host_dir(n["hs_data"]).exists()
    assert call(stack, "GET", "/apps/" + app).status == 404
    # A purge again is success and runs nothing destructive.
    r = call(stack, "DELETE", "/apps/%s?purge=true" % app)
    assert r.status == 200 and r.json["purged"] is False and r.json["existed"] is False, r


def test_a_purge_failing_at_every_step_is_resumed(stack, dokku):
    app = "mindroom-purgefail"
    n = names(app)
    assert post(stack, body(app, "spurgefail")).status == 201
    full = destroy_sequence(app, dokku.observed(app), purge=True)
    assert len(full) == (8 if K3S else 10)
    for step, target in enumerate(full):
        expected = destroy_sequence(app, dokku.observed(app), purge=True)
        idx = expected.index(target)
        failing = fail_at(dokku, expected, idx, 4)
        dokku.mark()
        try:
            r = call(stack, "DELETE", "/apps/%s?purge=true" % app)
        finally:
            dokku.untell("fail", failing)
        assert r.status == 502 and r.json["error"]["message"] == "%s exited 4" % failing, \
            (step, r)
        assert dokku.new_calls() == expected[:idx + 1]
    state = dokku.observed(app)
    dokku.mark()
    r = call(stack, "DELETE", "/apps/%s?purge=true" % app)
    assert r.status == 200, r
    assert r.json["storage"] == {"mindroom": "missing", "homeserver": "missing"}
    assert dokku.new_calls() == destroy_sequence(app, state, purge=True)
    assert not dokku.exists(app) and not dokku.exists(n["hs"]) and not dokku.network(n["net"])
    assert not dokku.host_dir(n["data"]).exists() and not dokku.host_dir(n["hs_data"]).exists()


def test_storage_of_a_destroyed_instance_is_removed_later(stack, dokku):
    app = "mindroom-retain"
    n = names(app)
    assert post(stack, body(app, "sretain")).status == 201
    # While the apps exist, their storage is theirs: refused, nothing runs destructively.
    dokku.mark()
    r = call(stack, "DELETE", "/apps/%s/storage" % app)
    assert r.status == 409 and r.json["error"]["code"] == "apps_exist", r
    assert dokku.new_calls() == [["apps:exists", app], ["apps:exists", n["hs"]]]
    assert dokku.entry(n["data"])

    assert call(stack, "DELETE", "/apps/" + app).status == 200
    dokku.mark()
    r = call(stack, "DELETE", "/apps/%s/storage" % app)
    assert r.status == 200, r
    assert r.json == {"app": app, "state": "destroyed",
                      "apps": {"mindroom": "missing", "homeserver": "missing"},
                      "storage": {"mindroom": "missing", "homeserver": "missing"},
                      "purged": True, "dry_run": False}
    assert dokku.new_calls() == [
        ["apps:exists", app], ["apps:exists", n["hs"]],
        ["storage:info", n["data"]], storage_destroy(n["data"]),
        ["storage:info", n["hs_data"]], storage_destroy(n["hs_data"])]
    assert not dokku.host_dir(n["data"]).exists() and not dokku.host_dir(n["hs_data"]).exists()
    r = call(stack, "DELETE", "/apps/%s/storage" % app)
    assert r.status == 200 and r.json["purged"] is False, r
    assert call(stack, "GET", "/apps/" + app).status == 404


# ---- data survives everything but purge -------------------------------------------

def test_data_survives_update_restart_stop_start_redeploy_and_destroy(stack, dokku):
    app = "mindroom-keep"
    n = names(app)
    assert post(stack, body(app, "skeep")).status == 201
    dokku.container_write(app, MINDROOM_DIR + "/agents/memory.db", "agent memory")
    dokku.container_write(n["hs"], "/data/homeserver.db", "rooms and messages")
    # Something written outside the mounts is the container's own, and goes with it.
    dokku.container_write(app, "/tmp/scratch", "ephemeral")

    def kept():
        assert dokku.container_read(app, MINDROOM_DIR + "/agents/memory.db") == "agent memory"
        assert dokku.container_read(n["hs"], "/data/homeserver.db") == "rooms and messages"

    # Plan change (limits and env): restarts both apps.
    r = post(stack, body(app, "skeep", 1024, 1, env={"MINDROOM_TIER": "pro"}, hs_memory_mb=512))
    assert r.status == 200 and r.json["restarted"] is True, r
    kept()
    assert dokku.container_read(app, "/tmp/scratch") is None
    # Stop and start.
    assert call(stack, "POST", "/apps/%s/stop" % app).status == 200
    assert call(stack, "POST", "/apps/%s/start" % app).status == 200
    kept()
    # A redeploy of a new image (a health-driven redeploy is the same request again).
    for f in ("image", "source-image"):
        (dokku.dir / "apps" / app / f).write_text("registry.example.com/old@sha256:" + "0" * 64)
    r = post(stack, body(app, "skeep", 1024, 1, env={"MINDROOM_TIER": "pro"}, hs_memory_mb=512))
    assert r.status == 200 and r.json["deployed"] is True, r
    kept()
    # The homeserver's configuration was written again, its database left alone.
    assert (dokku.host_dir(n["hs_data"]) / "homeserver.yaml").exists()
    # Destroy keeps the data; a new instance of the same app gets it back.
    assert call(stack, "DELETE", "/apps/" + app).status == 200
    assert (dokku.host_dir(n["data"]) / "agents" / "memory.db").read_text() == "agent memory"
    dokku.mark()
    r = post(stack, body(app, "skeep"))
    assert r.status == 201, r
    assert not [c for c in dokku.new_calls() if c[0] == "storage:create"]
    kept()
    # Purge removes it.
    assert call(stack, "DELETE", "/apps/%s?purge=true" % app).status == 200
    assert not dokku.host_dir(n["data"]).exists() and not dokku.host_dir(n["hs_data"]).exists()


def test_start_of_a_half_created_instance_says_not_deployed(stack, dokku):
    dokku.tell("fail", "resource:limit", times=1, skip=1)   # MindRoom's, after the homeserver's
    assert post(stack, body("mindroom-half", "shalf")).status == 502
    dokku.mark()
    r = call(stack, "POST", "/apps/mindroom-half/start")
    assert r.status == 404 and r.json["error"]["code"] == "not_deployed", r
    assert dokku.new_calls() == [["apps:exists", "mindroom-half"],
                                 ["apps:exists", "mindroom-half-matrix"],
                                 ["ps:report", "mindroom-half-matrix", "--deployed"],
                                 ["ps:report", "mindroom-half", "--deployed"]]
    r = call(stack, "GET", "/apps/mindroom-half")
    assert r.status == 200 and r.json["state"] == "created", r
    assert r.json["apps"] == {"mindroom": "created", "homeserver": "running"}


def test_a_failing_stop_is_a_502_with_the_subcommand(stack, dokku):
    assert post(stack, body("mindroom-stopfail", "sstopfail")).status == 201
    dokku.tell("fail", "ps:stop", times=1, status=7)
    r = call(stack, "POST", "/apps/mindroom-stopfail/stop")
    assert r.status == 502, r
    assert r.json == {"error": {"code": "dokku_failed", "message": "ps:stop exited 7"}}


def test_a_missing_app_is_dokkus_exit_20_and_any_other_failure_is_a_502(stack, dokku):
    """Dokku's apps:exists exits 20 for a missing app ("App <app> does not exist",
    the status of every command naming one); exit 1 is another error (access
    denied, sudo). A destroy that took that for "missing" would answer
    destroyed and leave the app running."""
    app = "mindroom-exists20"
    dokku.mark()
    r = call(stack, "DELETE", "/apps/" + app)
    assert r.status == 200 and r.json["existed"] is False, r
    assert dokku.new_calls()[:2] == [["apps:exists", app], ["apps:exists", app + "-matrix"]]
    assert post(stack, body(app, "sexists20")).status == 201
    dokku.tell("fail", "apps:exists", times=1, status=1)
    dokku.mark()
    r = call(stack, "DELETE", "/apps/" + app)
    assert r.status == 502, r
    assert r.json == {"error": {"code": "dokku_failed", "message": "apps:exists exited 1"}}
    assert dokku.new_calls() == [["apps:exists", app]]
    assert dokku.exists(app) and dokku.app(app, "running") == "true"
    r = call(stack, "DELETE", "/apps/" + app)
    assert r.status == 200 and r.json["existed"] is True and not dokku.exists(app), r


def test_a_network_check_that_fails_is_a_502_not_a_missing_network(stack, dokku):
    """network:exists exits 1 with "Network does not exist" for a missing network,
    and 1 with Docker's error when Docker fails: only the first is missing. A
    destroy that took Docker's failure for it would answer destroyed and leave
    the network behind."""
    app = "mindroom-netcheck"
    net = names(app)["net"]
    assert post(stack, body(app, "snetcheck")).status == 201
    dokku.tell("fail", "network:exists", times=1, status=1)
    dokku.mark()
    try:
        r = call(stack, "DELETE", "/apps/" + app)
    finally:
        dokku.untell("fail", "network:exists")
    if K3S:     # no network, no network:exists
        assert r.status == 200 and "network:exists" not in map(subcommand, dokku.new_calls()), r
        return
    assert r.status == 502, r
    assert r.json == {"error": {"code": "dokku_failed", "message": "network:exists exited 1"}}
    assert dokku.network(net)
    r = call(stack, "DELETE", "/apps/" + app)
    assert r.status == 200 and not dokku.network(net), r


# ---- bad input: 400 and nothing runs ---------------------------------------------

BAD_APPS = ["a;rm -rf /", "../x", "Upper", "mindroom-" + "a" * 25, "", "-a", "1abc", "a b",
            "a\nb", "a_b", "a.b", "$(id)", "\u00e4pp",
            # Names outside the prefix: a token holder must not reach other apps.
            "other-app", "dokku", "mindroom", "mindroom-", "xmindroom-abc",
            # Names that would reach another instance's homeserver, storage or network.
            "mindroom-abc-matrix", "mindroom-abc-data", "mindroom-a-b", "mindroom-Abc"]


@pytest.mark.parametrize("name", BAD_APPS)
def test_bad_app_names_in_the_body_run_nothing(stack, dokku, name):
    dokku.mark()
    r = post(stack, body(name, "sok"))
    assert r.status == 400 and r.json["error"]["code"] == "invalid_request", r
    assert dokku.new_calls() == []


@pytest.mark.parametrize("sub", ["a;b", "../x", "UP", "s" * 64, "", "-s", "a.b", "ab-",
                                 "s" * 57])
def test_bad_subdomains_run_nothing(stack, dokku, sub):
    dokku.mark()
    r = post(stack, body("mindroom-okname", sub))
    assert r.status == 400, r
    assert dokku.new_calls() == []


@pytest.mark.parametrize("key", ["A=B", "A B", "lower", "1A", "", "A-B", "A;B", "A\nB",
                                 "DOKKU_PROXY_PORT", "\u00c4", "MATRIX_HOMESERVER",
                                 "MATRIX_REGISTRATION_SHARED_SECRET", "MINDROOM_STORAGE_PATH",
                                 "MINDROOM_CONFIG_PATH", "MINDROOM_CONFIG_TEMPLATE",
                                 "MATRIX_SERVER_NAME", "MINDROOM_MANAGED_ENV"])
def test_bad_env_keys_run_nothing(stack, dokku, key):
    dokku.mark()
    r = post(stack, body("mindroom-okname", "sok", env={"GOOD": "1", key: "v"}))
    assert r.status == 400, r
    assert "v" != r.json["error"]["message"]
    assert dokku.new_calls() == []


@pytest.mark.parametrize("change", [
    {"memory_mb": 0}, {"memory_mb": 127}, {"memory_mb": 8193}, {"memory_mb": 512.5},
    {"memory_mb": "512"}, {"memory_mb": None}, {"cpu": 0}, {"cpu": -1}, {"cpu": 4.001},
    {"cpu": "1"}, {"cpu": 0.0001}, {"cpu": None}, {"env": {"A": 5}}, {"env": {"A": None}},
    {"env": ["A=B"]}, {"env": "A=B"}, {"extra": 1}, {"app": 5},
    {"storage_gb": 0}, {"storage_gb": 101}, {"storage_gb": 1.5}, {"storage_gb": "5"},
    {"homeserver": "yes"}, {"homeserver": []},
])
def test_out_of_bounds_or_mistyped_fields_run_nothing(stack, dokku, change):
    payload = body("mindroom-okname", "sok")
    payload.update(change)
    payload = {k: v for k, v in payload.items() if not (v is None and k in ("memory_mb", "cpu"))}
    dokku.mark()
    r = post(stack, payload)
    assert r.status == 400, (change, r)
    assert dokku.new_calls() == []


@pytest.mark.parametrize("where,cpu", [("mindroom", 0.001), ("mindroom", 0.009),
                                       ("homeserver", 0.005)])
def test_a_cpu_limit_under_what_the_scheduler_takes_is_a_400_and_runs_nothing(stack, dokku,
                                                                             where, cpu):
    """docker-local: Dokku hands resource:limit --cpu to `docker container create
    --cpus`, and Docker refuses anything under 0.01 ("Range of CPUs is from 0.01 to
    N.00"): every deploy of that spec would fail, a 502 the control plane retries for
    ever. The provisioner refuses it up front (400: the control plane holds it).
    k3s: Kubernetes takes 1m (0.001 CPU), so the same spec is created."""
    payload = body("mindroom-lowcpu", "slowcpu")
    if where == "mindroom":
        payload["cpu"] = cpu
    else:
        payload["homeserver"]["cpu"] = cpu
    dokku.mark()
    r = post(stack, payload)
    if K3S:
        assert r.status in (200, 201), (where, cpu, r)
        assert [c for c in dokku.new_calls() if c[0] == "resource:limit"], "no limit set"
        return
    assert r.status == 400 and r.json["error"]["code"] == "invalid_request", (where, cpu, r)
    assert "0.01" in r.json["error"]["message"]
    assert dokku.new_calls() == []


SIGNING = "ed25519 a_Test " + "A" * 43


@pytest.mark.parametrize("field,value", [
    ("memory_mb", 100), ("cpu", 5), ("storage_gb", 0), ("extra", 1),
    ("server_name", "Bad.Example"), ("server_name", "a..b"), ("server_name", "x y"),
    ("server_name", "-a.example"), ("server_name", 5),
    ("signing_key", None), ("signing_key", "ed25519 a_Test short"),
    ("signing_key", "ed25519 a-Test " + "A" * 43), ("signing_key", "ed448 a_Test " + "A" * 43),
    ("signing_key", SIGNING + "\n"), ("signing_key", SIGNING + "="),
    ("registration_shared_secret", "short"), ("registration_shared_secret", None),
    ("registration_shared_secret", "x" * 40 + "\n"), ("macaroon_secret_key", "x" * 40 + " y"),
    ("form_secret", "x" * 129), ("form_secret", 12345678901234567890123456789012345),
    ("macaroon_secret_key", "\"quoted\": yaml" + "x" * 30),
])
def test_bad_homeserver_fields_run_nothing(stack, dokku, field, value):
    payload = body("mindroom-okname", "sok")
    if value is None:
        del payload["homeserver"][field]
    else:
        payload["homeserver"][field] = value
    dokku.mark()
    r = post(stack, payload)
    assert r.status == 400 and r.json["error"]["code"] == "invalid_request", (field, r)
    # A secret's value is never echoed.
    if isinstance(value, str) and field != "server_name":
        assert value not in r.text
    assert dokku.new_calls() == []


def test_server_name_defaults_to_the_homeservers_host_and_is_answered(stack, dokku):
    """The control plane sends no server_name the first time: the homeserver is named
    after its host, and the answer says so (the control plane records it and sends it
    on every later call: Synapse cannot be renamed)."""
    payload = body("mindroom-named", "snamed")
    del payload["homeserver"]["server_name"]
    r = post(stack, payload)
    assert r.status == 201 and r.json["matrix_server_name"] == "snamed-matrix.%s" % DOMAIN, r
    yaml = (dokku.host_dir("mindroom-named-matrix-data") / "homeserver.yaml").read_text()
    assert 'server_name: "snamed-matrix.%s"' % DOMAIN in yaml


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'"x"',
                                 b'{"app":"mindroom-a","app":"mindroom-b","subdomain":"s",'
                                 b'"memory_mb":512,"cpu":1}',
                                 b'{"app":"mindroom-okname","subdomain":"sok","memory_mb":512,'
                                 b'"cpu":1,"env":{"A":"1","A":"2"}}'])
def test_malformed_bodies_run_nothing(stack, dokku, raw):
    dokku.mark()
    r = stack.call_provisioner("POST", "/apps", body=raw,
                               headers={"Content-Type": "application/json"})
    assert r.status == 400, (raw, r)
    assert dokku.new_calls() == []


@pytest.mark.parametrize("raw", [b"\xff", b"a\xc3", b"\xc0\xaf", b"\xed\xa0\x80",
                                 b"\xf4\x90\x80\x80", b"\xe0\x80\xaf"])
def test_an_env_value_that_is_not_utf8_runs_nothing(stack, dokku, raw):
    """Dokku reads MindRoom's environment as JSON and would turn a byte that is not
    UTF-8 into U+FFFD: the app would run with another value than the one sent."""
    payload = json.dumps(body("mindroom-okname", "sok", env={"KEY": "@@"})).encode()
    dokku.mark()
    r = stack.call_provisioner("POST", "/apps", body=payload.replace(b"@@", raw),
                               headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.json["error"]["code"] == "invalid_request", (raw, r)
    assert "KEY" in r.json["error"]["message"]
    assert dokku.new_calls() == []


@pytest.mark.parametrize("path", ["/apps/Upper", "/apps/a%3Brm%20-rf%20%2F",
                                  "/apps/" + "a" * 64, "/apps/a%20b", "/apps/-x",
                                  "/apps/a%0Ab/stop", "/apps/other-app", "/apps/dokku",
                                  "/apps/mindroom-x-matrix", "/apps/mindroom"])
def test_bad_app_names_in_the_path_run_nothing(stack, dokku, path):
    dokku.mark()
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/stop"), ("POST", "/start"),
                           ("POST", "/restart"), ("DELETE", "/storage"), ("DELETE", "?purge=true")):
        p = path if path.endswith("/stop") else path + suffix
        r = stack.call_provisioner(method, p)
        assert r.status == 400 and r.json["error"]["code"] == "invalid_app", (method, p, r)
    assert dokku.new_calls() == []


@pytest.mark.parametrize("path", ["/apps/../x", "/apps/x/../../etc/passwd",
                                  "/apps/mindroom-x/reboot", "/apps/", "/",
                                  "/apps/mindroom-x/stop/now", "/apps/mindroom-x/storage/x"])
def test_traversal_and_unknown_paths_run_nothing(stack, dokku, path):
    dokku.mark()
    r = stack.call_provisioner("POST", path)
    assert r.status in (400, 404), (path, r)
    assert dokku.new_calls() == []


@pytest.mark.parametrize("method,path", [
    ("DELETE", "/apps/mindroom-x?purge=yes"), ("DELETE", "/apps/mindroom-x?purge=1"),
    ("DELETE", "/apps/mindroom-x?purge=true&x=1"), ("DELETE", "/apps/mindroom-x?force=true"),
    ("GET", "/apps/mindroom-x?purge=true"), ("POST", "/apps/mindroom-x/stop?purge=true"),
    ("DELETE", "/apps/mindroom-x/storage?purge=true"), ("POST", "/apps?purge=true")])
def test_unknown_query_parameters_run_nothing(stack, dokku, method, path):
    dokku.mark()
    r = stack.call_provisioner(method, path, json=body("mindroom-x") if method == "POST" else None)
    assert r.status == 400 and r.json["error"]["code"] == "invalid_request", (path, r)
    assert dokku.new_calls() == []


def test_wrong_methods_are_405_and_run_nothing(stack, dokku):
    dokku.mark()
    for method, path in (("GET", "/apps"), ("DELETE", "/apps"), ("POST", "/apps/mindroom-x"),
                         ("GET", "/apps/mindroom-x/stop"), ("DELETE", "/apps/mindroom-x/start"),
                         ("GET", "/apps/mindroom-x/storage"), ("POST", "/apps/mindroom-x/storage")):
        r = stack.call_provisioner(method, path)
        assert r.status == 405, (method, path, r)
    assert stack.call_provisioner("PUT", "/apps").status == 405
    assert dokku.new_calls() == []


# ---- auth: 401 and nothing runs ----------------------------------------------------

@pytest.mark.parametrize("how", ["missing", "wrong", "prefix", "longer", "basic", "empty"])
def test_bad_tokens_are_401_and_run_nothing(stack, dokku, how):
    token = stack.env["DOKKU_PROVISIONER_TOKEN"]
    headers = {
        "missing": {},
        "wrong": {"Authorization": "Bearer " + "x" * len(token)},
        "prefix": {"Authorization": "Bearer " + token[:-1]},
        "longer": {"Authorization": "Bearer " + token + "x"},
        "basic": {"Authorization": "Basic " + base64.b64encode(token.encode()).decode()},
        "empty": {"Authorization": "Bearer "},
    }[how]
    dokku.mark()
    for method, path, payload in (("POST", "/apps", body("mindroom-auth", "sauth")),
                                  ("GET", "/apps/mindroom-create", None),
                                  ("DELETE", "/apps/mindroom-create?purge=true", None),
                                  ("DELETE", "/apps/mindroom-create/storage", None),
                                  ("POST", "/apps/mindroom-create/stop", None),
                                  ("GET", "/no/such/path", None)):
        r = mr.http(method, stack.provisioner_url + path, json=payload, headers=headers)
        assert r.status == 401, (how, method, path, r)
        assert r.json["error"]["code"] == "unauthorized"
        assert token not in r.text
    assert dokku.new_calls() == []
    assert dokku.exists("mindroom-create") and not dokku.exists("mindroom-auth")


def test_the_provisioner_is_not_on_the_public_listener(stack, dokku):
    dokku.mark()
    token = stack.env["DOKKU_PROVISIONER_TOKEN"]
    for path in ("/apps", "/functions/v1/dokku-provisioner/apps"):
        r = mr.http("POST", stack.base_url + path, json=body("mindroom-public", "spublic"),
                    token=token)
        assert r.status == 404, (path, r)
    assert dokku.new_calls() == []


def test_dokku_inherits_no_descriptors_and_only_allowed_variables(stack, dokku):
    assert post(stack, body("mindroom-inherit", "sinherit")).status == 201
    recs = [r for r in dokku.records() if any(a.startswith("mindroom-inherit") for a in r["argv"])]
    assert recs
    for r in recs:
        # stdin, stdout, stderr and the stand-in's own directory listing: no
        # FastCGI socket, no database connection, no lock file.
        assert r["fds"] == [0, 1, 2, 3], r
        # An allow-list: what running dokku needs and what PROVISIONER_CHILD_ENV
        # names, nothing else (SENTRY_DSN, MINDROOM_SECRETS_KEY, DATABASE_URL...).
        assert set(r["env"]) <= {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL",
                                 "LC_CTYPE", "TZ", "DOKKU_STANDIN_DIR"}, r["env"]
        assert "DOKKU_STANDIN_DIR" in r["env"] and "PATH" in r["env"]
    for var in ("SENTRY_DSN", "MINDROOM_SECRETS_KEY", "DATABASE_URL", "DOKKU_PROVISIONER_TOKEN"):
        assert var in stack.env


def test_the_fixture_check_catches_undocumented_commands():
    from provisioner_helpers import undocumented
    assert undocumented(["storage:destroy", "x", "--force", "--destroy-host-dir"]) is None
    assert undocumented(["--force", "apps:destroy", "x"]) is None
    assert undocumented(["storage:exec", "x", "--", "tar", "-x", "-f", "-", "-C", "/data"]) is None
    assert undocumented(["storage:destroy", "x", "--purge"]) is not None
    assert undocumented(["storage:unmount", "x", "y"]) is not None
    assert undocumented(["--force", "storage:mount", "a", "b", "--container-dir", "/d"]) is not None
    assert undocumented(["ports:set", "a", "http:80"]) is not None
    assert undocumented(["apps:create"]) is not None
    assert undocumented(["network:set", "a", "attach-pre-create", "n"]) is not None
    # k3s: the scheduler, its documented properties, reservations, PVC-backed entries.
    assert undocumented(["scheduler:set", "a", "selected", "k3s"]) is None
    assert undocumented(["scheduler-k3s:set", "a", "letsencrypt-email-prod", "ops@x.test"]) is None
    assert undocumented(["scheduler-k3s:set", "a", "cert-issuer-name", "acme-dns"]) is None
    assert undocumented(["scheduler-k3s:set", "a", "cert-manager-email", "x"]) is not None
    assert undocumented(["scheduler:set", "a", "scheduler", "k3s"]) is not None
    assert undocumented(["resource:reserve", "--memory", "512Mi", "--cpu", "0.5", "a"]) is None
    assert undocumented(["storage:create", "x", "--scheduler", "k3s", "--size", "5Gi",
                         "--access-mode", "ReadWriteOnce", "--reclaim-policy", "Delete",
                         "--storage-class-name", "longhorn"]) is None
    assert undocumented(["storage:create", "x", "--scheduler", "k3s", "--size", "5Gi",
                         "--namespace", "mindroom"]) is not None


def test_a_revert_after_an_update_that_failed_part_way_restarts_again(stack, dokku):
    """Spec A applied. Update B fails part-way (MindRoom's git:from-image), after its
    config:import: Dokku holds B's environment, and a restart (an operator's, or the
    control plane's) starts MindRoom's container from it. The control plane then
    sends A again: A reaches the container with a restart, although A is what was
    last applied whole. (Both schedulers: the k3s suite runs this file too.)"""
    app = "mindroom-revert"
    a = body(app, "srevert", env={"MINDROOM_TIER": "starter", "OPENAI_API_KEY": "sk-old"})
    b = body(app, "srevert", env={"MINDROOM_TIER": "starter", "OPENAI_API_KEY": "sk-new"})
    assert post(stack, a).status == 201
    # MindRoom's git:from-image is the second of the sequence (the homeserver's first).
    dokku.tell("fail", "git:from-image", times=1, skip=1)
    r = post(stack, b)
    dokku.untell("fail", "git:from-image")
    assert r.status == 502, r
    assert dokku.config(app)["OPENAI_API_KEY"] == "sk-new"
    assert call(stack, "POST", "/apps/%s/restart" % app).status == 200   # now running B
    dokku.mark()
    r = post(stack, a)
    assert r.status == 200, r
    assert dokku.config(app)["OPENAI_API_KEY"] == "sk-old"
    calls = dokku.new_calls()
    assert ["ps:rebuild", app] in calls and r.json["restarted"] is True, (r.json, calls)


def test_an_update_whose_recorded_spec_cannot_be_forgotten_changes_nothing(stack, dokku):
    """Spec A applied, its record kept. The record's file can then be read but not
    written (immutable for root, whom mode bits do not stop; read-only for anyone
    else), and update B comes. Were B to
    go on with A's record in place and fail part-way, as in the test above, A sent
    again would find it and skip the rebuild its container needs. B is refused
    before it changes the app instead, and once the file can be written the same
    update applies."""
    import os
    import subprocess
    app = "mindroom-stuck"
    a = body(app, "sstuck", env={"MINDROOM_TIER": "starter", "OPENAI_API_KEY": "sk-old"})
    b = body(app, "sstuck", env={"MINDROOM_TIER": "starter", "OPENAI_API_KEY": "sk-new"})
    assert post(stack, a).status == 201
    bucket = record_bucket(dokku.state / "apps", app)
    assert state_record(dokku.state / "apps", app)
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(bucket)], check=True)
    else:
        bucket.chmod(0o400)
    try:
        dokku.mark()
        r = post(stack, b)
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(bucket)], check=True)
        else:
            bucket.chmod(0o600)
    assert r.status == 500 and r.json["error"]["code"] == "internal", r
    assert r.json["error"]["message"].startswith(app + ": its recorded spec"), r.json
    changed = [c for c in dokku.new_calls() if c[0] not in ("apps:exists", "storage:info",
                                                            "network:exists", "config:get")]
    # The homeserver's spec did not change; MindRoom's app was not touched.
    assert not [c for c in changed if app in c], changed
    assert dokku.config(app)["OPENAI_API_KEY"] == "sk-old"
    r = post(stack, b)
    assert r.status == 200, r
    assert dokku.config(app)["OPENAI_API_KEY"] == "sk-new"


def test_stop_of_an_instance_whose_mindroom_app_is_missing_stops_its_homeserver(stack, dokku):
    """A create that failed at MindRoom's apps:create leaves the homeserver deployed
    and running. A stop stops it (404 not_found, which the control plane takes as
    stopped, only when neither app exists)."""
    app = "mindroom-hsonly"
    dokku.tell("fail", "apps:create", times=1, skip=1)   # MindRoom's, after the homeserver's
    assert post(stack, body(app, "shsonly")).status == 502
    assert dokku.app(app + "-matrix", "running") == "true"
    r = call(stack, "POST", "/apps/%s/stop" % app)
    assert r.status == 200 and r.json["apps"] == {"mindroom": "missing", "homeserver": "stopped"}, r
    assert dokku.app(app + "-matrix", "running") != "true", r.json


def test_a_first_deploy_that_failed_after_its_commit_is_resumed(stack, dokku):
    """Dokku's git:from-image commits "FROM <image>" to the app's repository, then
    builds and deploys it (plugins/git/git-from-image, git-from-directory). A deploy
    killed after the commit (the OOM killer, the host going down) keeps the commit:
    the same image again is "No changes detected" although nothing was deployed,
    and ps:restart / ps:start of an app never deployed only warn and exit 0
    (plugins/ps/ps.go). The same request again must complete the instance ("a call
    after a failure at any step completes the instance", docs/provisioner.md)."""
    app = "mindroom-crashed"
    n = names(app)
    payload = body(app, "scrashed")
    # The homeserver's deploy is the first git:from-image of the sequence.
    dokku.tell("crash", "git:from-image", times=1)
    r = post(stack, payload)
    dokku.untell("crash", "git:from-image")
    assert r.status == 502 and r.json["error"]["message"] == "git:from-image exited 137", r
    assert dokku.app(n["hs"], "image") is None          # nothing deployed yet
    answers = [post(stack, payload) for _ in range(3)]
    assert [a.status for a in answers] == [201, 200, 200], answers
    for a, image in ((n["hs"], MATRIX_IMAGE), (app, IMAGE)):
        assert dokku.app(a, "image") == image, "%s was never deployed" % a
        assert dokku.app(a, "running") == "true"
    r = call(stack, "GET", "/apps/" + app)
    assert r.json["apps"] == {"mindroom": "running", "homeserver": "running"}, r


def test_a_variable_no_longer_sent_is_unset_and_nothing_else(stack, dokku):
    """config:import only adds and overwrites: a variable the control plane stops
    sending (an operator's key revoked with `mindroomctl env unset`, the
    homeserver's MATRIX_* when the instance has none any more) must leave
    MindRoom's environment with the update, before its deploy. What the
    provisioner never set (Dokku's DOKKU_*, a variable set by hand) stays."""
    app = "mindroom-unset"
    env = {"MINDROOM_TIER": "starter", "OPENAI_API_KEY": "sk-revoked", "EXTRA": "x"}
    assert post(stack, body(app, "sunset", env=env)).status == 201
    cfg = dokku.config(app)
    assert cfg["OPENAI_API_KEY"] == "sk-revoked" and "MATRIX_HOMESERVER" in cfg
    # Set by others on the Dokku host.
    cfg.update({"DOKKU_APP_RESTORE": "1", "BY_HAND": "kept"})
    (dokku.dir / "apps" / app / "config.json").write_text(json.dumps(cfg))

    dokku.mark()
    r = post(stack, body(app, "sunset", env={"MINDROOM_TIER": "starter"}, hs=False))
    assert r.status == 200 and r.json["restarted"] is True, r
    calls = dokku.new_calls()
    unset = [c for c in calls if c[0] == "config:unset"]
    assert unset == [["config:unset", "--no-restart", app, "EXTRA", "MATRIX_HOMESERVER",
                      "MATRIX_REGISTRATION_SHARED_SECRET", "MATRIX_SERVER_NAME",
                      "OPENAI_API_KEY"]], calls
    # Before the config:import that records the new names, and before the deploy.
    order = [c[0] for c in calls]
    assert order.index("config:unset") < order.index("config:import") < order.index("ps:rebuild")
    want = managed(dict({"MINDROOM_TIER": "starter"}, **MINDROOM_OWN))
    assert dokku.config(app) == dict(want, DOKKU_APP_RESTORE="1", BY_HAND="kept")
    assert dokku.app_json(app, "container.json")["image"] == IMAGE

    # Nothing dropped: nothing unset.
    dokku.mark()
    assert post(stack, body(app, "sunset", env={"MINDROOM_TIER": "pro"}, hs=False)).status == 200
    assert not [c for c in dokku.new_calls() if c[0] == "config:unset"]
    assert dokku.config(app)["BY_HAND"] == "kept"
