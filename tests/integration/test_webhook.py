"""handle-stripe-webhook through real nginx and PostgreSQL, asserting rows.

Events come from tests/fixtures/stripe_*.json (both payload shapes: before
2025-03-31 current_period_end is on the subscription, since basil on
items.data[]); each test rewrites ids, customer, status, price and created as
it needs and signs the exact bytes it sends (mr.stripe_sign, Python hmac).
The webhook records intent and calls nothing: what it made owed is read from
the instance row (owed_action), and whether its commit woke the lifecycle worker
from a LISTEN on the worker's channel (Listener).
"""

import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2
import pytest

import fcgi
import mr
from lifecycle_helpers import link_customer, wait_until

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OLD_SECRET = "whsec_old_" + uuid.uuid4().hex
NEW_SECRET = "whsec_new_" + uuid.uuid4().hex


# ---- the worker's channel, as the worker listens to it ----------------------------

class Listener:
    """A connection LISTENing on mindroom_lifecycle; .count() says how many
    notifications arrived since the last call."""

    def __init__(self, stack):
        self.conn = psycopg2.connect(stack.pg.conninfo(stack.db))
        self.conn.autocommit = True
        with self.conn.cursor() as c:
            c.execute("LISTEN mindroom_lifecycle")

    def count(self, settle=0.3):
        time.sleep(settle)
        self.conn.poll()
        n = len(self.conn.notifies)
        self.conn.notifies.clear()
        return n

    def close(self):
        self.conn.close()


@pytest.fixture(scope="module")
def stack(pg):
    env = {"STRIPE_WEBHOOK_SECRET": OLD_SECRET + "," + NEW_SECRET}
    with mr.Stack(pg, env=env, functions=["handle-stripe-webhook"]) as s:
        yield s


@pytest.fixture
def listener(stack):
    lst = Listener(stack)
    lst.count(0)
    yield lst
    lst.close()


# ---- helpers ---------------------------------------------------------------------

def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def uid():
    return uuid.uuid4().hex[:16]


def new_account(stack, customer=None):
    """An auth user (the 004 trigger creates the account), optionally with a
    Stripe customer we created for it (link_customer). Returns the account id."""
    aid = str(uuid.uuid4())
    stack.sql("INSERT INTO auth.users (id, email) VALUES (%s, %s)", aid, "u%s@example.com" % uid())
    if customer:
        link_customer(stack, aid, customer)
    return aid


def begin_customer(stack, aid):
    """create-checkout-session's first step: the customer attempt, recorded before
    Stripe is asked. Returns its id (finish_customer records Stripe's answer)."""
    return one(stack, "SET ROLE service_role; SELECT public.billing_attempt_begin(%s, 'customer',"
                      " repeat('1', 64)) ->> 'attempt_id'", aid)[0]


def finish_customer(stack, attempt, customer):
    stack.sql("SET ROLE service_role; SELECT public.billing_attempt_succeeded(%s, %s, NULL, NULL,"
              " false)", attempt, customer)


def checkout_event(customer, ref=None, meta=None):
    co = fixture("stripe_checkout_session_completed.json")
    co["id"] = "evt_" + uid()
    co["data"]["object"]["customer"] = customer
    co["data"]["object"]["client_reference_id"] = ref
    co["data"]["object"]["metadata"] = {} if meta is None else {"account_id": meta}
    return co


def sub_event(kind="created", shape="basil", sub=None, customer=None, status="active",
              price="price_starter", created=None, evt=None, account_id=None):
    """A customer.subscription.<kind> event built from the fixture of that shape."""
    name = {("created", "basil"): "stripe_subscription_created_basil.json",
            ("created", "legacy"): "stripe_subscription_created_legacy.json",
            ("deleted", "legacy"): "stripe_subscription_deleted_legacy.json"}.get(
        (kind, shape), "stripe_subscription_updated_basil.json" if shape == "basil"
        else "stripe_subscription_created_legacy.json")
    e = fixture(name)
    e["type"] = "customer.subscription." + kind
    e["id"] = evt or "evt_" + uid()
    if created is not None:
        e["created"] = created
    o = e["data"]["object"]
    o["id"] = sub or "sub_" + uid()
    o["customer"] = customer
    o["status"] = status
    o["metadata"] = {} if account_id is None else {"account_id": account_id}
    for item in o["items"]["data"]:
        item["price"]["id"] = price
        item["subscription"] = o["id"]
        if "plan" in item:
            item["plan"]["id"] = price
    if "plan" in o:
        o["plan"]["id"] = price
    return e


def send(stack, event, secret=NEW_SECRET, raw=None, t=None, sig=None):
    body = raw if raw is not None else json.dumps(event, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json",
               "Stripe-Signature": sig if sig is not None else mr.stripe_sign(body, secret, t)}
    return stack.call("POST", "handle-stripe-webhook", body=body, headers=headers)


def one(stack, q, *p):
    rows = stack.sql(q, *p)
    assert len(rows) == 1, rows
    return rows[0]


def count(stack, q, *p):
    return stack.sql(q, *p)[0][0]


def sub_row(stack, stripe_sub):
    return one(stack, "SELECT id, account_id, tier, status::text, stripe_price_id, max_agents,"
                      " trial_ends_at, current_period_end, cancelled_at, cancel_at_period_end,"
                      " last_event_id FROM subscriptions WHERE stripe_subscription_id = %s",
               stripe_sub)


def instances(stack, sub_id):
    return stack.sql("SELECT id, status::text, desired_status::text, dokku_app_name, subdomain,"
                     " memory_limit_mb, cpu_limit, owed_action::text FROM instances"
                     " WHERE subscription_id = %s ORDER BY created_at", sub_id)


def event_row(stack, evt):
    return one(stack, "SELECT status, error, attempts FROM stripe_events WHERE id = %s", evt)


def total_writes(stack):
    return stack.sql("SELECT (SELECT count(*) FROM stripe_events), (SELECT count(*) FROM subscriptions),"
                     " (SELECT count(*) FROM instances), (SELECT count(*) FROM audit_logs),"
                     " (SELECT count(*) FROM accounts WHERE stripe_customer_id IS NOT NULL)")[0]


# ---- rejected input: nothing written -----------------------------------------------

