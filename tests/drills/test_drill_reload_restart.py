"""Drill 3: nginx reloaded and function binaries restarted while webhook events
and large health answers stream through.

Restarts come in two kinds. A rolling restart (the runbook's procedure: start
the new binary on the same socket path, which takes the path over, then SIGTERM
the old one, which finishes what it holds and leaves the new socket alone) and
a plain stop-then-start (a crash-loop or a careless deploy), where nginx finds
no socket for a moment and answers 502.

Asserted: every answer is complete JSON of the documented shape, carries the
X-Request-Id that was sent (no answer crossed to another request), every health
answer lists every instance; every 2xx'd event is committed, and after Stripe's
redelivery of the rest none is lost. Rolling restarts and reloads alone cost no
failed request at all."""
import collections
import json
import signal
import subprocess
import threading
import time
import uuid

import pytest

import mr
from drill_helpers import assert_well_formed
from health import HealthStandin
from lifecycle_helpers import new_account

INSTANCES = 120
SENDERS = 6
HEALTH_READERS = 2


@pytest.fixture(scope="module")
def probes():
    with HealthStandin() as h:
        yield h


@pytest.fixture(scope="module")
def stack(pg):
    env = {"MINDROOM_BASE_DOMAIN": "mindroom.test", "HEALTH_ALLOW_LOOPBACK": "1",
           "HEALTH_TIMEOUT_MS": "2000", "MR_WORKERS": "3"}
    with mr.Stack(pg, env=env, functions=["handle-stripe-webhook", "check-instance-health"]) as s:
        yield s


def nginx_reload(stack):
    """`nginx -s reload` on the stack's nginx, exactly as an operator runs it."""
    subprocess.run(["nginx", "-p", str(stack.run / "nginx"), "-c", str(stack.run / "nginx.conf"),
                    "-e", str(stack.run / "log/nginx.error.log"), "-s", "reload"], check=True,
                   timeout=30)


def rolling_restart(stack, name):
    """New binary first (it binds the socket path anew), old one drained after."""
    old = stack.procs.pop(name)
    stack._start_function(name)
    stack._wait_function(name)
    time.sleep(0.3)   # let the old workers take what was already queued on their socket
    old.send_signal(signal.SIGTERM)
    assert old.wait(30) == 0, "%s did not drain and exit cleanly" % name


def make_instances(stack, probes):
    acc = new_account(stack)[0]
    for i in range(INSTANCES):
        sid = str(uuid.uuid4())
        stack.sql("INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status) "
                  "VALUES (%s, %s, 'price_starter', 'starter', 'active')", sid, acc)
        stack.sql("INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, "
                  "backend_url) SELECT %s, n.dokku_app_name, n.subdomain, 'running', %s "
                  "FROM public.instance_names(%s) n", sid, probes.url("r%d" % i), sid)


def event(account, i, tag):
    if account is not None:
        obj = {"id": "sub_%s_%d" % (tag, i), "object": "subscription", "customer": "cus_%s_%d" % (tag, i),
               "status": "active", "metadata": {"account_id": account},
               "items": {"object": "list", "data": [{"price": {"id": "price_starter"},
                                                     "current_period_end": int(time.time()) + 86400}]}}
        type_ = "customer.subscription.created"
    else:
        obj = {"id": "in_%s_%d" % (tag, i), "object": "invoice"}
        type_ = "invoice.created"   # not handled: recorded, answered "ignored"
    raw = json.dumps({"id": "evt_%s_%d" % (tag, i), "object": "event", "type": type_,
                      "created": int(time.time()), "data": {"object": obj}}).encode()
    return {"id": "evt_%s_%d" % (tag, i), "raw": raw}


def send(stack, ev):
    rid = uuid.uuid4().hex
    h = dict(stack.stripe_headers(ev["raw"]), **{"X-Request-Id": rid})
    try:
        r = stack.call("POST", "handle-stripe-webhook", body=ev["raw"], headers=h, timeout=30)
    except (OSError, mr.httpclient.HTTPException) as e:   # IncompleteRead: a truncated body
        return (ev, None, None, rid, "%.3f %r" % (time.monotonic(), e))
    return (ev, r, r.headers.get("X-Request-Id"), rid, None)


