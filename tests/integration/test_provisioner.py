"""dokku-provisioner through real nginx (the provisioner listener) against the
stand-in dokku: the exact commands that reach Dokku, and nothing on bad input."""

import base64
import threading

import pytest

import mr
from provisioner_helpers import (DOMAIN, IMAGE, Dokku, body, create_sequence,
                                 decode_config_args, match)


@pytest.fixture(scope="module")
def dokku():
    return Dokku()


@pytest.fixture(scope="module")
def stack(pg, dokku):
    env = dokku.env(DOKKU_TLS="on", DOKKU_LOCK_RETRIES="3", PROVISIONER_MAX_CPU="4",
                    PROVISIONER_MAX_MEMORY_MB="8192")
    with mr.Stack(pg, env=env, functions=["dokku-provisioner"]) as s:
        yield s


def post(stack, payload, **kw):
    return stack.call_provisioner("POST", "/apps", json=payload, **kw)


# ---- create / update -------------------------------------------------------

def test_create_runs_the_exact_sequence(stack, dokku):
    dokku.mark()
    env = {"MINDROOM_TIER": "starter", "OPENAI_API_KEY": "sk-test-123"}
    r = post(stack, body("mr-create", "screate", 512, 0.5, env))
    assert r.status == 201, r
    assert r.json == {
        "app": "mr-create", "state": "running",
        "backend_url": "https://screate.%s/api" % DOMAIN,
        "frontend_url": "https://screate.%s" % DOMAIN,
        "matrix_server_url": "https://screate.%s" % DOMAIN,
        "created": True, "deployed": True, "restarted": False, "dry_run": False}
    calls = dokku.new_calls()
    match(calls, create_sequence("mr-create", "screate", tls=True))
    cfg = [c for c in calls if c[0] == "config:set"][0]
    assert cfg[3] == "mr-create"
    # Keys sorted, values base64: exactly the env that was asked for.
    assert [p.split("=")[0] for p in cfg[4:]] == ["MINDROOM_TIER", "OPENAI_API_KEY"]
    assert decode_config_args(cfg) == env
    # And Dokku (the stand-in) holds it.
    assert dokku.config("mr-create") == env
    assert dokku.app("mr-create", "image") == IMAGE
    assert dokku.app("mr-create", "domains") == "screate." + DOMAIN
    assert dokku.app("mr-create", "letsencrypt") == "on"


def test_create_twice_creates_once_and_does_not_restart(stack, dokku):
    payload = body("mr-twice", "stwice")
    assert post(stack, payload).status == 201
    dokku.mark()
    r = post(stack, payload)
    assert r.status == 200, r
    assert r.json["created"] is False and r.json["deployed"] is False
    assert r.json["restarted"] is False and r.json["state"] == "running"
    match(dokku.new_calls(), [
        ["apps:exists", "mr-twice"],
        ["resource:limit", "--memory", "512m", "--cpu", "0.5", "mr-twice"],
        None,
        ["domains:set", "mr-twice", "stwice." + DOMAIN],
        ["git:from-image", "mr-twice", IMAGE],          # "No changes detected"
        ["ps:report", "mr-twice", "--running"],
        ["letsencrypt:active", "mr-twice"],             # already on: no enable
    ])
    creates = [c for c in dokku.all_calls() if c == ["apps:create", "mr-twice"]]
    assert len(creates) == 1


def test_update_with_new_limits_restarts_to_apply_them(stack, dokku):
    assert post(stack, body("mr-update", "supdate", 512, 0.5)).status == 201
    dokku.mark()
    r = post(stack, body("mr-update", "supdate", 2048, 1.25,
                         env={"MINDROOM_TIER": "professional"}))
    assert r.status == 200, r
    assert r.json["restarted"] is True and r.json["created"] is False
    match(dokku.new_calls(), [
        ["apps:exists", "mr-update"],
        ["resource:limit", "--memory", "2048m", "--cpu", "1.25", "mr-update"],
        None,
        ["domains:set", "mr-update", "supdate." + DOMAIN],
        ["git:from-image", "mr-update", IMAGE],
        ["ps:restart", "mr-update"],
        ["letsencrypt:active", "mr-update"],
    ])
    assert dokku.config("mr-update") == {"MINDROOM_TIER": "professional"}
    assert '"memory": "2048m"' in dokku.app("mr-update", "resource.json")