def test_bad_signatures_write_nothing(stack):
    cust = "cus_" + uid()
    new_account(stack, cust)
    e = sub_event(customer=cust)
    compact = json.dumps(e, separators=(",", ":")).encode()
    before = total_writes(stack)
    now = int(time.time())
    cases = [
        dict(secret="whsec_wrong"),                                     # unknown secret
        dict(sig=""),                                                   # no header at all
        dict(sig="t=%d" % now),                                         # no v1
        dict(sig="t=%d,v0=%s" % (now, hmac.new(NEW_SECRET.encode(), b"%d.%s" % (now, compact),
                                                   hashlib.sha256).hexdigest())),  # v0 only
        dict(t=now - 301),                                              # too old
        dict(t=now + 3600),                                             # far future
        # signed compact, delivered re-serialized (same JSON, other bytes)
        dict(raw=json.dumps(e, indent=2).encode(),
             sig=mr.stripe_sign(compact, NEW_SECRET)),
        # one byte changed after signing
        dict(raw=compact.replace(b'"active"', b'"activf"'), sig=mr.stripe_sign(compact, NEW_SECRET)),
    ]
    for c in cases:
        if c.get("sig") == "":
            r = stack.call("POST", "handle-stripe-webhook", body=compact,
                           headers={"Content-Type": "application/json"})
        else:
            r = send(stack, e, **c)
        assert r.status == 400, (c, r)
        assert r.json["error"]["code"] == "invalid_signature"
    assert total_writes(stack) == before
    # The same event, signed correctly with either rotated secret, goes through.
    assert send(stack, e, secret=OLD_SECRET).status == 200
    assert send(stack, e, secret=NEW_SECRET).json == {"received": True, "duplicate": True}


def test_malformed_input_writes_nothing(stack):
    before = total_writes(stack)
    r = send(stack, None, raw=b'{"id": "evt_x", "type": ')
    assert r.status == 400 and r.json["error"]["code"] == "malformed_json"
    r = send(stack, None, raw=b'{"id":"evt_x"} trailing')
    assert r.status == 400 and r.json["error"]["code"] == "malformed_json"
    for bad in ({"type": "customer.created", "created": 1, "data": {"object": {}}},
                {"id": "evt_x", "type": "customer.created", "created": "1", "data": {"object": {}}},
                {"id": "evt_x", "type": "customer.created", "created": 1.5, "data": {"object": {}}},
                {"id": "evt_x", "type": "customer.created", "created": 1, "data": {}},
                [1, 2, 3]):
        r = send(stack, bad)
        assert r.status == 400 and r.json["error"]["code"] == "invalid_event", (bad, r)
    # Over the body cap: nginx (and the function) answer 413.
    big = fixture("stripe_customer_created.json")
    big["data"]["object"]["metadata"] = {"pad": "x" * 70000}
    r = send(stack, big)
    assert r.status == 413
    assert total_writes(stack) == before


# ---- subscriptions and instances ----------------------------------------------------

def test_create_basil_provisions(stack, listener):
    cust = "cus_" + uid()
    aid = new_account(stack, cust)
    e = sub_event(shape="basil", customer=cust, price="price_starter")
    r = send(stack, e)
    assert r.status == 200 and r.json == {"received": True}
    s = sub_row(stack, e["data"]["object"]["id"])
    assert str(s[1]) == aid and s[2] == "starter" and s[3] == "active" and s[5] == 3
    # basil: current_period_end comes from items.data[]
    assert int(s[7].timestamp()) == e["data"]["object"]["items"]["data"][0]["current_period_end"]
    assert s[6] is None and s[8] is None and s[9] is False and s[10] == e["id"]
    inst = instances(stack, s[0])
    assert len(inst) == 1
    hexid = str(s[0]).replace("-", "")[:12]
    assert inst[0][1:5] == ("provisioning", "running", "mindroom-" + hexid, "m" + hexid)
    assert inst[0][5] == 1024 and float(inst[0][6]) == 1.0
    assert event_row(stack, e["id"]) == ("processed", None, 1)
    # The create is owed, due now, and the same commit woke the worker, once.
    assert inst[0][7] == "create"
    assert one(stack, "SELECT owed_due_at <= now() FROM instances WHERE id = %s", inst[0][0])[0]
    assert listener.count() == 1
    # A redelivery, and an event that changes nothing owed, wake nobody.
    assert send(stack, e).json == {"received": True, "duplicate": True}
    u = sub_event("updated", sub=e["data"]["object"]["id"], customer=cust, price="price_starter",
                  created=e["created"] + 1)
    assert send(stack, u).json == {"received": True}
    assert listener.count() == 0


def test_create_legacy_trialing(stack):
    cust = "cus_" + uid()
    new_account(stack, cust)
    e = sub_event(shape="legacy", customer=cust, status="trialing", price="price_professional")
    assert send(stack, e).status == 200
    o = e["data"]["object"]
    s = sub_row(stack, o["id"])
    assert s[2] == "professional" and s[3] == "trialing" and s[5] == 10
    # legacy: current_period_end and trial_end from the subscription itself
    assert int(s[7].timestamp()) == o["current_period_end"]
    assert int(s[6].timestamp()) == o["trial_end"]
    inst = instances(stack, s[0])
    assert len(inst) == 1 and inst[0][1:3] == ("provisioning", "running") and inst[0][5] == 2048


def test_update_tier_change_limits_follow(stack):
    cust = "cus_" + uid()
    new_account(stack, cust)
    sub = "sub_" + uid()
    t = int(time.time()) - 100
    assert send(stack, sub_event(sub=sub, customer=cust, price="price_starter", created=t)).status == 200
    s = sub_row(stack, sub)
    assert (s[2], s[5]) == ("starter", 3)
    u = sub_event("updated", sub=sub, customer=cust, price="price_professional", created=t + 5)
    u["data"]["object"]["cancel_at_period_end"] = True
    assert send(stack, u).status == 200
    s = sub_row(stack, sub)
    assert (s[2], s[4], s[5], s[9]) == ("professional", "price_professional", 10, True)
    inst = instances(stack, s[0])
    assert len(inst) == 1 and inst[0][5] == 2048 and float(inst[0][6]) == 2.0