def test_reloads_and_restarts_under_load_cut_nothing(stack, probes):
    make_instances(stack, probes)
    tag = uuid.uuid4().hex[:8]
    accounts = [new_account(stack, "cus_%s_%d" % (tag, i))[0] for i in range(200)]
    stop = threading.Event()
    lock = threading.Lock()
    sent, health, problems = [], [], []
    counter = iter(range(10 ** 9))

    def sender():
        while not stop.is_set():
            with lock:
                i = next(counter)
            ev = event(accounts[i] if i < len(accounts) else None, i, tag)
            ev_, r, got_rid, rid, err = send(stack, ev)
            with lock:
                sent.append((ev, r, err))
                if r is not None and got_rid != rid:
                    problems.append(("crossed answer", rid, got_rid, r))

    def reader():
        tok = stack.jwt()
        while not stop.is_set():
            rid = uuid.uuid4().hex
            try:
                r = stack.call("GET", "check-instance-health", token=tok,
                               headers={"X-Request-Id": rid}, timeout=30)
            except (OSError, mr.httpclient.HTTPException) as e:
                with lock:
                    problems.append(("health: no complete answer", "%.3f" % time.monotonic(), repr(e)[:200]))
                continue
            with lock:
                health.append(r.status)
                if r.headers.get("X-Request-Id") != rid:
                    problems.append(("crossed health answer", rid, r.headers.get("X-Request-Id")))
                if r.status == 200:
                    j = r.json
                    if (j is None or j.get("checked") != INSTANCES
                            or len(j.get("results", [])) != INSTANCES):
                        problems.append(("incomplete health answer", len(r.body), r.text[:200]))
                elif r.json is None or "error" not in r.json:
                    problems.append(("health: not JSON", r.status, r.text[:200]))

    workers = [threading.Thread(target=sender) for _ in range(SENDERS)]
    workers += [threading.Thread(target=reader) for _ in range(HEALTH_READERS)]
    for w in workers:
        w.start()
    log = []
    try:
        time.sleep(1.0)
        # Phase A: what the runbook does. Reloads and rolling restarts only.
        for step in ("reload", "roll:handle-stripe-webhook", "reload", "roll:check-instance-health",
                     "reload", "roll:handle-stripe-webhook", "reload", "reload"):
            if step == "reload":
                nginx_reload(stack)
            else:
                rolling_restart(stack, step.split(":", 1)[1])
            log.append("%s@%.1f" % (step, time.monotonic()))
            time.sleep(0.7)
        with lock:
            phase_a = list(sent), list(health), list(problems)
        # Phase B: a plain stop-then-start of the webhook (nginx answers 502 meanwhile).
        stack.restart_function("handle-stripe-webhook")
        log.append("stop+start:handle-stripe-webhook")
        time.sleep(1.0)
    finally:
        stop.set()
        for w in workers:
            w.join(60)

    codes = collections.Counter(r.status if r is not None else None for _, r, _ in sent)
    a_sent, a_health, _ = phase_a
    a_codes = collections.Counter(r.status if r is not None else None for _, r, _ in a_sent)
    print("\ndrill reload-restart: %s; phase A (reloads, rolling restarts): %d events %s, "
          "%d health answers %s; overall events %s, health %s" % (
              ", ".join(log), len(a_sent), dict(a_codes), len(a_health),
              dict(collections.Counter(a_health)), dict(codes), dict(collections.Counter(health))))
    nginx_errors = [l for l in stack.log("nginx.error").splitlines()
                    if "connect() to unix" not in l and "signal" not in l and "reconfiguring" not in l]
    assert not problems, (problems[:5], log, nginx_errors[-10:])
    for ev, r, err in sent:
        assert r is not None, "no answer at all for %s: %s" % (ev["id"], err)
        assert_well_formed(type("D", (), {"status": r.status, "json": r.json})())
    assert set(codes) <= {200, 502, 503}, codes
    assert set(a_codes) == {200}, "a reload or rolling restart failed requests: %s" % a_codes
    assert set(collections.Counter(a_health)) == {200}, a_health

    # Committed: every 2xx. Redelivered: the rest. Lost: none.
    accepted = {ev["id"] for ev, r, _ in sent if r.status == 200}
    have = {r[0] for r in stack.sql("SELECT id FROM public.stripe_events WHERE id LIKE %s",
                                    "evt_%s_%%" % tag)}
    assert accepted <= have, sorted(accepted - have)[:5]
    for ev, r, _ in sent:
        if r.status != 200:
            again = send(stack, ev)[1]
            assert again is not None and again.status == 200, again
    have = {r[0] for r in stack.sql("SELECT id FROM public.stripe_events WHERE id LIKE %s",
                                    "evt_%s_%%" % tag)}
    assert have == {ev["id"] for ev, _, _ in sent}
