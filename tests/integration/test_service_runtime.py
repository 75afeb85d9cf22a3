"""The runtime as a service manager runs it: the socket's mode, the read deadline
on every accepted connection, a socket passed by systemd (LISTEN_FDS), readiness
notifications (NOTIFY_SOCKET), journal priorities on log lines (JOURNAL_STREAM),
and --version on every binary.

Most tests run `noop` (tests/bench/noop.c, the smallest libmindroom function; no
database needed) by hand and speak FastCGI to it (fcgi.py); the read deadline is
also shown on the webhook behind nginx, where two stalled local connections used
to hold both of its workers.
"""
import base64
import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest

import fcgi
import mr

BIN = mr.build_dir() / "bin"


# (process, log) of every binary the running test started.
STARTED = []


@pytest.fixture(autouse=True)
def no_sanitizer_report():
    """After each test, whatever it started by hand is stopped, and a sanitizer
    report in its log fails the test (a worker's leak at exit, say: its master
    exits 0 all the same)."""
    yield
    started = STARTED[:]
    STARTED.clear()
    for p, _ in started:
        stop(p)
    mr.assert_no_sanitizer_report(*sorted({log for _, log in started}))


def start(tmp_path, name="noop", env=None, pass_fds=(), argv_prefix=(), log="fn.log"):
    """Starts a binary of the build with a scrubbed environment; stdout and stderr
    to tmp_path/log, read for sanitizer reports after the test."""
    e = {k: os.environ[k] for k in mr.INHERITED_ENV if k in os.environ}
    e.update({"MR_WORKERS": "2", "MR_SOCKET": str(tmp_path / (name + ".sock"))})
    e.update(env or {})
    e = {k: v for k, v in e.items() if v is not None}
    p = mr.start_by_hand(list(argv_prefix) + [str(BIN / name)], e, tmp_path / log,
                         pass_fds=pass_fds, cwd=str(tmp_path), start_new_session=True)
    STARTED.append((p, tmp_path / log))
    return p


