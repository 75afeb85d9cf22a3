"""Integration-test harness: real PostgreSQL, real nginx, the real function binaries.

    pg                      session fixture (conftest.py): a throwaway cluster whose
                            database `mindroom_template` is migrated and seeded.
    with mr.Stack(pg, env={...}) as s:
        s.call("POST", "provision-instance", json={...}, token=s.jwt())
        s.sql("select status from instances where id = %s", iid)

A Stack clones the template into a fresh database, renders nginx/dev.conf into a
temporary run directory with free ports, starts every function binary found in
$MR_BUILD/bin (default build/san/bin) on unix sockets there, then nginx, and
waits until each answers. On exit it stops everything, fails if a sanitizer
reported anything in a function's log, and drops the database. A binary a test
runs by hand goes through start_by_hand and assert_no_sanitizer_report, for the
same check. Function logs
are in <run>/log/<name>.log; a failing test prints their tails (conftest.py).

Stripe signatures and JWTs are computed here in Python (hmac), independently of
libmindroom, so the tests check the C code against a second implementation.
"""

import atexit
import base64
import hashlib
import hmac
from http import client as httpclient
import json as jsonlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = (
    "handle-stripe-webhook",
    "provision-instance",
    "deprovision-instance",
    "check-instance-health",
    "dokku-provisioner",
    "create-checkout-session",
    "create-portal-session",
    "list-plans",
    "track-usage",
    "my-instance",
    "mindroom-admin",
    "mindroom-lifecycle",
)
# Processes that serve no socket: started and stopped like the functions, ready
# once they have their worker processes.
DAEMONS = ("mindroom-lifecycle",)
TEMPLATE_DB = "mindroom_template"
# Environment variables a function inherits from the test process; everything
# else it sees comes from Stack.env, so a developer's shell cannot leak in.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR",
                 "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS")
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                   "runtime error:", "ERROR: UndefinedBehaviorSanitizer")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

# Stacks currently running, so conftest.py can print their logs when a test fails.
LIVE_STACKS = []
# Functions that never open a database connection, and whether the running test
# module says its stacks start only those (conftest.py: the database_free marker).
DATABASE_FREE_FUNCTIONS = frozenset({"dokku-provisioner"})
DATABASE_FREE_MODULE = False


def build_dir():
    """The build whose binaries the stacks run: $MR_BUILD, default build/san."""
    return (ROOT / os.environ.get("MR_BUILD", "build/san")).resolve()


def scratch_dir(prefix):
    """A private directory under the system's temporary directory, removed when the
    test session's process exits (a stack or provisioner using it has stopped by then)."""
    d = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, d, True)
    return d


def free_ports(n):
    """n distinct TCP ports that were free a moment ago on 127.0.0.1 (callers
    retry on a race). They are held together while chosen: ports picked one at a
    time may repeat, and two listeners on one port make nginx serve one's
    requests with the other's server block."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port():
    """A TCP port that was free a moment ago on 127.0.0.1 (callers retry on a race)."""
    return free_ports(1)[0]


def wait_port(port, timeout=START_TIMEOUT):
    """Waits until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError("nothing listening on 127.0.0.1:%d after %ss" % (port, timeout))


def start_nginx(render, n, prefix, errlog, stderr_log):
    """nginx on n fresh ports: render(ports) writes its config and returns the
    path. Ports are picked free and then bound by nginx, so another process may
    win one: that start is retried with fresh ports. Returns (process, ports)
    once every port accepts connections."""
    last = ""
    for _ in range(5):
        ports = free_ports(n)
        conf = render(ports)
        p = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(errlog)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=open(stderr_log, "ab"), start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and p.poll() is None:
            if all(Stack._port_open(port) for port in ports):
                return p, ports
            time.sleep(0.02)
        Stack._terminate(p)
        last = "".join(Path(f).read_text(errors="replace") for f in (errlog, stderr_log)
                       if Path(f).exists())
        if "Address already in use" not in last:
            break
    raise RuntimeError("nginx did not start:\n" + last)


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(payload, secret, header=None):
    """An HS256 JWT of `payload` (dict) signed with `secret` (str or bytes).
    `header` replaces {"alg":"HS256","typ":"JWT"} (e.g. to forge alg none)."""
    if isinstance(secret, str):
        secret = secret.encode()
    h = header if header is not None else {"alg": "HS256", "typ": "JWT"}
    signing_input = (_b64url(jsonlib.dumps(h, separators=(",", ":")).encode()) + "." +
                     _b64url(jsonlib.dumps(payload, separators=(",", ":")).encode()))
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64url(sig)


