"""Shared pieces of the dokku-provisioner tests: the stand-in's directory and
what reached it, request bodies, the documented command sequences, and the
check that every command the provisioner ran is one Dokku documents.

MR_DOKKU_SCHEDULER=k3s (scripts/test.sh's k3s suite) runs every test that
uses these helpers against a provisioner with DOKKU_SCHEDULER=k3s: the
sequences and the observations below follow the scheduler."""

import base64
import json
import os
import re
import secrets
import stat
from pathlib import Path

import mr

STANDINS = mr.ROOT / "tests" / "standins"
FIXTURE = mr.ROOT / "tests" / "fixtures" / "dokku_commands.json"
IMAGE = "registry.example.com/mindroom/mindroom@sha256:" + "ab12" * 16
# The stand-in treats an image whose repository ends in /synapse like Synapse's.
MATRIX_IMAGE = "registry.example.com/matrixdotorg/synapse@sha256:" + "cd34" * 16
DOMAIN = "mr.test"
PREFIX = "mindroom-"
MINDROOM_PORT = 8765
MINDROOM_DIR = "/mindroom_data"
# What the provisioner puts in every MindRoom's environment: where its data and
# its configuration (seeded from the image's own) live, both in its storage.
MINDROOM_CONFIG = MINDROOM_DIR + "/config/config.yaml"
MINDROOM_OWN = {"MINDROOM_STORAGE_PATH": MINDROOM_DIR, "MINDROOM_CONFIG_PATH": MINDROOM_CONFIG,
                "MINDROOM_CONFIG_TEMPLATE": "/app/config.yaml"}
MINDROOM_UID = 1000
HS_UID = 991
# Synapse's max_upload_size, and the body its public host's nginx lets through.
HS_MAX_UPLOAD = "50M"
LABEL = "mindroom.chat/storage-gb"
TAR = ["--", "tar", "-x", "-f", "-", "-C", "/data"]
SCHEDULER = os.environ.get("MR_DOKKU_SCHEDULER", "docker-local")
assert SCHEDULER in ("docker-local", "k3s"), SCHEDULER
K3S = SCHEDULER == "k3s"
STORAGE_CLASS = "mr-standard"       # PROVISIONER_STORAGE_CLASS in k3s mode
ACME_EMAIL = "ops@mr.test"          # PROVISIONER_ACME_EMAIL in k3s mode with letsencrypt


def record_bucket(directory, name):
    """The file holding the record `name` of a directory of the provisioner's
    state (functions/dokku-provisioner/state.c): 64-bit FNV-1a of the name, 256
    buckets."""
    h = 0xcbf29ce484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return Path(directory) / ("%02x" % (h % 256))


def state_record(directory, name):
    """The value of the record `name` ("<name> <value>" in its bucket), or None."""
    try:
        text = record_bucket(directory, name).read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return value
    return None


def jsonl_records(path):
    """The JSON lines of a stand-in's record file (calls.jsonl, ssh.jsonl), [] before the
    first, read whole lines only (mr.whole_lines: a record is appended in one write(2),
    which a concurrent read can find half done)."""
    return [json.loads(line) for line in mr.whole_lines(path).splitlines() if line.strip()]


def mem(value, k3s=None):
    """A memory limit as the scheduler reads it: "512m" (docker-local) is "512Mi" on k3s."""
    k3s = K3S if k3s is None else k3s
    return value[:-1] + "Mi" if k3s and value.endswith("m") else value


def hs_internal_url(app, k3s=None):
    """How MindRoom reaches its homeserver: Dokku's network alias, or the k3s Service."""
    k3s = K3S if k3s is None else k3s
    if k3s:
        return "http://%s-matrix-web.default.svc.cluster.local" % app
    return "http://%s-matrix.web:8008" % app


def ports(port, tls, k3s=None):
    k3s = K3S if k3s is None else k3s
    if tls != "off" and not k3s:
        return "http:80:%d https:443:%d" % (port, port)
    return "http:80:%d" % port


def names(app):
    return {"app": app, "hs": app + "-matrix", "data": app + "-data",
            "hs_data": app + "-matrix-data", "net": app + "-net"}


class Call(list):
    """One call's argv (compares equal to the list), with .stdin: what a
    config:import from "-" read (as text), else None."""

    def __init__(self, rec):
        super().__init__(rec["argv"])
        self.stdin = rec.get("stdin")


