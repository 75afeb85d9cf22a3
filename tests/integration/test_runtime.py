"""The function runtime (libmindroom's mr_http) through real nginx and PostgreSQL:
methods, auth, body caps, request ids, JSON errors from nginx itself, worker
processes (concurrency, SIGKILL, SIGTERM drain).

Function-specific behaviour is tested in each function's own file; here the
four API functions are used only for what the runtime decides before their
handlers run (405, 401, 403, 413), and `noop` (tests/bench/noop.c, a function
that is never deployed) holds a request in flight in a worker and in
PostgreSQL with ?sleep_ms=N.
"""

import functools
import json
import os
import re
import signal
import socket
import threading
import time

import pytest

import fcgi
import mr
from lifecycle_helpers import wait_until

SERVICE_FUNCTIONS = ("provision-instance", "deprovision-instance")
JWT_FUNCTIONS = SERVICE_FUNCTIONS + ("check-instance-health",)


@pytest.fixture(scope="module")
def stack(pg):
    with mr.Stack(pg, extra_functions=("noop",)) as s:
        yield s


def error_of(r):
    """The {"error":{"code","message"}} of a response, asserting its shape."""
    assert r.headers.get("Content-Type", "").startswith("application/json"), r
    assert set(r.json) == {"error"}, r
    assert set(r.json["error"]) == {"code", "message"}, r
    return r.json["error"]


def log_lines(stack, name):
    out = []
    for line in stack.log(name).splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def request_log(stack, name, request_id):
    """The function's access-log lines for one request id."""
    return [l for l in log_lines(stack, name) if l.get("request_id") == request_id]


# Log lines and requests in flight are waited for up to 10 s.
wait_for = functools.partial(wait_until, timeout=10.0, interval=0.02)