# Stripe status -> (our status, instance rows created from scratch)
STATUS_MAP = {
    "incomplete": ("incomplete", 0), "incomplete_expired": ("incomplete_expired", 0),
    "trialing": ("trialing", 1), "active": ("active", 1), "past_due": ("past_due", 1),
    "canceled": ("cancelled", 0), "unpaid": ("unpaid", 0), "paused": ("paused", 0),
}
# Stripe status reached from active, on an instance still being created ->
# (instance status, desired_status, owed action). The webhook records what the
# instance should become; the worker moves status.
FROM_ACTIVE = {
    "trialing": ("provisioning", "running", "create"), "active": ("provisioning", "running", "create"),
    "past_due": ("provisioning", "running", "create"),
    # Owed a stop even before it ran: a create whose outcome was lost may have left
    # an app up, and stopping a missing app is done.
    "unpaid": ("provisioning", "stopped", "stop"),
    "paused": ("provisioning", "stopped", "stop"),
    "incomplete_expired": ("provisioning", "deprovisioned", "destroy"),
    "canceled": ("provisioning", "deprovisioned", "destroy"),
}


@pytest.mark.parametrize("status", sorted(STATUS_MAP))
def test_every_status_on_creation(stack, status):
    cust = "cus_" + uid()
    new_account(stack, cust)
    e = sub_event(customer=cust, status=status)
    assert send(stack, e).status == 200
    s = sub_row(stack, e["data"]["object"]["id"])
    assert s[3] == STATUS_MAP[status][0]
    assert len(instances(stack, s[0])) == STATUS_MAP[status][1]


@pytest.mark.parametrize("status", sorted(FROM_ACTIVE))
def test_every_status_from_active(stack, status):
    cust = "cus_" + uid()
    new_account(stack, cust)
    sub = "sub_" + uid()
    t = int(time.time()) - 100
    assert send(stack, sub_event(sub=sub, customer=cust, created=t)).status == 200
    kind = {"paused": "paused", "canceled": "updated"}.get(status, "updated")
    assert send(stack, sub_event(kind, sub=sub, customer=cust, status=status, created=t + 1)).status == 200
    s = sub_row(stack, sub)
    assert s[3] == STATUS_MAP[status][0]
    inst = instances(stack, s[0])
    assert len(inst) == 1
    want = FROM_ACTIVE[status]
    assert (inst[0][1], inst[0][2], inst[0][7]) == want


def test_stopped_instance_is_resumed(stack, listener):
    cust = "cus_" + uid()
    new_account(stack, cust)
    sub = "sub_" + uid()
    t = int(time.time()) - 100
    assert send(stack, sub_event(sub=sub, customer=cust, created=t)).status == 200
    sid = sub_row(stack, sub)[0]
    # The lifecycle ran it and then stopped it for non-payment.
    stack.sql("UPDATE instances SET status = 'running', applied_config_version = config_version,"
              " welcome_email_sent_at = now() WHERE subscription_id = %s", sid)
    listener.count()
    assert send(stack, sub_event("updated", sub=sub, customer=cust, status="unpaid",
                                 created=t + 1)).status == 200
    assert instances(stack, sid)[0][7] == "stop" and listener.count() == 1
    stack.sql("UPDATE instances SET status = 'stopped' WHERE subscription_id = %s", sid)
    listener.count()
    assert send(stack, sub_event("updated", sub=sub, customer=cust, status="active",
                                 created=t + 2)).status == 200
    inst = instances(stack, sid)
    assert len(inst) == 1 and (inst[0][1], inst[0][2], inst[0][7]) == ("stopped", "running", "start")
    assert listener.count() == 1


def test_delete_deprovisions(stack):
    cust = "cus_" + uid()
    new_account(stack, cust)
    sub = "sub_" + uid()
    t = int(time.time()) - 100
    assert send(stack, sub_event(shape="legacy", sub=sub, customer=cust, created=t)).status == 200
    d = sub_event("deleted", shape="legacy", sub=sub, customer=cust, status="canceled", created=t + 10)
    assert send(stack, d).status == 200
    s = sub_row(stack, sub)
    assert s[3] == "cancelled" and int(s[8].timestamp()) == d["data"]["object"]["canceled_at"]
    inst = instances(stack, s[0])
    assert len(inst) == 1 and (inst[0][2], inst[0][7]) == ("deprovisioned", "destroy")
    # A late "updated ... active" from before the deletion changes nothing.
    late = sub_event("updated", sub=sub, customer=cust, status="active", created=t + 5)
    assert send(stack, late).json == {"received": True, "stale": True}
    assert sub_row(stack, sub)[3] == "cancelled"


# ---- idempotency and ordering -------------------------------------------------------

def test_same_event_twice(stack):
    cust = "cus_" + uid()
    new_account(stack, cust)
    e = sub_event(customer=cust)
    assert send(stack, e).json == {"received": True}
    before = total_writes(stack)
    assert send(stack, e).json == {"received": True, "duplicate": True}
    assert total_writes(stack) == before
    assert event_row(stack, e["id"]) == ("processed", None, 1)


def test_ten_concurrent_deliveries(stack):
    cust = "cus_" + uid()
    new_account(stack, cust)
    e = sub_event(customer=cust)
    audits = count(stack, "SELECT count(*) FROM audit_logs")
    with ThreadPoolExecutor(10) as pool:
        rs = list(pool.map(lambda _: send(stack, e), range(10)))
    assert [r.status for r in rs] == [200] * 10
    assert sum(1 for r in rs if r.json.get("duplicate")) == 9
    s = sub_row(stack, e["data"]["object"]["id"])
    assert len(instances(stack, s[0])) == 1
    assert count(stack, "SELECT count(*) FROM subscriptions WHERE stripe_subscription_id = %s",
                 e["data"]["object"]["id"]) == 1
    assert event_row(stack, e["id"]) == ("processed", None, 1)
    # one subscription.created and one instance.created audit row, nothing doubled
    assert count(stack, "SELECT count(*) FROM audit_logs") == audits + 2


def test_updated_before_created(stack):
    cust = "cus_" + uid()
    new_account(stack, cust)
    sub = "sub_" + uid()
    t = int(time.time()) - 100
    u = sub_event("updated", sub=sub, customer=cust, price="price_professional", created=t + 3)
    c = sub_event("created", sub=sub, customer=cust, price="price_starter", created=t)
    assert send(stack, u).json == {"received": True}
    assert send(stack, c).json == {"received": True, "stale": True}
    s = sub_row(stack, sub)
    assert (s[2], s[10]) == ("professional", u["id"])
    assert len(instances(stack, s[0])) == 1
    assert event_row(stack, c["id"])[0] == "stale"