CONFIG_IMPORT = ["config:import", "--no-restart", "--format", "json"]


class Dokku:
    """The stand-in dokku's directory: calls made, app, storage and network
    state, the apps' containers, and switches."""

    def __init__(self, scheduler=None):
        self.scheduler = scheduler or SCHEDULER
        self.k3s = self.scheduler == "k3s"
        self.dir = Path(mr.scratch_dir("mr-dokku-"))
        self.state = self.dir / "state"
        self._seen = 0

    def env(self, **extra):
        env = {
            "DOKKU_MODE": "local",
            "DOKKU_BIN": str(STANDINS / "dokku"),
            "DOKKU_STANDIN_DIR": str(self.dir),
            # Children get an allow-listed environment: the stand-in needs its directory.
            "PROVISIONER_CHILD_ENV": "DOKKU_STANDIN_DIR",
            "MINDROOM_IMAGE": IMAGE,
            "MATRIX_IMAGE": MATRIX_IMAGE,
            "MINDROOM_BASE_DOMAIN": DOMAIN,
            "PROVISIONER_STATE_DIR": str(self.state),
            "DOKKU_COMMAND_TIMEOUT_MS": "30000",
            "DOKKU_DEPLOY_TIMEOUT_MS": "30000",
            "DOKKU_LOCK_BACKOFF_MS": "20",
        }
        if self.k3s:
            env["DOKKU_SCHEDULER"] = "k3s"
            env["PROVISIONER_STORAGE_CLASS"] = STORAGE_CLASS
            if extra.get("DOKKU_TLS") in ("letsencrypt", "on", "1", "true", "yes"):
                env["PROVISIONER_ACME_EMAIL"] = ACME_EMAIL
        env.update({k: str(v) for k, v in extra.items()})
        return env

    # ---- calls ----

    def records(self):
        """Every call's full record: argv, pid, time, fds, env (names)."""
        return jsonl_records(self.dir / "calls.jsonl")

    def all_calls(self):
        return [Call(r) for r in self.records()]

    def mark(self):
        """Forget the calls so far: new_calls() returns only later ones."""
        self._seen = len(self.all_calls())

    def new_calls(self):
        calls = self.all_calls()[self._seen:]
        self._seen += len(calls)
        return calls

    def tell(self, kind, sub, **spec):
        """kind: fail, lock or stall; spec: times, status, seconds, skip."""
        (self.dir / ("%s-%s.json" % (kind, sub))).write_text(json.dumps(spec))

    def untell(self, kind, sub):
        try:
            (self.dir / ("%s-%s.json" % (kind, sub))).unlink()
        except FileNotFoundError:
            pass

    # ---- apps ----

    def app(self, app, name, default=None):
        try:
            return (self.dir / "apps" / app / name).read_text()
        except FileNotFoundError:
            return default

    def app_json(self, app, name, default=None):
        text = self.app(app, name)
        return json.loads(text) if text is not None else default

    def config(self, app):
        return self.app_json(app, "config.json", {})

    def exists(self, app):
        return (self.dir / "apps" / app).is_dir()

    def mounts(self, app):
        return self.app_json(app, "mounts.json", [])

    # ---- storage and networks ----

    def entry(self, name):
        try:
            return json.loads((self.dir / "storage" / (name + ".json")).read_text())
        except FileNotFoundError:
            return None

    def host_dir(self, name):
        return self.dir / "storage-data" / name

    def network(self, name):
        return (self.dir / "networks" / name).exists()

    # ---- containers: what an app's running container sees ----

    def _host_path(self, app, cpath):
        box = self.app_json(app, "container.json")
        assert box is not None, "%s has no container" % app
        for m in sorted(box["mounts"], key=lambda m: -len(m["container_dir"])):
            d = m["container_dir"].rstrip("/")
            if cpath == d or cpath.startswith(d + "/"):
                return self.host_dir(m["entry"]) / cpath[len(d):].lstrip("/")
        return self.dir / "apps" / app / "container" / cpath.lstrip("/")

    def container_write(self, app, cpath, text):
        """Writes a file as the app's process would, inside its container."""
        p = self._host_path(app, cpath)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def container_read(self, app, cpath):
        try:
            return self._host_path(app, cpath).read_text()
        except FileNotFoundError:
            return None

    def reaches(self, app, alias):
        """True when app's container can resolve alias ("<other-app>.web"): both
        containers running on a common network (docker-local), or both on the
        k3s scheduler with the other's web Service up (k3s)."""
        other = alias.split(".")[0]
        a, b = self.app_json(app, "container.json"), self.app_json(other, "container.json")
        if not a or not b or self.app(other, "running") != "true":
            return False
        if self.k3s:
            return self.app(app, "scheduler") == "k3s" == self.app(other, "scheduler")
        return bool(set(a["networks"]) & set(b["networks"]))

    def tls_active(self, app):
        """The app has its certificate source: the letsencrypt plugin (docker-local)
        or the k3s scheduler's cert-manager integration."""
        if self.k3s:
            return bool(self.app_json(app, "k3s.json", {}).get("letsencrypt-email-prod"))
        return self.app(app, "letsencrypt") == "on"

    def assert_entry_owned(self, entry, uid, gb):
        """The entry is the app's alone (owner uid, 0700) and its size recorded."""
        e = self.entry(entry)
        if self.k3s:
            assert (e["scheduler"], e["size"], e["access_mode"], e["storage_class"],
                    e["reclaim_policy"], e["chown"], e["mode"]) == (
                "k3s", "%sGi" % gb, "ReadWriteOnce", STORAGE_CLASS, "Delete", "", ""), e
        else:
            assert e["chown"] == str(uid) and e["mode"] == "0700", e
        assert e["labels"] == {LABEL: str(gb)}
        st = self.host_dir(entry).stat()
        assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
        if os.geteuid() == 0:
            assert st.st_uid == uid

    # ---- the provisioner's own state ----

    def spec_stored(self, app):
        return state_record(self.state / "apps", app) is not None

    def observed(self, app):
        """What a create/update will find for the instance of app, per component."""
        out = {}
        n = names(app)
        for key, a, e, image in (("hs", n["hs"], n["hs_data"], MATRIX_IMAGE),
                                 ("mr", n["app"], n["data"], IMAGE)):
            out[key] = {"app": self.exists(a), "entry": self.entry(e) is not None,
                        "deployed": self.app(a, "image") == image,
                        "running": self.app(a, "running") == "true",
                        "le": self.tls_active(a),
                        "spec_ok": self.spec_stored(a)}
        out["net"] = self.network(n["net"])
        return out

    # ---- Dokku's documentation ----

    def assert_documented(self):
        """Every command that reached the stand-in is one Dokku documents, with
        documented flags only (tests/fixtures/dokku_commands.json)."""
        for argv in self.all_calls():
            problem = undocumented(argv)
            assert problem is None, "%s: %s" % (argv, problem)


