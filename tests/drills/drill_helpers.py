"""What the drills share: Stripe event sequences with a known final state, a
concurrent delivery driver that records every answer, and a TCP gate that makes
a service unreachable (connection refused) and reachable again on the same port."""
import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import mr
from lifecycle_helpers import PRICES, new_account

STRIPE_STATUS = {  # Stripe's status -> subscription_status (docs/webhook.md)
    "trialing": "trialing", "active": "active", "past_due": "past_due", "canceled": "cancelled",
    "unpaid": "unpaid", "paused": "paused", "incomplete": "incomplete",
    "incomplete_expired": "incomplete_expired",
}
ENTITLED = {"trialing", "active", "past_due"}
# What the instance owes once a subscription's last event is in (desired_status).
OWED = {"trialing": "running", "active": "running", "past_due": "running",
        "unpaid": "stopped", "paused": "stopped", "incomplete_expired": "deprovisioned",
        "cancelled": "deprovisioned"}


class Customer:
    """One account and one Stripe subscription, with a scripted event history.
    Events have strictly increasing `created`, so "what Stripe's last event says"
    is unambiguous."""

    def __init__(self, stack, rng, t0):
        self.sub = "sub_" + uuid.uuid4().hex[:16]
        self.customer = "cus_" + uuid.uuid4().hex[:16]
        self.account, self.email = new_account(stack, self.customer)
        self.events = []
        t = t0
        tiers = ["starter", "professional", "enterprise", "free"]
        # created -> updates through a tier change and a payment hiccup -> an end.
        plan = [("customer.subscription.created", rng.choice(["trialing", "active"]), rng.choice(tiers)),
                ("customer.subscription.updated", "active", rng.choice(tiers)),
                ("customer.subscription.updated", "past_due", None),
                ("customer.subscription.updated", "active", rng.choice(tiers))]
        end = rng.choice(["keep", "unpaid", "deleted"])
        if end == "unpaid":
            plan.append(("customer.subscription.updated", "unpaid", None))
        elif end == "deleted":
            plan.append(("customer.subscription.deleted", "canceled", None))
        tier = plan[0][2]
        for type_, status, new_tier in plan:
            t += rng.randint(1, 3)
            tier = new_tier or tier
            self.events.append(self._event(type_, status, tier, t))

    def _event(self, type_, status, tier, t):
        obj = {"id": self.sub, "object": "subscription", "customer": self.customer,
               "status": status, "metadata": {"account_id": self.account},
               "cancel_at_period_end": False,
               "items": {"object": "list", "data": [{
                   "id": "si_" + uuid.uuid4().hex[:10],
                   "price": {"id": PRICES[tier], "object": "price"},
                   "current_period_end": t + 30 * 86400}]}}
        ev = {"id": "evt_" + uuid.uuid4().hex, "object": "event", "type": type_, "created": t,
              "api_version": "2025-03-31.basil", "livemode": False, "data": {"object": obj}}
        return {"id": ev["id"], "raw": json.dumps(ev).encode(), "status": STRIPE_STATUS[status],
                "tier": tier, "created": t, "period_end": t + 30 * 86400}

    @property
    def last(self):
        return self.events[-1]


def deliveries(customers, rng, dup_rate=0.3):
    """Every event once, a share of them again (Stripe's at-least-once), shuffled
    (Stripe's no-order)."""
    out = [e for c in customers for e in c.events]
    out += [e for e in out if rng.random() < dup_rate]
    rng.shuffle(out)
    return out


class Delivered:
    """One delivery's outcome: event id, HTTP status (None: no answer), parsed
    body, raw body, error text."""
    __slots__ = ("event", "status", "json", "body", "error", "at")

    def __init__(self, event, status, js, body, error, at):
        self.event, self.status, self.json, self.body, self.error, self.at = event, status, js, body, error, at

    def __repr__(self):
        return "<%s %s %r %s>" % (self.event["id"], self.status, self.body[:120], self.error or "")


def deliver(stack, ev, timeout=30):
    """Signs and POSTs one event the way Stripe does; never raises."""
    try:
        r = stack.call("POST", "handle-stripe-webhook", body=ev["raw"],
                       headers=stack.stripe_headers(ev["raw"]), timeout=timeout)
        return Delivered(ev, r.status, r.json, r.body, None, time.monotonic())
    except (OSError, mr.httpclient.HTTPException) as e:
        return Delivered(ev, None, None, b"", repr(e), time.monotonic())


def burst(stack, events, threads=16, on_progress=None):
    """Delivers `events` from `threads` concurrent senders; returns [Delivered] in
    completion order. on_progress(done_count) runs in the caller's thread as
    deliveries complete (for triggering a failure mid-burst)."""
    results = []
    with ThreadPoolExecutor(threads) as pool:
        futs = [pool.submit(deliver, stack, e) for e in events]
        for f in futs:
            results.append(f.result())
            if on_progress:
                on_progress(len(results))
    return results


def redeliver_until_accepted(stack, failed, rng, rounds=8, pause=0.5):
    """Stripe's retries: whatever did not get a 2xx is sent again (shuffled) until
    every event has been accepted once. Returns (attempts, [Delivered])."""
    pending = [d.event for d in failed]
    seen = []
    for _ in range(rounds):
        if not pending:
            break
        rng.shuffle(pending)
        res = burst(stack, pending, threads=8)
        seen += res
        pending = [d.event for d in res if d.status is None or not 200 <= d.status < 300]
        if pending:
            time.sleep(pause)
    assert not pending, "still not accepted after %d rounds: %r" % (rounds, pending[:5])
    return seen


def assert_well_formed(d):
    """A webhook answer a client can trust: complete JSON of the documented shape."""
    assert d.status is not None, "no answer: %r" % d
    assert d.json is not None, "body is not complete JSON: %r" % d
    if d.status == 200:
        assert d.json.get("received") is True, d
    else:
        err = d.json.get("error")
        assert isinstance(err, dict) and err.get("code") and err.get("message"), d


class Gate:
    """A loopback TCP forwarder to (host, port) that can be closed (connections
    refused, in-flight ones cut) and opened again on the same port."""

    def __init__(self, target_url):
        u = target_url.split("//", 1)[1]
        self.target = (u.split(":")[0], int(u.split(":")[1].split("/")[0]))
        self.port = mr.free_port()
        self._lsock = None
        self._conns = set()
        self._lock = threading.Lock()
        self.refused_window = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def open(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self._lsock = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return self

    def close(self):
        s, self._lsock = self._lsock, None
        if s is not None:
            # shutdown first: close() alone leaves the socket listening while the
            # accept thread still holds it, and connections would still succeed.
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self._lock:
            for c in list(self._conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()

    def _accept(self, ls):
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns.update((c, u))
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