def stripe_sign(payload, secret, t=None):
    """The Stripe-Signature header value for raw `payload` bytes with `secret`
    ("whsec_..."), as Stripe computes it: HMAC-SHA256 over "<t>.<payload>"."""
    if isinstance(payload, str):
        payload = payload.encode()
    t = int(time.time()) if t is None else int(t)
    mac = hmac.new(secret.encode(), str(t).encode() + b"." + payload, hashlib.sha256)
    return "t=%d,v1=%s" % (t, mac.hexdigest())


class Response:
    """An HTTP answer: status (int), headers (case-insensitive .get), text, json
    (the parsed body, or None when it is not JSON), body (raw bytes)."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body
        self.text = body.decode("utf-8", "replace")
        try:
            self.json = jsonlib.loads(self.text) if self.text else None
        except ValueError:
            self.json = None

    def __repr__(self):
        return "<Response %d %s>" % (self.status, self.text[:300])


def http(method, url, json=None, body=None, headers=None, token=None, timeout=60, source=None):
    """One HTTP/1.1 request on a fresh connection; never raises on an HTTP status.
    json= sends it encoded with Content-Type application/json; body= sends raw
    bytes/str as is; token= adds "Authorization: Bearer <token>"; source= is the
    local address to send from (e.g. "127.0.0.2", another loopback address)."""
    u = urllib.parse.urlsplit(url)
    hdrs = dict(headers or {})
    if json is not None:
        body = jsonlib.dumps(json).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if isinstance(body, str):
        body = body.encode()
    if token is not None:
        hdrs["Authorization"] = "Bearer " + token
    conn = httpclient.HTTPConnection(u.hostname, u.port, timeout=timeout,
                                     source_address=(source, 0) if source else None)
    try:
        path = u.path + ("?" + u.query if u.query else "")
        conn.request(method, path or "/", body=body, headers=hdrs)
        r = conn.getresponse()
        return Response(r.status, r.headers, r.read())
    finally:
        conn.close()


class Cluster:
    """The session's PostgreSQL cluster (scripts/pg.sh in a temporary directory,
    unix socket only). The `pg` fixture yields one."""

    def __init__(self, fsync=False):
        self.dir = Path(tempfile.mkdtemp(prefix="mr-pg-"))
        out = _run([str(ROOT / "scripts/pg.sh"), "init", str(self.dir)],
                   env=dict(os.environ, PG_FSYNC="on" if fsync else "off"))
        self.base_conninfo = out.strip().splitlines()[-1]
        kv = dict(p.split("=", 1) for p in self.base_conninfo.split())
        self.host, self.port = kv["host"], kv["port"]

    def conninfo(self, dbname="mindroom", user="postgres"):
        return "host=%s port=%s dbname=%s user=%s" % (self.host, self.port, dbname, user)

    def sql(self, query, *params, dbname="mindroom"):
        """Runs one statement as the superuser in autocommit; returns all rows (or [])."""
        conn = psycopg2.connect(self.conninfo(dbname))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(query, params or None)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def make_template(self):
        """Creates mindroom_template: every migration (scripts/migrate.sh) and the seed."""
        self.sql("DROP DATABASE IF EXISTS %s" % TEMPLATE_DB)
        self.sql("CREATE DATABASE %s" % TEMPLATE_DB)
        conn = self.conninfo(TEMPLATE_DB)
        migrate = ROOT / "scripts/migrate.sh"
        if migrate.exists():
            _run([str(migrate), conn])
        else:
            print("mr.py: scripts/migrate.sh not found, template database left empty")
        seed = ROOT / "sql/seed.sql"
        if seed.exists():
            _run(["psql", conn, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(seed)])

    def has_role(self, role):
        return bool(self.sql("SELECT 1 FROM pg_roles WHERE rolname = %s", role))

    def stop(self):
        _run([str(ROOT / "scripts/pg.sh"), "stop", str(self.dir)])

    def start(self):
        _run([str(ROOT / "scripts/pg.sh"), "start", str(self.dir)])

    def destroy(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Pooler:
    """PgBouncer in transaction mode in front of a Cluster, on a unix socket in
    the cluster's directory: the stand-in for Supavisor's transaction mode (port
    6543). Functions and workers reach PostgreSQL through it when
    MR_TEST_POOLER=transaction; LISTEN and the tests' own SQL stay direct."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.dir = cluster.dir / "pgbouncer"
        self.dir.mkdir()
        self.port = free_port()
        (self.dir / "userlist.txt").write_text('"postgres" ""\n"authenticator" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n* = host=%s port=%s\n\n[pgbouncer]\n"
            "listen_addr =\nlisten_port = %d\nunix_socket_dir = %s\n"
            "auth_type = trust\nauth_file = %s\npool_mode = transaction\n"
            "max_client_conn = 2000\ndefault_pool_size = 40\nmax_db_connections = 150\n"
            "server_reset_query =\nignore_startup_parameters = extra_float_digits\n"
            # As a managed pooler does: a dead server connection (PostgreSQL
            # restarted) is replaced before a client gets it, and a client waits
            # for a server at most a few seconds while PostgreSQL is down.
            "server_check_delay = 0\nserver_check_query = select 1\nquery_wait_timeout = 10\n"
            "server_login_retry = 1\n"
            "logfile = %s\npidfile = %s\n" % (
                cluster.host, cluster.port, self.port, self.dir, self.dir / "userlist.txt",
                self.dir / "pgbouncer.log", self.dir / "pgbouncer.pid"))
        owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        _run(owner + ["pgbouncer", "-d", str(self.dir / "pgbouncer.ini")])
        deadline = time.monotonic() + START_TIMEOUT
        sock = self.dir / (".s.PGSQL.%d" % self.port)
        while not sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("pgbouncer did not start:\n" + self.log())
            time.sleep(0.05)

    def conninfo(self, dbname, user="authenticator"):
        return "host=%s port=%d dbname=%s user=%s" % (self.dir, self.port, dbname, user)

    def log(self):
        try:
            return (self.dir / "pgbouncer.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self):
        try:
            pid = int((self.dir / "pgbouncer.pid").read_text())
            os.kill(pid, signal.SIGTERM)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            pass


def whole_lines(path, settle=5.0):
    """A file another process appends lines to, read whole: "" before it exists. A
    line appended in one write(2) (a log line, a stand-in's record) can be read half
    done by a concurrent read, so while the file does not end with a whole line it
    is read again, for up to `settle` seconds; what is there then is returned as it
    is (a writer that left a half line for that long is broken, and the reader's
    parse says so)."""
    deadline = time.monotonic() + settle
    while True:
        try:
            text = Path(path).read_text(errors="replace")
        except FileNotFoundError:
            return ""
        if not text or text.endswith("\n") or time.monotonic() > deadline:
            return text
        time.sleep(0.005)


# Prometheus text format (GET /metrics on mindroom-admin).
METRIC_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
METRIC_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_samples(text):
    """[(name, {labels}, value)] of every sample line."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_SAMPLE.match(line)
        assert m, "not a sample line: %r" % line
        out.append((m.group(1), dict(METRIC_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def metric_value(text, name, **labels):
    """The sample of name with exactly these labels, or 0 when there is none."""
    hits = [v for n, l, v in metric_samples(text) if n == name and l == labels]
    assert len(hits) <= 1, (name, labels, hits)
    return hits[0] if hits else 0.0


def _run(argv, env=None, timeout=300):
    p = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError("%s exited %d:\n%s%s" % (" ".join(argv), p.returncode, p.stdout, p.stderr))
    return p.stdout


def children(pid):
    """Pids whose parent is pid (the workers of a function's master process)."""
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (ppid) comes after the parenthesised command, which may hold spaces.
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            kids.append(int(d))
    return sorted(kids)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _sanitizer_report(text):
    return any(m in text for m in SANITIZER_MARKS)


def start_by_hand(argv, env, log, **popen):
    """Starts a process outside any Stack (a binary of the build a test runs itself)
    with its stdout and stderr appended to the file log, for
    assert_no_sanitizer_report once it has exited. A file, never a pipe: a pipe
    nobody reads hides a sanitizer report (and blocks the writer once full)."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, **popen)


def assert_no_sanitizer_report(*logs):
    """Fails when the log of a process started by hand (start_by_hand) holds a
    sanitizer report, as a Stack fails for its functions' logs: a worker's leak,
    overflow or undefined behaviour is reported on stderr, and its master respawns
    it (or, stopping, exits 0) all the same. Call once the processes have exited
    (LeakSanitizer reports at exit)."""
    for log in logs:
        try:
            text = Path(log).read_text(errors="replace")
        except FileNotFoundError:
            continue
        if _sanitizer_report(text):
            raise AssertionError("sanitizer report in %s:\n%s" % (log, text[-6000:]))


class Stack:
    """A whole stack for one test module: database, functions, nginx.

    Attributes: env (dict, the functions' environment), run (Path), port,
    provisioner_port and admin_port (nginx), provisioner_url, admin_url, base_url,
    db (database name),
    procs (name -> Popen of each running function's master), functions (names
    started). Extra env given to the constructor wins over the defaults; a
    value of None removes a default (e.g. {"DOKKU_PROVISIONER_TOKEN": None}).
    functions= limits which of FUNCTIONS start (default: every one built);
    extra_functions= names more binaries from the build (e.g. "noop", the
    runtime's test function) served at /functions/v1/<name> too;
    nginx_extra= is nginx text added inside the public server block (@RUN@ and
    @ROOT@ replaced). db= names an existing database to share (another stack's:
    two complete stacks on one database); it is then neither created nor dropped.
    trusted_proxies= lists the addresses nginx believes X-Forwarded-For from
    (set_real_ip_from; default none, as `make run`). test_target=False: never
    registers a provisioner target for MR_TEST_TARGET (_register_test_target).
    wrappers= maps a function's name to the argv its binary is started under
    (e.g. a private mount namespace); the wrapper must exec the binary, keeping
    its pid.

    The lifecycle worker (mindroom-lifecycle) runs in every stack that starts it;
    its periodic health round is set to once a day unless env says otherwise, so
    that stand-in instances are probed only when a test asks for it.
    """

    def __init__(self, pg, env=None, functions=None, workers=2, extra_functions=(),
                 nginx_extra="", db=None, trusted_proxies=(), test_target=True, wrappers=None):
        self.pg = pg
        self.run = Path(tempfile.mkdtemp(prefix="mr-stack-"))
        self.own_db = db is None
        self.db = db or "mr_" + secrets.token_hex(6)
        self.bin = build_dir() / "bin"
        wanted = functions if functions is not None else FUNCTIONS
        self.functions = [f for f in wanted if os.access(self.bin / f, os.X_OK)]
        for f in extra_functions:
            if not os.access(self.bin / f, os.X_OK):
                raise RuntimeError("%s not built in %s" % (f, self.bin))
        self.extra_functions = list(extra_functions)
        self.functions += self.extra_functions
        if DATABASE_FREE_MODULE and set(self.functions) - DATABASE_FREE_FUNCTIONS:
            raise RuntimeError("a database_free test module starts %s, which connect to PostgreSQL"
                               % sorted(set(self.functions) - DATABASE_FREE_FUNCTIONS))
        self.procs = {}
        self.nginx = None
        self.port = self.provisioner_port = self.admin_port = None
        self._nginx_extra = nginx_extra
        self.trusted_proxies = tuple(trusted_proxies)
        self._extra_env = dict(env or {})
        self._workers = workers
        self._test_target = test_target
        self._wrappers = dict(wrappers or {})
        self.env = {}

    # ---- lifecycle -------------------------------------------------------

    def __enter__(self):
        LIVE_STACKS.append(self)
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self):
        for d in ("sock", "log", "nginx", "conf.d", "metrics"):
            (self.run / d).mkdir()
        if self.own_db:
            self.pg.sql('CREATE DATABASE "%s" TEMPLATE %s' % (self.db, TEMPLATE_DB))
        (self.run / "conf.d/extra-functions.conf").write_text("".join(
            self.extra_location(f) for f in self.extra_functions) +
            self._nginx_extra.replace("@RUN@", str(self.run)).replace("@ROOT@", str(ROOT)))
        self._start_nginx()
        user = "authenticator" if self.pg.has_role("authenticator") else "postgres"
        pooler = getattr(self.pg, "pooler", None)
        self.env = {
            "DATABASE_URL": self.pg.conninfo(self.db, user),
            "SUPABASE_URL": self.base_url,
            "SUPABASE_JWT_SECRET": secrets.token_urlsafe(40),
            "STRIPE_WEBHOOK_SECRET": "whsec_" + secrets.token_hex(24),
            "DOKKU_PROVISIONER_URL": self.provisioner_url,
            "DOKKU_PROVISIONER_TOKEN": secrets.token_urlsafe(32),
            "MINDROOM_SECRETS_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
            "PROVISIONER_STATE_DIR": str(self.run / "provisioner"),
            "MR_LIFECYCLE_WORKERS": "2",
            "HEALTH_INTERVAL_S": "86400",
            "MR_LOG_LEVEL": "info",
            # What instances are told to report usage to: this stack's nginx.
            "MINDROOM_CONTROL_PLANE_URL": self.base_url,
            "MR_METRICS_DIR": str(self.run / "metrics"),
        }
        # workers=None: each function's own default, as `make run` leaves it.
        if self._workers is not None:
            self.env["MR_WORKERS"] = str(self._workers)
        if pooler is not None:
            # Through PgBouncer in transaction mode, as through Supavisor on 6543;
            # LISTEN needs a session, so the worker listens on the direct URL.
            self.env.update(DATABASE_URL=pooler.conninfo(self.db, user),
                            DATABASE_POOLER="transaction",
                            DATABASE_LISTEN_URL=self.pg.conninfo(self.db, user))
        self.env.update(self._extra_env)
        self._register_test_target()
        for name in self.functions:
            self._start_function(name)
        for name in self.functions:
            self._wait_function(name)

    def _register_test_target(self):
        """With MR_TEST_TARGET=k3s or docker-local (scripts/test.sh's k3s suite), a
        stack that runs the lifecycle worker on its own database registers its
        DOKKU_PROVISIONER_URL as a provisioner target of that scheduler before
        anything starts: every instance is placed there and the worker reaches the
        provisioner through the target's row (targets.c) and its token reference
        (env:MR_TEST_TARGET_TOKEN, DOKKU_PROVISIONER_TOKEN's value), never through
        DOKKU_PROVISIONER_URL, which is then a closed port. Room and slots are
        unlimited in effect, so the target changes nothing else a test sees.
        test_target=False opts a stack out."""
        scheduler = os.environ.get("MR_TEST_TARGET")
        if not scheduler or not self._test_target or not self.own_db:
            return
        assert scheduler in ("docker-local", "k3s"), scheduler
        if "mindroom-lifecycle" not in self.functions or not self.env.get("DOKKU_PROVISIONER_TOKEN"):
            return
        self.env["MR_TEST_TARGET_TOKEN"] = self.env["DOKKU_PROVISIONER_TOKEN"]
        self.pg.sql("INSERT INTO public.provisioner_targets (name, url, token_ref, scheduler, "
                    "capacity_mb, max_in_flight) VALUES ('test-target', %s, "
                    "'env:MR_TEST_TARGET_TOKEN', %s, 2000000000, 10000)",
                    self.env["DOKKU_PROVISIONER_URL"], scheduler, dbname=self.db)
        # Only the worker reads DOKKU_PROVISIONER_URL: pointed at a closed port, any
        # call that did not go through the target fails the test that made it.
        self.env["DOKKU_PROVISIONER_URL"] = "http://127.0.0.1:9"

    def __exit__(self, exc_type, exc, tb):
        try:
            self.close()
        finally:
            if self in LIVE_STACKS:
                LIVE_STACKS.remove(self)
        return False

    def close(self):
        """Stops functions (SIGTERM, then SIGKILL after STOP_TIMEOUT) and nginx,
        drops the database, removes the run directory. Raises if a function's
        log holds a sanitizer report (the run directory is then kept)."""
        for name in list(self.procs):
            self._stop_function(name)
        if self.nginx is not None:
            self._terminate(self.nginx)
            self.nginx = None
        if self.own_db:
            try:
                self.pg.sql('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % self.db)
            except Exception as e:  # the cluster may be stopped by a failed drill
                print("mr.py: could not drop %s: %s" % (self.db, e))
        bad = [n for n in self.functions if _sanitizer_report(self.log(n))]
        if bad:
            raise AssertionError("sanitizer report in %s (logs kept in %s):\n%s" % (
                ", ".join(bad), self.run, "\n".join(self.log_tail(n, 80) for n in bad)))
        shutil.rmtree(self.run, ignore_errors=True)

    # ---- nginx -----------------------------------------------------------

    def render_nginx(self, public_listen, provisioner_listen, admin_listen):
        """nginx/dev.conf with this stack's paths and listeners."""
        text = (ROOT / "nginx/dev.conf").read_text()
        user = "user root root;" if os.geteuid() == 0 else "# user: the current one"
        proxies = getattr(self, "trusted_proxies", ())
        real_ip = "".join("set_real_ip_from %s;" % p for p in proxies) or "# no trusted proxies"
        for k, v in (("@ROOT@", str(ROOT)), ("@RUN@", str(self.run)),
                     ("@PUBLIC_LISTEN@", public_listen),
                     ("@PROVISIONER_LISTEN@", provisioner_listen),
                     ("@ADMIN_LISTEN@", admin_listen), ("@USER@", user),
                     ("@REAL_IP_FROM@", real_ip)):
            text = text.replace(k, v)
        return text

    def extra_location(self, name):
        """An nginx location serving binary `name` at /functions/v1/<name>."""
        return ("location = /functions/v1/%(n)s {\n"
                "    fastcgi_pass unix:%(run)s/sock/%(n)s.sock;\n"
                "    include %(root)s/nginx/fastcgi.conf;\n"
                "    fastcgi_param SCRIPT_NAME /functions/v1/%(n)s;\n"
                "    fastcgi_param PATH_INFO \"\";\n"
                "}\n") % {"n": name, "run": self.run, "root": ROOT}

    def _start_nginx(self):
        def render(ports):
            self.port, self.provisioner_port, self.admin_port = ports
            conf = self.run / "nginx.conf"
            conf.write_text(self.render_nginx(*("127.0.0.1:%d" % p for p in ports)))
            return conf
        self.nginx, _ = start_nginx(render, 3, self.run / "nginx", self.run / "log/nginx.error.log",
                                    self.run / "log/nginx.stderr.log")

    @staticmethod
    def _port_open(port):
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    @property
    def base_url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def provisioner_url(self):
        return "http://127.0.0.1:%d" % self.provisioner_port

    @property
    def admin_url(self):
        return "http://127.0.0.1:%d" % self.admin_port

    # ---- functions -------------------------------------------------------

    def socket_path(self, name):
        return self.run / "sock" / (name + ".sock")

    def _function_env(self, name):
        env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        env.update(self.env)
        env["MR_SOCKET"] = str(self.socket_path(name))
        return {k: str(v) for k, v in env.items() if v is not None}

    def _start_function(self, name):
        log = open(self.run / "log" / (name + ".log"), "ab")
        self.procs[name] = subprocess.Popen(
            [*self._wrappers.get(name, ()), str(self.bin / name)], env=self._function_env(name), cwd=str(self.run),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def _wait_function(self, name):
        """Until the function's socket accepts connections and it has all its
        workers (a daemon: its workers); raises with its log if it exits or takes
        too long."""
        p = self.procs[name]
        path = str(self.socket_path(name))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError("%s exited %s at start-up:\n%s" % (
                    name, p.returncode, self.log_tail(name)))
            if name in DAEMONS:
                if len(self.workers(name)) >= self._expected_workers(name):
                    return
            elif os.path.exists(path) and len(self.workers(name)) >= self._expected_workers():
                with socket.socket(socket.AF_UNIX) as s:
                    if s.connect_ex(path) == 0:
                        return
            time.sleep(0.02)
        raise RuntimeError("%s not ready after %ss:\n%s" % (name, START_TIMEOUT, self.log_tail(name)))

    def _expected_workers(self, name=None):
        var = "MR_LIFECYCLE_WORKERS" if name in DAEMONS else "MR_WORKERS"
        try:
            return max(1, int(self.env.get(var) or "1"))
        except ValueError:
            return 1

    def _stop_function(self, name):
        p = self.procs.pop(name, None)
        if p is not None:
            self._terminate(p)

    @staticmethod
    def _terminate(p, timeout=STOP_TIMEOUT):
        """SIGTERM the process (it drains and exits), SIGKILL its group if it hangs.
        Returns its exit status."""
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of its process group (stray workers)
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return p.wait()

    def workers(self, name):
        """Pids of the function's live worker processes."""
        p = self.procs.get(name)
        return children(p.pid) if p is not None and p.poll() is None else []

    def master_pid(self, name):
        return self.procs[name].pid

    def kill_worker(self, name):
        """SIGKILLs one worker of the function; returns its pid. The master should
        replace it (see wait_workers)."""
        pids = self.workers(name)
        assert pids, "%s has no workers" % name
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def wait_workers(self, name, count=None, exclude=(), timeout=10.0):
        """Waits until the function has `count` (default MR_WORKERS) live workers,
        none of them in `exclude`; returns their pids."""
        count = count or self._expected_workers(name)
        deadline = time.monotonic() + timeout
        while True:
            pids = [w for w in self.workers(name) if w not in exclude]
            if len(pids) >= count:
                return pids
            if time.monotonic() > deadline:
                raise AssertionError("%s has workers %s, wanted %d (log:\n%s)" % (
                    name, pids, count, self.log_tail(name)))
            time.sleep(0.02)

    def stop_function(self, name):
        """SIGTERMs the function and waits; returns its exit status."""
        p = self.procs.pop(name)
        return self._terminate(p)

    def start_function(self, name):
        """Starts the function with the current self.env and waits until ready."""
        assert name not in self.procs, "%s already running" % name
        self._start_function(name)
        self._wait_function(name)

    def restart_function(self, name):
        """Stops (SIGTERM, drain) and starts the function again, picking up any
        change to self.env."""
        if name in self.procs:
            self.stop_function(name)
        self.start_function(name)

    # ---- database --------------------------------------------------------

    def sql(self, query, *params):
        """Runs one statement on this stack's database as the superuser, in
        autocommit; returns the rows as a list of tuples ([] without a result)."""
        return self.pg.sql(query, *params, dbname=self.db)

    def wipe_instances(self):
        """A test's clean slate: every instance row gone, and with them the teardowns
        their deletion records (in the same transaction), so no worker goes on to
        destroy apps an earlier test made."""
        self.sql("DELETE FROM public.instances; DELETE FROM public.instance_teardowns")

    def stop_db(self):
        """Stops the whole session cluster (every stack's database)."""
        self.pg.stop()

    def start_db(self):
        """Starts the session cluster again; with a pooler in front, returns once
        the pooler serves again too (PgBouncer refuses logins for
        server_login_retry after failing to reach PostgreSQL: the pooler's own
        recovery, not ours)."""
        self.pg.start()
        pooler = getattr(self.pg, "pooler", None)
        if pooler is not None:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    conn = psycopg2.connect(pooler.conninfo(self.db))
                    try:
                        with conn.cursor() as cur:  # the login alone needs no server
                            cur.execute("SELECT 1")
                    finally:
                        conn.close()
                    return
                except psycopg2.Error:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    # ---- HTTP ------------------------------------------------------------

    def url(self, name):
        """http://127.0.0.1:<port>/functions/v1/<name> (name may carry /path?query)."""
        return self.base_url + "/functions/v1/" + name

    def call(self, method, name, json=None, body=None, headers=None, token=None, timeout=60,
             source=None):
        """Calls a function through nginx; see http(). A name starting with "/"
        is a raw path on the public listener."""
        url = self.base_url + name if name.startswith("/") else self.url(name)
        return http(method, url, json=json, body=body, headers=headers, token=token,
                    timeout=timeout, source=source)

    def call_provisioner(self, method, path, json=None, body=None, headers=None,
                         token=None, timeout=60):
        """Calls the provisioner listener; token defaults to DOKKU_PROVISIONER_TOKEN."""
        if token is None:
            token = self.env["DOKKU_PROVISIONER_TOKEN"]
        return http(method, self.provisioner_url + path, json=json, body=body,
                    headers=headers, token=token or None, timeout=timeout)

    def call_admin(self, path, method="GET", timeout=60):
        """GET /live, /ready or /metrics on mindroom-admin's listener."""
        return http(method, self.admin_url + path, timeout=timeout)

    def jwt(self, role="service_role", sub=None, exp_in=3600, **claims):
        """A JWT signed with this stack's SUPABASE_JWT_SECRET, shaped like
        Supabase's: role, iss, iat, exp (now + exp_in) and sub when given.
        Extra claims are merged; a claim set to None is left out."""
        now = int(time.time())
        payload = {"iss": "supabase-demo", "role": role, "iat": now, "exp": now + exp_in}
        if sub is not None:
            payload["sub"] = str(sub)
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return make_jwt(payload, self.env["SUPABASE_JWT_SECRET"])

    def stripe_headers(self, payload):
        """Headers for a webhook delivery of raw `payload` signed with the first secret."""
        secret = self.env["STRIPE_WEBHOOK_SECRET"].split(",")[0]
        return {"Content-Type": "application/json",
                "Stripe-Signature": stripe_sign(payload, secret)}

    # ---- logs ------------------------------------------------------------

    def log(self, name):
        """A log's text, whole lines only (whole_lines): a function name, "nginx.error",
        "nginx.access", "nginx.stderr". A log whose writer died mid-line comes back as
        it is after a second."""
        return whole_lines(self.run / "log" / (name + ".log"), settle=1.0)

    def log_tail(self, name, lines=60):
        text = self.log(name).splitlines()[-lines:]
        return "---- %s.log (%s)\n%s" % (name, self.run, "\n".join(text))

    def all_logs(self, lines=60):
        names = self.functions + ["nginx.error", "nginx.stderr"]
        return "\n".join(self.log_tail(n, lines) for n in names if self.log(n))