_FIXTURE = None


def fixture():
    global _FIXTURE
    if _FIXTURE is None:
        _FIXTURE = json.loads(FIXTURE.read_text())
    return _FIXTURE


def undocumented(argv):
    """None when argv matches a documented synopsis, else what is wrong with it."""
    fx = fixture()
    i, used_globals = 0, []
    while i < len(argv) and argv[i].startswith("--"):
        if argv[i] not in fx["global_flags"]:
            return "undocumented global flag %s" % argv[i]
        used_globals.append(argv[i])
        i += 1
    if i >= len(argv):
        return "no subcommand"
    sub, args = argv[i], argv[i + 1:]
    spec = fx["commands"].get(sub)
    if spec is None:
        return "subcommand %s is not in the fixture" % sub
    for g in used_globals:
        if g not in spec.get("global_flags", []):
            return "global flag %s is not documented with %s" % (g, sub)
    if spec.get("command_after") and spec["command_after"] in args:
        args = args[:args.index(spec["command_after"])]
    pos, k = [], 0
    while k < len(args):
        a = args[k]
        if a.startswith("--"):
            kind = spec["flags"].get(a)
            if kind is None:
                return "flag %s is not documented for %s" % (a, sub)
            k += 2 if kind == "value" else 1
            continue
        pos.append(a)
        k += 1
    lo, hi = spec["positional"]
    if len(pos) < lo or (hi is not None and len(pos) > hi):
        return "%d positional arguments; %s takes %s..%s" % (len(pos), sub, lo, hi)
    for where, pattern in spec.get("pattern", {}).items():
        idx = range(int(where[:-1]), len(pos)) if where.endswith("+") else [int(where)]
        for j in idx:
            if j < len(pos) and not re.match(pattern, pos[j]):
                return "argument %r does not match %s" % (pos[j], pattern)
    return None