def test_a_stopped_app_is_started_again_by_create(stack, dokku):
    payload = body("mr-restart", "srestart")
    assert post(stack, payload).status == 201
    assert stack.call_provisioner("POST", "/apps/mr-restart/stop").status == 200
    dokku.mark()
    r = post(stack, payload)
    assert r.status == 200 and r.json["state"] == "running", r
    calls = dokku.new_calls()
    assert calls[-3:] == [["ps:report", "mr-restart", "--running"],
                          ["ps:start", "mr-restart"],
                          ["letsencrypt:active", "mr-restart"]]
    assert dokku.app("mr-restart", "running") == "true"


def test_values_with_newlines_and_shell_are_passed_encoded(stack, dokku):
    env = {
        "MULTI": "line one\nline two\n",
        "SHELL_BAIT": "$(touch /tmp/pwned); `id`; a && b | c > d",
        "QUOTES": "it's \"quoted\" \\ back",
        "EQUALS": "a=b=c",
        "UNICODE": "h\u00e9llo \u2603",
        "EMPTY": "",
        "SECRETISH": "supersecret-value-zz9",
    }
    dokku.mark()
    r = post(stack, body("mr-values", "svalues", env=env))
    assert r.status == 201, r
    calls = dokku.new_calls()
    cfg = [c for c in calls if c[0] == "config:set"][0]
    assert decode_config_args(cfg) == env
    # No value appears in clear anywhere on any command line ...
    for c in calls:
        for a in c:
            assert "line one" not in a and "touch" not in a and "supersecret" not in a
    # ... nor in the provisioner's log (Dokku's config:set output echoes values).
    log = stack.log("dokku-provisioner")
    assert "supersecret-value-zz9" not in log
    assert "config:set --no-restart --encoded mr-values" in log
    assert "SECRETISH=..." in log
    assert dokku.config("mr-values") == env


def test_recovery_after_a_failure_following_apps_create(stack, dokku):
    dokku.tell("fail", "config:set", times=1, status=3)
    dokku.mark()
    r = post(stack, body("mr-resume", "sresume", env={"TOKEN_LIKE": "do-not-echo-42"}))
    assert r.status == 502, r
    assert r.json == {"error": {"code": "dokku_failed", "message": "config:set exited 3"}}
    assert "do-not-echo-42" not in r.text
    calls = dokku.new_calls()
    assert [c[0] for c in calls] == ["apps:exists", "apps:create", "resource:limit",
                                     "config:set"]
    assert dokku.exists("mr-resume") and dokku.app("mr-resume", "image") is None

    # The same request again completes the half-created app: no second apps:create.
    r = post(stack, body("mr-resume", "sresume", env={"TOKEN_LIKE": "do-not-echo-42"}))
    assert r.status == 200, r
    assert r.json["created"] is False and r.json["deployed"] is True
    match(dokku.new_calls(), [
        ["apps:exists", "mr-resume"],
        ["resource:limit", "--memory", "512m", "--cpu", "0.5", "mr-resume"],
        None,
        ["domains:set", "mr-resume", "sresume." + DOMAIN],
        ["git:from-image", "mr-resume", IMAGE],
        ["letsencrypt:active", "mr-resume"],
        ["letsencrypt:enable", "mr-resume"],
    ])
    assert dokku.config("mr-resume") == {"TOKEN_LIKE": "do-not-echo-42"}


def test_a_failed_deploy_is_completed_by_the_next_request(stack, dokku):
    dokku.tell("fail", "git:from-image", times=1)
    r = post(stack, body("mr-deployfail", "sdeployfail"))
    assert r.status == 502 and r.json["error"]["message"] == "git:from-image exited 1", r
    dokku.mark()
    r = post(stack, body("mr-deployfail", "sdeployfail"))
    assert r.status == 200 and r.json["deployed"] is True, r
    assert ["apps:create", "mr-deployfail"] not in dokku.new_calls()
    assert dokku.app("mr-deployfail", "image") == IMAGE