def test_older_event_after_newer(stack):
    cust = "cus_" + uid()
    new_account(stack, cust)
    sub = "sub_" + uid()
    t = int(time.time()) - 100
    assert send(stack, sub_event(sub=sub, customer=cust, created=t)).status == 200
    newer = sub_event("updated", sub=sub, customer=cust, status="active",
                      price="price_professional", created=t + 20)
    older = sub_event("updated", sub=sub, customer=cust, status="past_due", created=t + 10)
    assert send(stack, newer).status == 200
    assert send(stack, older).json == {"received": True, "stale": True}
    s = sub_row(stack, sub)
    assert (s[2], s[3], s[10]) == ("professional", "active", newer["id"])


def test_same_second_events_converge(stack):
    """Two orders of the same same-second events end in the same row: an update
    beats the creation, and of two updates the later lifecycle status wins."""
    t = int(time.time()) - 100
    finals = []
    for order in (0, 1):
        cust = "cus_" + uid()
        new_account(stack, cust)
        sub = "sub_" + uid()
        evs = [sub_event("created", sub=sub, customer=cust, price="price_starter", created=t),
               sub_event("updated", sub=sub, customer=cust, status="active",
                         price="price_professional", created=t),
               sub_event("updated", sub=sub, customer=cust, status="past_due",
                         price="price_professional", created=t)]
        for e in (evs if order == 0 else reversed(evs)):
            assert send(stack, e).status == 200
        s = sub_row(stack, sub)
        finals.append((s[2], s[3], s[10] == evs[2]["id"]))
        assert len(instances(stack, s[0])) == 1
    assert finals == [("professional", "past_due", True)] * 2


# ---- accounts ------------------------------------------------------------------------

def test_events_wait_for_our_customer_creation_then_apply(stack):
    """Stripe may send a customer's events before our record of creating that
    customer is committed: they are deferred (503, Stripe retries), and the
    redelivery after our record lands applies them."""
    aid = new_account(stack)                      # signed up; checkout under way
    attempt = begin_customer(stack, aid)          # we asked Stripe for a customer...
    cust = "cus_" + uid()                         # ...which Stripe created as this id
    e = sub_event(customer=cust)                  # no metadata.account_id
    before = total_writes(stack)
    r = send(stack, e)
    assert r.status == 503 and r.json["error"]["code"] == "account_not_found"
    st, err, attempts = event_row(stack, e["id"])
    assert (st, attempts) == ("deferred", 1) and "unknown account" in err
    co = checkout_event(cust, ref=aid, meta=aid)
    r = send(stack, co)
    assert r.status == 503 and r.json["error"] == {
        "code": "account_not_found",
        "message": "unknown account: the named account's Stripe customer is still being created"}
    after = total_writes(stack)
    assert after[0] == before[0] + 2 and after[1:] == before[1:]   # only the events recorded

    finish_customer(stack, attempt, cust)         # our record of the customer commits
    # Stripe's redeliveries are processed now, not duplicates.
    assert send(stack, co).json == {"received": True}
    assert send(stack, e).json == {"received": True}
    assert event_row(stack, e["id"]) == ("processed", None, 2)
    s = sub_row(stack, e["data"]["object"]["id"])
    assert str(s[1]) == aid and len(instances(stack, s[0])) == 1
    assert send(stack, e).json == {"received": True, "duplicate": True}


def test_a_claim_never_links_a_customer(stack):
    """metadata.account_id and client_reference_id name an account; only a
    customer we created for it links it. A claim the customer does not back is
    refused (200: a retry cannot change it), recorded and audited, and links nothing."""
    aid = new_account(stack)
    cust = "cus_" + uid()
    e = sub_event(shape="legacy", customer=cust, account_id=aid)
    r = send(stack, e)
    assert r.status == 200 and r.json == {
        "received": True,
        "refused": "account link refused: the account it names has no Stripe customer of ours"}
    assert event_row(stack, e["id"])[0] == "refused"
    assert one(stack, "SELECT stripe_customer_id FROM accounts WHERE id = %s", aid)[0] is None
    assert count(stack, "SELECT count(*) FROM subscriptions WHERE account_id = %s", aid) == 0
    audit = one(stack, "SELECT account_id::text, details FROM audit_logs"
                       " WHERE action = 'stripe.account_link_refused' AND details->>'event_id' = %s",
                e["id"])
    assert audit[0] == aid and audit[1]["customer"] == cust and audit[1]["claimed_account"] == aid
    assert send(stack, e).json == {"received": True, "duplicate": True}

    # The same claim from a customer we created for that account applies.
    link_customer(stack, aid, cust)
    u = sub_event("updated", sub=e["data"]["object"]["id"], customer=cust, account_id=aid,
                  created=e["created"] + 1)
    assert send(stack, u).json == {"received": True}
    assert str(sub_row(stack, e["data"]["object"]["id"])[1]) == aid
    # So does its checkout; naming another account from it is refused.
    assert send(stack, checkout_event(cust, ref=aid, meta=aid)).json == {"received": True}
    other = new_account(stack)
    r = send(stack, checkout_event(cust, ref=other))
    assert r.json == {"received": True,
                      "refused": "account link refused: it names an account other than its customer's"}
    assert one(stack, "SELECT stripe_customer_id FROM accounts WHERE id = %s", other)[0] is None


def test_deferred_event_reprocessed_by_sql(stack):
    """The worker's Stripe sweep's path: public.reprocess_stripe_event(id)."""
    aid = new_account(stack)
    cust = "cus_" + uid()
    e = sub_event(customer=cust)
    assert send(stack, e).status == 503
    link_customer(stack, aid, cust)
    # As the sweep runs it: service_role, which is all the function needs.
    out = one(stack, "SET ROLE service_role; SELECT public.reprocess_stripe_event(%s)", e["id"])[0]
    assert out["result"] == "processed" and out["owed"] == "create"
    assert event_row(stack, e["id"]) == ("processed", None, 2)


def test_unknown_price_recorded(stack):
    cust = "cus_" + uid()
    new_account(stack, cust)
    e = sub_event(customer=cust, price="price_nobody_knows_" + uid())
    r = send(stack, e)
    assert r.status == 200 and r.json["received"] is True and "unknown price" in r.json["failed"]
    st, err, _ = event_row(stack, e["id"])
    assert st == "failed" and "unknown price" in err
    assert stack.sql("SELECT 1 FROM subscriptions WHERE stripe_subscription_id = %s",
                     e["data"]["object"]["id"]) == []
    assert send(stack, e).json == {"received": True, "duplicate": True}