def sleeping_backends(stack):
    """PostgreSQL backends of this stack's database running noop's pg_sleep."""
    return stack.sql("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                     "AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'")


class Background:
    """An HTTP call in a thread; .result() joins it."""

    def __init__(self, fn, *args, **kw):
        self._r = self._e = None
        self._t = threading.Thread(target=self._run, args=(fn, args, kw), daemon=True)
        self._t.start()

    def _run(self, fn, args, kw):
        try:
            self._r = fn(*args, **kw)
        except BaseException as e:  # reported by result()
            self._e = e

    def done(self):
        return not self._t.is_alive()

    def result(self, timeout=30):
        self._t.join(timeout)
        assert not self._t.is_alive(), "request still running after %ss" % timeout
        if self._e:
            raise self._e
        return self._r


# ---- methods -------------------------------------------------------------

@pytest.mark.parametrize("method,name,allow", [
    ("GET", "handle-stripe-webhook", "POST"),
    ("PUT", "handle-stripe-webhook", "POST"),
    ("GET", "provision-instance", "POST"),
    ("DELETE", "deprovision-instance", "POST"),
    ("PATCH", "check-instance-health", "GET, POST"),
    ("PUT", "my-instance", "GET, POST"),
])
def test_wrong_method_is_405_json(stack, method, name, allow):
    r = stack.call(method, name, json={}, token=stack.jwt())
    assert r.status == 405, r
    assert error_of(r)["code"] == "method_not_allowed"
    # RFC 9110's list of methods, as clients split it.
    assert r.headers["Allow"] == allow, r.headers
    # The runtime said so, not nginx: the function logged the request (after its
    # answer: a webhook worker writes its lines when it is about to wait).
    rid = r.headers["X-Request-Id"]
    wait_for(lambda: request_log(stack, name, rid), what="the function's log line")
    assert [l["status"] for l in request_log(stack, name, rid)] == [405]


# ---- auth ----------------------------------------------------------------

def forged_tokens(stack):
    secret = stack.env["SUPABASE_JWT_SECRET"]
    now = int(time.time())
    good = {"role": "service_role", "iat": now, "exp": now + 600}
    valid = mr.make_jwt(good, secret)
    h, p, sig = valid.split(".")
    return {
        "bad signature": mr.make_jwt(good, secret + "x"),
        "tampered payload": h + "." + mr._b64url(json.dumps(
            dict(good, role="service_role", sub="x")).encode()) + "." + sig,
        "alg none": mr.make_jwt(good, secret, header={"alg": "none", "typ": "JWT"}).rsplit(".", 1)[0] + ".",
        "alg HS512 header": mr.make_jwt(good, secret, header={"alg": "HS512", "typ": "JWT"}),
        "expired": mr.make_jwt(dict(good, exp=now - 60), secret),
        "not yet valid": mr.make_jwt(dict(good, nbf=now + 600), secret),
        "garbage": "not-a-jwt",
        "two parts": h + "." + p,
    }


@pytest.mark.parametrize("name", JWT_FUNCTIONS)
def test_missing_token_is_401(stack, name):
    r = stack.call("POST", name, json={})
    assert r.status == 401, r
    error_of(r)


@pytest.mark.parametrize("case", ["bad signature", "tampered payload", "alg none", "alg HS512 header",
                                  "expired", "not yet valid", "garbage", "two parts"])
def test_invalid_token_is_401(stack, case):
    token = forged_tokens(stack)[case]
    for name in JWT_FUNCTIONS:
        r = stack.call("POST", name, json={}, token=token)
        assert r.status == 401, (case, name, r)
        err = error_of(r)
        assert token not in r.text and stack.env["SUPABASE_JWT_SECRET"] not in r.text
        assert err["message"]


def test_non_bearer_scheme_is_401(stack):
    r = stack.call("POST", "provision-instance", json={},
                   headers={"Authorization": "Basic " + stack.jwt()})
    assert r.status == 401, r


@pytest.mark.parametrize("name", SERVICE_FUNCTIONS)
@pytest.mark.parametrize("role,sub", [("anon", None),
                                      ("authenticated", "6f1c1b7e-1d3a-4c55-9a43-0c1c7e9a2b11")])
def test_user_roles_on_service_functions_are_403(stack, name, role, sub):
    r = stack.call("POST", name, json={}, token=stack.jwt(role=role, sub=sub))
    assert r.status == 403, r
    error_of(r)


def test_anon_on_health_is_403(stack):
    r = stack.call("POST", "check-instance-health", json={}, token=stack.jwt(role="anon"))
    assert r.status == 403, r


def test_supabase_js_invoke_headers_pass_auth(stack):
    """functions.invoke() sends Authorization: Bearer <user session> plus apikey
    <anon key>, x-client-info and a JSON body: the runtime authenticates the
    bearer (not the apikey) and the call reaches the handler as that user."""
    user = "0b6d3c1e-58a4-4f7e-9f53-6a2d9d1c9f10"
    session = stack.jwt(role="authenticated", sub=user, aud="authenticated",
                        email="user@example.com")
    anon_key = stack.jwt(role="anon")
    r = stack.call("POST", "check-instance-health", json={},
                   headers={"Authorization": "Bearer " + session, "apikey": anon_key,
                            "x-client-info": "supabase-js/2.45.0",
                            "Content-Type": "application/json"})
    assert r.status not in (401, 403, 404, 405), r
    logged = request_log(stack, "check-instance-health", r.headers["X-Request-Id"])
    assert [l.get("role") for l in logged] == ["authenticated"], logged

    # The same with the service_role key as bearer, as an ops script would call.
    # (An unknown subscription is the handler's own 404 not_found: past auth.)
    r = stack.call("POST", "provision-instance", json={"subscription_id": user},
                   headers={"Authorization": "Bearer " + stack.jwt(), "apikey": anon_key,
                            "x-client-info": "supabase-js/2.45.0"})
    assert r.status not in (401, 403, 405), r
    logged = request_log(stack, "provision-instance", r.headers["X-Request-Id"])
    assert [l.get("role") for l in logged] == ["service_role"], logged
    # Authorization wins over apikey: a user session with a service_role apikey
    # stays a user (403 on a service function).
    r = stack.call("POST", "provision-instance", json={},
                   headers={"Authorization": "Bearer " + session, "apikey": stack.jwt()})
    assert r.status == 403, r
    # Without Authorization the apikey JWT is the credential, verified like one.
    r = stack.call("POST", "provision-instance", json={}, headers={"apikey": anon_key})
    assert r.status == 403, r
    r = stack.call("POST", "provision-instance", json={},
                   headers={"apikey": forged_tokens(stack)["bad signature"]})
    assert r.status == 401, r


# ---- body caps -----------------------------------------------------------

def test_body_over_nginx_cap_is_413_and_never_reaches_the_function(stack):
    before = len(log_lines(stack, "provision-instance"))
    r = stack.call("POST", "provision-instance", body=b"{" + b" " * 70000 + b"}",
                   headers={"Content-Type": "application/json"}, token=stack.jwt())
    assert r.status == 413, r
    assert error_of(r)["code"] == "too_big"
    assert r.headers.get("X-Request-Id")
    assert len(log_lines(stack, "provision-instance")) == before


def test_body_at_the_cap_passes_byte_for_byte(stack):
    body = b"x" * 65536
    r = stack.call("POST", "noop", body=body, headers={"Content-Type": "application/octet-stream"})
    assert r.status == 200, r


def test_body_over_function_cap_is_413_from_the_function(stack):
    # A function configured below nginx's cap enforces its own on the bytes it reads.
    stack.env["MR_MAX_BODY"] = "1024"
    try:
        stack.restart_function("provision-instance")
        ok = stack.call("POST", "provision-instance", body=b"{" + b" " * 1000 + b"}",
                        headers={"Content-Type": "application/json"}, token=stack.jwt())
        assert ok.status != 413, ok
        r = stack.call("POST", "provision-instance", body=b"{" + b" " * 2000 + b"}",
                       headers={"Content-Type": "application/json"}, token=stack.jwt())
        assert r.status == 413, r
        assert error_of(r)["code"] == "too_big"   # the code nginx's 413 says (docs/billing.md)
        assert [l["status"] for l in request_log(stack, "provision-instance",
                                                  r.headers["X-Request-Id"])] == [413]
    finally:
        del stack.env["MR_MAX_BODY"]
        stack.restart_function("provision-instance")


# ---- request ids ---------------------------------------------------------

def test_request_id_is_echoed(stack):
    rid = "req-" + str(time.time_ns())
    r = stack.call("POST", "provision-instance", json={}, headers={"X-Request-Id": rid})
    assert r.status == 401
    assert r.headers["X-Request-Id"] == rid
    # nginx and the worker write their log lines after the answer has gone out.
    wait_for(lambda: request_log(stack, "provision-instance", rid), what="function log line")
    assert len(request_log(stack, "provision-instance", rid)) == 1
    wait_for(lambda: '"request_id":"%s"' % rid in stack.log("nginx.access"),
             what="nginx access log line")


def test_request_id_is_generated_when_absent(stack):
    ids = set()
    for _ in range(3):
        r = stack.call("GET", "noop")
        assert r.status == 200, r
        rid = r.headers.get("X-Request-Id")
        assert rid and re.fullmatch(r"[0-9A-Za-z_-]{8,64}", rid), rid
        wait_for(lambda: request_log(stack, "noop", rid), what="function log line")
        assert len(request_log(stack, "noop", rid)) == 1
        ids.add(rid)
    assert len(ids) == 3


@pytest.mark.parametrize("sent", ["trace:" + "x" * 70, "a b", "x" * 65, "é"])
def test_a_request_id_the_function_would_refuse_is_replaced_by_one_id_for_all(stack, sent):
    """An X-Request-Id the functions do not accept (they take 1 to 64 of
    [A-Za-z0-9._-]) is replaced by nginx's own before anyone logs it: the answer,
    nginx's log line and the function's log line carry one id."""
    r = stack.call("GET", "noop", headers={"X-Request-Id": sent})
    assert r.status == 200, r
    rid = r.headers["X-Request-Id"]
    assert rid != sent and re.fullmatch(r"[0-9A-Za-z_-]{8,64}", rid), rid
    wait_for(lambda: request_log(stack, "noop", rid), what="function log line")
    wait_for(lambda: '"request_id":"%s"' % rid in stack.log("nginx.access"),
             what="nginx access log line")
    # nginx's own answers too.
    r = stack.call("GET", "/functions/v1/nope", headers={"X-Request-Id": sent})
    assert r.status == 404 and r.headers["X-Request-Id"] != sent, r
    rid = r.headers["X-Request-Id"]
    wait_for(lambda: '"request_id":"%s"' % rid in stack.log("nginx.access"),
             what="nginx access log line of the 404")


def test_access_log_has_no_secrets(stack):
    token = stack.jwt()
    rid = "secrets-" + str(time.time_ns())
    stack.call("POST", "provision-instance?token=" + token, json={}, token=token,
               headers={"X-Request-Id": rid})
    # Both lines of this request written (nginx's log is buffered up to a second).
    wait_for(lambda: request_log(stack, "provision-instance", rid), what="function log line")
    wait_for(lambda: '"request_id":"%s"' % rid in stack.log("nginx.access"),
             what="nginx access log line")
    for name in ("provision-instance", "nginx.access", "nginx.error"):
        assert token not in stack.log(name), name
        assert stack.env["SUPABASE_JWT_SECRET"] not in stack.log(name), name


# ---- nginx's own errors --------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/functions/v1/", "/functions/v1/nope",
                                  "/functions/v1/dokku-provisioner", "/functions/v1/provision-instancex",
                                  "/rest/v1/accounts"])