def test_deploy_lock_contention_is_retried(stack, dokku):
    dokku.tell("lock", "git:from-image", times=2)
    dokku.mark()
    r = post(stack, body("mr-locked", "slocked"))
    assert r.status == 201, r
    calls = dokku.new_calls()
    assert calls.count(["git:from-image", "mr-locked", IMAGE]) == 3
    assert dokku.app("mr-locked", "image") == IMAGE
    assert "deploy lock held by another deploy; retry 2/3" in stack.log("dokku-provisioner")


def test_deploy_lock_held_too_long_is_a_502(stack, dokku):
    dokku.tell("lock", "ps:stop", times=10)
    assert post(stack, body("mr-lockedout", "slockedout")).status == 201
    dokku.mark()
    r = stack.call_provisioner("POST", "/apps/mr-lockedout/stop")
    dokku.untell("lock", "ps:stop")
    assert r.status == 502, r
    assert r.json["error"] == {"code": "dokku_locked", "message": "ps:stop exited 1"}
    # DOKKU_LOCK_RETRIES=3: the first attempt and three retries.
    assert dokku.new_calls() == [["apps:exists", "mr-lockedout"]] + \
        [["ps:stop", "mr-lockedout"]] * 4


def test_concurrent_creates_of_one_app_run_one_at_a_time(stack, dokku):
    dokku.mark()
    results = []

    def one():
        results.append(post(stack, body("mr-race", "srace"), timeout=120))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in results) == [200, 200, 201], results
    calls = dokku.new_calls()
    assert calls.count(["apps:create", "mr-race"]) == 1
    # Each request's sequence starts with apps:exists and is never interleaved
    # with another's: the runs are contiguous blocks.
    starts = [i for i, c in enumerate(calls) if c[0] == "apps:exists"]
    assert len(starts) == 3 and starts[0] == 0
    first = calls[starts[0]:starts[1]]
    assert [c[0] for c in first][-1] == "letsencrypt:enable"


# ---- stop / start / state / destroy ---------------------------------------

def test_stop_start_state_destroy_sequences(stack, dokku):
    assert post(stack, body("mr-life", "slife")).status == 201

    dokku.mark()
    r = stack.call_provisioner("POST", "/apps/mr-life/stop")
    assert r.status == 200 and r.json == {"app": "mr-life", "state": "stopped",
                                          "dry_run": False}, r
    assert dokku.new_calls() == [["apps:exists", "mr-life"], ["ps:stop", "mr-life"]]

    r = stack.call_provisioner("GET", "/apps/mr-life")
    assert r.status == 200 and r.json["state"] == "stopped", r
    assert dokku.new_calls() == [["apps:exists", "mr-life"],
                                 ["ps:report", "mr-life", "--deployed"],
                                 ["ps:report", "mr-life", "--running"]]

    r = stack.call_provisioner("POST", "/apps/mr-life/start")
    assert r.status == 200 and r.json["state"] == "running", r
    assert dokku.new_calls() == [["apps:exists", "mr-life"],
                                 ["ps:report", "mr-life", "--deployed"],
                                 ["ps:start", "mr-life"]]
    assert stack.call_provisioner("GET", "/apps/mr-life").json["state"] == "running"
    dokku.mark()

    r = stack.call_provisioner("DELETE", "/apps/mr-life")
    assert r.status == 200, r
    assert r.json == {"app": "mr-life", "state": "destroyed", "existed": True, "dry_run": False}
    assert dokku.new_calls() == [["apps:exists", "mr-life"],
                                 ["--force", "apps:destroy", "mr-life"]]
    assert not dokku.exists("mr-life")

    # Destroying a missing app is success and runs nothing destructive.
    r = stack.call_provisioner("DELETE", "/apps/mr-life")
    assert r.status == 200 and r.json["existed"] is False, r
    assert dokku.new_calls() == [["apps:exists", "mr-life"]]

    for method, path in (("GET", "/apps/mr-life"), ("POST", "/apps/mr-life/stop"),
                         ("POST", "/apps/mr-life/start")):
        r = stack.call_provisioner(method, path)
        assert r.status == 404 and r.json["error"]["code"] == "not_found", (path, r)
    assert dokku.new_calls() == [["apps:exists", "mr-life"]] * 3


