"""A recording, controllable HTTP stand-in (stdlib only) that the provisioner and
Resend stand-ins build on.

Runs in the test process on 127.0.0.1 and a free port. Every request is recorded
(method, path, headers, parsed JSON body, time). What it answers is scripted per
test: a default behaviour plus a queue of one-shot behaviours for the next requests:

    s.behave("ok")                 # default for every request
    s.next("fail", "hang")         # the next request gets a 500, the one after hangs
    s.behave(("slow", 0.5))        # answer normally after 0.5 s
    s.release()                    # let every hanging request go (they then answer 500)
    s.release(then="hang")         # the same, and the requests after them hang again

Behaviours: "ok", "fail" (500), "reject" (400), ("status", N), "hang" (until
release() or stop), ("slow", seconds), ("huge", N) (a 500 whose body is N bytes
and more), "unreachable" (the provisioner's 503 dokku_unreachable: its Dokku host
is out of reach).
"""
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorded:
    def __init__(self, method, path, headers, body, started):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None
        self.time = started

    def __repr__(self):
        return f"<{self.method} {self.path} {self.json!r}>"


class RecordingServer:
    """Subclasses implement answer(rec) -> (status, json_obj)."""

    def __init__(self, token=None):
        self.token = token
        self.requests = []
        self.lock = threading.Lock()
        self.default = "ok"
        self.queue = []
        self.generation = 0     # release() bumps it: every request hanging before lets go
        self.stopping = threading.Event()
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests answered at once since the last reset
        self._server = None
        self._thread = None

    # --- control ---
    def behave(self, behaviour):
        with self.lock:
            self.default = behaviour
            self.queue.clear()

    def next(self, *behaviours):
        with self.lock:
            self.queue.extend(behaviours)

    def release(self, then="ok"):
        """Lets every hanging request go (answering 500); later ones follow the script,
        a default of "hang" becoming then (in the same step: no request in between
        meets another behaviour)."""
        with self.lock:
            self.generation += 1
            if self.default == "hang":
                self.default = then

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.queue.clear()
            self.default = "ok"
            self.generation += 1
            self.max_in_flight = self.in_flight

    def recorded(self, method=None, path=None):
        with self.lock:
            return [r for r in self.requests
                    if (method is None or r.method == method)
                    and (path is None or r.path == path)]

    def wait_for(self, predicate, timeout=5.0):
        """Polls until predicate(self) is truthy; returns its value or None."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = predicate(self)
            if v:
                return v
            time.sleep(0.02)
        return predicate(self)

    @property
    def url(self):
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- lifecycle ---
    def start(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The headers and the body go out in two writes: with Nagle's algorithm
            # the body waited for the client's delayed ACK, 40 ms a request on a
            # kept-alive connection (about 45 requests a second over two).
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def _do(self):
                started = time.monotonic()
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                rec = Recorded(self.command, self.path, dict(self.headers.items()),
                               body.decode("utf-8", "replace"), started)
                if outer.token is not None and not outer._authorized(self.headers):
                    outer._record_unauthorized(rec)
                    return self._send(*outer.unauthorized_answer(self.headers))
                with outer.lock:
                    outer.requests.append(rec)
                    behaviour = outer.queue.pop(0) if outer.queue else outer.default
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    status, obj, *headers = outer._apply(behaviour, rec)
                    if status is None:
                        return  # connection dropped on purpose
                    self._send(status, obj, *headers)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _send(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_DELETE = do_PUT = _do

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.stopping.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- internals ---
    unauthorized = 0

    def unauthorized_answer(self, headers):
        """(status, body) for a request without the right token."""
        return 401, {"error": {"code": "unauthorized", "message": "bad token"}}

    def _record_unauthorized(self, rec):
        with self.lock:
            self.unauthorized += 1

    def _authorized(self, headers):
        got = headers.get("Authorization", "")
        want = "Bearer " + self.token
        return hmac.compare_digest(got.encode(), want.encode())

    def _apply(self, behaviour, rec):
        if behaviour == "hang":
            gen = self.generation
            while self.generation == gen and not self.stopping.is_set():
                self.stopping.wait(0.05)
            return 500, {"error": {"code": "released", "message": "released after hanging"}}
        if isinstance(behaviour, tuple) and behaviour[0] == "slow":
            time.sleep(behaviour[1])
            return self.answer(rec)
        if behaviour == "fail":
            return 500, {"error": {"code": "internal", "message": "stand-in told to fail"}}
        if behaviour == "reject":
            return 400, {"error": {"code": "invalid", "message": "stand-in told to reject"}}
        if behaviour == "unreachable":
            return 503, {"error": {"code": "dokku_unreachable",
                                   "message": "apps:exists: ssh to dokku.test exited 255: "
                                              "the Dokku host was not reached"}}
        if isinstance(behaviour, tuple) and behaviour[0] == "huge":
            return 500, {"error": {"code": "internal", "message": "x" * behaviour[1]}}
        if isinstance(behaviour, tuple) and behaviour[0] == "status":
            return behaviour[1], {"error": {"code": "scripted", "message": "scripted status"}}
        return self.answer(rec)

    def answer(self, rec):
        """(status, json_obj) or (status, json_obj, headers) for rec."""
        raise NotImplementedError