def test_unhandled_type_ignored(stack):
    e = fixture("stripe_customer_created.json")
    e["id"] = "evt_" + uid()
    before = total_writes(stack)
    assert send(stack, e).json == {"received": True, "ignored": True}
    assert event_row(stack, e["id"])[0] == "ignored"
    after = total_writes(stack)
    assert after[0] == before[0] + 1 and after[1:] == before[1:]


def test_invoices_audited(stack):
    cust = "cus_" + uid()
    aid = new_account(stack, cust)
    for name, action in (("stripe_invoice_paid_basil.json", "stripe.invoice.paid"),
                         ("stripe_invoice_payment_failed_legacy.json", "stripe.invoice.payment_failed")):
        e = fixture(name)
        e["id"] = "evt_" + uid()
        e["data"]["object"]["customer"] = cust
        assert send(stack, e).json == {"received": True}
        row = one(stack, "SELECT action, details FROM audit_logs WHERE account_id = %s"
                         " AND details->>'event_id' = %s", aid, e["id"])
        assert row[0] == action
        assert row[1]["invoice_id"] == e["data"]["object"]["id"]
        assert row[1]["amount_due"] == e["data"]["object"]["amount_due"]
        assert row[1]["subscription"].startswith("sub_")


def test_refunds_and_disputes_audited(stack):
    # A refund of our customer's charge: on the account, with what went back.
    cust = "cus_" + uid()
    aid = new_account(stack, cust)
    e = fixture("stripe_charge_refunded.json")
    e["id"] = "evt_" + uid()
    e["data"]["object"]["customer"] = cust
    assert send(stack, e).json == {"received": True}
    action, details = one(stack, "SELECT action, details FROM audit_logs WHERE account_id = %s"
                                 " AND details->>'event_id' = %s", aid, e["id"])
    assert action == "stripe.charge.refunded"
    assert details == {"event_id": e["id"], "charge_id": "ch_3QrefundedCharge0000001",
                       "customer": cust, "payment_intent": "pi_3QrefundedCharge0000001",
                       "amount": 2000, "amount_refunded": 2000, "currency": "usd", "refunded": True}
    assert send(stack, e).json == {"received": True, "duplicate": True}
    assert count(stack, "SELECT count(*) FROM audit_logs WHERE details->>'event_id' = %s", e["id"]) == 1

    # A refund of a customer that is not ours is recorded, not deferred for Stripe
    # to retry for days.
    e = fixture("stripe_charge_refunded.json")
    e["id"] = "evt_" + uid()
    e["data"]["object"]["customer"] = "cus_" + uid()
    assert send(stack, e).json == {"received": True}
    assert event_row(stack, e["id"]) == ("processed", None, 1)
    assert one(stack, "SELECT account_id FROM audit_logs WHERE details->>'event_id' = %s",
               e["id"]) == (None,)

    # A dispute opened, then lost: the operator's rows (a dispute names no customer),
    # with when its evidence is due.
    for status, type_ in (("needs_response", "charge.dispute.created"), ("lost", "charge.dispute.closed")):
        e = fixture("stripe_charge_dispute_created.json")
        e["id"] = "evt_" + uid()
        e["type"] = type_
        e["data"]["object"]["status"] = status
        assert send(stack, e).json == {"received": True}
        account, action, details = one(stack, "SELECT account_id, action, details FROM audit_logs"
                                              " WHERE details->>'event_id' = %s", e["id"])
        assert (account, action) == (None, "stripe." + type_)
        assert details == {"event_id": e["id"], "dispute_id": "dp_1QdisputeCreated0000001",
                           "charge_id": "ch_3QdisputedCharge000001",
                           "payment_intent": "pi_3QdisputedCharge000001", "amount": 2000,
                           "currency": "usd", "reason": "fraudulent", "status": status,
                           "evidence_due_by": 1744329599}


# ---- the database goes away ------------------------------------------------------------

def test_database_stopped_mid_run(stack):
    cust = "cus_" + uid()
    new_account(stack, cust)
    t = int(time.time()) - 100
    first = sub_event(customer=cust, created=t)
    assert send(stack, first).status == 200
    during = [sub_event(customer=cust, created=t + i) for i in range(1, 4)]
    stack.stop_db()
    try:
        for e in during:
            r = send(stack, e)
            assert r.status == 503 and r.json["error"]["code"] == "database_unavailable"
    finally:
        stack.start_db()
    # Stripe redelivers everything, the already-applied one too.
    assert send(stack, first).json == {"received": True, "duplicate": True}
    for e in during:
        assert send(stack, e).json == {"received": True}
        s = sub_row(stack, e["data"]["object"]["id"])
        assert len(instances(stack, s[0])) == 1
        assert event_row(stack, e["id"]) == ("processed", None, 1)
    for e in during:
        assert send(stack, e).json == {"received": True, "duplicate": True}


# ---- configuration ------------------------------------------------------------------------

def start_alone(stack, tmp_path, **env):
    """Starts the webhook binary outside the stack with env (plus the stack's
    DATABASE_URL and a socket of its own); returns the finished process."""
    binary = mr.build_dir() / "bin" / "handle-stripe-webhook"
    full = {k: os.environ[k] for k in ("PATH", "ASAN_OPTIONS", "UBSAN_OPTIONS") if k in os.environ}
    full.update({"DATABASE_URL": stack.env["DATABASE_URL"], "MR_SOCKET": str(tmp_path / "s.sock")})
    full.update(env)
    return subprocess.run([str(binary)], env=full, capture_output=True, timeout=20)


def test_secret_with_whitespace_stops_startup(stack, tmp_path):
    p = start_alone(stack, tmp_path, STRIPE_WEBHOOK_SECRET="whsec_aaa, whsec_bbb")
    assert p.returncode == 2
    err = p.stderr.decode()
    assert "STRIPE_WEBHOOK_SECRET" in err and "whitespace" in err
    assert "whsec_aaa" not in err and "whsec_bbb" not in err