def test_recreate_after_destroy_deploys_again(stack, dokku):
    payload = body("mr-again", "sagain")
    assert post(stack, payload).status == 201
    assert stack.call_provisioner("DELETE", "/apps/mr-again").status == 200
    dokku.mark()
    r = post(stack, payload)
    assert r.status == 201 and r.json["deployed"] is True, r
    match(dokku.new_calls(), create_sequence("mr-again", "sagain", tls=True))


def test_start_of_a_half_created_app_says_not_deployed(stack, dokku):
    dokku.tell("fail", "resource:limit", times=1)
    assert post(stack, body("mr-half", "shalf")).status == 502
    dokku.mark()
    r = stack.call_provisioner("POST", "/apps/mr-half/start")
    assert r.status == 404 and r.json["error"]["code"] == "not_deployed", r
    assert dokku.new_calls() == [["apps:exists", "mr-half"],
                                 ["ps:report", "mr-half", "--deployed"]]
    r = stack.call_provisioner("GET", "/apps/mr-half")
    assert r.status == 200 and r.json["state"] == "created", r


def test_a_failing_stop_is_a_502_with_the_subcommand(stack, dokku):
    assert post(stack, body("mr-stopfail", "sstopfail")).status == 201
    dokku.tell("fail", "ps:stop", times=1, status=7)
    r = stack.call_provisioner("POST", "/apps/mr-stopfail/stop")
    assert r.status == 502, r
    assert r.json == {"error": {"code": "dokku_failed", "message": "ps:stop exited 7"}}


# ---- bad input: 400 and nothing runs ---------------------------------------

BAD_APPS = ["a;rm -rf /", "../x", "Upper", "a" * 64, "", "-a", "1abc", "a b", "a\nb",
            "a_b", "a.b", "$(id)", "\u00e4pp"]


@pytest.mark.parametrize("name", BAD_APPS)
def test_bad_app_names_in_the_body_run_nothing(stack, dokku, name):
    dokku.mark()
    r = post(stack, body(name, "sok"))
    assert r.status == 400 and r.json["error"]["code"] == "invalid_request", r
    assert dokku.new_calls() == []


@pytest.mark.parametrize("sub", ["a;b", "../x", "UP", "s" * 64, "", "-s", "a.b"])
def test_bad_subdomains_run_nothing(stack, dokku, sub):
    dokku.mark()
    r = post(stack, body("mr-okname", sub))
    assert r.status == 400, r
    assert dokku.new_calls() == []


@pytest.mark.parametrize("key", ["A=B", "A B", "lower", "1A", "", "A-B", "A;B", "A\nB",
                                 "DOKKU_PROXY_PORT", "\u00c4"])
def test_bad_env_keys_run_nothing(stack, dokku, key):
    dokku.mark()
    r = post(stack, body("mr-okname", "sok", env={"GOOD": "1", key: "v"}))
    assert r.status == 400, r
    assert "v" != r.json["error"]["message"]
    assert dokku.new_calls() == []


@pytest.mark.parametrize("change", [
    {"memory_mb": 0}, {"memory_mb": 127}, {"memory_mb": 8193}, {"memory_mb": 512.5},
    {"memory_mb": "512"}, {"memory_mb": None}, {"cpu": 0}, {"cpu": -1}, {"cpu": 4.001},
    {"cpu": "1"}, {"cpu": 0.0001}, {"cpu": None}, {"env": {"A": 5}}, {"env": {"A": None}},
    {"env": ["A=B"]}, {"env": "A=B"}, {"extra": 1}, {"app": 5},
])
def test_out_of_bounds_or_mistyped_fields_run_nothing(stack, dokku, change):
    payload = body("mr-okname", "sok")
    payload.update(change)
    payload = {k: v for k, v in payload.items() if not (v is None and k in ("memory_mb", "cpu"))}
    dokku.mark()
    r = post(stack, payload)
    assert r.status == 400, (change, r)
    assert dokku.new_calls() == []


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'"x"',
                                 b'{"app":"a","app":"b","subdomain":"s","memory_mb":512,"cpu":1}',
                                 b'{"app":"mr-okname","subdomain":"sok","memory_mb":512,'
                                 b'"cpu":1,"env":{"A":"1","A":"2"}}'])
