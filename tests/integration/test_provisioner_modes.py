"""dokku-provisioner's modes and limits: dry-run, ssh, deadlines, start-up checks."""

import base64
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time

import pytest

import mr
from provisioner_helpers import (DOMAIN, IMAGE, K3S, MATRIX_IMAGE, MINDROOM_DIR, STANDINS,
                                 STORAGE_CLASS, Dokku, alive, body, create_sequence,
                                 imported, jsonl_records, match, mem, names, ports,
                                 record_bucket, state_record, storage_destroy)

# The provisioner never connects to PostgreSQL: nothing here differs behind a pooler.
pytestmark = pytest.mark.database_free


# ---- dry-run ---------------------------------------------------------------

@pytest.fixture(scope="module")
def dry(pg):
    d = Dokku()
    env = d.env()
    del env["DOKKU_MODE"]          # unset: dry-run, so nothing reaches a host by accident
    with mr.Stack(pg, env=env, functions=["dokku-provisioner"]) as s:
        yield s, d


def test_dry_run_records_and_answers_without_running_anything(dry):
    s, d = dry
    assert "dry_run: true; DOKKU_MODE=(unset)" in s.log("dokku-provisioner")
    env = {"API_TOKEN_X": "dry-secret-value-77"}
    payload = body("mindroom-dry", "sdry", env=env)
    r = s.call_provisioner("POST", "/apps", json=payload)
    assert r.status == 201, r
    assert r.json["dry_run"] is True and r.json["state"] == "running"
    assert r.json["frontend_url"] == "http://sdry.%s" % DOMAIN   # DOKKU_TLS off: http
    assert r.json["matrix_server_url"] == "http://sdry-matrix.%s" % DOMAIN
    assert d.all_calls() == []          # the stand-in dokku was never run

    log = s.log("dokku-provisioner")
    for line in ("would run: dokku scheduler:set mindroom-dry-matrix selected k3s" if K3S else
                 "would run: dokku network:create mindroom-dry-net",
                 "would run: dokku apps:create mindroom-dry-matrix",
                 "would run: dokku storage:create mindroom-dry-matrix-data --scheduler k3s --size "
                 "3Gi --access-mode ReadWriteOnce --reclaim-policy Delete --storage-class-name "
                 + STORAGE_CLASS if K3S else
                 "would run: dokku storage:create mindroom-dry-matrix-data --chown 991 --mode 0700",
                 "would run: dokku storage:exec mindroom-dry-matrix-data -- tar -x -f - -C /data"
                 " (with stdin)",
                 "would run: dokku git:from-image mindroom-dry-matrix " + MATRIX_IMAGE,
                 "would run: dokku apps:exists mindroom-dry",
                 "would run: dokku apps:create mindroom-dry",
                 "would run: dokku storage:mount mindroom-dry mindroom-dry-data --container-dir "
                 + MINDROOM_DIR,
                 "would run: dokku resource:limit --memory %s --cpu 0.5 mindroom-dry" % mem("512m"),
                 "would run: dokku config:import --no-restart --format json mindroom-dry - (with stdin)",
                 "would run: dokku domains:set mindroom-dry sdry." + DOMAIN,
                 "would run: dokku git:from-image mindroom-dry " + IMAGE):
        assert line in log, line
    assert "dry-secret-value-77" not in log
    for k in ("signing_key", "registration_shared_secret", "macaroon_secret_key", "form_secret"):
        assert payload["homeserver"][k].split()[-1] not in log
    lines = [json.loads(x) for x in log.splitlines() if "would run" in x]
    assert lines and all(x["msg"].startswith("dry_run: true; ") for x in lines)

    r = s.call_provisioner("POST", "/apps", json=payload)
    assert r.status == 200 and r.json["dry_run"] is True, r
    for method, path, status, state in (("GET", "/apps/mindroom-dry", 200, "running"),
                                        ("POST", "/apps/mindroom-dry/stop", 200, "stopped"),
                                        ("GET", "/apps/mindroom-dry", 200, "stopped"),
                                        ("POST", "/apps/mindroom-dry/start", 200, "running"),
                                        ("DELETE", "/apps/mindroom-dry", 200, "destroyed"),
                                        ("GET", "/apps/mindroom-dry", 200, "destroyed"),
                                        ("DELETE", "/apps/mindroom-dry/storage", 200,
                                         "destroyed")):
        r = s.call_provisioner(method, path)
        assert r.status == status and r.json["state"] == state, (method, path, r)
        assert r.json["dry_run"] is True
    assert s.call_provisioner("GET", "/apps/mindroom-dry").status == 404
    assert d.all_calls() == []


def test_dry_run_instances_sharing_a_registry_file_keep_their_own_state(dry):
    """The registry keeps an entry a line, many a file (state.c): stopping,
    destroying and creating instances whose apps share a file leaves the others
    as they were."""
    s, d = dry
    registry = d.state / "dry-run" / "apps"
    first = record_bucket(registry, "mindroom-share0")
    apps = ["mindroom-share0"] + [a for a in ("mindroom-share%d" % i for i in range(1, 5000))
                                  if record_bucket(registry, a) == first][:2]
    assert len(apps) == 3
    for a in apps:
        r = s.call_provisioner("POST", "/apps", json=body(a, hs=False))
        assert r.status == 201 and r.json["state"] == "running", r
    assert s.call_provisioner("POST", "/apps/%s/stop" % apps[1]).json["state"] == "stopped"
    assert s.call_provisioner("DELETE", "/apps/%s" % apps[0]).json["state"] == "destroyed"
    states = {a: s.call_provisioner("GET", "/apps/" + a).json["state"] for a in apps}
    assert states == {apps[0]: "destroyed", apps[1]: "stopped", apps[2]: "running"}, states
    assert [state_record(registry, a) for a in apps] == [None, "stopped", "running"]
    r = s.call_provisioner("POST", "/apps", json=body(apps[0], hs=False))
    assert r.status == 201 and r.json["state"] == "running", r
    states = {a: s.call_provisioner("GET", "/apps/" + a).json["state"] for a in apps}
    assert states == {apps[0]: "running", apps[1]: "stopped", apps[2]: "running"}, states
    assert d.all_calls() == []