@pytest.mark.parametrize("key, says", [
    ("pk_live_" + "a" * 24, "holds a publishable key"),
    ("sk_live_" + "a" * 24 + "\n", "whitespace"),
    ("sk_prod_" + "a" * 24, "must be a secret key"),
])
def test_a_malformed_secret_key_stops_startup(stack, tmp_path, key, says):
    p = start_alone(stack, tmp_path, STRIPE_WEBHOOK_SECRET=NEW_SECRET, STRIPE_SECRET_KEY=key)
    assert p.returncode == 2
    err = p.stderr.decode()
    assert "STRIPE_SECRET_KEY" in err and says in err, err
    assert key.strip() not in err


# ---- livemode: events of the other mode than STRIPE_SECRET_KEY's --------------------------

@pytest.fixture(scope="module")
def live(pg):
    env = {"STRIPE_WEBHOOK_SECRET": NEW_SECRET, "STRIPE_SECRET_KEY": "rk_live_" + uuid.uuid4().hex}
    with mr.Stack(pg, env=env, functions=["handle-stripe-webhook"], workers=1) as s:
        yield s


def test_livemode_mismatch_is_refused_and_writes_nothing(live, stack):
    cust = "cus_" + uid()
    new_account(live, cust)
    e = sub_event(customer=cust)
    assert e["livemode"] is False                  # the fixtures are test-mode events
    before = total_writes(live)
    for _ in range(2):                             # never remembered, never recorded
        r = send(live, e)
        assert r.status == 400 and r.json["error"] == {
            "code": "livemode_mismatch",
            "message": "a test-mode event, but this server uses a live-mode Stripe key"}
    assert total_writes(live) == before
    e["livemode"] = True
    assert send(live, e).json == {"received": True}
    assert one(live, "SELECT livemode FROM stripe_events WHERE id = %s", e["id"])[0] is True
    # livemode must be a boolean when present; without a key either mode is taken.
    bad = dict(sub_event(customer=cust), livemode="true")
    r = send(live, bad)
    assert r.status == 400 and r.json["error"]["code"] == "invalid_event"
    cust2 = "cus_" + uid()
    new_account(stack, cust2)
    lv = dict(sub_event(customer=cust2), livemode=True)
    assert send(stack, lv).json == {"received": True}


# ---- the memory of settled events (STRIPE_DUPLICATE_CACHE_SECONDS) ------------------------
# One worker, so that every delivery meets the same memory; a 2 s memory so that
# its expiry can be watched.

MEMORY_S = 2


@pytest.fixture(scope="module")
def one_worker(pg):
    env = {"STRIPE_WEBHOOK_SECRET": NEW_SECRET, "STRIPE_DUPLICATE_CACHE_SECONDS": str(MEMORY_S)}
    with mr.Stack(pg, env=env, functions=["handle-stripe-webhook"], workers=1) as s:
        yield s


def test_settled_event_answered_while_database_is_down(one_worker):
    s = one_worker
    cust = "cus_" + uid()
    new_account(s, cust)
    e = sub_event(customer=cust)
    assert send(s, e).json == {"received": True}
    s.stop_db()
    try:
        # A redelivery of what PostgreSQL already settled needs no database ...
        r = send(s, e)
        assert (r.status, r.json) == (200, {"received": True, "duplicate": True})
        # ... anything else still does, and says so.
        r = send(s, sub_event(customer=cust))
        assert r.status == 503 and r.json["error"]["code"] == "database_unavailable"
    finally:
        s.start_db()
    assert event_row(s, e["id"]) == ("processed", None, 1)


def test_memory_of_an_event_expires(one_worker):
    """The memory is at most MEMORY_S behind the database: a row deleted by hand
    is answered "duplicate" (and nothing written) until then, and processed again
    after."""
    s = one_worker
    cust = "cus_" + uid()
    new_account(s, cust)
    e = sub_event(customer=cust)
    assert send(s, e).json == {"received": True}
    s.sql("DELETE FROM stripe_events WHERE id = %s", e["id"])
    assert send(s, e).json == {"received": True, "duplicate": True}
    assert count(s, "SELECT count(*) FROM stripe_events WHERE id = %s", e["id"]) == 0
    time.sleep(MEMORY_S + 0.2)
    # Asked again: the database records the event anew (same state, nothing owed).
    assert send(s, e).json == {"received": True}
    assert event_row(s, e["id"]) == ("processed", None, 1)
    assert send(s, e).json == {"received": True, "duplicate": True}


def test_deferred_event_is_not_remembered(one_worker):
    s = one_worker
    cust = "cus_" + uid()
    e = sub_event(customer=cust)
    for _ in range(2):
        r = send(s, e)
        assert r.status == 503 and r.json["error"]["code"] == "account_not_found"
    new_account(s, cust)
    assert send(s, e).json == {"received": True}
    assert event_row(s, e["id"])[0] == "processed"
    assert send(s, e).json == {"received": True, "duplicate": True}


@pytest.mark.parametrize("value", ["-1", "3601", "ten"])
def test_bad_memory_setting_stops_startup(stack, tmp_path, value):
    p = start_alone(stack, tmp_path, STRIPE_WEBHOOK_SECRET=NEW_SECRET,
                    STRIPE_DUPLICATE_CACHE_SECONDS=value)
    assert p.returncode == 2
    assert "STRIPE_DUPLICATE_CACHE_SECONDS" in p.stderr.decode()


# ---- deliveries that arrive together ---------------------------------------------------
# The one worker is held on a first delivery (its event row waits for a table lock a
# test session holds) while others queue on its socket; released, it takes those
# that are waiting as one batch: one transaction, each event its own outcome.

@contextlib.contextmanager
def worker_held(s, first):
    """The one worker busy with delivering `first` until release() (or the block's
    end): its event row waits for a lock a test session holds on stripe_events.
    Yields a thread pool, first's future and release; whatever the block sends
    meanwhile queues on the socket."""
    lock = psycopg2.connect(s.pg.conninfo(s.db))
    pool = ThreadPoolExecutor(16)
    try:
        with lock.cursor() as c:
            c.execute("BEGIN; LOCK TABLE stripe_events IN EXCLUSIVE MODE")
        held = pool.submit(send, s, first)
        deadline = time.monotonic() + 10
        while count(s, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                       " AND query LIKE '%%process_stripe_event%%'") != 1:
            assert time.monotonic() < deadline, "the first delivery never waited for the lock"
            time.sleep(0.02)
        yield pool, held, lock.rollback
    finally:
        lock.rollback()
        lock.close()
        pool.shutdown()