# ---- requests ----------------------------------------------------------------

def b64(data):
    return base64.b64encode(data).decode().rstrip("=")


def hs_secrets():
    """A homeserver block's secrets, as the control plane generates them."""
    return {
        "signing_key": "ed25519 a_Test %s" % b64(secrets.token_bytes(32)),
        "registration_shared_secret": secrets.token_urlsafe(32),
        "macaroon_secret_key": secrets.token_urlsafe(32),
        "form_secret": secrets.token_urlsafe(32),
    }


def matrix_host(sub):
    return "%s-matrix.%s" % (sub, DOMAIN)


def body(app, subdomain=None, memory_mb=512, cpu=0.5, env=None, storage_gb=5, hs=True,
         hs_memory_mb=256, hs_cpu=0.25, hs_storage_gb=3, secrets_=None):
    sub = ("s" + app[len(PREFIX):]) if subdomain is None else subdomain
    b = {"app": app, "subdomain": sub, "memory_mb": memory_mb, "cpu": cpu,
         "env": {"MINDROOM_TIER": "starter"} if env is None else env}
    if storage_gb is not None:
        b["storage_gb"] = storage_gb
    if hs:
        h = {"memory_mb": hs_memory_mb, "cpu": hs_cpu,
             "server_name": matrix_host(sub) if isinstance(sub, str) else "x.mr.test"}
        if hs_storage_gb is not None:
            h["storage_gb"] = hs_storage_gb
        h.update(secrets_ or hs_secrets())
        b["homeserver"] = h
    return b


def managed(env):
    """MindRoom's environment as the provisioner sets it: env plus the names of
    everything in it (MINDROOM_MANAGED_ENV, which a later update unsets by)."""
    return dict(env, MINDROOM_MANAGED_ENV=",".join(sorted(env)))


def imported(call):
    """{KEY: value} a recorded `config:import --no-restart --format json <app> -`
    read on its stdin."""
    argv = call
    assert argv[:4] == CONFIG_IMPORT and len(argv) == 6 and argv[5] == "-", call
    out = json.loads(call.stdin)
    assert isinstance(out, dict) and all(isinstance(v, str) for v in out.values()), out
    return out


# ---- the documented sequences (docs/provisioner.md) ----------------------------

FRESH = {"app": False, "entry": False, "deployed": False, "running": False, "le": False,
         "spec_ok": False}
DONE = {"app": True, "entry": True, "deployed": True, "running": True, "le": True,
        "spec_ok": True}


def app_sequence(app, entry, cdir, uid, mem_, cpu, gb, network, port, domain, image, tls,
                 config, files, st, k3s=None):
    k3s = K3S if k3s is None else k3s
    mem_ = mem(mem_, k3s)
    seq = [["apps:exists", app]]
    if not st["app"]:
        seq.append(["apps:create", app])
    if k3s:
        seq.append(["scheduler:set", app, "selected", "k3s"])
    seq.append(["storage:info", entry])
    if not st["entry"] and k3s:
        seq.append(["storage:create", entry, "--scheduler", "k3s", "--size", "%sGi" % gb,
                    "--access-mode", "ReadWriteOnce", "--reclaim-policy", "Delete",
                    "--storage-class-name", STORAGE_CLASS])
    elif not st["entry"]:
        seq.append(["storage:create", entry, "--chown", str(uid), "--mode", "0700"])
    seq.append(["storage:mount", app, entry, "--container-dir", cdir])
    if gb is not None:
        seq.append(["storage:labels:set", entry, LABEL, str(gb)])
    seq.append(["resource:limit", "--memory", mem_, "--cpu", cpu, app])
    if k3s:
        seq.append(["resource:reserve", "--memory", mem_, "--cpu", cpu, app])
    if network and not k3s:
        seq.append(["network:set", app, "attach-post-create", network])
    seq.append(["ports:set", app] + ports(port, tls, k3s).split())
    if not k3s:
        seq.append(["checks:disable", app])
    if files:   # the homeserver
        seq.append(["nginx:set", app, "client-max-body-size", HS_MAX_UPLOAD])
    if config:
        seq.append(["config:get", app, "MINDROOM_MANAGED_ENV"])
        seq.append(None)
    seq.append(["domains:set", app, domain])
    if tls == "wildcard":
        seq.append(["certs:add", app])
    if k3s and tls == "letsencrypt":
        seq.append(["scheduler-k3s:set", app, "letsencrypt-email-prod", ACME_EMAIL])
    # On k3s MindRoom's entry gets a storage:exec too: it makes the volume's root its own.
    if files or k3s:
        seq.append(["storage:exec", entry] + TAR)
    seq.append(["git:from-image", app, image])
    if st["deployed"]:
        if not st["spec_ok"]:
            seq.append(["ps:rebuild", app])
        else:
            seq.append(["ps:report", app, "--deployed"])
            seq.append(["ps:report", app, "--running"])
            if not st["running"]:
                seq.append(["ps:start", app])
    if tls == "letsencrypt" and not k3s:
        seq.append(["letsencrypt:active", app])
        if not st["le"]:
            seq.append(["letsencrypt:enable", app])
    return seq