def test_explicit_dry_run_still_validates_and_authenticates(dry):
    s, d = dry
    s.env["DOKKU_MODE"] = "dry-run"
    s.restart_function("dokku-provisioner")
    assert "dry_run: true; DOKKU_MODE=dry-run" in s.log("dokku-provisioner")
    assert s.call_provisioner("POST", "/apps", json=body("Bad", "sok")).status == 400
    assert s.call_provisioner("POST", "/apps", json=body("other-app", "sok")).status == 400
    assert s.call_provisioner("POST", "/apps", json=body("mindroom-dry2", "sok"),
                              token="wrong-token-000000").status == 401
    r = s.call_provisioner("POST", "/apps", json=body("mindroom-dry2", "sdry2"))
    assert r.status == 201 and r.json["dry_run"] is True, r
    assert d.all_calls() == []


# ---- ssh -------------------------------------------------------------------

# A pinned host key as ssh-keyscan writes it (the key itself is never checked here).
KNOWN_HOST_LINE = ("dokku.example.com ssh-ed25519 "
                   "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")


def known_hosts_file(directory):
    path = directory / "known_hosts"
    path.write_text(KNOWN_HOST_LINE)
    return path


def ssh_env(d, **extra):
    return d.env(DOKKU_MODE="ssh", DOKKU_SSH_BIN=str(STANDINS / "ssh"),
                 DOKKU_HOST="dokku.example.com", DOKKU_SSH_KEY="/etc/mindroom/dokku_ed25519",
                 DOKKU_SSH_PORT="2222", DOKKU_SSH_KNOWN_HOSTS=str(known_hosts_file(d.dir)),
                 **extra)


@pytest.fixture(scope="module")
def ssh(pg):
    d = Dokku()
    with mr.Stack(pg, env=ssh_env(d), functions=["dokku-provisioner"]) as s:
        yield s, d


def ssh_calls(d):
    return [r["argv"] for r in jsonl_records(d.dir / "ssh.jsonl")]


def test_ssh_mode_sends_argv_to_the_dokku_user(ssh):
    s, d = ssh
    env = {"MULTI": "a\nb c\td", "SPACES": "  padded  ", "GLOB": "* ? [x]",
           "API_KEY": "ssh-secret-value-42"}
    r = s.call_provisioner("POST", "/apps", json=body("mindroom-ssh", "sssh", env=env))
    assert r.status == 201, r
    calls = ssh_calls(d)
    # No value on ssh's command line, plain or base64 (the Dokku host's too, below).
    secret = [env["API_KEY"], base64.b64encode(env["API_KEY"].encode()).decode()]
    assert not [a for c in calls for a in c for n in secret if n in a]
    prefix = ["-F", "/dev/null",
              "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15",
              "-i", "/etc/mindroom/dokku_ed25519", "-o", "IdentitiesOnly=yes",
              "-o", "StrictHostKeyChecking=yes",
              "-o", "UserKnownHostsFile=%s" % (d.dir / "known_hosts"),
              "-o", "GlobalKnownHostsFile=/dev/null",
              "-p", "2222", "dokku@dokku.example.com", "--"]
    assert calls[0] == prefix + create_sequence("mindroom-ssh", "sssh")[0]
    assert all(c[:len(prefix)] == prefix for c in calls)
    # What the host ran after splitting the joined command line: exactly the
    # create sequence (ssh ends its own options at the "--" after the
    # destination and does not send it); the environment crossed on stdin,
    # values intact.
    dk = d.all_calls()
    assert dk and not [c for c in dk if c[0] == "--"], dk
    match(dk, create_sequence("mindroom-ssh", "sssh"))
    assert not [a for c in dk for a in c for n in secret if n in a]
    assert imported([c for c in dk if c[0] == "config:import"][0])["MULTI"] == env["MULTI"]
    assert {k: v for k, v in d.config("mindroom-ssh").items() if k in env} == env
    # stdin crossed ssh: the homeserver's files are in its storage.
    assert (d.host_dir("mindroom-ssh-matrix-data") / "homeserver.yaml").exists()

    assert s.call_provisioner("DELETE", "/apps/mindroom-ssh?purge=true").status == 200
    assert ssh_calls(d)[-1] == prefix + storage_destroy("mindroom-ssh-matrix-data")
    assert prefix + ["--force", "apps:destroy", "mindroom-ssh"] in ssh_calls(d)
    d.assert_documented()


def ssh_options(argv):
    """ssh's own options, up to the destination: [(flag, value)]."""
    out, i = [], 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] in ("-o", "-i", "-p", "-F", "-l", "-J", "-E"):
            out.append((argv[i], argv[i + 1]))
            i += 2
        else:
            out.append((argv[i], None))
            i += 1
    assert i < len(argv) and "@" in argv[i], argv
    return out


def test_ssh_mode_trusts_only_the_pinned_host_key(ssh):
    # No ssh_config (system or user) can relax host-key checking or reroute the
    # connection, no global known_hosts adds keys: DOKKU_SSH_KNOWN_HOSTS, and
    # strict checking, for every command.
    s, d = ssh
    r = s.call_provisioner("POST", "/apps", json=body("mindroom-sshpin", "sshpin", hs=False))
    assert r.status == 201, r
    calls = ssh_calls(d)
    assert calls
    for argv in calls:
        opts = ssh_options(argv)
        assert opts[0] == ("-F", "/dev/null"), argv
        assert [o for o in opts if o[0] == "-F"] == [("-F", "/dev/null")], argv
        o = [v for f, v in opts if f == "-o"]
        assert [v for v in o if v.lower().startswith("stricthostkeychecking=")] == \
            ["StrictHostKeyChecking=yes"], argv
        assert [v for v in o if v.lower().startswith("userknownhostsfile=")] == \
            ["UserKnownHostsFile=%s" % (d.dir / "known_hosts")], argv
        assert [v for v in o if v.lower().startswith("globalknownhostsfile=")] == \
            ["GlobalKnownHostsFile=/dev/null"], argv
        assert "BatchMode=yes" in o and "IdentitiesOnly=yes" in o, argv
        assert ("-i", "/etc/mindroom/dokku_ed25519") in opts, argv
    assert s.call_provisioner("DELETE", "/apps/mindroom-sshpin?purge=true").status == 200