def test_malformed_bodies_run_nothing(stack, dokku, raw):
    dokku.mark()
    r = stack.call_provisioner("POST", "/apps", body=raw,
                               headers={"Content-Type": "application/json"})
    assert r.status == 400, (raw, r)
    assert dokku.new_calls() == []


@pytest.mark.parametrize("path", ["/apps/Upper", "/apps/a%3Brm%20-rf%20%2F",
                                  "/apps/" + "a" * 64, "/apps/a%20b", "/apps/-x",
                                  "/apps/a%0Ab/stop"])
def test_bad_app_names_in_the_path_run_nothing(stack, dokku, path):
    dokku.mark()
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/stop"), ("POST", "/start")):
        p = path if path.endswith("/stop") else path + suffix
        r = stack.call_provisioner(method, p)
        assert r.status == 400 and r.json["error"]["code"] == "invalid_app", (method, p, r)
    assert dokku.new_calls() == []


@pytest.mark.parametrize("path", ["/apps/../x", "/apps/x/../../etc/passwd", "/apps/x/restart",
                                  "/apps/", "/", "/apps/x/stop/now"])
def test_traversal_and_unknown_paths_run_nothing(stack, dokku, path):
    dokku.mark()
    r = stack.call_provisioner("POST", path)
    assert r.status in (400, 404), (path, r)
    assert dokku.new_calls() == []


def test_wrong_methods_are_405_and_run_nothing(stack, dokku):
    dokku.mark()
    for method, path in (("GET", "/apps"), ("DELETE", "/apps"), ("POST", "/apps/mr-x"),
                         ("GET", "/apps/mr-x/stop"), ("DELETE", "/apps/mr-x/start")):
        r = stack.call_provisioner(method, path)
        assert r.status == 405, (method, path, r)
    assert stack.call_provisioner("PUT", "/apps").status == 405
    assert dokku.new_calls() == []


# ---- auth: 401 and nothing runs --------------------------------------------

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
    for method, path, payload in (("POST", "/apps", body("mr-auth", "sauth")),
                                  ("GET", "/apps/mr-create", None),
                                  ("DELETE", "/apps/mr-create", None),
                                  ("POST", "/apps/mr-create/stop", None),
                                  ("GET", "/no/such/path", None)):
        r = mr.http(method, stack.provisioner_url + path, json=payload, headers=headers)
        assert r.status == 401, (how, method, path, r)
        assert r.json["error"]["code"] == "unauthorized"
        assert token not in r.text
    assert dokku.new_calls() == []
    assert dokku.exists("mr-create") and not dokku.exists("mr-auth")


def test_the_provisioner_is_not_on_the_public_listener(stack, dokku):
    dokku.mark()
    token = stack.env["DOKKU_PROVISIONER_TOKEN"]
    for path in ("/apps", "/functions/v1/dokku-provisioner/apps"):
        r = mr.http("POST", stack.base_url + path, json=body("mr-public", "spublic"),
                    token=token)
        assert r.status == 404, (path, r)
    assert dokku.new_calls() == []


def test_dokku_inherits_no_descriptors_and_no_secrets(stack, dokku):
    assert post(stack, body("mr-inherit", "sinherit")).status == 201
    recs = [r for r in dokku.records() if "mr-inherit" in r["argv"]]
    assert recs
    for r in recs:
        # stdin, stdout, stderr and the stand-in's own directory listing: no
        # FastCGI socket, no database connection, no lock file.
        assert r["fds"] == [0, 1, 2, 3], r
        for secret in ("DOKKU_PROVISIONER_TOKEN", "SUPABASE_JWT_SECRET", "DATABASE_URL",
                       "STRIPE_WEBHOOK_SECRET"):
            assert secret not in r["env"], r
        assert "DOKKU_STANDIN_DIR" in r["env"] and "PATH" in r["env"]
