"""dokku-provisioner's modes and limits: dry-run, ssh, deadlines, start-up checks."""

import json
import os
import re
import subprocess
import tempfile
import time

import pytest

import mr
from provisioner_helpers import (DOMAIN, IMAGE, STANDINS, Dokku, alive, body,
                                 create_sequence, decode_config_args, match)


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
    r = s.call_provisioner("POST", "/apps", json=body("mr-dry", "sdry", env=env))
    assert r.status == 201, r
    assert r.json["dry_run"] is True and r.json["state"] == "running"
    assert r.json["frontend_url"] == "http://sdry.%s" % DOMAIN   # DOKKU_TLS off: http
    assert d.all_calls() == []          # the stand-in dokku was never run

    log = s.log("dokku-provisioner")
    for line in ("would run: dokku apps:exists mr-dry",
                 "would run: dokku apps:create mr-dry",
                 "would run: dokku resource:limit --memory 512m --cpu 0.5 mr-dry",
                 "would run: dokku config:set --no-restart --encoded mr-dry API_TOKEN_X=...",
                 "would run: dokku domains:set mr-dry sdry." + DOMAIN,
                 "would run: dokku git:from-image mr-dry " + IMAGE):
        assert line in log, line
    assert "dry-secret-value-77" not in log
    lines = [json.loads(x) for x in log.splitlines() if "would run" in x]
    assert lines and all(x["msg"].startswith("dry_run: true; ") for x in lines)

    r = s.call_provisioner("POST", "/apps", json=body("mr-dry", "sdry", env=env))
    assert r.status == 200 and r.json["dry_run"] is True, r
    for method, path, status, state in (("GET", "/apps/mr-dry", 200, "running"),
                                        ("POST", "/apps/mr-dry/stop", 200, "stopped"),
                                        ("GET", "/apps/mr-dry", 200, "stopped"),
                                        ("POST", "/apps/mr-dry/start", 200, "running"),
                                        ("DELETE", "/apps/mr-dry", 200, "destroyed")):
        r = s.call_provisioner(method, path)
        assert r.status == status and r.json["state"] == state, (method, path, r)
        assert r.json["dry_run"] is True
    assert s.call_provisioner("GET", "/apps/mr-dry").status == 404
    assert d.all_calls() == []


def test_explicit_dry_run_still_validates_and_authenticates(dry):
    s, d = dry
    s.env["DOKKU_MODE"] = "dry-run"
    s.restart_function("dokku-provisioner")
    assert "dry_run: true; DOKKU_MODE=dry-run" in s.log("dokku-provisioner")
    assert s.call_provisioner("POST", "/apps", json=body("Bad", "sok")).status == 400
    assert s.call_provisioner("POST", "/apps", json=body("mr-dry2", "sok"),
                              token="wrong-token-000000").status == 401
    r = s.call_provisioner("POST", "/apps", json=body("mr-dry2", "sdry2"))
    assert r.status == 201 and r.json["dry_run"] is True, r
    assert d.all_calls() == []


# ---- ssh -------------------------------------------------------------------

@pytest.fixture(scope="module")
def ssh(pg):
    d = Dokku()
    env = d.env(DOKKU_MODE="ssh", DOKKU_SSH_BIN=str(STANDINS / "ssh"),
                DOKKU_HOST="dokku.example.com", DOKKU_SSH_KEY="/etc/mindroom/dokku_ed25519",
                DOKKU_SSH_PORT="2222", DOKKU_SSH_KNOWN_HOSTS="/etc/mindroom/known_hosts")
    with mr.Stack(pg, env=env, functions=["dokku-provisioner"]) as s:
        yield s, d