def test_unknown_path_is_404_json(stack, path):
    r = stack.call("POST", path, json={})
    assert r.status == 404, r
    assert error_of(r)["code"] == "not_found"


def test_provisioner_is_not_on_the_public_listener(stack):
    r = stack.call("GET", "/apps", token=stack.env["DOKKU_PROVISIONER_TOKEN"])
    assert r.status == 404, r
    # The provisioner listener routes every path to dokku-provisioner itself.
    r = stack.call_provisioner("GET", "/apps/mindroom-000000000000")
    assert len(request_log(stack, "dokku-provisioner", r.headers["X-Request-Id"])) == 1, r


def raw_request(port, data):
    """Sends `data` as it is on a new connection; returns (status, headers, body)
    of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(data)
        out = b""
        while True:
            b = c.recv(65536)
            if not b:
                break
            out += b
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(l.split(": ", 1) for l in lines[1:] if ": " in l)
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("case,status", [
    ("headers over large_client_header_buffers", 400),
    ("URI too long", 414),
    ("unknown Transfer-Encoding", 501),
    ("malformed request line", 400),
    ("HTTP version not supported", 505),
])
def test_requests_nginx_cannot_read_are_answered_json(stack, case, status):
    """A browser's or a script's request nginx refuses before any location (a big
    JWT, a long query, a bad request line) gets the functions' error shape, with
    the CORS origin header and a request id, not nginx's HTML page."""
    fn = b"/functions/v1/list-plans"
    req = {
        "headers over large_client_header_buffers":
            b"GET " + fn + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"a" * 9000 + b"\r\n",
        "URI too long": b"GET " + fn + b"?x=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n",
        "unknown Transfer-Encoding": b"POST " + fn + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n",
        "malformed request line": b"GET@ " + fn + b" HTTP/1.1\r\nHost: x\r\n",
        "HTTP version not supported": b"GET " + fn + b" HTTP/2.5\r\nHost: x\r\n",
    }[case]
    got, headers, body = raw_request(stack.port, req + b"Connection: close\r\n\r\n")
    assert got == status, (got, headers, body[:200])
    assert headers.get("Content-Type") == "application/json", (headers, body[:200])
    err = json.loads(body)
    assert set(err) == {"error"} and set(err["error"]) == {"code", "message"}, err
    assert headers.get("Access-Control-Allow-Origin") == "*" and headers.get("X-Request-Id"), headers
    # ...which the page's script can read (a support report names it).
    exposed = {h.strip().lower() for h in headers.get("Access-Control-Expose-Headers", "").split(",")}
    assert {"x-request-id", "retry-after"} <= exposed, headers