def queued(s, n):
    """Waits until n connections wait on the webhook's socket (its accept queue, as
    `ss` reads it from the kernel)."""
    path = str(s.socket_path("handle-stripe-webhook"))  # bound as <path>.<pid>.new, then renamed
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True, check=True).stdout
        got = [int(f[2]) for f in map(str.split, out.splitlines())
               if len(f) > 4 and f[1] == "LISTEN" and (f[4] == path or f[4].startswith(path + "."))]
        if got == [n]:
            return
        assert time.monotonic() < deadline, "%s connections waiting, not %d" % (got, n)
        time.sleep(0.02)


def deliver(s, e, raw, rid):
    body = raw if raw is not None else json.dumps(e, separators=(",", ":")).encode()
    return s.call("POST", "handle-stripe-webhook", body=body, headers={
        "Content-Type": "application/json", "X-Request-Id": rid, "User-Agent": "agent-" + rid,
        "Stripe-Signature": mr.stripe_sign(body, NEW_SECRET)})


def held_then_batched(s, first, batch):
    """Sends `first` and, while the worker is held on it, every delivery of `batch`
    (a list of (event, raw body or None, request id)); then lets go. Returns (first's
    answer, the batch's answers in order)."""
    with worker_held(s, first) as (pool, held, release):
        answers = []
        for item in batch:   # in this order on the socket
            answers.append(pool.submit(deliver, s, *item))
            queued(s, len(answers))
        assert not held.done() and not any(a.done() for a in answers)
        release()
        return held.result(timeout=30), [a.result(timeout=30) for a in answers]


def invoice_paid(customer):
    """An invoice.paid event of its own for the customer."""
    e = fixture("stripe_invoice_paid_basil.json")
    e["id"] = "evt_" + uid()
    e["data"]["object"]["customer"] = customer
    return e


def request_notes(s, rids):
    """The notes of the deliveries' log lines, once every one is written (a webhook
    worker writes its lines when it is about to wait)."""
    def notes():
        lines = [json.loads(l) for l in s.log("handle-stripe-webhook").splitlines()
                 if l.startswith("{")]
        got = {l["request_id"]: l.get("note", "") for l in lines
               if l.get("msg") == "request" and l.get("request_id") in rids}
        return got if len(got) == len(set(rids)) else None
    return wait_until(notes, timeout=10, interval=0.02, what="the deliveries' log lines")


def test_deliveries_that_arrive_together_share_one_commit_and_keep_their_own_outcomes(one_worker):
    s = one_worker
    lst = Listener(s)
    try:
        custs = ["cus_" + uid() for _ in range(3)]
        aids = [new_account(s, c) for c in custs]
        paid = invoice_paid(custs[1])
        created = sub_event(customer=custs[2])
        unknown = sub_event(customer="cus_" + uid())   # no account yet: deferred
        other = invoice_paid(custs[0])
        other["type"] = "charge.succeeded"
        rids = ["batch" + uid() for _ in range(4)]
        lst.count(0)
        first, answers = held_then_batched(s, sub_event(customer=custs[0]), list(zip(
            (paid, created, unknown, other), (None,) * 4, rids)))
        assert (first.status, first.json) == (200, {"received": True})
        assert [(a.status, a.json) for a in answers] == [
            (200, {"received": True}), (200, {"received": True}),
            (503, {"error": {"code": "account_not_found",
                             "message": answers[2].json["error"]["message"]}}),
            (200, {"received": True, "ignored": True})]
        # One transaction: each line says how many it was committed with.
        notes = request_notes(s, rids)
        assert [notes[r].split(": ", 1)[1] for r in rids] == [
            "processed, owed none (one commit with 3 more)",
            "processed, owed create (one commit with 3 more)",
            "deferred, owed none (one commit with 3 more)",
            "ignored, owed none (one commit with 3 more)"]
        assert [event_row(s, e["id"])[0] for e in (paid, created, unknown, other)] == [
            "processed", "processed", "deferred", "ignored"]
        # Each event's audit rows carry its own delivery's context, not the batch's first.
        assert s.sql("SELECT request_id, user_agent FROM audit_logs WHERE account_id = %s"
                     " AND action LIKE 'stripe.%%'", aids[1]) == [(rids[0], "agent-" + rids[0])]
        assert sorted(s.sql("SELECT action, request_id, user_agent FROM audit_logs"
                            " WHERE account_id = %s AND action LIKE '%%.created'", aids[2])) == [
            ("instance.created", rids[1], "agent-" + rids[1]),
            ("subscription.created", rids[1], "agent-" + rids[1])]
        # The new instance woke the lifecycle worker.
        assert lst.count() >= 1
    finally:
        lst.close()


def test_an_event_the_database_refuses_is_answered_alone_and_the_batch_is_still_recorded(one_worker):
    s = one_worker
    cust = "cus_" + uid()
    aid = new_account(s, cust)
    good = [invoice_paid(cust) for _ in range(2)]
    # Valid JSON the webhook accepts, but not as jsonb: PostgreSQL refuses \u0000.
    bad = invoice_paid(cust)
    bad["data"]["object"]["description"] = "NUL"
    raw = json.dumps(bad, separators=(",", ":")).replace('"NUL"', '"\\u0000"').encode()
    rids = ["refused" + uid() for _ in range(3)]
    first, answers = held_then_batched(s, sub_event(customer=cust), [
        (good[0], None, rids[0]), (bad, raw, rids[1]), (good[1], None, rids[2])])
    assert first.status == 200
    assert [a.status for a in answers] == [200, 400, 200]
    assert answers[1].json["error"]["code"] == "invalid_event"
    assert [event_row(s, e["id"])[0] for e in good] == ["processed", "processed"]
    assert count(s, "SELECT count(*) FROM stripe_events WHERE id = %s", bad["id"]) == 0
    # Applied alone after the shared transaction failed: each its own commit.
    notes = request_notes(s, rids)
    assert not any("one commit with" in notes[r] for r in rids), notes
    assert sorted(r for (r,) in s.sql("SELECT request_id FROM audit_logs WHERE account_id = %s"
                                      " AND action = 'stripe.invoice.paid'", aid)) == sorted(
        [rids[0], rids[2]])