def test_ssh_mode_says_when_the_dokku_host_is_out_of_reach(ssh):
    # ssh's own failure (exit 255) is not a Dokku command that failed: the answer says
    # the host was not reached (the lifecycle worker then places new customers on
    # other targets), and nothing ran there. Once it is back, the same call succeeds.
    s, d = ssh
    down = d.dir / "ssh.down"
    down.touch()
    try:
        before = len(d.all_calls())
        r = s.call_provisioner("POST", "/apps", json=body("mindroom-sshdown", "sshdown"))
        assert r.status == 503 and r.json["error"]["code"] == "dokku_unreachable", r
        assert "dokku.example.com" in r.json["error"]["message"], r
        assert "not reached" in r.json["error"]["message"], r
        assert len(d.all_calls()) == before
    finally:
        down.unlink()
    r = s.call_provisioner("POST", "/apps", json=body("mindroom-sshdown", "sshdown"))
    assert r.status == 201, r


# ---- Let's Encrypt on a Dokku host ---------------------------------------------

def test_a_create_whose_certificate_failed_is_not_rebuilt_when_sent_again(pg):
    """A first deploy whose letsencrypt:enable fails (DNS not pointed at the host yet,
    Let's Encrypt's rate limit) has deployed the apps and left them running. The
    create sent again asks for the certificate again and rebuilds nothing: a rebuild
    at every retry would take the homeserver down each time for nothing. (A Dokku
    host's plugin; on k3s cert-manager asks for certificates, no command does.)"""
    d = Dokku(scheduler="docker-local")
    with mr.Stack(pg, env=d.env(DOKKU_TLS="letsencrypt"), functions=["dokku-provisioner"]) as s:
        payload = body("mindroom-lefail", "slefail")
        d.tell("fail", "letsencrypt:enable", times=1)
        r = s.call_provisioner("POST", "/apps", json=payload)
        d.untell("fail", "letsencrypt:enable")
        assert r.status == 502, r
        d.mark()
        r = s.call_provisioner("POST", "/apps", json=payload)
        assert r.status in (200, 201) and r.json["state"] == "running", r
        calls = d.new_calls()
        assert not [c for c in calls if c[0] in ("ps:rebuild", "ps:restart")], calls
        assert [c for c in calls if c[0] == "letsencrypt:enable"], calls


# ---- deadlines and start failures ------------------------------------------

@pytest.fixture(scope="module")
def slow(pg):
    d = Dokku()
    env = d.env(DOKKU_COMMAND_TIMEOUT_MS="3000", DOKKU_DEPLOY_TIMEOUT_MS="4000")
    with mr.Stack(pg, env=env, functions=["dokku-provisioner"]) as s:
        yield s, d