def wait_socket(path, p, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, "exited %s" % p.returncode
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s:
                if s.connect_ex(str(path)) == 0:
                    return
        time.sleep(0.02)
    raise AssertionError("no socket at %s" % path)


def stop(p):
    return mr.Stack._terminate(p)


def lines(path):
    return (path).read_text(errors="replace").splitlines()


# ---- the socket ------------------------------------------------------------------

def test_the_socket_is_owner_and_group_only_by_default(tmp_path):
    p = start(tmp_path)
    try:
        sock = tmp_path / "noop.sock"
        wait_socket(sock, p)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        assert fcgi.call(sock)[0] == 200
    finally:
        stop(p)
    # A wider mode is allowed, and said to be a bad idea.
    p = start(tmp_path, env={"MR_SOCKET_MODE": "0666"}, log="wide.log")
    try:
        wait_socket(tmp_path / "noop.sock", p)
        assert stat.S_IMODE(os.stat(tmp_path / "noop.sock").st_mode) == 0o666
        assert any("bypassing nginx's limits" in l for l in lines(tmp_path / "wide.log"))
    finally:
        stop(p)


def test_a_metrics_directory_others_can_write_is_refused(tmp_path):
    # Anyone who could write there could hand mindroom-admin a segment of their own.
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    p = start(tmp_path, env={"MR_METRICS_DIR": str(open_dir)})
    assert p.wait(15) == 2
    assert any("must not be writable by others" in l for l in lines(tmp_path / "fn.log"))
    # Nor through a symlink; a group-shared directory is fine, the segment 0640 in it.
    (tmp_path / "link").symlink_to(tmp_path / "shared")
    (tmp_path / "shared").mkdir()
    os.chmod(tmp_path / "shared", 0o2770)
    p = start(tmp_path, env={"MR_METRICS_DIR": str(tmp_path / "link")}, log="link.log")
    assert p.wait(15) == 2 and any("MR_METRICS_DIR" in l for l in lines(tmp_path / "link.log"))
    p = start(tmp_path, env={"MR_METRICS_DIR": str(tmp_path / "shared")}, log="shared.log")
    try:
        wait_socket(tmp_path / "noop.sock", p)
        seg = tmp_path / "shared/noop.metrics"
        assert stat.S_IMODE(seg.stat().st_mode) == 0o640 and stat.S_ISREG(seg.lstat().st_mode)
    finally:
        assert stop(p) == 0
    assert not (tmp_path / "shared/noop.metrics").exists()   # removed on a clean exit


# ---- the read deadline -------------------------------------------------------------

def closed_by_peer(c):
    """Whether the other end closed the connection (EOF, or a reset: it closed with
    our bytes unread)."""
    try:
        return c.recv(100) == b""
    except ConnectionResetError:
        return True


def stall(path, n):
    """n connections that send BEGIN_REQUEST and then nothing."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(fcgi.begin_request())
        out.append(s)
    return out


def test_stalled_connections_do_not_hold_the_webhooks_workers(pg):
    with mr.Stack(pg, functions=["handle-stripe-webhook"], workers=2,
                  env={"MR_READ_TIMEOUT_MS": "1000"}) as s:
        stalled = stall(s.socket_path("handle-stripe-webhook"), 2)
        try:
            time.sleep(0.3)  # both workers have taken one each
            t0 = time.monotonic()
            r = s.call("POST", "handle-stripe-webhook", body=b"{}", timeout=8)
            elapsed = time.monotonic() - t0
            assert r.status == 400 and r.json["error"]["code"] == "invalid_signature", r
            assert elapsed < 4.0, elapsed
            # Both were dropped by the function, each logged.
            for c in stalled:
                assert closed_by_peer(c)
        finally:
            for c in stalled:
                c.close()
        dropped = [l for l in s.log("handle-stripe-webhook").splitlines()
                   if "dropped a connection: no whole request within 1000 ms" in l]
        assert len(dropped) == 2, s.log_tail("handle-stripe-webhook")
        assert all(json.loads(l)["level"] == "warn" for l in dropped)


def test_a_request_delivered_in_pieces_within_the_deadline_is_served(tmp_path):
    p = start(tmp_path, env={"MR_READ_TIMEOUT_MS": "2000"})
    try:
        sock = tmp_path / "noop.sock"
        wait_socket(sock, p)
        whole = fcgi.request("GET", "/functions/v1/noop")
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(10)
        c.connect(str(sock))
        for i in range(0, len(whole), 40):
            c.sendall(whole[i:i + 40])
            time.sleep(0.05)
        status, _, body = fcgi.read_response(c)
        c.close()
        assert status == 200 and json.loads(body)["ok"] is True
    finally:
        stop(p)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_connection_stopped_mid_request_does_not_make_its_worker_spin(tmp_path):
    """What a connection sent stays readable while the worker only looks at it; the
    worker waits for more without burning the core, and drops it at the deadline."""
    p = start(tmp_path, env={"MR_READ_TIMEOUT_MS": "2000", "MR_WORKERS": "1"})
    try:
        sock = tmp_path / "noop.sock"
        wait_socket(sock, p)
        # The socket listens before the supervisor forks its worker.
        deadline = time.monotonic() + 10
        while not mr.children(p.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        worker, = mr.children(p.pid)
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(10)
        c.connect(str(sock))
        c.sendall(fcgi.request("GET", "/functions/v1/noop")[:40])
        time.sleep(0.2)
        before, t0 = cpu_seconds(worker), time.monotonic()
        time.sleep(1.5)
        used = cpu_seconds(worker) - before
        assert used < 0.3 * (time.monotonic() - t0), used
        assert closed_by_peer(c)   # dropped at the deadline
        c.close()
        assert any("no whole request within 2000 ms" in l for l in lines(tmp_path / "fn.log"))
        assert fcgi.call(sock)[0] == 200
    finally:
        stop(p)


def test_what_is_not_a_fastcgi_request_is_dropped_at_once(tmp_path):
    p = start(tmp_path, env={"MR_READ_TIMEOUT_MS": "5000", "MR_WORKERS": "1"})
    try:
        sock = tmp_path / "noop.sock"
        wait_socket(sock, p)
        for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                     fcgi.record(fcgi.PARAMS, b""),                     # no BEGIN_REQUEST
                     fcgi.begin_request(role=2) + fcgi.params({})):     # not a responder
            c = socket.socket(socket.AF_UNIX)
            c.settimeout(10)
            c.connect(str(sock))
            c.sendall(junk)
            t0 = time.monotonic()
            assert closed_by_peer(c)
            assert time.monotonic() - t0 < 1.0
            c.close()
        # The one worker is free for a real request.
        assert fcgi.call(sock)[0] == 200
        assert sum("not a FastCGI responder request" in l for l in lines(tmp_path / "fn.log")) == 3
    finally:
        stop(p)


# ---- socket activation ---------------------------------------------------------------

def activated(tmp_path, listener, env=None, pid_of_child=True, nfds="1"):
    """Starts noop as systemd would: the listening socket as fd 3, LISTEN_PID (the
    child's own pid, or another) and LISTEN_FDS."""
    script = ('exec 3<&"$1"; %sLISTEN_FDS=%s exec "$2"' %
              ("LISTEN_PID=$$ " if pid_of_child else "LISTEN_PID=1 ", nfds))
    fd = listener.fileno()
    e = {"MR_SOCKET": str(tmp_path / "own.sock")}
    e.update(env or {})
    return start(tmp_path, env=e, pass_fds=(fd,), argv_prefix=("/bin/bash", "-c", script, "sh", str(fd)))


def test_a_socket_passed_by_systemd_is_served_and_left_in_place(tmp_path):
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(16)
    os.chmod(path, 0o660)
    p = activated(tmp_path, listener)
    listener.close()  # the child holds it now, as systemd would
    try:
        deadline = time.monotonic() + 10
        while not any("from systemd" in l for l in lines(tmp_path / "fn.log")):
            assert p.poll() is None and time.monotonic() < deadline, lines(tmp_path / "fn.log")
            time.sleep(0.02)
        for _ in range(4):
            status, _, body = fcgi.call(path)
            assert status == 200 and json.loads(body)["ok"] is True
        assert not (tmp_path / "own.sock").exists()        # MR_SOCKET was not bound
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660  # the unit's mode, untouched
    finally:
        assert stop(p) == 0
    assert path.exists()  # the socket is systemd's: a stopping function leaves it


def test_listen_variables_for_another_process_are_ignored_and_bad_ones_refused(tmp_path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "a.sock"))
    listener.listen(1)
    p = activated(tmp_path, listener, pid_of_child=False)   # LISTEN_PID of another process
    try:
        wait_socket(tmp_path / "own.sock", p)                # binds its own, as without systemd
    finally:
        stop(p)
    p = activated(tmp_path, listener, nfds="2")
    assert p.wait(10) == 2
    assert any("exactly one socket must be passed" in l for l in lines(tmp_path / "fn.log"))
    listener.close()


# ---- readiness notification ------------------------------------------------------------

def notify_socket(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(15)
    return s


def test_ready_and_stopping_are_notified(tmp_path):
    n = notify_socket(tmp_path)
    p = start(tmp_path, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        assert n.recv(4096) == b"READY=1"
        # By then the socket accepts: a Type=notify unit is up when READY comes.
        assert fcgi.call(tmp_path / "noop.sock")[0] == 200
        p.send_signal(signal.SIGTERM)
        assert n.recv(4096) == b"STOPPING=1"
        assert p.wait(15) == 0
    finally:
        stop(p)
        n.close()


def lifecycle_env(tmp_path, **more):
    """The lifecycle worker's settings, with a database it never reaches."""
    e = {"MR_LIFECYCLE_WORKERS": "1", "DATABASE_URL": "host=%s dbname=none" % tmp_path,
         "MR_SOCKET": None, "DOKKU_PROVISIONER_TOKEN": "t" * 32,
         "MR_LIFECYCLE_STOP_GRACE_MS": "500",
         "MINDROOM_SECRETS_KEY": base64.b64encode(b"k" * 32).decode(),
         "MINDROOM_CONTROL_PLANE_URL": "https://api.mindroom.test"}
    e.update(more)
    return e


def test_the_lifecycle_worker_notifies_too(tmp_path):
    n = notify_socket(tmp_path)
    p = start(tmp_path, name="mindroom-lifecycle",
              env=lifecycle_env(tmp_path, NOTIFY_SOCKET=str(tmp_path / "notify")))
    try:
        assert n.recv(4096) == b"READY=1"
        p.send_signal(signal.SIGTERM)
        assert n.recv(4096) == b"STOPPING=1"
        assert p.wait(15) == 0
    finally:
        stop(p)
        n.close()


# ---- a stop at start-up -------------------------------------------------------------------

def stop_as_soon_as(p, path):
    """SIGTERMs p the moment path exists (a busy wait: the moment is the point) and
    returns its exit status."""
    deadline = time.monotonic() + 15
    while not os.path.exists(path):
        assert p.poll() is None, "exited %s" % p.returncode
        assert time.monotonic() < deadline, "no %s" % path
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(15)
    except subprocess.TimeoutExpired:
        raise AssertionError("still running 15 s after SIGTERM: the stop was lost")


def test_a_stop_as_soon_as_the_socket_is_there_is_taken(tmp_path):
    # systemd or an operator may stop a function the moment it is up: it drains and
    # exits 0, taking its socket and metrics segment with it, and never runs on
    # until killed.
    (tmp_path / "metrics").mkdir(mode=0o750)
    for i in range(10):
        log = "fn%d.log" % i
        p = start(tmp_path, env={"MR_METRICS_DIR": str(tmp_path / "metrics")}, log=log)
        assert stop_as_soon_as(p, tmp_path / "noop.sock") == 0
        assert any('"stopped"' in l for l in lines(tmp_path / log))
        assert not (tmp_path / "noop.sock").exists()
        assert list((tmp_path / "metrics").iterdir()) == []


def test_a_stop_as_soon_as_the_lifecycle_worker_has_its_segment_is_taken(tmp_path):
    (tmp_path / "metrics").mkdir(mode=0o750)
    seg = tmp_path / "metrics/mindroom-lifecycle.metrics"
    for i in range(10):
        p = start(tmp_path, name="mindroom-lifecycle", log="lc%d.log" % i,
                  env=lifecycle_env(tmp_path, MR_METRICS_DIR=str(tmp_path / "metrics")))
        assert stop_as_soon_as(p, seg) == 0
        assert not seg.exists()


# ---- logs in the journal -------------------------------------------------------------------

def journal_stream(path):
    st = os.stat(path)
    return "%d:%d" % (st.st_dev, st.st_ino)


def test_lines_carry_the_syslog_priority_when_stderr_is_the_journal(tmp_path):
    log = tmp_path / "fn.log"
    log.touch()
    # The warning (a wide socket mode) and info lines, as journald would receive them.
    p = start(tmp_path, env={"JOURNAL_STREAM": journal_stream(log), "MR_SOCKET_MODE": "0666"})
    try:
        wait_socket(tmp_path / "noop.sock", p)
        fcgi.call(tmp_path / "noop.sock")
    finally:
        stop(p)
    got = lines(log)
    assert got and all(l[:3] in ("<3>", "<4>", "<6>", "<7>") for l in got), got
    by_prefix = {l[:3]: json.loads(l[3:]) for l in got}
    assert by_prefix["<4>"]["level"] == "warn" and by_prefix["<6>"]["level"] == "info"
    assert any(json.loads(l[3:]).get("msg") == "request" for l in got if l.startswith("<6>"))
    # An error: the socket's directory does not exist.
    err = tmp_path / "err.log"
    err.touch()
    p = start(tmp_path, env={"JOURNAL_STREAM": journal_stream(err),
                             "MR_SOCKET": str(tmp_path / "missing/dir/x.sock")}, log="err.log")
    assert p.wait(15) == 1
    e = [l for l in lines(err) if l.startswith("<3>")]
    assert e and json.loads(e[0][3:])["level"] == "error" and "cannot listen" in e[0], lines(err)


def test_lines_are_plain_json_when_stderr_is_not_the_journal(tmp_path):
    log = tmp_path / "fn.log"
    log.touch()
    other = tmp_path / "other"
    other.touch()
    p = start(tmp_path, env={"JOURNAL_STREAM": journal_stream(other)})   # someone else's stream
    try:
        wait_socket(tmp_path / "noop.sock", p)
    finally:
        stop(p)
    got = lines(log)
    assert got and all(json.loads(l)["function"] == "noop" for l in got), got


# ---- --version --------------------------------------------------------------------------------

def built_version():
    return (mr.build_dir() / "version.stamp").read_text().split()[0]


def test_every_binary_prints_its_version():
    names = sorted(p.name for p in BIN.iterdir() if os.access(p, os.X_OK) and p.name != "bare")
    assert {"handle-stripe-webhook", "mindroom-admin", "mindroom-lifecycle", "dokku-provisioner",
            "mr-jwt", "mr-pgservice", "mr-secrets"} <= set(names)
    for n in names:
        r = subprocess.run([str(BIN / n), "--version"], capture_output=True, text=True, timeout=10,
                           env={"PATH": "/usr/bin:/bin"})
        assert r.returncode == 0 and r.stdout == "%s %s\n" % (n, built_version()), (n, r)