def test_a_batch_of_slow_events_each_within_its_timeout_is_answered(one_worker):
    """Each event takes 1.9 s in PostgreSQL, well under the 5 s statement timeout,
    and alone is a 200. Four in one batch take 7.6 s together, beyond one
    statement's answer window (its timeout + 2 s). The server times each statement
    alone, so the webhook waits for a batch of n its n timeouts + 2 s: the batch is
    answered 200, not 503 while the server commits it."""
    s = one_worker
    s.sql("""CREATE FUNCTION public.test_slow_event() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.payload #>> '{data,object,description}' = 'slow' THEN
                 PERFORM pg_catalog.pg_sleep(1.9);
               END IF;
               RETURN NEW;
             END $$""")
    s.sql("CREATE TRIGGER test_slow_event BEFORE INSERT ON public.stripe_events"
          " FOR EACH ROW EXECUTE FUNCTION public.test_slow_event()")
    try:
        cust = "cus_" + uid()
        new_account(s, cust)
        events = [invoice_paid(cust) for _ in range(5)]
        for e in events:
            e["data"]["object"]["description"] = "slow"
        assert send(s, events.pop()).status == 200
        rids = ["slow" + uid() for _ in range(4)]
        t0 = time.monotonic()
        first, answers = held_then_batched(s, sub_event(customer=cust),
                                           [(e, None, r) for e, r in zip(events, rids)])
        assert time.monotonic() - t0 > 7.0      # the batch did outlast one window
        assert first.status == 200
        assert [a.status for a in answers] == [200] * 4
        assert [event_row(s, e["id"])[0] for e in events] == ["processed"] * 4
        notes = request_notes(s, rids)
        assert all("one commit with" in notes[r] for r in rids), notes
    finally:
        s.sql("DROP TRIGGER IF EXISTS test_slow_event ON public.stripe_events")
        s.sql("DROP FUNCTION IF EXISTS public.test_slow_event()")


def test_a_database_that_does_not_answer_is_given_up_on_after_the_window(pg):
    """A server that takes a delivery's statements and answers nothing (its backend
    stopped: a pooler queueing forever, a dead path) is given up on after the
    statement timeout + 2 s: 503, the connection dropped; once it answers again
    the same delivery is a 200."""
    env = {"STRIPE_WEBHOOK_SECRET": NEW_SECRET, "MR_DB_STATEMENT_TIMEOUT_MS": "1000"}
    with mr.Stack(pg, env=env, functions=["handle-stripe-webhook"], workers=1) as s:
        cust = "cus_" + uid()
        new_account(s, cust)
        assert send(s, invoice_paid(cust)).status == 200     # the worker's connection is open
        (pid,), = s.sql("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name = 'handle-stripe-webhook'")
        e = invoice_paid(cust)
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = send(s, e)
            took = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert r.status == 503 and r.json["error"]["code"] == "database_unavailable"
        assert 2.8 < took < 5.0, took
        assert send(s, e).status == 200
        assert event_row(s, e["id"])[0] == "processed"


def test_a_delivery_still_arriving_does_not_hold_up_the_others(one_worker):
    """Of the connections waiting when the worker is free again, one whose request
    has not arrived whole is served after the batch, with its own deadline: the
    deliveries behind it are answered at once, not after it."""
    s = one_worker
    cust = "cus_" + uid()
    new_account(s, cust)
    events = [invoice_paid(cust) for _ in range(3)]
    rids = ["late" + uid() for _ in range(3)]
    body = json.dumps(events[1], separators=(",", ":")).encode()
    whole = fcgi.request("POST", "/functions/v1/handle-stripe-webhook", body, extra={
        "HTTP_STRIPE_SIGNATURE": mr.stripe_sign(body, NEW_SECRET), "HTTP_X_REQUEST_ID": rids[1]})
    slow = socket.socket(socket.AF_UNIX)
    slow.settimeout(30)
    try:
        with worker_held(s, sub_event(customer=cust)) as (pool, held, release):
            first = pool.submit(deliver, s, events[0], None, rids[0])
            queued(s, 1)
            slow.connect(str(s.socket_path("handle-stripe-webhook")))
            slow.sendall(whole[:40])   # its BEGIN_REQUEST and part of its params
            queued(s, 2)
            last = pool.submit(deliver, s, events[2], None, rids[2])
            queued(s, 3)
            assert not any(f.done() for f in (held, first, last))
            t0 = time.monotonic()
            release()
            assert [first.result(timeout=30).status, last.result(timeout=30).status] == [200, 200]
            # At once, not after the slow one's deadline (5 s).
            assert time.monotonic() - t0 < 2.0
        notes = request_notes(s, [rids[0], rids[2]])   # rids[1] is still arriving
        assert notes[rids[0]].endswith("(one commit with 1 more)"), notes
        assert notes[rids[2]].endswith("(one commit with 1 more)"), notes
        slow.sendall(whole[40:])
        status, _, answer = fcgi.read_response(slow)
        assert (status, json.loads(answer)) == (200, {"received": True})
    finally:
        slow.close()
    assert [event_row(s, e["id"])[0] for e in events] == ["processed"] * 3


def test_a_stop_is_taken_after_the_delivery_in_hand_even_with_more_waiting(pg):
    """SIGTERM while the one worker applies a delivery and ten more wait on its socket:
    the delivery in hand is answered, then the worker stops instead of taking what
    waits (Stripe delivers those again), as a worker that waits in accept does."""
    with mr.Stack(pg, env={"STRIPE_WEBHOOK_SECRET": NEW_SECRET},
                  functions=["handle-stripe-webhook"], workers=1) as s:
        p = s.procs["handle-stripe-webhook"]
        cust = "cus_" + uid()
        new_account(s, cust)
        events = [invoice_paid(cust) for _ in range(10)]
        with worker_held(s, sub_event(customer=cust)) as (pool, held, release):
            waiting = []
            for e in events:
                waiting.append(pool.submit(deliver, s, e, None, "stop" + uid()))
                queued(s, len(waiting))
            p.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert p.poll() is None   # draining the delivery in hand
            t0 = time.monotonic()
            release()
            assert held.result(timeout=30).status == 200
            assert p.wait(10) == 0
            assert time.monotonic() - t0 < 2.0
            assert [w.result(timeout=30).status for w in waiting] == [502] * 10
        assert count(s, "SELECT count(*) FROM stripe_events WHERE id = ANY(%s)",
                     [e["id"] for e in events]) == 0
        s.procs.pop("handle-stripe-webhook")
