"""Stand-in for Stripe's API (STRIPE_API_BASE), speaking its wire format.

  POST /v1/customers                  email, name, metadata[...]       -> customer
  GET /v1/customers                   email, limit, starting_after       -> list (newest
                                      first, has_more)
  POST /v1/checkout/sessions          mode, customer, line_items[i][price|quantity],
                                      success_url, cancel_url, client_reference_id,
                                      metadata[...], subscription_data[...],
                                      allow_promotion_codes              -> checkout.session
  POST /v1/billing_portal/sessions    customer, return_url               -> billing_portal.session
  POST /v1/checkout/sessions/{id}/expire                                  -> checkout.session
                                      (400 invalid_request_error without a code unless the
                                      session is open, the same for a complete and an
                                      expired one, as Stripe; complete() pays one,
                                      expire_outside() expires one as an operator would)
  GET /v1/checkout/sessions/{id}                                          -> checkout.session
                                      (status open/complete/expired, payment_status)
  DELETE /v1/subscriptions/{id}       (no body)                           -> subscription,
                                      cancelled now; 404 resource_missing ("No such
                                      subscription") for one it does not have or that is
                                      already canceled or incomplete_expired, as Stripe;
                                      one of the other mode than the key (live or test)
                                      gets Stripe's 404 resource_missing "...; a similar
                                      object exists in live mode, but a test mode key was
                                      used to make this request"

Requests are application/x-www-form-urlencoded with nested keys (a[b][0][c]=v),
authenticated with `Authorization: Bearer <secret key>` (compared in constant time;
401 otherwise). Answers are JSON objects with Stripe's field names, a `Request-Id`
header, and errors in Stripe's shape: {"error": {"type", "code", "message", "param"}}.

Idempotency, as Stripe does it: the first answer to an Idempotency-Key is kept and
replayed (with `Idempotent-Replayed: true`) to a request with the same key and the
same parameters; the same key with other parameters is refused with 400
idempotency_error; a key whose first request is still running gets 409. Answers that
fail before the request is executed (scripted 429/5xx, validation errors) are not
kept, as on Stripe.

Scripting, per test: next(...) queues behaviours for the next requests:
    ("status", 429) / ("status", 500[, {"Stripe-Should-Retry": "false"}])
                     answer that status, in Stripe's error shape, executing nothing
    ("kept", 500[, {"Stripe-Should-Retry": "false"}])
                     a 500 after the request began executing: kept for its key and
                     replayed to every later request with it, as Stripe keeps a key's
                     first answer, "including 500 errors"
    ("executed", 500) the same, after executing the request: what the 500 hides was done
    "lost"           execute the request (and keep its answer for the key), then close
                     the connection without answering: a lost response
    "hang"           hold the request until release()
down() closes the listener (connections are refused) until up().

    with StripeStandin() as stripe:
        env = {"STRIPE_API_BASE": stripe.url, "STRIPE_SECRET_KEY": stripe.key}
        stripe.customers, stripe.sessions, stripe.portal_sessions   # what was created
        stripe.requests                                             # every request
        stripe.complete(session_id) -> [event, ...]                 # Stripe's events
        stripe.expire_outside(session_id)     # expired in the Dashboard, or at expires_at
        stripe.add_subscription(customer, status) -> id             # one made elsewhere
        stripe.portal_cancel(sub_id[, at]) -> event   # cancelled in the customer portal
        stripe.portal_renew(sub_id) -> event          # and renewed there

Subscriptions are in flexible billing mode (billing_mode.type = flexible, the default
for new subscriptions in current API versions): a cancellation at the period's end
sets cancel_at and leaves cancel_at_period_end false.
"""
import hmac
import json
import re
import secrets
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHECKOUT_HOST = "https://checkout.stripe.com"
PORTAL_HOST = "https://billing.stripe.com"
API_VERSION = "2025-03-31.basil"


class Request:
    """One request as received: method, path (without its query), query (dict),
    headers (dict), raw body (str), pairs (the form's (key, value) list in order),
    params (nested dict)."""

    def __init__(self, method, path, headers, body):
        self.method = method
        self.path, _, query = path.partition("?")
        self.query = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        self.headers = headers
        self.body = body
        self.pairs = urllib.parse.parse_qsl(body, keep_blank_values=True, strict_parsing=False)
        self.params = nest(self.pairs)
        self.time = time.monotonic()

    @property
    def idempotency_key(self):
        return self.headers.get("Idempotency-Key")

    def __repr__(self):
        return "<%s %s %s>" % (self.method, self.path, self.pairs)


