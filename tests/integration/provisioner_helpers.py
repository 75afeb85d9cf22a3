"""Shared pieces of the dokku-provisioner tests: the stand-in's directory and
what reached it."""

import base64
import json
import os
import tempfile
from pathlib import Path

import mr

STANDINS = mr.ROOT / "tests" / "standins"
IMAGE = "registry.example.com/mindroom/mindroom@sha256:" + "ab12" * 16
DOMAIN = "mr.test"


class Dokku:
    """The stand-in dokku's directory: calls made, app state, and switches."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="mr-dokku-"))
        self._seen = 0

    def env(self, **extra):
        env = {
            "DOKKU_MODE": "local",
            "DOKKU_BIN": str(STANDINS / "dokku"),
            "DOKKU_STANDIN_DIR": str(self.dir),
            "MINDROOM_IMAGE": IMAGE,
            "MINDROOM_BASE_DOMAIN": DOMAIN,
            "PROVISIONER_STATE_DIR": str(self.dir / "state"),
            "DOKKU_COMMAND_TIMEOUT_MS": "30000",
            "DOKKU_DEPLOY_TIMEOUT_MS": "30000",
            "DOKKU_LOCK_BACKOFF_MS": "20",
        }
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def records(self):
        """Every call's full record: argv, pid, time, fds, env (names)."""
        try:
            lines = (self.dir / "calls.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def all_calls(self):
        return [r["argv"] for r in self.records()]

    def mark(self):
        """Forget the calls so far: new_calls() returns only later ones."""
        self._seen = len(self.all_calls())

    def new_calls(self):
        calls = self.all_calls()[self._seen:]
        self._seen += len(calls)
        return calls

    def tell(self, kind, sub, **spec):
        """kind: fail, lock or stall; spec: times, status, seconds."""
        (self.dir / ("%s-%s.json" % (kind, sub))).write_text(json.dumps(spec))

    def untell(self, kind, sub):
        try:
            (self.dir / ("%s-%s.json" % (kind, sub))).unlink()
        except FileNotFoundError:
            pass

    def app(self, app, name, default=None):
        try:
            return (self.dir / "apps" / app / name).read_text()
        except FileNotFoundError:
            return default

    def config(self, app):
        return json.loads(self.app(app, "config.json", "{}"))

    def exists(self, app):
        return (self.dir / "apps" / app).is_dir()


def decode_config_args(argv):
    """{KEY: decoded value} from a recorded config:set argv."""
    assert argv[:3] == ["config:set", "--no-restart", "--encoded"], argv
    out = {}
    for pair in argv[4:]:
        k, _, v = pair.partition("=")
        out[k] = base64.b64decode(v, validate=True).decode()
    return out


def body(app, subdomain=None, memory_mb=512, cpu=0.5, env=None):
    return {"app": app, "subdomain": ("s" + app) if subdomain is None else subdomain,
            "memory_mb": memory_mb,
            "cpu": cpu, "env": {"MINDROOM_TIER": "starter"} if env is None else env}


def create_sequence(app, subdomain, mem="512m", cpu="0.5", env_argv=True, tls=False):
    """The commands a create of a missing app runs, config:set left as None
    (its arguments are base64 and checked separately)."""
    seq = [["apps:exists", app], ["apps:create", app],
           ["resource:limit", "--memory", mem, "--cpu", cpu, app]]
    if env_argv:
        seq.append(None)
    seq += [["domains:set", app, "%s.%s" % (subdomain, DOMAIN)],
            ["git:from-image", app, IMAGE]]
    if tls:
        seq += [["letsencrypt:active", app], ["letsencrypt:enable", app]]
    return seq


def match(calls, expected):
    """Asserts calls equal expected, where None in expected matches a config:set."""
    assert len(calls) == len(expected), "calls:\n%s\nexpected:\n%s" % (
        "\n".join(map(str, calls)), "\n".join(map(str, expected)))
    for got, want in zip(calls, expected):
        if want is None:
            assert got[:3] == ["config:set", "--no-restart", "--encoded"], got
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