def test_the_error_pages_are_not_a_path(stack):
    r = stack.call("GET", "/.mr-error/500")
    assert r.status == 404 and error_of(r)["code"] == "not_found", r


def test_function_down_is_502_json(stack):
    stack.stop_function("deprovision-instance")
    try:
        r = stack.call("POST", "deprovision-instance", json={}, token=stack.jwt())
        assert r.status == 502, r
        assert error_of(r)["code"] == "unavailable"
    finally:
        stack.start_function("deprovision-instance")
    assert stack.call("POST", "deprovision-instance", json={}).status == 401


# ---- worker processes ----------------------------------------------------

def test_two_workers_serve_concurrent_requests(stack):
    assert len(stack.wait_workers("noop")) == 2
    t0 = time.monotonic()
    calls = [Background(stack.call, "GET", "noop?sleep_ms=1500") for _ in range(2)]
    # Both requests are inside PostgreSQL at the same moment: one per worker.
    wait_for(lambda: len(sleeping_backends(stack)) == 2, what="two requests in flight")
    rs = [c.result() for c in calls]
    assert [r.status for r in rs] == [200, 200], rs
    assert {r.json["pid"] for r in rs} == set(stack.workers("noop"))
    assert time.monotonic() - t0 < 2.8  # in parallel, not one after the other
    # Each request's log line names the worker that served it (mr_log keeps the
    # pid per process, refreshed at fork), not the master it was forked from.
    for r in rs:
        rid = r.headers["X-Request-Id"]
        wait_for(lambda: request_log(stack, "noop", rid), what="function log line")
        assert [l["pid"] for l in request_log(stack, "noop", rid)] == [r.json["pid"]]