def nest(pairs):
    """Stripe's form keys to a nested structure: a[b][0][c]=v -> {"a": {"b": [{"c": v}]}}.
    Raises ValueError for a malformed key."""
    root = {}
    for key, value in pairs:
        m = re.fullmatch(r"([^\[\]]+)((?:\[[^\[\]]*\])*)", key)
        if not m:
            raise ValueError("malformed key %r" % key)
        parts = [m.group(1)] + re.findall(r"\[([^\[\]]*)\]", m.group(2))
        cur = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = parts[i + 1] if not last else None
            if isinstance(cur, list):
                idx = int(part)
                while len(cur) <= idx:
                    cur.append(None)
                if last:
                    cur[idx] = value
                else:
                    if cur[idx] is None:
                        cur[idx] = [] if nxt.isdigit() else {}
                    cur = cur[idx]
            else:
                if last:
                    cur[part] = value
                else:
                    cur = cur.setdefault(part, [] if nxt.isdigit() else {})
    return root


def error(status, type_, message, code=None, param=None):
    e = {"type": type_, "message": message}
    if code:
        e["code"] = code
    if param:
        e["param"] = param
    return status, {"error": e}, {}


class StripeStandin:
    def __init__(self, key=None, prices=("price_free", "price_starter", "price_starter_annual",
                                         "price_professional", "price_professional_annual",
                                         "price_enterprise", "price_enterprise_annual")):
        self.key = key or "sk_test_" + secrets.token_hex(16)
        self.livemode = self.key[3:8] == "live_"
        self.prices = set(prices)
        self.lock = threading.Lock()
        self.requests = []
        self.customers = {}          # id -> customer object
        self.sessions = {}           # id -> checkout.session object
        self.portal_sessions = {}    # id -> billing_portal.session object
        self.subscriptions = {}      # id -> subscription object (complete())
        self.queue = []
        self._keys = {}              # idempotency key -> {"fp", "status", "body", "done"}
        self._release = threading.Event()
        self._server = None
        self._port = 0
        self._conns = set()          # open client connections (down() closes them)

    # ---- control -----------------------------------------------------------
    def next(self, *behaviours):
        with self.lock:
            self.queue.extend(behaviours)

    def release(self):
        self._release.set()

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.queue.clear()
        self._release.set()
        self._release = threading.Event()

    def recorded(self, path=None):
        with self.lock:
            return [r for r in self.requests if path is None or r.path == path]

    def wait_for(self, predicate, timeout=5.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = predicate(self)
            if v:
                return v
            time.sleep(0.02)
        return predicate(self)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self._port

    # ---- the objects ---------------------------------------------------------
    def _id(self, prefix):
        return prefix + secrets.token_hex(12)

    def _customer(self, p):
        obj = {"id": self._id("cus_"), "object": "customer", "created": int(time.time()),
               "email": p.get("email"), "name": p.get("name"),
               "metadata": p.get("metadata") or {}, "livemode": False}
        self.customers[obj["id"]] = obj
        return 200, obj, {}

    def _list_customers(self, q):
        """GET /v1/customers: newest first, filtered by email (case-sensitive, as
        Stripe's filter is), at most limit (1-100, default 10), after the customer
        starting_after names (400 resource_missing for one it does not have), with
        has_more saying whether any follow."""
        try:
            limit = int(q.get("limit", "10"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            return error(400, "invalid_request_error",
                         "Invalid integer: %s" % q.get("limit"), param="limit")
        unknown = sorted(set(q) - {"email", "limit", "starting_after"})
        if unknown:
            return error(400, "invalid_request_error",
                         "Received unknown parameter: %s" % unknown[0])
        found = [c for c in self.customers.values()
                 if "email" not in q or c.get("email") == q["email"]]
        found.sort(key=lambda c: c["created"], reverse=True)
        if "starting_after" in q:
            at = [i for i, c in enumerate(found) if c["id"] == q["starting_after"]]
            if not at:
                return error(400, "invalid_request_error",
                             "No such customer: '%s'" % q["starting_after"],
                             param="starting_after", code="resource_missing")
            found = found[at[0] + 1:]
        return 200, {"object": "list", "url": "/v1/customers", "has_more": len(found) > limit,
                     "data": json.loads(json.dumps(found[:limit]))}, {}

    def _checkout(self, p):
        if p.get("mode") not in ("payment", "setup", "subscription"):
            return error(400, "invalid_request_error", "Missing required param: mode.",
                         "parameter_missing", "mode")
        if not p.get("success_url"):
            return error(400, "invalid_request_error", "Missing required param: success_url.",
                         "parameter_missing", "success_url")
        items = p.get("line_items") or []
        if not items or not isinstance(items, list):
            return error(400, "invalid_request_error", "Missing required param: line_items.",
                         "parameter_missing", "line_items")
        for i, it in enumerate(items):
            if not isinstance(it, dict) or it.get("price") not in self.prices:
                return error(400, "invalid_request_error",
                             "No such price: '%s'" % (it or {}).get("price"),
                             "resource_missing", "line_items[%d][price]" % i)
        cust = p.get("customer")
        if cust is not None and cust not in self.customers:
            return error(400, "invalid_request_error", "No such customer: '%s'" % cust,
                         "resource_missing", "customer")
        sid = self._id("cs_test_")
        now = int(time.time())
        obj = {"id": sid, "object": "checkout.session", "mode": p["mode"], "status": "open",
               "url": "%s/c/pay/%s" % (CHECKOUT_HOST, sid), "customer": cust,
               "client_reference_id": p.get("client_reference_id"),
               "metadata": p.get("metadata") or {}, "success_url": p["success_url"],
               "cancel_url": p.get("cancel_url"),
               "allow_promotion_codes": p.get("allow_promotion_codes") == "true" or None,
               "created": now, "expires_at": now + 86400, "livemode": False,
               "subscription": None, "payment_status": "unpaid",
               "line_items_sent": items, "subscription_data_sent": p.get("subscription_data")}
        self.sessions[sid] = obj
        out = {k: v for k, v in obj.items() if not k.endswith("_sent")}
        return 200, out, {}

    def _portal(self, p):
        cust = p.get("customer")
        if cust not in self.customers:
            return error(400, "invalid_request_error", "No such customer: '%s'" % cust,
                         "resource_missing", "customer")
        pid = self._id("bps_")
        obj = {"id": pid, "object": "billing_portal.session", "customer": cust,
               "return_url": p.get("return_url"), "created": int(time.time()),
               "url": "%s/p/session/test_%s" % (PORTAL_HOST, secrets.token_hex(10)),
               "livemode": False}
        self.portal_sessions[pid] = obj
        return 200, obj, {}

    def _session(self, sid):
        s = self.sessions.get(sid)
        if s is None:
            return None, error(404, "invalid_request_error",
                               "No such checkout.session: '%s'" % sid, "resource_missing",
                               "session")
        return s, None

    def _expire(self, sid):
        s, missing = self._session(sid)
        if missing:
            return missing
        if s["status"] != "open":
            # Stripe's answer for a complete and an expired session alike: only the
            # message names the status.
            return error(400, "invalid_request_error",
                         'Only Checkout Sessions with a status in ["open"] can be expired. '
                         "This Checkout Session has a status of `%s`." % s["status"])
        s.update(status="expired", url=None)
        return 200, {k: v for k, v in s.items() if not k.endswith("_sent")}, {}

    def _retrieve(self, sid, q):
        s, missing = self._session(sid)
        if missing:
            return missing
        if q:
            return error(400, "invalid_request_error",
                         "Received unknown parameter: %s" % sorted(q)[0])
        return 200, json.loads(json.dumps({k: v for k, v in s.items()
                                            if not k.endswith("_sent")})), {}

    def expire_outside(self, session_id):
        """The session expires without this API being asked to expire it: an operator
        expires it in the Dashboard, or its expires_at passes. Only an open session
        (ValueError otherwise)."""
        with self.lock:
            s = self.sessions[session_id]
            if s["status"] != "open":
                raise ValueError("checkout session %s is %s" % (session_id, s["status"]))
            s.update(status="expired", url=None)

    def complete(self, session_id, status=None):
        """The customer pays: the session completes and its subscription starts
        (trialing when it asked for a trial). status "incomplete" is a payment that is
        still processing (a bank debit takes days): the session completes with
        payment_status "unpaid" and the subscription waits for the payment. Returns the
        events Stripe would send, oldest first: checkout.session.completed,
        customer.subscription.created. Only an open session can be paid (ValueError
        otherwise)."""
        with self.lock:
            s = self.sessions[session_id]
            if s["status"] != "open":
                raise ValueError("checkout session %s is %s" % (session_id, s["status"]))
            sd = s["subscription_data_sent"] or {}
            trial = int(sd.get("trial_period_days") or 0)
            now = int(time.time())
            sub_id = self._id("sub_")
            sub = {"id": sub_id, "object": "subscription", "customer": s["customer"],
                   "status": status or ("trialing" if trial else "active"),
                   "metadata": sd.get("metadata") or {}, "billing_mode": {"type": "flexible"},
                   "cancel_at": None, "cancel_at_period_end": False, "canceled_at": None, "trial_end": now + trial * 86400 if trial else None,
                   "items": {"object": "list", "data": [{
                       "id": self._id("si_"), "object": "subscription_item",
                       "price": {"id": it["price"], "object": "price"},
                       "quantity": int(it.get("quantity") or 1),
                       "current_period_end": now + 30 * 86400}
                       for it in s["line_items_sent"]]}}
            self.subscriptions[sub_id] = sub
            s.update(status="complete", subscription=sub_id,
                     payment_status="unpaid" if sub["status"] == "incomplete" else "paid")
            session = {k: v for k, v in s.items() if not k.endswith("_sent")}

        return [self._event("checkout.session.completed", session, now),
                self._event("customer.subscription.created", sub, now)]

    def _event(self, type_, obj, created):
        return {"id": self._id("evt_"), "object": "event", "type": type_,
                "api_version": API_VERSION, "created": created, "livemode": False,
                "data": {"object": json.loads(json.dumps(obj))}}

    def portal_cancel(self, sub_id, at=None):
        """The customer cancels in the customer portal ("at the end of the period"), or
        the merchant sets the date `at` (Unix time): as Stripe does it in flexible
        billing mode, cancel_at is that time (default: the period's end, the latest
        item's current_period_end) and cancel_at_period_end stays false; the
        subscription stays active until then. Returns the customer.subscription.updated
        event Stripe sends."""
        with self.lock:
            sub = self.subscriptions[sub_id]
            end = max(it["current_period_end"] for it in sub["items"]["data"])
            sub.update(cancel_at=end if at is None else at, cancel_at_period_end=False,
                       canceled_at=int(time.time()))
            return self._event("customer.subscription.updated", sub, int(time.time()))

    def portal_renew(self, sub_id):
        """The customer renews (un-cancels) it in the portal: cancel_at back to null.
        Returns the customer.subscription.updated event."""
        with self.lock:
            sub = self.subscriptions[sub_id]
            sub.update(cancel_at=None, cancel_at_period_end=False, canceled_at=None)
            return self._event("customer.subscription.updated", sub, int(time.time()))

    def add_subscription(self, customer=None, status="active", price="price_starter",
                         livemode=None):
        """A subscription Stripe has (as if paid for through a checkout); returns its id.
        livemode: the mode it was made in (default: the key's)."""
        now = int(time.time())
        sub_id = self._id("sub_")
        with self.lock:
            self.subscriptions[sub_id] = {
                "id": sub_id, "object": "subscription", "customer": customer or self._id("cus_"),
                "livemode": self.livemode if livemode is None else livemode,
                "status": status, "metadata": {}, "billing_mode": {"type": "flexible"},
                "cancel_at": None, "cancel_at_period_end": False,
                "canceled_at": now if status == "canceled" else None, "ended_at": None,
                "items": {"object": "list", "data": [{
                    "id": self._id("si_"), "object": "subscription_item",
                    "price": {"id": price, "object": "price"}, "quantity": 1,
                    "current_period_end": now + 30 * 86400}]}}
        return sub_id

    def _cancel(self, sub_id, p):
        sub = self.subscriptions.get(sub_id)
        if sub is not None and sub.get("livemode", False) != self.livemode:
            # Another mode's object is invisible to this key, whatever its status.
            modes = ("live", "test") if sub.get("livemode", False) else ("test", "live")
            return error(404, "invalid_request_error",
                         "No such subscription: '%s'; a similar object exists in %s mode, but a "
                         "%s mode key was used to make this request." % ((sub_id,) + modes),
                         "resource_missing", "id")
        if sub is None or sub["status"] in ("canceled", "incomplete_expired"):
            return error(404, "invalid_request_error", "No such subscription: '%s'" % sub_id,
                         "resource_missing", "id")
        if p:
            return error(400, "invalid_request_error",
                         "Received unknown parameter: %s" % sorted(p)[0])
        now = int(time.time())
        sub.update(status="canceled", canceled_at=now, ended_at=now)
        return 200, json.loads(json.dumps(sub)), {}

    # ---- HTTP ----------------------------------------------------------------
    def _execute(self, req):
        routes = {"/v1/customers": self._customer, "/v1/checkout/sessions": self._checkout,
                  "/v1/billing_portal/sessions": self._portal}
        m = re.fullmatch(r"/v1/checkout/sessions/([A-Za-z0-9_]+)/expire", req.path)
        if req.method == "POST" and m:
            return self._expire(m.group(1))
        m = re.fullmatch(r"/v1/subscriptions/([A-Za-z0-9_]+)", req.path)
        if req.method == "DELETE" and m:
            return self._cancel(m.group(1), req.params)
        m = re.fullmatch(r"/v1/checkout/sessions/([A-Za-z0-9_]+)", req.path)
        if req.method == "GET" and m:
            return self._retrieve(m.group(1), req.query)
        if req.method == "GET" and req.path == "/v1/customers":
            return self._list_customers(req.query)
        if req.method != "POST" or req.path not in routes:
            return error(404, "invalid_request_error",
                         "Unrecognized request URL (%s: %s)." % (req.method, req.path))
        return routes[req.path](req.params)

    def _handle(self, req):
        """Returns (status, body, headers, lost)."""
        with self.lock:
            behaviour = self.queue.pop(0) if self.queue else None
        status, body, headers = self._answer(req, behaviour)
        return status, body, headers, behaviour == "lost" and status < 400

    def _answer(self, req, behaviour):
        auth = req.headers.get("Authorization", "")
        if not hmac.compare_digest(auth.encode(), ("Bearer " + self.key).encode()):
            return error(401, "invalid_request_error", "Invalid API Key provided: sk_test_****")
        if isinstance(behaviour, tuple) and behaviour[0] == "status":
            status, extra = behaviour[1], (behaviour[2] if len(behaviour) > 2 else {})
            if status == 429:
                s, b, _ = error(429, "invalid_request_error",
                                "Too many requests hit the API too quickly. We recommend an "
                                "exponential backoff of your requests.", "rate_limit")
            else:
                s, b, _ = error(status, "api_error", "An unknown error occurred")
            return s, b, dict(extra)
        key = req.idempotency_key
        fp = (req.method, req.path, tuple(req.pairs))
        with self.lock:
            if key is not None:
                kept = self._keys.get(key)
                if kept is not None:
                    if kept["fp"] != fp:
                        return error(400, "idempotency_error",
                                     "Keys for idempotent requests can only be used with the "
                                     "same parameters they were first used with. Try using a "
                                     "key other than '%s' if you meant to execute a different "
                                     "request." % key)
                    if not kept["done"]:
                        return error(409, "idempotency_error",
                                     "There is currently another in-progress request using "
                                     "this Idempotent Key (that probably means you submitted "
                                     "twice, and the other request is still going through): "
                                     "%s. Please try again later." % key)
                    return kept["status"], kept["body"], {"Idempotent-Replayed": "true"}
                self._keys[key] = {"fp": fp, "done": False}
        if behaviour == "hang":
            self._release.wait(60)
        if isinstance(behaviour, tuple) and behaviour[0] in ("kept", "executed"):
            if behaviour[0] == "executed":
                with self.lock:
                    self._execute(req)
            status, body, _ = error(behaviour[1], "api_error", "An unknown error occurred")
            with self.lock:
                if key is not None:
                    self._keys[key].update(done=True, status=status, body=body)
            return status, body, dict(behaviour[2] if len(behaviour) > 2 else {})
        with self.lock:
            try:
                status, body, headers = self._execute(req)
            except ValueError as e:
                status, body, headers = error(400, "invalid_request_error", str(e))
            if key is not None:
                if status < 400:
                    self._keys[key].update(done=True, status=status, body=body)
                else:
                    del self._keys[key]   # validation errors are not kept
        return status, body, headers

    def start(self, port=0):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()
                with outer.lock:
                    outer._conns.add(self.connection)

            def finish(self):
                with outer.lock:
                    outer._conns.discard(self.connection)
                super().finish()

            def _do(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n).decode("utf-8", "replace") if n else ""
                req = Request(self.command, self.path, dict(self.headers.items()), raw)
                with outer.lock:
                    outer.requests.append(req)
                status, body, headers, lost = outer._handle(req)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("Request-Id", "req_" + secrets.token_hex(7))
                    self.send_header("Stripe-Version", req.headers.get("Stripe-Version", API_VERSION))
                    if req.idempotency_key:
                        self.send_header("Idempotency-Key", req.idempotency_key)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    if lost:
                        # Cut off mid-answer: the client has started reading, so not
                        # even libcurl's silent re-send on a reused connection applies.
                        self.wfile.write(data[:len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass

            do_GET = do_POST = do_DELETE = _do

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self._release.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def down(self):
        """Stripe unreachable until up(): the port refuses connections, and the ones
        kept alive from earlier requests are closed."""
        self.stop()
        with self.lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def up(self):
        self._release = threading.Event()
        self.start(self._port)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
