#!/usr/bin/python3
"""Runs as root inside the Debian 12 container of packaging/package-test.sh once it
has booted with systemd and mindroom.target and the provisioner are started: the
services answer through their sockets, in the sandbox their units give them.

    package-boot-check.py FCGI_DIR VERSION

FCGI_DIR holds tests/integration/fcgi.py (the tests' FastCGI client). Checks that
nginx's user (www-data, in group mindroom-web) reaches every function and nobody
else does; that mindroom-admin's /ready and /metrics see every process (the
provisioner's counters too, written through its supplementary group); that
restarting a function and the whole target loses no request (the sockets stay);
and that no unit logged an error."""
import collections
import json
import os
import pwd
import subprocess
import sys
import threading
import time

sys.path.insert(0, sys.argv[1])
import fcgi  # noqa: E402

VERSION = sys.argv[2]
FUNCTIONS = sorted(os.listdir("/usr/lib/mindroom/functions"))
PROCESSES = set(FUNCTIONS) | {"dokku-provisioner", "mindroom-lifecycle"}


def fail(msg):
    print("package-boot-check: FAIL: %s" % msg, file=sys.stderr)
    sys.exit(1)


def ok(msg):
    print("package-boot-check: ok: %s" % msg, file=sys.stderr)


def as_user(name, fn):
    """fn() in a child running as user name (with its groups); returns its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            pw = pwd.getpwnam(name)
            os.setgroups(os.getgrouplist(name, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            out = json.dumps(fn())
        except Exception as e:  # reported to the parent
            out = json.dumps({"exception": repr(e)})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.waitpid(pid, 0)
    return json.loads(data)


def call(sock, uri):
    status, _, body = fcgi.call("/run/mindroom/%s.sock" % sock, uri=uri, timeout=30)
    return status, body.decode()


def refused():
    try:
        call("list-plans", "/functions/v1/list-plans")
        return "connected"
    except PermissionError:
        return "refused"


if as_user("nobody", refused) != "refused":
    fail("user nobody reached a function's socket")
ok("a user outside mindroom-web is refused by the sockets")


def reach_all():
    return {fn: call(fn, "/functions/v1/%s/none" % fn)[0] for fn in FUNCTIONS + ["dokku-provisioner"]} | \
        {"plans": call("list-plans", "/functions/v1/list-plans")}


got = as_user("www-data", reach_all)
if "exception" in got or got["plans"][0] != 200 or not json.loads(got["plans"][1])["plans"]:
    fail("list-plans: %r" % got)
bad = {fn: s for fn, s in got.items() if fn != "plans" and not 200 <= s < 600}
if bad:
    fail("answers: %r" % bad)
ok("www-data reaches every function: %s" % ", ".join(sorted(k for k in got if k != "plans")))

status, body = call("mindroom-admin", "/ready")
ready = json.loads(body)
if status != 200 or set(ready["checks"]["functions"]) != PROCESSES or \
        set(ready["checks"]["functions"].values()) != {"running"}:
    fail("/ready answered %s: %s" % (status, body))
status, text = call("mindroom-admin", "/metrics")
for name in sorted(PROCESSES):
    if 'mindroom_build_info{function="%s",version="%s"} 1' % (name, VERSION) not in text:
        fail("/metrics lacks %s's build_info:\n%s" % (name, text[:3000]))
if "mindroom_database_up 1" not in text:
    fail("/metrics: the database is not up")
ok("/ready is 200; /metrics has every process, the provisioner's counters included")


def load(seconds):
    def run():
        out, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                out.append(call("list-plans", "/functions/v1/list-plans")[0])
            except OSError as e:
                out.append(type(e).__name__)
        return collections.Counter(out)
    return run


box = {}
t = threading.Thread(target=lambda: box.update(counts=as_user("www-data", load(8))))
t.start()
time.sleep(1)
for unit in ("mindroom-function@list-plans.service", "mindroom-function@list-plans.service",
             "mindroom.target"):
    subprocess.run(["systemctl", "restart", unit], check=True)
    time.sleep(0.5)
t.join()
counts = box["counts"]
if set(counts) != {"200"} or counts["200"] < 20:
    fail("requests while restarting: %r" % counts)
ok("%d requests while list-plans and mindroom.target restarted: all 200" % counts["200"])

errors = subprocess.run(["journalctl", "--no-pager", "-o", "cat", "-p", "err", "-u", "mindroom-*"],
                        capture_output=True, text=True).stdout.strip()
if errors and errors != "-- No entries --":
    fail("errors in the journal:\n%s" % errors)
ok("no mindroom unit logged an error")