def test_sigkilled_worker_is_replaced_and_service_continues(stack):
    before = stack.wait_workers("noop")
    calls = [Background(stack.call, "GET", "noop?sleep_ms=2000") for _ in range(2)]
    wait_for(lambda: len(sleeping_backends(stack)) == 2, what="both workers busy")
    victim = stack.kill_worker("noop")  # mid-request: both workers are serving
    rs = sorted((c.result() for c in calls), key=lambda r: r.status)
    # The killed worker's caller gets nginx's JSON 502; the other request completes.
    assert [r.status for r in rs] == [200, 502], rs
    assert error_of(rs[1])["code"] == "unavailable"
    after = stack.wait_workers("noop", exclude=[victim])
    assert victim not in after and len(after) == 2 and set(after) & set(before)
    for _ in range(20):
        r = stack.call("GET", "noop")
        assert r.status == 200, r
    # Both workers, the new one included, answer (one slow request each at once).
    calls = [Background(stack.call, "GET", "noop?sleep_ms=300") for _ in range(2)]
    assert {c.result().json["pid"] for c in calls} == set(after)


def test_sigkilled_idle_workers_of_a_real_function_are_replaced(stack):
    name = "provision-instance"
    before = stack.wait_workers(name)
    # Each pid by name: kill_worker() takes the first listed worker, which may be
    # one just killed that has not become a zombie yet.
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    after = stack.wait_workers(name, exclude=before)
    assert not set(after) & set(before)
    for _ in range(10):
        r = stack.call("POST", name, json={}, token=stack.jwt(role="anon"))
        assert r.status == 403, r


def test_sigterm_drains_in_flight_request_then_exits(stack):
    p = stack.procs["noop"]
    call = Background(stack.call, "GET", "noop?sleep_ms=2000")
    wait_for(lambda: len(sleeping_backends(stack)) == 1, what="request in flight")
    p.send_signal(signal.SIGTERM)
    # The master stays until the request is answered.
    time.sleep(0.5)
    assert p.poll() is None and not call.done()
    r = call.result()
    assert r.status == 200 and r.json["ok"] is True, r
    assert p.wait(10) == 0
    assert not stack.workers("noop")
    # Stopped means stopped: nginx answers 502 (JSON) until it is started again.
    r = stack.call("GET", "noop")
    assert r.status == 502, r
    stack.procs.pop("noop")
    stack.start_function("noop")
    assert stack.call("GET", "noop").status == 200


def test_db_restart_costs_no_failed_request_after_it(stack):
    """Each worker keeps one connection; after PostgreSQL restarts, the next
    request reconnects instead of failing."""
    assert stack.call("GET", "noop?sleep_ms=1").status == 200
    stack.stop_db()
    try:
        r = stack.call("GET", "noop?sleep_ms=1")
        assert r.status == 503, r
        error_of(r)
    finally:
        stack.start_db()
    for _ in range(4):
        r = stack.call("GET", "noop?sleep_ms=1")
        assert r.status == 200, r


def test_a_connection_lost_inside_a_transaction_is_not_replaced_inside_it(stack):
    """The backend of a transaction ends between two of its statements (an operator's
    pg_terminate_backend, a pooler restart, idle_in_transaction_session_timeout). The
    rest of it must not run on a new connection, outside any transaction and without
    its identity, with a COMMIT of nothing answered as success: the transaction is
    tried again whole on a new connection, as its identity."""
    out = {}
    t = threading.Thread(target=lambda: out.update(r=stack.call("GET", "noop?tx_pause_ms=1500",
                                                                  timeout=30)))
    t.start()
    try:
        pids = wait_until(lambda: stack.sql(
            "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction'"
            " AND query = 'SELECT pg_backend_pid()'"), timeout=10, what="the paused transaction")
        assert stack.sql("SELECT pg_terminate_backend(%s)", pids[0][0]) == [(True,)]
    finally:
        t.join(30)
    r = out["r"]
    assert r.status == 200 and r.json["tx_user"] == "service_role", r