def create_sequence(app, subdomain=None, mem="512m", cpu="0.5", gb=5, hs=True, hs_mem="256m",
                    hs_cpu="0.25", hs_gb=3, tls="off", state=None, k3s=None):
    """The commands a create/update runs, config:import left as None (what it
    reads on stdin is checked separately). state: observed() of the
    instance before the request (default: nothing exists). Memory is given in
    docker-local's units and converted for k3s."""
    k3s = K3S if k3s is None else k3s
    sub = ("s" + app[len(PREFIX):]) if subdomain is None else subdomain
    n = names(app)
    st = state or {"hs": FRESH, "mr": FRESH, "net": False}
    seq = []
    if hs:
        if not k3s:
            seq.append(["network:exists", n["net"]])
            if not st["net"]:
                seq.append(["network:create", n["net"]])
        seq += app_sequence(n["hs"], n["hs_data"], "/data", HS_UID, hs_mem, hs_cpu, hs_gb,
                            n["net"], 8008, matrix_host(sub), MATRIX_IMAGE, tls, False, True,
                            st["hs"], k3s)
    seq += app_sequence(app, n["data"], MINDROOM_DIR, MINDROOM_UID, mem, cpu, gb,
                        n["net"] if hs else None, MINDROOM_PORT, "%s.%s" % (sub, DOMAIN), IMAGE,
                        tls, True, False, st["mr"], k3s)
    return seq


def storage_destroy(entry, k3s=None):
    """Destroys an entry with its data: --destroy-host-dir on docker-local; k3s
    entries are created with reclaim policy Delete (the flag is an error there)."""
    k3s = K3S if k3s is None else k3s
    return ["storage:destroy", entry, "--force"] + ([] if k3s else ["--destroy-host-dir"])


def network_teardown(app, exists=True, k3s=None):
    """What destroy runs for the instance's network (nothing on k3s)."""
    k3s = K3S if k3s is None else k3s
    if k3s:
        return []
    net = names(app)["net"]
    return [["network:exists", net]] + ([["--force", "network:destroy", net]] if exists else [])


def destroy_sequence(app, state, purge=False, k3s=None):
    """The commands DELETE /apps/{app}[?purge=true] runs from state (observed())."""
    k3s = K3S if k3s is None else k3s
    n = names(app)
    seq = [["apps:exists", n["app"]], ["apps:exists", n["hs"]]]
    for key, a in (("mr", n["app"]), ("hs", n["hs"])):
        if state[key]["app"]:
            seq.append(["--force", "apps:destroy", a])
    seq += network_teardown(app, state["net"], k3s)
    for key, e in (("mr", n["data"]), ("hs", n["hs_data"])):
        seq.append(["storage:info", e])
        if purge and state[key]["entry"]:
            seq.append(storage_destroy(e, k3s))
    return seq


def subcommand(argv):
    return "config:import" if argv is None else [a for a in argv if not a.startswith("--")][0]


def match(calls, expected):
    """Asserts calls equal expected, where None in expected matches a config:import."""
    assert len(calls) == len(expected), "calls:\n%s\nexpected:\n%s" % (
        "\n".join(map(str, calls)), "\n".join(map(str, expected)))
    for got, want in zip(calls, expected):
        if want is None:
            assert got[:4] == CONFIG_IMPORT and got[5:] == ["-"], got
        else:
            assert got == want, "got %s, wanted %s (all: %s)" % (got, want, calls)


def alive(pid):
    """True when pid is a live (not zombie) process."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return os.path.exists("/proc/%d" % pid)