def ssh_calls(d):
    try:
        text = (d.dir / "ssh.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(x)["argv"] for x in text.splitlines() if x.strip()]


def test_ssh_mode_sends_argv_to_the_dokku_user(ssh):
    s, d = ssh
    env = {"MULTI": "a\nb c\td", "SPACES": "  padded  ", "GLOB": "* ? [x]"}
    r = s.call_provisioner("POST", "/apps", json=body("mr-ssh", "sssh", env=env))
    assert r.status == 201, r
    calls = ssh_calls(d)
    prefix = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15",
              "-i", "/etc/mindroom/dokku_ed25519", "-o", "IdentitiesOnly=yes",
              "-o", "UserKnownHostsFile=/etc/mindroom/known_hosts",
              "-o", "StrictHostKeyChecking=yes",
              "-p", "2222", "dokku@dokku.example.com", "--"]
    assert calls[0] == prefix + ["apps:exists", "mr-ssh"]
    assert all(c[:len(prefix)] == prefix for c in calls)
    # What the host ran after splitting the joined command line: the "--" that
    # ssh passed on (Dokku drops leading "--" arguments), then exactly the
    # create sequence, values intact (base64 has no spaces or glob characters).
    raw = d.all_calls()
    assert raw and all(c[0] == "--" for c in raw), raw
    dk = [c[1:] for c in raw]
    match(dk, create_sequence("mr-ssh", "sssh"))
    assert decode_config_args([c for c in dk if c[0] == "config:set"][0]) == env
    assert d.config("mr-ssh") == env

    assert s.call_provisioner("DELETE", "/apps/mr-ssh").status == 200
    assert ssh_calls(d)[-1] == prefix + ["--force", "apps:destroy", "mr-ssh"]


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
    r = s.call_provisioner("GET", "/apps/mr-stall")
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
    assert s.call_provisioner("GET", "/apps/mr-stall").status == 404


def test_a_stalled_deploy_times_out_and_the_retry_completes(slow):
    s, d = slow
    d.tell("stall", "git:from-image", times=1, seconds=120)
    r = s.call_provisioner("POST", "/apps", json=body("mr-slowdeploy", "sslow"))
    assert r.status == 504, r
    assert r.json["error"]["message"] == "git:from-image timed out after 4000 ms"
    d.mark()
    r = s.call_provisioner("POST", "/apps", json=body("mr-slowdeploy", "sslow"))
    assert r.status == 200 and r.json["deployed"] is True, r
    assert ["apps:create", "mr-slowdeploy"] not in d.new_calls()


def test_a_dokku_that_cannot_start_is_a_503(slow):
    s, d = slow
    s.env["DOKKU_BIN"] = str(d.dir / "no-such-dokku")
    s.restart_function("dokku-provisioner")
    try:
        r = s.call_provisioner("GET", "/apps/mr-nodokku")
        assert r.status == 503 and r.json["error"]["code"] == "dokku_unavailable", r
    finally:
        s.env["DOKKU_BIN"] = str(STANDINS / "dokku")
        s.restart_function("dokku-provisioner")
    assert s.call_provisioner("GET", "/apps/mr-nodokku").status == 404


# ---- start-up checks --------------------------------------------------------

def start_with(env):
    """Runs the binary with env and returns (exit status, stderr) once it exits
    (or None when it kept running, i.e. accepted the configuration)."""
    binary = mr.build_dir() / "bin" / "dokku-provisioner"
    run = tempfile.mkdtemp(prefix="mr-prov-start-")
    full = {k: os.environ[k] for k in ("PATH", "HOME", "ASAN_OPTIONS", "UBSAN_OPTIONS")
            if k in os.environ}
    full.update({"MR_SOCKET": os.path.join(run, "p.sock"), "MR_WORKERS": "1",
                 "PROVISIONER_STATE_DIR": os.path.join(run, "state")})
    full.update(env)
    p = subprocess.Popen([str(binary)], env=full, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=5)
        return p.returncode, err.decode()
    except subprocess.TimeoutExpired:
        p.terminate()
        p.communicate(timeout=30)
        return None, ""


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


def test_the_request_deadline_bounds_every_command(slow):
    s, d = slow
    s.env["PROVISIONER_REQUEST_TIMEOUT_MS"] = "1500"
    s.restart_function("dokku-provisioner")
    try:
        d.tell("stall", "apps:exists", times=1, seconds=120)
        t0 = time.monotonic()
        r = s.call_provisioner("GET", "/apps/mr-deadline")
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
        r = s.call_provisioner("GET", "/apps/mr-inpath")
        assert r.status == 404, r
        assert d.new_calls() == [["apps:exists", "mr-inpath"]]
    finally:
        s.env["DOKKU_BIN"] = str(STANDINS / "dokku")
        del s.env["PATH"]
        s.restart_function("dokku-provisioner")