def test_a_rollback_the_server_does_not_answer_is_given_up_on_after_the_window(pg):
    """A transaction refused part-way is rolled back; a server that stops answering
    then (its backend stopped: a pooler queueing forever, a dead path) holds the
    worker one statement's window (statement timeout + 2 s), not for ever: the
    connection is dropped and the next request is served on a new one."""
    with mr.Stack(pg, env={"MR_DB_STATEMENT_TIMEOUT_MS": "1000"}, extra_functions=("noop",),
                  functions=[], workers=1) as s:
        out = {}

        def call():
            try:
                out["r"] = s.call("GET", "noop?tx_pause_ms=1500&tx_refuse=1", timeout=30)
            except Exception as e:   # noqa: BLE001 (reported by the assertion below)
                out["error"] = repr(e)
        t = threading.Thread(target=call)
        t0 = time.monotonic()
        t.start()
        pids = wait_until(lambda: s.sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'idle in transaction' AND query = 'SELECT pg_backend_pid()'"),
            timeout=10, what="the paused transaction")
        assert len(pids) == 1, pids
        os.kill(pids[0][0], signal.SIGSTOP)
        try:
            t.join(30)
            took = time.monotonic() - t0
            assert not t.is_alive() and "r" in out, ("the worker was held past the window", out)
            r = out["r"]
            assert r.status == 503, r
            assert 4.3 < took < 9.0, took     # the pause, then one window of 1 + 2 s
            r = s.call("GET", "noop?tx_pause_ms=0", timeout=10)
        finally:
            os.kill(pids[0][0], signal.SIGCONT)
        assert r.status == 200 and r.json["tx_user"] == "service_role", r


def test_failed_calls_do_not_pile_prepared_statements_up_in_a_connection(stack):
    """A call that fails (a tenant's bad input, a constraint) makes its connection
    prepare its statements again under new names, and the old ones stay prepared on
    the server for the connection's life: a worker's connection is replaced before
    failed calls pile them up without bound."""
    r = stack.call("GET", "noop?failed_calls=400", timeout=60)
    assert r.status == 200, r
    assert r.json["prepared"] < 100, r


# ---- browsers --------------------------------------------------------------

def test_cors_preflight_is_answered_by_nginx(stack):
    """supabase-js in a browser preflights its call (Authorization, apikey,
    x-client-info): nginx answers 204 with Supabase's CORS headers, and the
    real call's answer (success or error) carries the origin header too."""
    before = len(log_lines(stack, "check-instance-health"))
    r = stack.call("OPTIONS", "check-instance-health", headers={
        "Origin": "https://app.mindroom.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, x-client-info, apikey, content-type"})
    assert r.status == 204, r
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    allowed = {h.strip() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "x-client-info", "apikey", "content-type"} <= allowed
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert len(log_lines(stack, "check-instance-health")) == before
    r = stack.call("POST", "check-instance-health", json={}, headers={"Origin": "https://x.example"})
    assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == "*", r
    r = stack.call("POST", "/functions/v1/nope", json={}, headers={"Origin": "https://x.example"})
    assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == "*", r


def test_a_body_within_a_raised_cap_but_beyond_the_socket_queue_is_served(tmp_path):
    """With MR_MAX_BODY raised (to 1 MiB, as nginx's client_max_body_size), a body
    larger than a unix socket queues (about 200 KB) arrives only as the worker reads
    it: the worker takes the request once its params are whole and the queue stops
    growing, instead of waiting for the rest until its read deadline."""
    sock = tmp_path / "noop.sock"
    env = dict(os.environ, MR_MAX_BODY=str(1 << 20), MR_WORKERS="1", MR_SOCKET=str(sock),
               MR_READ_TIMEOUT_MS="3000")
    env.pop("DATABASE_URL", None)
    log = tmp_path / "noop.log"
    p = mr.start_by_hand([str(mr.build_dir() / "bin" / "noop")], env, log)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        for size in (100_000, 400_000, (1 << 20) - 100):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(str(sock))
            try:
                t0 = time.monotonic()
                s.sendall(fcgi.request("POST", "/functions/v1/noop", b"x" * size))
                status, _, _ = fcgi.read_response(s)
                took = time.monotonic() - t0
            except OSError as e:              # a broken pipe: the worker dropped it
                status, took = repr(e), None
            finally:
                s.close()
            assert status == 200 and took < 2.0, (size, status, took)
    finally:
        p.terminate()
        p.wait(10)
    mr.assert_no_sanitizer_report(log)