def wait_dead(pids, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_a_stalled_command_is_killed_with_its_process_group(slow):
    s, d = slow
    d.tell("stall", "apps:exists", times=1, seconds=120)
    t0 = time.monotonic()
    r = s.call_provisioner("GET", "/apps/mindroom-stall")
    took = time.monotonic() - t0
    assert r.status == 504, r
    assert r.json["error"] == {"code": "dokku_timeout",
                               "message": "apps:exists timed out after 3000 ms"}
    assert 2.5 < took < 20, took
    pids = [int(p) for line in (d.dir / "stalled.pids").read_text().split("\n") if line
            for p in line.split()]
    assert len(pids) == 2           # the stand-in and its child, same process group
    assert wait_dead(pids) == []
    # The next request is not affected.
    assert s.call_provisioner("GET", "/apps/mindroom-stall").status == 404


def test_a_stalled_deploy_times_out_and_the_retry_completes(slow):
    s, d = slow
    d.tell("stall", "git:from-image", times=1, seconds=120)
    payload = body("mindroom-slowdeploy", "sslow", hs=False)
    r = s.call_provisioner("POST", "/apps", json=payload)
    assert r.status == 504, r
    assert r.json["error"]["message"] == "git:from-image timed out after 4000 ms"
    d.mark()
    r = s.call_provisioner("POST", "/apps", json=payload)
    assert r.status == 200 and r.json["deployed"] is True, r
    assert ["apps:create", "mindroom-slowdeploy"] not in d.new_calls()


def test_a_deploy_cut_off_after_its_commit_is_completed_by_the_retry(slow):
    """Dokku's git:from-image commits the image before deploying it, and only a
    deploy that exits non-zero takes the commit back out: one killed at
    DOKKU_DEPLOY_TIMEOUT_MS keeps it. The retry's git:from-image then says "No
    changes detected" and ps:restart / ps:start of a never-deployed app are a
    warning with exit 0; the retry must deploy the homeserver, not answer the
    instance running without it (TLS off: no letsencrypt:enable to trip over)."""
    s, d = slow
    app = "mindroom-lies"
    n = names(app)
    payload = body(app, "slies")
    d.tell("crash", "git:from-image", times=1, seconds=120)
    r = s.call_provisioner("POST", "/apps", json=payload)
    d.untell("crash", "git:from-image")
    assert r.status == 504, r
    assert r.json["error"]["message"] == "git:from-image timed out after 4000 ms"
    assert d.app(n["hs"], "source-image") == MATRIX_IMAGE and d.app(n["hs"], "image") is None
    r = s.call_provisioner("POST", "/apps", json=payload)
    assert r.status == 201 and r.json["state"] == "running", r
    assert d.app(n["hs"], "image") == MATRIX_IMAGE, "answered running, homeserver never deployed"
    assert d.app(n["hs"], "running") == "true" and d.app(app, "image") == IMAGE
    r = s.call_provisioner("GET", "/apps/" + app)
    assert r.json["apps"] == {"mindroom": "running", "homeserver": "running"}, r


def test_a_new_image_whose_deploy_was_killed_after_its_commit_is_rolled_out_by_the_retry(slow):
    """MINDROOM_IMAGE changes (a release); the update's deploy of it is killed after
    Dokku committed it. The retry's git:from-image is "No changes detected", and
    ps:restart would restart the release that is deployed: the old image. The
    retry must roll the new image out, not answer success with the old one."""
    s, d = slow
    app = "mindroom-rollout"
    payload = body(app, "srollout", hs=False)
    assert s.call_provisioner("POST", "/apps", json=payload).status == 201
    new_image = IMAGE.split("@")[0] + "@sha256:" + "ef56" * 16
    s.env["MINDROOM_IMAGE"] = new_image
    s.restart_function("dokku-provisioner")
    try:
        d.tell("crash", "git:from-image", times=1)
        r = s.call_provisioner("POST", "/apps", json=payload)
        d.untell("crash", "git:from-image")
        assert r.status == 502 and r.json["error"]["message"] == "git:from-image exited 137", r
        assert d.app(app, "image") == IMAGE             # the old release still runs
        r = s.call_provisioner("POST", "/apps", json=payload)
        assert r.status == 200, r
        assert d.app(app, "image") == new_image, "answered 200 with the old image deployed"
        assert d.app(app, "running") == "true"
        # Applied now: the same request again deploys nothing more.
        d.mark()
        r = s.call_provisioner("POST", "/apps", json=payload)
        assert r.status == 200 and r.json["restarted"] is False, r
        assert not [c for c in d.new_calls() if c[0] in ("ps:rebuild", "ps:restart")]
    finally:
        s.env["MINDROOM_IMAGE"] = IMAGE
        s.restart_function("dokku-provisioner")


def test_a_dokku_that_cannot_start_is_a_503(slow):
    s, d = slow
    s.env["DOKKU_BIN"] = str(d.dir / "no-such-dokku")
    s.restart_function("dokku-provisioner")
    try:
        r = s.call_provisioner("GET", "/apps/mindroom-nodokku")
        assert r.status == 503 and r.json["error"]["code"] == "dokku_unavailable", r
    finally:
        s.env["DOKKU_BIN"] = str(STANDINS / "dokku")
        s.restart_function("dokku-provisioner")
    assert s.call_provisioner("GET", "/apps/mindroom-nodokku").status == 404


# ---- start-up checks --------------------------------------------------------

def start_with(env):
    """Runs the binary with env and returns (exit status, output) once it exits
    (status None when it kept running, i.e. accepted the configuration: it is then
    stopped). Either way a sanitizer report in its output fails the test."""
    binary = mr.build_dir() / "bin" / "dokku-provisioner"
    run = mr.scratch_dir("mr-prov-start-")
    full = {k: os.environ[k] for k in ("PATH", "HOME", "ASAN_OPTIONS", "UBSAN_OPTIONS")
            if k in os.environ}
    full.update({"MR_SOCKET": os.path.join(run, "p.sock"), "MR_WORKERS": "1",
                 "PROVISIONER_STATE_DIR": os.path.join(run, "state")})
    full.update(env)
    log = os.path.join(run, "out.log")
    p = mr.start_by_hand([str(binary)], full, log, start_new_session=True)
    try:
        status = p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        status = None
        mr.Stack._terminate(p)
    mr.assert_no_sanitizer_report(log)
    with open(log, errors="replace") as f:
        return status, f.read()


GOOD = {"DOKKU_PROVISIONER_TOKEN": "t" * 32, "DOKKU_MODE": "local", "MINDROOM_IMAGE": IMAGE,
        "MINDROOM_BASE_DOMAIN": DOMAIN}


@pytest.mark.parametrize("change,needle", [
    ({"MINDROOM_IMAGE": "registry.example.com/mindroom:latest"}, "MINDROOM_IMAGE"),
    ({"MINDROOM_IMAGE": "mindroom@sha256:" + "AB" * 32}, "MINDROOM_IMAGE"),
    ({"MINDROOM_IMAGE": "mindroom@sha256:" + "ab" * 31}, "MINDROOM_IMAGE"),
    ({"MINDROOM_IMAGE": "mind room@sha256:" + "ab" * 32}, "MINDROOM_IMAGE"),
    ({"MINDROOM_IMAGE": None}, "MINDROOM_IMAGE"),
    ({"MINDROOM_BASE_DOMAIN": None}, "MINDROOM_BASE_DOMAIN"),
    ({"MINDROOM_BASE_DOMAIN": "Example.COM"}, "MINDROOM_BASE_DOMAIN"),
    ({"DOKKU_MODE": "yolo"}, "DOKKU_MODE"),
    ({"DOKKU_MODE": "ssh"}, "DOKKU_HOST"),
    ({"DOKKU_MODE": "ssh", "DOKKU_HOST": "-oProxyCommand=x"}, "DOKKU_HOST"),
    ({"DOKKU_PROVISIONER_TOKEN": "short"}, "DOKKU_PROVISIONER_TOKEN"),
    ({"DOKKU_PROVISIONER_TOKEN": None}, "DOKKU_PROVISIONER_TOKEN"),
    ({"PROVISIONER_MAX_CPU": "lots"}, "PROVISIONER_MAX_CPU"),
    ({"PROVISIONER_BACKEND_URL": "{scheme}://{nope}/api"}, "PROVISIONER_BACKEND_URL"),
    ({"DOKKU_TLS": "maybe"}, "DOKKU_TLS"),
    ({"DOKKU_TLS": "wildcard"}, "DOKKU_TLS_CERT"),
    ({"MATRIX_IMAGE": "matrixdotorg/synapse:latest"}, "MATRIX_IMAGE"),
    ({"MATRIX_IMAGE": "matrixdotorg/synapse@sha256:" + "ab" * 31}, "MATRIX_IMAGE"),
    ({"PROVISIONER_APP_PREFIX": "Mindroom-"}, "PROVISIONER_APP_PREFIX"),
    ({"PROVISIONER_APP_PREFIX": "-x"}, "PROVISIONER_APP_PREFIX"),
    ({"PROVISIONER_APP_PREFIX": "a" * 21}, "PROVISIONER_APP_PREFIX"),
    ({"PROVISIONER_MATRIX_HOST": "matrix.{subdomain}"}, "PROVISIONER_MATRIX_HOST"),
    ({"PROVISIONER_MATRIX_HOST": "{nope}"}, "PROVISIONER_MATRIX_HOST"),
    ({"PROVISIONER_CHILD_ENV": "PATH,bad name"}, "PROVISIONER_CHILD_ENV"),
    ({"PROVISIONER_CHILD_ENV": "A,,B"}, "PROVISIONER_CHILD_ENV"),
    ({"PROVISIONER_CHILD_ENV": "A,"}, "PROVISIONER_CHILD_ENV"),
    ({"MINDROOM_DATA_DIR": "relative/dir"}, "MINDROOM_DATA_DIR"),
    ({"MINDROOM_DATA_DIR": "/data/../etc"}, "MINDROOM_DATA_DIR"),
    ({"MINDROOM_DATA_DIR": "/"}, "MINDROOM_DATA_DIR"),
    ({"MINDROOM_DATA_DIR": "/a b"}, "MINDROOM_DATA_DIR"),
    ({"PROVISIONER_STATE_DIR": "relative/state"}, "PROVISIONER_STATE_DIR"),
    # Dokku's storage:create --chown takes a uid up to 65535 (a larger one fails
    # every create there); k3s writes it into a ustar header of 7 octal digits.
    ({"MINDROOM_DATA_UID": "65536"}, "MINDROOM_DATA_UID"),
    ({"DOKKU_SCHEDULER": "k3s", "MINDROOM_DATA_UID": "2097152"}, "MINDROOM_DATA_UID"),
    ({"DOKKU_SCHEDULER": "kubernetes"}, "DOKKU_SCHEDULER"),
    ({"DOKKU_TLS": "issuer", "PROVISIONER_CERT_ISSUER": "acme-dns"}, "DOKKU_SCHEDULER=k3s"),
    ({"DOKKU_SCHEDULER": "k3s", "DOKKU_TLS": "issuer"}, "PROVISIONER_CERT_ISSUER"),
    ({"DOKKU_SCHEDULER": "k3s", "DOKKU_TLS": "issuer", "PROVISIONER_CERT_ISSUER": "Bad Name"},
     "PROVISIONER_CERT_ISSUER"),
    ({"DOKKU_SCHEDULER": "k3s", "DOKKU_TLS": "issuer", "PROVISIONER_CERT_ISSUER": "false"},
     "PROVISIONER_CERT_ISSUER"),
    ({"DOKKU_SCHEDULER": "k3s", "DOKKU_TLS": "letsencrypt"}, "PROVISIONER_ACME_EMAIL"),
    ({"DOKKU_SCHEDULER": "k3s", "DOKKU_TLS": "letsencrypt",
      "PROVISIONER_ACME_EMAIL": "ops example.com"}, "PROVISIONER_ACME_EMAIL"),
    # Read as an option by scheduler-k3s:set; refused by ssh mode at every create.
    ({"DOKKU_SCHEDULER": "k3s", "DOKKU_TLS": "letsencrypt",
      "PROVISIONER_ACME_EMAIL": "-ops@example.com"}, "PROVISIONER_ACME_EMAIL"),
    ({"DOKKU_SCHEDULER": "k3s", "DOKKU_TLS": "letsencrypt",
      "PROVISIONER_ACME_EMAIL": "ops%team@example.com"}, "PROVISIONER_ACME_EMAIL"),
    ({"DOKKU_TLS": "letsencrypt", "PROVISIONER_ACME_EMAIL": "ops@example.com"},
     "PROVISIONER_ACME_EMAIL"),
    ({"PROVISIONER_STORAGE_CLASS": "longhorn"}, "PROVISIONER_STORAGE_CLASS"),
    ({"DOKKU_SCHEDULER": "k3s", "PROVISIONER_STORAGE_CLASS": "Long Horn"},
     "PROVISIONER_STORAGE_CLASS"),
])
def test_bad_configuration_stops_the_start(change, needle):
    env = dict(GOOD)
    env.update(change)
    env = {k: v for k, v in env.items() if v is not None}
    status, err = start_with(env)
    assert status == 2, (change, status, err)
    assert needle in err
    assert "t" * 32 not in err


def test_good_configuration_starts():
    status, err = start_with(GOOD)
    assert status is None, err
    status, err = start_with(dict(GOOD, MINDROOM_DATA_UID="65535"))
    assert status is None, err


SSH = dict(GOOD, DOKKU_MODE="ssh", DOKKU_HOST="dokku.example.com")


def test_ssh_mode_starts_with_a_pinned_host_key(tmp_path):
    status, err = start_with(dict(SSH, DOKKU_SSH_KNOWN_HOSTS=str(known_hosts_file(tmp_path))))
    assert status is None, err


@pytest.mark.parametrize("known_hosts", [None, "", "missing", "empty", "directory", "spaced",
                                         "relative", "tilde", "none"])
def test_ssh_mode_refuses_to_start_without_a_pinned_host_key(tmp_path, known_hosts):
    """Without a known_hosts file of its own, ssh would trust whatever the system's
    and the user's ssh configuration say (accept-new, or no checking at all): the
    instances' secrets would go to any host answering DOKKU_HOST's name."""
    env = dict(SSH)
    if known_hosts == "missing":
        env["DOKKU_SSH_KNOWN_HOSTS"] = str(tmp_path / "no-such-file")
    elif known_hosts == "empty":
        (tmp_path / "known_hosts").write_text("")
        env["DOKKU_SSH_KNOWN_HOSTS"] = str(tmp_path / "known_hosts")
    elif known_hosts == "directory":
        env["DOKKU_SSH_KNOWN_HOSTS"] = str(tmp_path)
    elif known_hosts == "spaced":
        # ssh would read two files, the second ~/.ssh/known_hosts.
        env["DOKKU_SSH_KNOWN_HOSTS"] = "%s ~/.ssh/known_hosts" % known_hosts_file(tmp_path)
    elif known_hosts in ("relative", "tilde"):
        # ssh would look for it elsewhere than the provisioner checked.
        known_hosts_file(tmp_path)
        env["DOKKU_SSH_KNOWN_HOSTS"] = ("~/" if known_hosts == "tilde" else "") + "known_hosts"
        env["HOME"] = str(tmp_path)
    elif known_hosts is not None:
        env["DOKKU_SSH_KNOWN_HOSTS"] = known_hosts
    status, err = start_with(env)
    assert status == 2, (known_hosts, status, err)
    lines = [l for l in err.splitlines() if "DOKKU_SSH_KNOWN_HOSTS" in l]
    assert len(lines) == 1 and lines[0].startswith("dokku-provisioner: DOKKU_SSH_KNOWN_HOSTS"), err
    assert "t" * 32 not in err


def test_the_known_hosts_file_is_needed_in_ssh_mode_only():
    for mode in ("local", "dry-run"):
        status, err = start_with(dict(GOOD, DOKKU_MODE=mode))
        assert status is None, (mode, err)


@pytest.mark.parametrize("change", [
    {"DOKKU_SCHEDULER": "k3s"},
    {"DOKKU_SCHEDULER": "k3s", "PROVISIONER_STORAGE_CLASS": "longhorn", "DOKKU_TLS": "letsencrypt",
     "PROVISIONER_ACME_EMAIL": "ops+certs@example.com"},
    {"DOKKU_SCHEDULER": "k3s", "DOKKU_TLS": "issuer", "PROVISIONER_CERT_ISSUER": "acme-dns"},
    {"DOKKU_SCHEDULER": "k3s", "MINDROOM_DATA_UID": "2097151"},
])
def test_good_k3s_configuration_starts(change):
    status, err = start_with(dict(GOOD, **change))
    assert status is None, err


def test_the_request_deadline_bounds_every_command(slow):
    s, d = slow
    s.env["PROVISIONER_REQUEST_TIMEOUT_MS"] = "1500"
    s.restart_function("dokku-provisioner")
    try:
        d.tell("stall", "apps:exists", times=1, seconds=120)
        t0 = time.monotonic()
        r = s.call_provisioner("GET", "/apps/mindroom-deadline")
        took = time.monotonic() - t0
        assert r.status == 504 and r.json["error"]["code"] == "dokku_timeout", r
        # Cut at the request's 1500 ms, not at the command's own 3000 ms.
        assert re.fullmatch(r"apps:exists timed out after 1[0-9]{3} ms",
                            r.json["error"]["message"]), r
        assert took < 2.9, took
    finally:
        del s.env["PROVISIONER_REQUEST_TIMEOUT_MS"]
        s.restart_function("dokku-provisioner")


def test_a_bare_dokku_bin_is_found_in_path(slow):
    s, d = slow
    s.env["DOKKU_BIN"] = "dokku"
    s.env["PATH"] = "%s:%s" % (STANDINS, os.environ.get("PATH", "/usr/bin:/bin"))
    s.restart_function("dokku-provisioner")
    try:
        d.mark()
        r = s.call_provisioner("GET", "/apps/mindroom-inpath")
        assert r.status == 404, r
        assert d.new_calls() == [["apps:exists", "mindroom-inpath"],
                                 ["apps:exists", "mindroom-inpath-matrix"],
                                 ["storage:info", "mindroom-inpath-data"],
                                 ["storage:info", "mindroom-inpath-matrix-data"]]
    finally:
        s.env["DOKKU_BIN"] = str(STANDINS / "dokku")
        del s.env["PATH"]
        s.restart_function("dokku-provisioner")


# ---- the state directory: no local user can steer a write -------------------

def test_the_state_directory_defaults_to_var_lib():
    """Without PROVISIONER_STATE_DIR it is /var/lib/mindroom-provisioner (systemd's
    StateDirectory=), created 0700: seen through a private mount of /var/lib."""
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is needed to look at /var/lib privately")
    varlib = mr.scratch_dir("mr-varlib-")
    binary = mr.build_dir() / "bin" / "dokku-provisioner"
    run = mr.scratch_dir("mr-prov-start-")
    env = {k: os.environ[k] for k in ("PATH", "HOME", "ASAN_OPTIONS", "UBSAN_OPTIONS")
           if k in os.environ}
    env.update(GOOD, MR_SOCKET=os.path.join(run, "p.sock"), MR_WORKERS="1")
    log = os.path.join(run, "out.log")
    p = mr.start_by_hand(["unshare", "-m", "sh", "-c",
                          'mount --bind "$0" /var/lib && exec "$1"', varlib, str(binary)],
                         env, log, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        state = os.path.join(varlib, "mindroom-provisioner")
        while time.monotonic() < deadline and not os.path.isdir(os.path.join(state, "locks")):
            assert p.poll() is None, open(log, errors="replace").read()
            time.sleep(0.05)
        st = os.stat(state)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    finally:
        mr.Stack._terminate(p)
    mr.assert_no_sanitizer_report(log)


@pytest.mark.parametrize("how", ["other_owner", "group_writable", "world_writable", "symlink",
                                 "a_file", "sub_symlink", "sub_other_owner"])
def test_an_unsafe_state_directory_stops_the_start(how):
    base = mr.scratch_dir("mr-prov-state-")
    state = os.path.join(base, "state")
    os.mkdir(state, 0o700)
    if how == "other_owner":
        os.chown(state, 65534, 65534)
    elif how == "group_writable":
        os.chmod(state, 0o770)
    elif how == "world_writable":
        os.chmod(state, 0o1777)
    elif how == "symlink":
        os.rmdir(state)
        os.mkdir(state + ".real", 0o700)
        os.symlink(state + ".real", state)
    elif how == "a_file":
        os.rmdir(state)
        open(state, "w").close()
    elif how == "sub_symlink":
        os.mkdir(os.path.join(base, "elsewhere"), 0o700)
        os.symlink(os.path.join(base, "elsewhere"), os.path.join(state, "locks"))
    elif how == "sub_other_owner":
        os.mkdir(os.path.join(state, "apps"), 0o700)
        os.chown(os.path.join(state, "apps"), 65534, 65534)
    status, err = start_with(dict(GOOD, PROVISIONER_STATE_DIR=state))
    assert status == 2, (how, err)
    assert "PROVISIONER_STATE_DIR" in err, err


def worker_pids(stack):
    master = stack.procs["dokku-provisioner"].pid
    pids = [master]
    for task in os.listdir("/proc/%d/task" % master):
        with open("/proc/%d/task/%s/children" % (master, task)) as f:
            pids += [int(x) for x in f.read().split()]
    return pids


@pytest.fixture(scope="module")
def locking(pg):
    d = Dokku()
    env = d.env(PROVISIONER_APP_LOCK_WAIT_MS="500")
    with mr.Stack(pg, env=env, functions=["dokku-provisioner"]) as s:
        yield s, d


def test_one_request_an_instance_at_a_time_across_workers(locking):
    """The instance lock holds across the provisioner's workers: while a request
    for an app waits on Dokku, another for the same app is answered 503 once
    PROVISIONER_APP_LOCK_WAIT_MS has passed, with nothing run; one for another app
    is not held up."""
    s, d = locking
    d.tell("stall", "apps:exists", times=1, seconds=3)
    first = {}
    t = threading.Thread(target=lambda: first.update(
        r=s.call_provisioner("DELETE", "/apps/mindroom-held")))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not (d.dir / "stalled.pids").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (d.dir / "stalled.pids").exists()
        d.mark()
        t0 = time.monotonic()
        r = s.call_provisioner("POST", "/apps/mindroom-held/stop")
        took = time.monotonic() - t0
        assert r.status == 503, r
        assert "another request is working on this app" in r.json["error"]["message"], r
        assert 0.4 < took < 2.5, took
        assert d.new_calls() == []
        r = s.call_provisioner("DELETE", "/apps/mindroom-free")
        assert r.status == 200 and r.json["state"] == "destroyed", r
        assert t.is_alive()            # the first request still holds its app
    finally:
        t.join(30)
    assert first["r"].status == 200 and first["r"].json["state"] == "destroyed", first


@pytest.fixture(scope="module")
def ssh_locking(pg):
    d = Dokku()
    with mr.Stack(pg, env=ssh_env(d, PROVISIONER_APP_LOCK_WAIT_MS="500"),
                  functions=["dokku-provisioner"]) as s:
        yield s, d


def parent_of(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def orphan_a_command(s, d, app, seconds):
    """Starts DELETE /apps/<app> with its first command (apps:exists) stalled for
    seconds and SIGKILLs the worker running it. Returns the stalled command's
    pid, its child's, its keeper's (the process between it and the worker),
    what the keeper held open then, and when it started (time.monotonic())."""
    (d.dir / "stalled.pids").unlink(missing_ok=True)
    d.tell("stall", "apps:exists", times=1, seconds=seconds)
    first = {}
    t = threading.Thread(target=lambda: first.update(
        r=s.call_provisioner("DELETE", "/apps/" + app)))
    t0 = time.monotonic()
    t.start()
    try:
        while not (d.dir / "stalled.pids").exists() and time.monotonic() < t0 + 10:
            time.sleep(0.02)
        command, sleeper = [int(p) for p in
                            (d.dir / "stalled.pids").read_text().split("\n")[-2].split()]
        workers = worker_pids(s)[1:]
        keeper, worker = command, parent_of(command)
        while worker > 1 and worker not in workers:
            keeper, worker = worker, parent_of(worker)
        assert worker in workers, (command, workers)
        held = [os.readlink("/proc/%d/fd/%s" % (keeper, fd))
                for fd in os.listdir("/proc/%d/fd" % keeper)]
        os.kill(worker, signal.SIGKILL)
    finally:
        t.join(30)
    assert first["r"].status == 502, first      # nginx: the worker went away
    return command, sleeper, keeper, held, t0


@pytest.mark.parametrize("mode", ["local", "ssh"])
def test_a_command_outliving_its_killed_worker_keeps_its_app(mode, request):
    """A worker killed outright (SIGKILL, a crash) while its command runs leaves
    the command running; until it ends, the next request for the same app is
    answered 503 "another request is working on this app" with nothing run (a
    destroy never runs beside a deploy), and once it has ended the same request
    succeeds. In ssh mode too, where ssh closes every inherited descriptor."""
    s, d = request.getfixturevalue("locking" if mode == "local" else "ssh_locking")
    app = "mindroom-orphan" + mode
    command, sleeper, keeper, held, _ = orphan_a_command(s, d, app, 4)
    try:
        d.mark()
        r = s.call_provisioner("DELETE", "/apps/" + app)
        assert r.status == 503 and r.json["error"]["code"] == "app_busy", r
        assert "another request is working on this app" in r.json["error"]["message"], r
        assert d.new_calls() == []
        assert alive(command)           # the 503 was for the orphan, not for a stale lock
    finally:
        assert wait_dead([command, sleeper, keeper], timeout=15) == []
    r = s.call_provisioner("DELETE", "/apps/" + app)
    assert r.status == 200 and r.json["state"] == "destroyed", r
    assert d.new_calls()[0] == ["apps:exists", app]
    # What held the lock: the command's keeper, a child of the worker with
    # nothing else of the worker's open (not the FastCGI socket, not a pipe).
    assert keeper != command and held == [str(d.state / "locks" / "instances")], held


def test_an_orphaned_command_is_still_killed_after_its_deadline(slow):
    """The orphan of a killed worker keeps its deadline (DOKKU_COMMAND_TIMEOUT_MS,
    3 s here, and the 2 s the worker's own kill would have taken): its process
    group is killed then, so a stalled command cannot keep its app busy forever."""
    s, d = slow
    command, sleeper, keeper, _, t0 = orphan_a_command(s, d, "mindroom-orphandl", 120)
    assert wait_dead([command, sleeper, keeper], timeout=15) == []
    took = time.monotonic() - t0
    assert 4.5 < took < 9, took
    r = s.call_provisioner("DELETE", "/apps/mindroom-orphandl")
    assert r.status == 200 and r.json["state"] == "destroyed", r


def test_a_planted_lock_symlink_is_refused_and_followed_nowhere(slow):
    s, d = slow
    victim = os.path.join(mr.scratch_dir("mr-victim-"), "created-through-a-link")
    lock = d.state / "locks" / "instances"
    kept = lock.with_name("instances.kept")
    if lock.exists():
        os.rename(lock, kept)
    os.symlink(victim, lock)
    try:
        d.mark()
        r = s.call_provisioner("DELETE", "/apps/mindroom-victim")
        assert r.status == 500 and r.json["error"]["code"] == "internal", r
        assert not os.path.lexists(victim)
        assert d.new_calls() == []
    finally:
        os.unlink(lock)
        if kept.exists():
            os.rename(kept, lock)


def test_fingerprints_are_written_in_place_and_never_through_a_link(slow):
    s, d = slow
    victim = os.path.join(mr.scratch_dir("mr-victim-"), "victim")
    with open(victim, "w") as f:
        f.write("untouched\n")
    planted = []
    for pid in worker_pids(s):
        for name in ("mindroom-tmpname.spec.%d.tmp" % pid, "mindroom-tmpname.spec.tmp",
                     "mindroom-tmpname.spec"):
            p = d.state / "apps" / name
            if not os.path.lexists(p):
                os.symlink(victim, p)
                planted.append(p)
    r = s.call_provisioner("POST", "/apps", json=body("mindroom-tmpname", "stmpname", hs=False))
    assert r.status == 201, r
    with open(victim) as f:
        assert f.read() == "untouched\n"
    bucket = record_bucket(d.state / "apps", "mindroom-tmpname")
    assert bucket.is_file() and not bucket.is_symlink()
    assert stat.S_IMODE(bucket.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", state_record(d.state / "apps", "mindroom-tmpname"))
    for p in planted:
        if os.path.lexists(p):
            os.unlink(p)

    # A link planted where another app's fingerprint goes: the create still
    # succeeds (without a fingerprint the next update restarts the app, nothing
    # else) and nothing is written through the link.
    other = "mindroom-linkedspec"
    bucket = record_bucket(d.state / "apps", other)
    kept = bucket.with_name(bucket.name + ".kept")
    if bucket.exists():
        os.rename(bucket, kept)
    os.symlink(victim, bucket)
    try:
        r = s.call_provisioner("POST", "/apps", json=body(other, "slinkedspec", hs=False))
        assert r.status == 201, r
        with open(victim) as f:
            assert f.read() == "untouched\n"
    finally:
        os.unlink(bucket)
        if kept.exists():
            os.rename(kept, bucket)


def test_a_fingerprint_from_a_file_of_its_own_is_still_read(slow):
    """An app whose fingerprint an older version kept in apps/<app>.spec: after
    the upgrade (the provisioner started again) an update that changes nothing
    restarts nothing, and the fingerprint has moved to its bucket."""
    s, d = slow
    app = "mindroom-oldspec"
    r = s.call_provisioner("POST", "/apps", json=body(app, "soldspec", hs=False))
    assert r.status == 201, r
    fp = state_record(d.state / "apps", app)
    # As an older version left it: the file, and no line.
    bucket = record_bucket(d.state / "apps", app)
    bucket.write_text("".join(line + "\n" for line in bucket.read_text().splitlines()
                              if not line.startswith(app + " ")))
    legacy = d.state / "apps" / (app + ".spec")
    legacy.write_text(fp + "\n")
    os.chmod(legacy, 0o600)
    s.restart_function("dokku-provisioner")
    d.mark()
    r = s.call_provisioner("POST", "/apps", json=body(app, "soldspec", hs=False))
    assert r.status == 200, r
    assert not [c for c in d.new_calls() if c[0] == "ps:restart"], d.new_calls()
    assert state_record(d.state / "apps", app) == fp
    assert not legacy.exists()


# ---- DOKKU_TLS=wildcard: the operator's certificate on every app ----------------

def make_cert(dirpath, cn, days=30):
    crt, key = os.path.join(dirpath, "wild.crt"), os.path.join(dirpath, "wild.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", crt,
                    "-days", str(days), "-subj", "/CN=" + cn,
                    "-addext", "subjectAltName=DNS:%s" % cn],
                   check=True, capture_output=True)
    return crt, key


@pytest.fixture(scope="module")
def wildcard(pg):
    d = Dokku()
    certs = mr.scratch_dir("mr-certs-")
    crt, key = make_cert(certs, "*." + DOMAIN)
    env = d.env(DOKKU_TLS="wildcard", DOKKU_TLS_CERT=crt, DOKKU_TLS_KEY=key)
    with mr.Stack(pg, env=env, functions=["dokku-provisioner"]) as s:
        yield s, d, crt, key
    d.assert_documented()


def test_wildcard_mode_installs_the_certificate_on_both_apps(wildcard):
    s, d, crt, key = wildcard
    d.mark()
    payload = body("mindroom-wild", "swild")
    r = s.call_provisioner("POST", "/apps", json=payload)
    assert r.status == 201, r
    assert r.json["frontend_url"] == "https://swild." + DOMAIN
    assert r.json["matrix_server_url"] == "https://swild-matrix." + DOMAIN
    match(d.new_calls(), create_sequence("mindroom-wild", "swild", tls="wildcard"))
    for app, port in (("mindroom-wild", 8765), ("mindroom-wild-matrix", 8008)):
        with open(crt) as f:
            assert d.app(app, "certs/server.crt") == f.read()
        with open(key) as f:
            assert d.app(app, "certs/server.key") == f.read()
        assert d.app(app, "ports") == ports(port, "wildcard")
        assert d.app(app, "letsencrypt") is None
    # The key never reaches a command line or the log.
    with open(key) as f:
        body_lines = [x for x in f.read().splitlines() if x and not x.startswith("-----")]
    log = s.log("dokku-provisioner")
    for line in body_lines:
        assert line not in log
        for c in d.all_calls():
            assert all(line not in a for a in c)
    # Every update installs it again (a renewed certificate reaches each app).
    d.mark()
    assert s.call_provisioner("POST", "/apps", json=payload).status == 200
    calls = d.new_calls()
    assert ["certs:add", "mindroom-wild"] in calls and ["certs:add", "mindroom-wild-matrix"] in calls
    assert not [c for c in calls if c[0] == "ps:restart"]


@pytest.mark.parametrize("how,needle", [
    ("other_domain", "does not cover"), ("deeper", "does not cover"),
    ("mismatch", "does not belong"), ("missing", "DOKKU_TLS_CERT"), ("garbage", "no PEM")])
def test_a_wrong_wildcard_certificate_stops_the_start(how, needle):
    certs = mr.scratch_dir("mr-certs-")
    crt, key = make_cert(certs, "*." + DOMAIN)
    if how == "other_domain":
        crt, key = make_cert(certs, "*.example.org")
    elif how == "deeper":
        crt, key = make_cert(certs, "*.x." + DOMAIN)
    elif how == "mismatch":
        other = mr.scratch_dir("mr-certs-")
        _, key = make_cert(other, "*." + DOMAIN)
    elif how == "missing":
        crt = os.path.join(certs, "nope.crt")
    elif how == "garbage":
        with open(crt, "w") as f:
            f.write("not a certificate\n")
    status, err = start_with(dict(GOOD, DOKKU_TLS="wildcard", DOKKU_TLS_CERT=crt,
                                  DOKKU_TLS_KEY=key))
    assert status == 2, (how, err)
    assert needle in err, err
    with open(key) as f:
        assert f.read().splitlines()[1] not in err
