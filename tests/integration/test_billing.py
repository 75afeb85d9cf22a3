"""Selling through real nginx and PostgreSQL: create-checkout-session,
create-portal-session and list-plans against the Stripe API stand-in
(tests/standins/stripe_api.py), which speaks Stripe's wire format (form bodies,
Idempotency-Key replay, its error shape). Each test asserts what a user would
notice: the answer, the rows, and the exact requests Stripe received.
"""
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest

import mr
from lifecycle_helpers import instance, new_account, stack_env, wait_status, wait_until

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "standins"))
from stripe_api import StripeStandin  # noqa: E402

SUCCESS_URL = "https://app.mindroom.test/billing/done?session_id={CHECKOUT_SESSION_ID}"
CANCEL_URL = "https://app.mindroom.test/pricing"
RETURN_URL = "https://app.mindroom.test/account"
PUBLISHABLE_KEY = "sb_publishable_" + secrets.token_urlsafe(24)
FUNCS = ["create-checkout-session", "create-portal-session", "list-plans",
         "handle-stripe-webhook", "mindroom-lifecycle", "my-instance"]


@pytest.fixture(scope="module")
def stripe():
    with StripeStandin() as s:
        yield s


@pytest.fixture(scope="module")
def stack(pg, stripe, prov, resend):
    env = stack_env(prov, resend, STRIPE_SECRET_KEY=stripe.key, STRIPE_API_BASE=stripe.url,
                    STRIPE_CHECKOUT_SUCCESS_URL=SUCCESS_URL, STRIPE_CHECKOUT_CANCEL_URL=CANCEL_URL,
                    STRIPE_PORTAL_RETURN_URL=RETURN_URL, STRIPE_ALLOW_PROMOTION_CODES="1",
                    SUPABASE_PUBLISHABLE_KEYS=PUBLISHABLE_KEY)
    with mr.Stack(pg, env=env, functions=FUNCS) as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(stripe):
    stripe.reset()
    yield
    stripe.release()


# ---- helpers -----------------------------------------------------------------------

def user(stack):
    """A signed-up user: (account id, email, their access token)."""
    acc, email = new_account(stack)
    return acc, email, stack.jwt(role="authenticated", sub=acc)


def checkout(stack, token, **body):
    return stack.call("POST", "create-checkout-session", json=body, token=token)


def portal(stack, token, body=None):
    return stack.call("POST", "create-portal-session", json=body, token=token)


def attempts(stack, acc):
    return stack.sql("SELECT kind, status, idempotency_key, object_id, calls FROM "
                     "public.billing_attempts WHERE account_id = %s ORDER BY created_at, kind", acc)


def customer_of(stack, acc):
    return stack.sql("SELECT stripe_customer_id FROM public.accounts WHERE id = %s", acc)[0][0]


def made_for(stripe, acc):
    """The ids of the customers Stripe holds that were made for this account."""
    return [c["id"] for c in stripe.customers.values() if c["metadata"] == {"account_id": acc}]


def error(r):
    assert r.headers.get("Content-Type", "").startswith("application/json"), r
    assert set(r.json) == {"error"} and set(r.json["error"]) == {"code", "message"}, r
    return r.json["error"]


def session_pairs(acc, customer, price, trial=None):
    """The exact form the checkout function sends for this account and plan."""
    pairs = [("mode", "subscription"), ("customer", customer), ("client_reference_id", acc),
             ("line_items[0][price]", price), ("line_items[0][quantity]", "1"),
             ("success_url", SUCCESS_URL), ("cancel_url", CANCEL_URL),
             ("metadata[account_id]", acc), ("subscription_data[metadata][account_id]", acc)]
    if trial:
        pairs.append(("subscription_data[trial_period_days]", str(trial)))
    pairs.append(("allow_promotion_codes", "true"))
    return pairs


# ---- checkout ------------------------------------------------------------------------

def test_checkout_creates_one_customer_and_one_session(stack, stripe):
    acc, email, tok = user(stack)
    r = checkout(stack, tok, tier="starter", interval="month")
    assert r.status == 200, r
    assert set(r.json) == {"id", "url", "expires_at"}
    assert r.headers["Cache-Control"] == "no-store"

    custs = stripe.recorded("/v1/customers")
    sessions = stripe.recorded("/v1/checkout/sessions")
    assert len(custs) == 1 and len(sessions) == 1, stripe.requests
    cus = customer_of(stack, acc)
    assert made_for(stripe, acc) == [cus]
    assert custs[0].pairs == [("email", email), ("metadata[account_id]", acc)]
    assert stripe.customers[cus]["metadata"] == {"account_id": acc}
    # Starter has a 14-day trial; this account never had a subscription.
    assert sessions[0].pairs == session_pairs(acc, cus, "price_starter", trial=14)
    assert r.json["id"] in stripe.sessions and r.json["url"] == stripe.sessions[r.json["id"]]["url"]
    assert r.json["expires_at"] == stripe.sessions[r.json["id"]]["expires_at"]

    for req in custs + sessions:
        assert req.headers["Stripe-Version"] == "2025-03-31.basil"
        assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert req.headers["Authorization"] == "Bearer " + stripe.key
    rows = attempts(stack, acc)
    assert [(k, s, o, n) for k, s, _, o, n in rows] == [
        ("customer", "succeeded", cus, 1), ("checkout", "succeeded", r.json["id"], 1)]
    keys = {k: key for k, _, key, _, _ in rows}
    assert custs[0].idempotency_key == keys["customer"]
    assert sessions[0].idempotency_key == keys["checkout"]
    assert keys["customer"] != keys["checkout"]
    audit = stack.sql("SELECT action, details->>'object_id' FROM public.audit_logs "
                      "WHERE account_id = %s AND action LIKE 'billing.%%' ORDER BY created_at, action", acc)
    assert sorted(audit) == sorted([("billing.customer_created", cus),
                                    ("billing.checkout_created", r.json["id"])])


def test_a_repeated_call_after_a_lost_answer_creates_nothing_new(stack, stripe):
    acc, _, tok = user(stack)
    first = checkout(stack, tok, tier="professional", interval="year")
    assert first.status == 200, first
    n = len(stripe.requests)
    again = checkout(stack, tok, tier="professional", interval="year")
    assert again.status == 200 and again.json == first.json
    # Nothing is made again: Stripe is only asked whether that session is still open.
    assert [(r.method, r.path) for r in stripe.requests[n:]] == [
        ("GET", "/v1/checkout/sessions/" + first.json["id"])], "Stripe was asked for more"
    assert len([a for a in attempts(stack, acc) if a[0] == "checkout"]) == 1

    # Another plan is another request: a new session (new key), the same customer.
    other = checkout(stack, tok, tier="professional", interval="month")
    assert other.status == 200 and other.json["id"] != first.json["id"]
    assert len(stripe.recorded("/v1/customers")) == 1
    sessions = stripe.recorded("/v1/checkout/sessions")
    assert len(sessions) == 2 and sessions[0].idempotency_key != sessions[1].idempotency_key
    assert sessions[1].params["line_items"][0]["price"] == "price_professional"


def test_a_lost_stripe_answer_is_replayed_with_the_same_key(stack, stripe):
    acc, _, tok = user(stack)
    stripe.next("lost")              # the customer is created, its answer never arrives
    r = checkout(stack, tok, tier="starter")
    assert r.status == 200, r
    custs = stripe.recorded("/v1/customers")
    assert len(custs) == 2 and custs[0].idempotency_key == custs[1].idempotency_key
    assert len(made_for(stripe, acc)) == 1
    assert customer_of(stack, acc) in stripe.customers


def test_an_answer_lost_on_every_try_is_resumed_by_the_next_call(stack, stripe):
    acc, _, tok = user(stack)
    stripe.next("lost", "lost", "lost")    # all three tries (STRIPE_MAX_RETRIES=2)
    r = checkout(stack, tok, tier="starter")
    assert r.status == 503, r
    assert error(r) == {"code": "stripe_unavailable",
                        "message": "the payment provider did not answer; try again in a moment"}
    assert customer_of(stack, acc) is None
    [(kind, status, key, _, calls)] = attempts(stack, acc)
    assert (kind, status, calls) == ("customer", "pending", 1)

    r = checkout(stack, tok, tier="starter")
    assert r.status == 200, r
    custs = stripe.recorded("/v1/customers")
    assert len(custs) == 4 and {c.idempotency_key for c in custs} == {key}
    mine = made_for(stripe, acc)
    assert len(mine) == 1 and customer_of(stack, acc) == mine[0]
    assert attempts(stack, acc)[0][1:] == ("succeeded", key, mine[0], 2)


def test_a_double_click_creates_one_customer_and_one_session(stack, stripe):
    acc, _, tok = user(stack)
    stripe.next("hang")              # the first click's customer request is still running...
    with ThreadPoolExecutor(2) as ex:
        first = ex.submit(checkout, stack, tok, tier="starter")
        assert stripe.wait_for(lambda s: len(s.recorded("/v1/customers")) == 1)
        second = ex.submit(checkout, stack, tok, tier="starter")
        # ... when the second sends the same request with the same key: Stripe's 409.
        assert stripe.wait_for(lambda s: len(s.recorded("/v1/customers")) == 2)
        stripe.release()
        a, b = first.result(), second.result()
    assert a.status == 200 and b.status == 200 and a.json == b.json, (a, b)
    custs = stripe.recorded("/v1/customers")
    assert len({c.idempotency_key for c in custs}) == 1
    assert made_for(stripe, acc) == [customer_of(stack, acc)]
    assert [s["id"] for s in stripe.sessions.values() if s["client_reference_id"] == acc] == [a.json["id"]]


def test_the_same_plan_clicked_again_after_its_session_ended_at_stripe_is_not_handed_that_session(
        stack, stripe):
    """The same plan clicked again within the hour gets the session the first click
    made, unless it ended at Stripe meanwhile: one an operator expired in the
    Dashboard is recorded abandoned and replaced by a new, payable session (not a page
    that says it expired, at every click); one paid whose subscription is still on its
    way is answered 409 checkout_completed."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="starter", interval="month")
    assert a.status == 200, a
    again = checkout(stack, tok, tier="starter", interval="month")
    assert again.status == 200 and again.json == a.json, again      # a reload: the same one
    stripe.expire_outside(a.json["id"])
    b = checkout(stack, tok, tier="starter", interval="month")
    assert b.status == 200 and b.json["id"] != a.json["id"], b
    assert stripe.sessions[b.json["id"]]["status"] == "open", (b.json, attempts(stack, acc))
    states = {obj: st for kind, st, _, obj, _ in attempts(stack, acc) if kind == "checkout"}
    assert states[a.json["id"]] == "abandoned", states

    stripe.complete(b.json["id"])          # paid; its webhook events are not delivered yet
    c = checkout(stack, tok, tier="starter", interval="month")
    assert c.status == 409 and error(c)["code"] == "checkout_completed", c
    states = {obj: st for kind, st, _, obj, _ in attempts(stack, acc) if kind == "checkout"}
    assert states[b.json["id"]] == "completed", states
    assert [s for s in stripe.sessions.values()
            if s["client_reference_id"] == acc and s["status"] == "open"] == []


def test_stripe_down_then_back(stack, stripe):
    acc, _, tok = user(stack)
    stripe.down()
    try:
        t0 = time.monotonic()
        r = checkout(stack, tok, tier="starter")
        took = time.monotonic() - t0
    finally:
        stripe.up()
    assert r.status == 503, r
    assert error(r)["code"] == "stripe_unavailable"
    assert took >= 1.0, "two retries back off at least 0.5 s each"
    assert customer_of(stack, acc) is None and stripe.requests == []
    [(_, status, key, _, _)] = attempts(stack, acc)
    assert status == "pending"

    r = checkout(stack, tok, tier="starter")
    assert r.status == 200, r
    assert [c.idempotency_key for c in stripe.recorded("/v1/customers")] == [key]
    assert len(stripe.recorded("/v1/checkout/sessions")) == 1


def test_stripe_429_then_200(stack, stripe):
    acc, _, tok = user(stack)
    stripe.next(("status", 429))
    t0 = time.monotonic()
    r = checkout(stack, tok, tier="starter")
    assert r.status == 200, r
    assert time.monotonic() - t0 >= 0.5
    custs = stripe.recorded("/v1/customers")
    assert len(custs) == 2 and custs[0].idempotency_key == custs[1].idempotency_key
    assert made_for(stripe, acc) == [customer_of(stack, acc)]


def test_a_refusal_is_a_502_that_does_not_leak_stripes_message(stack, stripe):
    acc, _, tok = user(stack)
    stack.sql("UPDATE public.accounts SET stripe_customer_id = 'cus_deleted_at_stripe' WHERE id = %s", acc)
    r = checkout(stack, tok, tier="starter")
    assert r.status == 502, r
    e = error(r)
    assert e["code"] == "stripe_error"
    assert e["message"].startswith("the payment provider refused the request (Stripe request req_")
    assert "No such customer" not in r.text and "cus_deleted" not in r.text
    assert len(stripe.recorded("/v1/checkout/sessions")) == 1, "a refusal is not retried"
    [(kind, status, _, _, _)] = attempts(stack, acc)
    assert (kind, status) == ("checkout", "failed")


def test_no_second_trial(stack, stripe):
    acc, _, tok = user(stack)
    stack.sql("INSERT INTO public.subscriptions (account_id, stripe_subscription_id, stripe_price_id,"
              " tier, status) VALUES (%s, %s, 'price_starter', 'starter', 'cancelled')",
              acc, "sub_old_" + uuid.uuid4().hex[:8])
    r = checkout(stack, tok, price_id="price_starter")
    assert r.status == 200, r
    [s] = stripe.recorded("/v1/checkout/sessions")
    assert s.pairs == session_pairs(acc, customer_of(stack, acc), "price_starter")


def test_a_live_subscription_gets_409(stack, stripe):
    acc, _, tok = user(stack)
    stack.sql("INSERT INTO public.subscriptions (account_id, stripe_subscription_id, stripe_price_id,"
              " tier, status) VALUES (%s, %s, 'price_starter', 'starter', 'past_due')",
              acc, "sub_" + uuid.uuid4().hex[:12])
    r = checkout(stack, tok, tier="professional")
    assert r.status == 409, r
    assert error(r) == {"code": "subscription_exists",
                        "message": "this account already has a subscription (past_due): change or "
                                   "cancel it in the billing portal (create-portal-session)"}
    assert stripe.requests == [] and attempts(stack, acc) == []


@pytest.mark.parametrize("body, code, message", [
    ({"tier": "gold"}, "unknown_plan", "no plan for tier gold and interval month"),
    ({"tier": "free", "interval": "year"}, "unknown_plan", "no plan for tier free and interval year"),
    ({"price_id": "price_nope"}, "unknown_plan", "no plan has the price price_nope"),
    ({"price_id": "price_legacy_starter"}, "inactive_plan",
     "that plan is no longer offered (list-plans shows what is)"),
    ({"tier": "starter", "interval": "week"}, "invalid_body", "interval must be \"month\" or \"year\""),
    ({}, "invalid_body", "give either tier (and interval) or price_id"),
    ({"tier": "starter", "price_id": "price_starter"}, "invalid_body",
     "give either tier (and interval) or price_id"),
    ({"tier": 3}, "invalid_body", "tier, interval and price_id must be strings"),
    ({"tier": "starter", "success_url": "https://evil.test/"}, "invalid_body",
     "unknown field: only tier, interval and price_id are accepted (the account is always the "
     "caller's)"),
    ([], "invalid_body", "body must be a JSON object"),
    (b'{"tier": "starter", "tier": "professional"}', "invalid_body", '"tier" is given twice'),
])
def test_bad_input_is_refused_and_writes_nothing(stack, stripe, body, code, message):
    stack.sql("INSERT INTO public.plans (stripe_price_id, tier, name, max_agents, max_storage_gb,"
              " memory_limit_mb, cpu_limit, amount, active) VALUES ('price_legacy_starter', "
              "'starter', 'Starter (2024)', 3, 5, 1024, 1.0, 800, false) ON CONFLICT DO NOTHING")
    acc, _, tok = user(stack)
    r = checkout(stack, tok, **body) if isinstance(body, dict) else \
        stack.call("POST", "create-checkout-session", body=body, token=tok,
                   headers={"Content-Type": "application/json"}) if isinstance(body, bytes) else \
        stack.call("POST", "create-checkout-session", json=body, token=tok)
    assert r.status == 400, r
    assert error(r) == {"code": code, "message": message}
    assert stripe.requests == [] and attempts(stack, acc) == [] and customer_of(stack, acc) is None


def test_missing_token_anon_key_and_service_role(stack, stripe):
    r = stack.call("POST", "create-checkout-session", json={"tier": "starter"})
    assert r.status == 401 and error(r) == {"code": "unauthorized", "message": "missing credentials: send Authorization: Bearer <token> or apikey"}
    r = checkout(stack, stack.jwt(role="anon"), tier="starter")
    assert r.status == 403 and error(r) == {
        "code": "forbidden", "message": "role anon may not call create-checkout-session"}
    for fn in ("create-checkout-session", "create-portal-session"):
        r = stack.call("POST", fn, json={}, token=stack.jwt())
        assert r.status == 403 and error(r) == {
            "code": "forbidden",
            "message": "this function acts for a signed-in user: call it with the user's access token"}
    assert stripe.requests == []


def test_a_publishable_key_alone_is_anon_and_gets_403(stack, stripe):
    """supabase-js signed out sends the publishable key as apikey (and as the
    Bearer token too): that is anon, whom no function serves."""
    acc, _, _ = user(stack)
    before = stack.sql("SELECT count(*) FROM public.billing_attempts")[0][0]
    for headers in ({"apikey": PUBLISHABLE_KEY},
                    {"apikey": PUBLISHABLE_KEY, "Authorization": "Bearer " + PUBLISHABLE_KEY}):
        r = stack.call("POST", "create-checkout-session", json={"tier": "starter"}, headers=headers)
        assert r.status == 403 and error(r) == {
            "code": "forbidden", "message": "role anon may not call create-checkout-session"}, r
    assert stripe.requests == [] and customer_of(stack, acc) is None
    assert stack.sql("SELECT count(*) FROM public.billing_attempts")[0][0] == before


def test_another_users_account_cannot_be_named(stack, stripe):
    a, _, tok_a = user(stack)
    assert checkout(stack, tok_a, tier="starter").status == 200
    cus_a = customer_of(stack, a)
    stripe.reset()
    b, _, tok_b = user(stack)
    r = checkout(stack, tok_b, tier="starter", account_id=a)
    assert r.status == 400 and error(r)["code"] == "invalid_body"
    r = portal(stack, tok_b, {"customer": cus_a})
    assert r.status == 400 and error(r) == {
        "code": "invalid_body",
        "message": "the body must be empty or {}: the portal is always the caller's"}
    r = portal(stack, tok_b)
    assert r.status == 404 and error(r) == {
        "code": "no_customer",
        "message": "this account has no billing details yet: subscribe first (create-checkout-session)"}
    assert stripe.requests == [] and customer_of(stack, b) is None and attempts(stack, b) == []


def test_oversized_body(stack, stripe):
    _, _, tok = user(stack)
    r = stack.call("POST", "create-checkout-session", body=b'{"tier":"' + b"x" * 70000 + b'"}',
                   headers={"Content-Type": "application/json"}, token=tok)
    assert r.status == 413 and error(r) == {"code": "too_big", "message": "request body too large"}
    assert stripe.requests == []


def test_a_user_without_an_account(stack, stripe):
    tok = stack.jwt(role="authenticated", sub=str(uuid.uuid4()))
    for fn in ("create-checkout-session", "create-portal-session"):
        r = stack.call("POST", fn, json={"tier": "starter"} if fn.endswith("checkout-session") else {},
                       token=tok)
        assert r.status == 404 and error(r) == {"code": "no_account",
                                                "message": "no account for this user"}
    assert stripe.requests == []


# ---- portal --------------------------------------------------------------------------

def test_portal_session(stack, stripe):
    acc, _, tok = user(stack)
    assert checkout(stack, tok, tier="starter").status == 200
    cus = customer_of(stack, acc)
    stripe.reset()
    r = portal(stack, tok)
    assert r.status == 200, r
    [req] = stripe.recorded("/v1/billing_portal/sessions")
    assert req.pairs == [("customer", cus), ("return_url", RETURN_URL)]
    assert req.headers["Stripe-Version"] == "2025-03-31.basil"
    [created] = stripe.portal_sessions.values()
    assert r.json == {"id": created["id"], "url": created["url"]}
    rows = [a for a in attempts(stack, acc) if a[0] == "portal"]
    assert [(s, k, o) for _, s, k, o, _ in rows] == [("succeeded", req.idempotency_key, r.json["id"])]
    # Each visit gets a session of its own: a portal link lives minutes.
    r2 = portal(stack, tok, {})
    assert r2.status == 200 and r2.json["url"] != r.json["url"]


# ---- list-plans ----------------------------------------------------------------------

def test_list_plans_without_auth_never_shows_an_inactive_plan(stack):
    stack.sql("INSERT INTO public.plans (stripe_price_id, tier, name, max_agents, max_storage_gb,"
              " memory_limit_mb, cpu_limit, amount, active) VALUES ('price_legacy_starter', "
              "'starter', 'Starter (2024)', 3, 5, 1024, 1.0, 800, false) ON CONFLICT DO NOTHING")
    r = stack.call("GET", "list-plans")
    assert r.status == 200, r
    assert r.headers["Cache-Control"] == "public, max-age=300"
    plans = r.json["plans"]
    assert [(p["price_id"], p["interval"], p["amount"]) for p in plans] == [
        ("price_free", "month", 0),
        ("price_starter", "month", 1000), ("price_starter_annual", "year", 9600),
        ("price_professional", "month", 4900), ("price_professional_annual", "year", 47000),
        ("price_enterprise", "month", 19900), ("price_enterprise_annual", "year", 191000)]
    assert plans[1] == {"price_id": "price_starter", "tier": "starter", "name": "Starter",
                        "interval": "month", "amount": 1000, "currency": "usd", "trial_days": 14,
                        "limits": {"max_agents": 3, "max_messages_per_day": 1000,
                                   "max_storage_gb": 5, "memory_limit_mb": 1024, "cpu_limit": 1.0}}
    assert "price_legacy_starter" not in r.text
    # An operator retires a price: it disappears from the catalogue at once.
    stack.sql("UPDATE public.plans SET active = false WHERE stripe_price_id = 'price_enterprise_annual'")
    try:
        r = stack.call("GET", "list-plans")
        assert [p["price_id"] for p in r.json["plans"]][-1] == "price_enterprise"
    finally:
        stack.sql("UPDATE public.plans SET active = true WHERE stripe_price_id = 'price_enterprise_annual'")
    r = stack.call("POST", "list-plans", json={})
    assert r.status == 405 and error(r)["code"] == "method_not_allowed"


# ---- end to end ----------------------------------------------------------------------

def test_a_completed_checkout_gives_an_active_subscription_and_a_running_instance(stack, stripe, prov):
    acc, _, tok = user(stack)
    r = checkout(stack, tok, tier="enterprise")     # no trial on enterprise
    assert r.status == 200, r
    for event in stripe.complete(r.json["id"]):
        raw = json.dumps(event).encode()
        w = stack.call("POST", "handle-stripe-webhook", body=raw, headers=stack.stripe_headers(raw))
        assert w.status == 200, (event["type"], w)
    [(sid, status, tier)] = stack.sql("SELECT id, status, tier FROM public.subscriptions "
                                      "WHERE account_id = %s", acc)
    assert (status, tier) == ("active", "enterprise")
    assert wait_status(stack, str(sid), "running", timeout=15)
    # The account now has a live subscription: a second checkout is refused.
    r = checkout(stack, tok, tier="starter")
    assert r.status == 409 and error(r)["code"] == "subscription_exists"


def deliver(stack, event):
    raw = json.dumps(event).encode()
    return stack.call("POST", "handle-stripe-webhook", body=raw, headers=stack.stripe_headers(raw))


def stripe_event(type_, obj, created, livemode=False):
    return {"id": "evt_" + uuid.uuid4().hex[:24], "object": "event", "type": type_,
            "api_version": "2025-03-31.basil", "created": created, "livemode": livemode,
            "data": {"object": obj}}


def attackers_subscription(sub, customer, claim, status, t):
    return {"id": sub, "object": "subscription", "customer": customer, "status": status,
            "metadata": {"account_id": claim}, "cancel_at_period_end": False,
            "items": {"object": "list", "data": [{
                "id": "si_" + uuid.uuid4().hex[:14], "object": "subscription_item",
                "price": {"id": "price_enterprise", "object": "price"},
                "current_period_end": t + 30 * 86400}]}}


def test_a_forged_account_link_is_refused_and_the_victims_own_checkout_works(stack, stripe, prov):
    """The attacker pays through a checkout of their own (a customer Stripe made,
    not us) that names the victim's account. Those events are recorded, audited
    and logged at error level, and link nothing; the victim's own checkout then
    gives the victim an active subscription and a running instance, and the
    attacker's later events change nothing of it."""
    victim, _, tok = user(stack)
    attacker = "cus_" + uuid.uuid4().hex[:14]
    sub = "sub_" + uuid.uuid4().hex[:14]
    t = int(time.time()) - 60
    forged = [
        stripe_event("checkout.session.completed", {
            "id": "cs_test_" + uuid.uuid4().hex, "object": "checkout.session",
            "mode": "subscription", "status": "complete", "customer": attacker,
            "client_reference_id": victim, "metadata": {}, "subscription": sub}, t),
        stripe_event("customer.subscription.created",
                     attackers_subscription(sub, attacker, victim, "active", t), t)]
    for ev in forged:
        w = deliver(stack, ev)
        assert w.status == 200 and w.json == {
            "received": True,
            "refused": "account link refused: the account it names has no Stripe customer of ours"}, w
        assert deliver(stack, ev).json == {"received": True, "duplicate": True}
    ids = [ev["id"] for ev in forged]
    assert stack.sql("SELECT status FROM public.stripe_events WHERE id = ANY(%s)", ids) == [("refused",)] * 2
    audit = stack.sql("SELECT details->>'event_id', details->>'customer', details->>'claimed_account'"
                      " FROM public.audit_logs WHERE action = 'stripe.account_link_refused'"
                      " AND account_id = %s", victim)
    assert sorted(audit) == sorted((i, attacker, victim) for i in ids)
    log = stack.log("handle-stripe-webhook").splitlines()
    for i in ids:
        [line] = [json.loads(l) for l in log if i in l and "security" in l]
        assert line["level"] == "error" and attacker in line["msg"] and victim in line["msg"], line
    assert customer_of(stack, victim) is None
    assert stack.sql("SELECT count(*) FROM public.subscriptions WHERE account_id = %s", victim) == [(0,)]

    # The victim's own checkout, and Stripe's events for it.
    r = checkout(stack, tok, tier="enterprise")
    assert r.status == 200, r
    cus = customer_of(stack, victim)
    assert cus in stripe.customers and cus != attacker
    for ev in stripe.complete(r.json["id"]):
        w = deliver(stack, ev)
        assert w.status == 200 and w.json == {"received": True}, (ev["type"], w)
    [(sid, status, tier)] = stack.sql("SELECT id, status, tier FROM public.subscriptions "
                                      "WHERE account_id = %s", victim)
    assert (status, tier) == ("active", "enterprise")
    assert wait_status(stack, str(sid), "running", timeout=15)

    # The attacker keeps at it, now against a linked account: refused, nothing changes.
    w = deliver(stack, stripe_event("customer.subscription.updated",
                                    attackers_subscription(sub, attacker, victim, "canceled", t + 120),
                                    t + 120))
    assert w.status == 200 and w.json["refused"] == \
        "account link refused: the account it names is linked to another Stripe customer"
    assert stack.sql("SELECT s.status::text, i.status::text, i.desired_status::text"
                     " FROM public.subscriptions s JOIN public.instances i ON i.subscription_id = s.id"
                     " WHERE s.account_id = %s", victim) == [("active", "running", "running")]
    assert stack.sql("SELECT count(*) FROM public.stripe_events WHERE status = 'refused'"
                     " AND payload #>> '{data,object,customer}' = %s", attacker) == [(3,)]


def test_an_event_of_the_other_mode_is_refused(stack):
    """STRIPE_SECRET_KEY here is a test key: a live-mode event is refused, unrecorded."""
    acc, _, _ = user(stack)
    ev = stripe_event("customer.subscription.created",
                      attackers_subscription("sub_" + uuid.uuid4().hex[:14], "cus_x", acc, "active",
                                             int(time.time())), int(time.time()), livemode=True)
    w = deliver(stack, ev)
    assert w.status == 400 and error(w) == {
        "code": "livemode_mismatch",
        "message": "a live-mode event, but this server uses a test-mode Stripe key"}
    assert stack.sql("SELECT count(*) FROM public.stripe_events WHERE id = %s", ev["id"]) == [(0,)]
    assert stack.sql("SELECT count(*) FROM public.audit_logs WHERE details->>'event_id' = %s",
                     ev["id"]) == [(0,)]


# ---- configuration -------------------------------------------------------------------

@pytest.fixture(scope="module")
def bare(pg):
    """A stack without STRIPE_SECRET_KEY, as `make run` starts by default."""
    with mr.Stack(pg, functions=["create-checkout-session", "create-portal-session",
                                 "list-plans"], workers=1) as s:
        yield s


def test_without_a_secret_key_the_sessions_answer_503(bare):
    acc, _ = new_account(bare)
    tok = bare.jwt(role="authenticated", sub=acc)
    for fn in ("create-checkout-session", "create-portal-session"):
        r = bare.call("POST", fn, json={"tier": "starter"}, token=tok)
        assert r.status == 503 and error(r) == {
            "code": "stripe_not_configured",
            "message": "payments are not set up on this server (STRIPE_SECRET_KEY is unset)"}
    assert bare.call("GET", "list-plans").status == 200


def start_alone(stack, tmp_path, name, **env):
    binary = mr.build_dir() / "bin" / name
    full = {k: os.environ[k] for k in ("PATH", "ASAN_OPTIONS", "UBSAN_OPTIONS") if k in os.environ}
    full.update({"DATABASE_URL": stack.env["DATABASE_URL"], "MR_SOCKET": str(tmp_path / "s.sock"),
                 "SUPABASE_JWT_SECRET": stack.env["SUPABASE_JWT_SECRET"]})
    full.update(env)
    return subprocess.run([str(binary)], env=full, capture_output=True, timeout=20)


@pytest.mark.parametrize("key, says", [
    ("pk_test_" + "a" * 24, "holds a publishable key"),
    ("sk_test_abc", "too short"),
    ("sk_test_" + "a" * 20 + " ", "whitespace"),
    ("whsec_" + "a" * 30, "webhook signing secret"),
    ("sk_prod_" + "a" * 24, "must be a secret key"),
])
def test_a_malformed_secret_key_stops_startup(bare, tmp_path, key, says):
    p = start_alone(bare, tmp_path, "create-checkout-session", STRIPE_SECRET_KEY=key,
                    STRIPE_CHECKOUT_SUCCESS_URL=SUCCESS_URL, STRIPE_CHECKOUT_CANCEL_URL=CANCEL_URL)
    assert p.returncode == 2, p
    err = p.stderr.decode()
    assert "STRIPE_SECRET_KEY" in err and says in err, err
    assert key.strip() not in err


@pytest.mark.parametrize("name, env, says", [
    ("create-checkout-session", {"STRIPE_CHECKOUT_CANCEL_URL": CANCEL_URL},
     "STRIPE_CHECKOUT_SUCCESS_URL is required but not set"),
    ("create-checkout-session", {"STRIPE_CHECKOUT_SUCCESS_URL": "/billing/done",
                                 "STRIPE_CHECKOUT_CANCEL_URL": CANCEL_URL},
     "STRIPE_CHECKOUT_SUCCESS_URL is not an absolute URL"),
    ("create-portal-session", {"STRIPE_PORTAL_RETURN_URL": "ftp://x.test/"},
     "STRIPE_PORTAL_RETURN_URL must be an http:// or https:// URL"),
])
def test_missing_or_bad_urls_stop_startup(bare, tmp_path, name, env, says):
    p = start_alone(bare, tmp_path, name, STRIPE_SECRET_KEY="sk_test_" + "a" * 24, **env)
    assert p.returncode == 2, p
    assert says in p.stderr.decode()


def test_a_5xx_is_an_unknown_outcome_even_when_stripe_says_not_to_retry(stack, stripe):
    """A 500 with Stripe-Should-Retry: false (applied, or will be) is not retried
    within the request, but it is not a refusal either: 503, the attempt left
    pending, so the next click resumes it with the same idempotency key instead of
    creating the customer again."""
    acc, _, tok = user(stack)
    stripe.next(("status", 500, {"Stripe-Should-Retry": "false"}))
    r = checkout(stack, tok, tier="starter")
    rows = attempts(stack, acc)
    assert r.status == 503 and error(r)["code"] == "stripe_unavailable", (r, rows)
    assert [(k, s) for k, s, _, _, _ in rows] == [("customer", "pending")], rows
    r = checkout(stack, tok, tier="starter")
    assert r.status == 200, r
    custs = stripe.recorded("/v1/customers")
    assert len(custs) == 2
    assert custs[0].idempotency_key and custs[0].idempotency_key == custs[1].idempotency_key, custs


def test_a_5xx_stripe_replays_for_its_key_does_not_block_checkout_for_a_day(stack, stripe):
    """Stripe keeps a key's first answer once it began executing the request, a 500
    too, and replays it to that key for 24 hours. Resumed with that key, the attempt
    would answer 503 to every click for as long as it is resumed (23 hours): once
    Stripe replays a 5xx, the attempt is closed and the next click gets a new key."""
    acc, _, tok = user(stack)
    stripe.next(("kept", 500, {"Stripe-Should-Retry": "false"}))
    r = checkout(stack, tok, tier="starter")
    assert r.status == 503 and error(r)["code"] == "stripe_unavailable", r
    r = checkout(stack, tok, tier="starter")      # the same key: Stripe's 500 again
    assert r.status == 503 and error(r)["code"] == "stripe_unavailable", r
    [key] = {c.idempotency_key for c in stripe.recorded("/v1/customers")}
    r = checkout(stack, tok, tier="starter")
    assert r.status == 200, r
    last = stripe.recorded("/v1/customers")[-1]
    assert last.idempotency_key != key
    assert made_for(stripe, acc) == [customer_of(stack, acc)]
    # The replayed key's attempt is closed, never sent again.
    rows = attempts(stack, acc)
    assert [(k, s) for k, s, ik, _, _ in rows if ik == key] == [("customer", "failed")], rows


def customer_behind_kept_500(stack, stripe):
    """A user whose first customer attempt Stripe executed and answered with a 500 it
    keeps for the attempt's key (the second click gets it replayed): the attempt is
    closed, and Stripe holds a customer made for the account that the account does
    not know. Returns (account, email, token, [that customer's id])."""
    acc, email, tok = user(stack)
    stripe.next(("executed", 500, {"Stripe-Should-Retry": "false"}))
    for _ in range(2):      # the second with the same key: Stripe's 500 replayed
        r = checkout(stack, tok, tier="starter")
        assert r.status == 503 and error(r)["code"] == "stripe_unavailable", r
    made = made_for(stripe, acc)
    assert len(made) == 1 and customer_of(stack, acc) is None, made
    return acc, email, tok, made


def someone_elses_customer(stripe, email, created, prefix="cus_other"):
    """A customer at Stripe with this email, made for another account."""
    cid = prefix + uuid.uuid4().hex[:12]
    stripe.customers[cid] = {"id": cid, "object": "customer", "created": created, "email": email,
                             "name": None, "metadata": {"account_id": str(uuid.uuid4())},
                             "livemode": False}
    return cid


def checkout_takes(stack, stripe, tok, acc, made, lists):
    """The next checkout takes the customer Stripe made for the account (made[0])
    after `lists` requests listing customers: it becomes the account's and the
    session's, and no other customer is made for the account. Returns the answer and
    those list requests."""
    r = checkout(stack, tok, tier="starter")
    assert r.status == 200, r
    assert customer_of(stack, acc) == made[0]
    assert stripe.sessions[r.json["id"]]["customer"] == made[0]
    assert made_for(stripe, acc) == made
    calls = stripe.recorded("/v1/customers")
    assert [c.method for c in calls] == ["POST", "POST"] + ["GET"] * lists, calls
    return r, calls[2:]


def test_a_customer_stripe_made_behind_a_kept_500_is_found_not_made_again(stack, stripe):
    """A 500 that Stripe keeps for its key may hide a customer it did make. Once that
    attempt is closed, the next click looks for the account's customer at Stripe (its
    email, this account's id in its metadata) before making one: the account gets the
    customer Stripe made, never a second one, and never another account's customer
    that has the same email."""
    acc, email, tok, made = customer_behind_kept_500(stack, stripe)
    # Made before ours, with the same email, for someone else: not ours to take.
    someone_elses_customer(stripe, email, created=1)
    r, [listed] = checkout_takes(stack, stripe, tok, acc, made, 1)
    assert listed.query == {"email": email, "limit": "100"} and listed.idempotency_key is None
    assert email.split("@")[0] not in stack.log("create-checkout-session")  # nor encoded
    # The closed attempt stays failed; the customer is recorded ours by an attempt
    # whose key was never sent.
    rows = attempts(stack, acc)
    assert [(k, s, o, n) for k, s, _, o, n in rows] == [
        ("customer", "failed", None, 2), ("customer", "succeeded", made[0], 0),
        ("checkout", "succeeded", r.json["id"], 1)], rows
    assert stack.sql("SELECT details->>'object_id' FROM public.audit_logs WHERE account_id = %s "
                     "AND action = 'billing.customer_found'", acc) == [(made[0],)]
    # From now on the account has its customer: Stripe is not asked again.
    r = checkout(stack, tok, tier="professional", interval="month")
    assert r.status == 200 and len(stripe.recorded("/v1/customers")) == 3, r


def test_a_customer_made_behind_a_kept_500_is_found_past_the_first_page(stack, stripe):
    """Stripe lists an email's customers newest first, 100 a page. When more than a
    page of customers share the user's email (made later, for other accounts), the
    one Stripe made for this account behind a kept 500 is on a later page: the
    checkout reads on (starting_after the last one's id) and takes it, never making
    a second customer."""
    acc, email, tok, made = customer_behind_kept_500(stack, stripe)
    ours = stripe.customers[made[0]]["created"]
    newer = [someone_elses_customer(stripe, email, ours + 1 + n, "cus_newer%03d" % n)
             for n in range(150)]
    _, listed = checkout_takes(stack, stripe, tok, acc, made, 2)
    # The first page ends at the 100th newest; the second starts after it.
    assert [c.query for c in listed] == [
        {"email": email, "limit": "100"},
        {"email": email, "limit": "100", "starting_after": newer[50]}], listed


def change_email(stack, acc, email):
    """The user changes their email (Supabase Auth's row; the account follows it)."""
    stack.sql("UPDATE auth.users SET email = %s WHERE id = %s", email, acc)
    assert stack.sql("SELECT email FROM public.accounts WHERE id = %s", acc) == [(email,)]


def test_a_customer_made_under_the_users_old_email_is_found_after_they_change_it(stack, stripe):
    """Stripe lists customers by the exact email. A customer Stripe made behind a kept
    500 under the email the user had then is found after they changed it: the checkout
    looks under the email each unsure attempt sent as well as under the new one, and
    the account gets that customer, never a second one."""
    acc, email, tok, made = customer_behind_kept_500(stack, stripe)
    assert stripe.customers[made[0]]["email"] == email, made
    new = "renamed-" + email
    change_email(stack, acc, new)
    r, listed = checkout_takes(stack, stripe, tok, acc, made, 2)
    assert [c.query for c in listed] == [{"email": new, "limit": "100"},
                                         {"email": email, "limit": "100"}], listed
    rows = attempts(stack, acc)
    assert [(k, s, o) for k, s, _, o, _ in rows] == [
        ("customer", "failed", None), ("customer", "succeeded", made[0]),
        ("checkout", "succeeded", r.json["id"])], rows


def test_a_pending_customer_attempt_of_the_users_old_email_is_looked_for_not_left(stack, stripe):
    """A customer attempt whose answer was lost stays pending and is resumed by the
    same request. After an email change the next request is another one: the pending
    attempt is given up, so the customer Stripe may have made for it is looked for
    under its email first, and taken rather than made again."""
    acc, email, tok = user(stack)
    stripe.next(("executed", 500, {"Stripe-Should-Retry": "false"}))
    r = checkout(stack, tok, tier="starter")
    assert r.status == 503 and error(r)["code"] == "stripe_unavailable", r
    assert [(k, s) for k, s, _, _, _ in attempts(stack, acc)] == [("customer", "pending")]
    made = made_for(stripe, acc)
    assert len(made) == 1, made
    new = "renamed-" + email
    change_email(stack, acc, new)
    r = checkout(stack, tok, tier="starter")
    assert r.status == 200, r
    assert customer_of(stack, acc) == made[0]
    assert made_for(stripe, acc) == made
    calls = stripe.recorded("/v1/customers")
    assert [(c.method, c.query.get("email")) for c in calls[1:]] == [
        ("GET", new), ("GET", email)], calls
    rows = attempts(stack, acc)
    assert [(k, s, o) for k, s, _, o, _ in rows] == [
        ("customer", "abandoned", None), ("customer", "succeeded", made[0]),
        ("checkout", "succeeded", r.json["id"])], rows


def test_a_customer_attempt_pending_past_its_resume_is_looked_for_not_made_again(stack, stripe):
    """A customer attempt whose answer was lost is resumed by the same request for 23
    hours. A user back a day later sends the same request, but the attempt is given up
    for a new key: the customer Stripe made behind the first is looked for first and
    taken, never made a second time."""
    acc, email, tok = user(stack)
    stripe.next(("executed", 500, {"Stripe-Should-Retry": "false"}))
    r = checkout(stack, tok, tier="starter")
    assert r.status == 503 and error(r)["code"] == "stripe_unavailable", r
    assert [(k, s) for k, s, _, _, _ in attempts(stack, acc)] == [("customer", "pending")]
    made = made_for(stripe, acc)
    assert len(made) == 1, made
    stack.sql("UPDATE public.billing_attempts SET created_at = now() - interval '30 hours' "
              "WHERE account_id = %s", acc)
    r = checkout(stack, tok, tier="starter")
    assert r.status == 200, r
    assert customer_of(stack, acc) == made[0]
    assert made_for(stripe, acc) == made
    calls = stripe.recorded("/v1/customers")
    assert [(c.method, c.query.get("email")) for c in calls[1:]] == [("GET", email)], calls
    rows = attempts(stack, acc)
    assert [(k, s, o) for k, s, _, o, _ in rows] == [
        ("customer", "abandoned", None), ("customer", "succeeded", made[0]),
        ("checkout", "succeeded", r.json["id"])], rows


def test_a_cancellation_applies_whatever_its_price(stack, stripe, prov):
    """customer.subscription.deleted always means cancelled: a price the catalogue
    lacks (switched to in Stripe's portal, a plan row removed) keeps the recorded
    plan, and the instance is destroyed, not left running for a customer who left."""
    acc, _, tok = user(stack)
    r = checkout(stack, tok, tier="enterprise")
    assert r.status == 200, r
    evs = stripe.complete(r.json["id"])
    for ev in evs:
        assert deliver(stack, ev).status == 200
    sub = json.loads(json.dumps(evs[1]["data"]["object"]))
    sub["status"] = "canceled"
    sub["items"]["data"][0]["price"]["id"] = "price_not_in_plans"
    w = deliver(stack, stripe_event("customer.subscription.deleted", sub, int(time.time()) + 5))
    assert w.status == 200 and "failed" not in w.json, w
    rows = stack.sql("SELECT s.status::text, s.tier::text, s.stripe_price_id, i.desired_status::text"
                     " FROM public.subscriptions s JOIN public.instances i ON i.subscription_id = s.id"
                     " WHERE s.account_id = %s", acc)
    assert [(st, tier, want) for st, tier, _, want in rows] == [("cancelled", "enterprise", "deprovisioned")]
    assert rows[0][2] != "price_not_in_plans"


def test_only_the_newest_checkout_session_can_be_paid(stack, stripe, prov):
    """A second checkout (another interval) expires the first session at Stripe, so
    paying both cannot make two subscriptions (two trials, two instances) on one
    account; asking for the first plan again makes a new session, never the
    expired one."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="starter", interval="month")
    b = checkout(stack, tok, tier="starter", interval="year")
    assert a.status == 200 and b.status == 200 and a.json["id"] != b.json["id"]
    assert stripe.sessions[a.json["id"]]["status"] == "expired"
    assert stripe.sessions[b.json["id"]]["status"] == "open"
    with pytest.raises(ValueError):
        stripe.complete(a.json["id"])
    c = checkout(stack, tok, tier="starter", interval="month")
    assert c.status == 200 and c.json["id"] not in (a.json["id"], b.json["id"]), c
    assert stripe.sessions[b.json["id"]]["status"] == "expired"
    for ev in stripe.complete(c.json["id"]):
        assert deliver(stack, ev).status == 200
    live = stack.sql("SELECT status::text FROM public.subscriptions WHERE account_id = %s", acc)
    assert live == [("trialing",)], live
    states = sorted(st for kind, st, *_ in attempts(stack, acc) if kind == "checkout")
    assert states == ["abandoned", "abandoned", "succeeded"], attempts(stack, acc)


def test_an_older_session_whose_expiry_stripe_kept_as_a_500_is_expired_by_the_next_checkout(
        stack, stripe, prov):
    """Stripe keeps a key's first answer for a day, a 500 too. An older session whose
    expiry got such a 500 stays open for now, and the account's next checkout expires
    it (its expiry has a key of its own), instead of getting the kept 500 again and
    leaving it payable beside the newest session for the rest of its day."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="starter", interval="month")
    assert a.status == 200, a
    stripe.next(None, ("kept", 500))      # b's session is made; a's expiry: a 500 kept
    b = checkout(stack, tok, tier="starter", interval="year")
    assert b.status == 200 and b.json["id"] != a.json["id"], b
    assert stripe.sessions[a.json["id"]]["status"] == "open"
    c = checkout(stack, tok, tier="professional", interval="month")
    assert c.status == 200, c
    assert stripe.sessions[a.json["id"]]["status"] == "expired"
    assert stripe.sessions[b.json["id"]]["status"] == "expired"
    with pytest.raises(ValueError):
        stripe.complete(a.json["id"])
    tries = stripe.recorded("/v1/checkout/sessions/%s/expire" % a.json["id"])
    # b's call and its retry (the kept 500 replayed), then c's call with a new key.
    assert len(tries) == 3, tries
    assert tries[0].idempotency_key == tries[1].idempotency_key != tries[2].idempotency_key
    for ev in stripe.complete(c.json["id"]):
        assert deliver(stack, ev).status == 200
    assert stack.sql("SELECT count(*) FROM public.subscriptions WHERE account_id = %s", acc) == [(1,)]


def test_a_checkout_after_an_older_session_was_paid_is_refused(stack, stripe, prov):
    """The older session was paid but its subscription is not recorded yet (the
    webhook has not come): the new session is expired too and the answer is 409
    checkout_completed, so the account is not billed twice."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="starter", interval="month")
    assert a.status == 200, a
    events = stripe.complete(a.json["id"])
    b = checkout(stack, tok, tier="starter", interval="year")
    assert b.status == 409 and error(b)["code"] == "checkout_completed", b
    new = [obj for kind, st, _, obj, _ in attempts(stack, acc)
           if kind == "checkout" and obj != a.json["id"]]
    assert len(new) == 1 and stripe.sessions[new[0]]["status"] == "expired", new
    for ev in events:
        assert deliver(stack, ev).status == 200
    assert stack.sql("SELECT count(*) FROM public.subscriptions WHERE account_id = %s", acc) == [(1,)]


def test_an_older_session_stripe_does_not_know_is_not_taken_for_a_paid_one(stack, stripe):
    """An older session Stripe answers 404 for (made under another key, test or
    live) cannot be paid: it is recorded abandoned and the new checkout goes ahead,
    instead of being refused as if the older one had been paid."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="starter", interval="month")
    assert a.status == 200, a
    with stripe.lock:
        del stripe.sessions[a.json["id"]]
    b = checkout(stack, tok, tier="starter", interval="year")
    assert b.status == 200 and b.json["id"] != a.json["id"], b
    states = {obj: st for kind, st, _, obj, _ in attempts(stack, acc) if kind == "checkout"}
    assert states == {a.json["id"]: "abandoned", b.json["id"]: "succeeded"}, states


def test_a_session_expired_outside_is_not_taken_for_a_paid_one(stack, stripe, prov):
    """An older session that expired without this function (an operator expired it in
    the Dashboard, or its expires_at passed) was never paid. Stripe refuses its expiry
    with the same 400 as for a paid one: the session is read, and the customer's next
    checkout gets a new session instead of 409 checkout_completed, and the checkouts
    after it too (not refused for days). A session that was paid still refuses the
    next checkout."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="starter", interval="month")
    assert a.status == 200, a
    stripe.expire_outside(a.json["id"])
    b = checkout(stack, tok, tier="starter", interval="year")
    assert b.status == 200 and b.json["id"] != a.json["id"], (b, attempts(stack, acc))
    assert stripe.sessions[b.json["id"]]["status"] == "open"
    reads = [r for r in stripe.recorded("/v1/checkout/sessions/" + a.json["id"])
             if r.method == "GET"]
    assert len(reads) == 1 and reads[0].body == "" and reads[0].idempotency_key is None, reads
    states = {obj: st for kind, st, _, obj, _ in attempts(stack, acc) if kind == "checkout"}
    assert states == {a.json["id"]: "abandoned", b.json["id"]: "succeeded"}, states
    c = checkout(stack, tok, tier="professional", interval="month")
    assert c.status == 200, (c, attempts(stack, acc))
    assert stripe.sessions[b.json["id"]]["status"] == "expired"
    events = stripe.complete(c.json["id"])          # paid; its webhook is on its way
    d = checkout(stack, tok, tier="enterprise")
    assert d.status == 409 and error(d)["code"] == "checkout_completed", d
    mine = {sid: s["status"] for sid, s in stripe.sessions.items() if s["client_reference_id"] == acc}
    assert [sid for sid, st in mine.items() if st == "open"] == [], mine
    states = {obj: st for kind, st, _, obj, _ in attempts(stack, acc) if kind == "checkout"}
    assert states[c.json["id"]] == "completed", states
    for ev in events:
        assert deliver(stack, ev).status == 200
    assert stack.sql("SELECT count(*) FROM public.subscriptions WHERE account_id = %s", acc) == [(1,)]


def test_a_session_not_open_that_cannot_be_read_is_a_503_that_loses_nothing(stack, stripe):
    """Stripe refuses to expire an older session (not open) and then cannot be asked
    what it is (5xx on every try): it may have been paid, so no session is handed out,
    and the answer is a 503 to try again, not 409 checkout_completed. Trying again
    gets the session made for the first try, now that Stripe says the older one had
    expired."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="starter", interval="month")
    assert a.status == 200, a
    stripe.expire_outside(a.json["id"])
    # The new session and the older one's expiry (400) go through; every read fails.
    stripe.next(None, None, ("status", 500), ("status", 500), ("status", 500))
    b = checkout(stack, tok, tier="starter", interval="year")
    assert b.status == 503 and error(b)["code"] == "stripe_unavailable", b
    states = {obj: st for kind, st, _, obj, _ in attempts(stack, acc) if kind == "checkout"}
    [made] = [obj for obj in states if obj != a.json["id"]]
    assert states == {a.json["id"]: "succeeded", made: "succeeded"}, states
    again = checkout(stack, tok, tier="starter", interval="year")
    assert again.status == 200 and again.json["id"] == made, (again, attempts(stack, acc))
    assert stripe.sessions[made]["status"] == "open"
    states = {obj: st for kind, st, _, obj, _ in attempts(stack, acc) if kind == "checkout"}
    assert states == {a.json["id"]: "abandoned", made: "succeeded"}, states


def test_a_customer_deleted_in_stripe_does_not_lock_the_account_out_of_checkout(stack, stripe, prov):
    """An operator deletes the account's customer in Stripe (which cancels its
    subscription): customer.deleted unlinks it, a late event of that customer does
    not link it again, and the next checkout creates a new customer instead of
    naming the deleted one to Stripe (a 502 on every try)."""
    acc, _, tok = user(stack)
    r = checkout(stack, tok, tier="enterprise")
    assert r.status == 200, r
    evs = stripe.complete(r.json["id"])
    for ev in evs:
        assert deliver(stack, ev).status == 200
    cus = customer_of(stack, acc)
    t = int(time.time()) + 5
    sub = json.loads(json.dumps(evs[1]["data"]["object"]))
    sub.update(status="canceled", canceled_at=t)
    with stripe.lock:
        del stripe.customers[cus]
    assert deliver(stack, stripe_event("customer.subscription.deleted", sub, t)).status == 200
    w = deliver(stack, stripe_event("customer.deleted", {"id": cus, "object": "customer", "deleted": True}, t))
    assert w.status == 200 and w.json == {"received": True}, w
    assert customer_of(stack, acc) is None
    audit = stack.sql("SELECT details->>'customer' FROM public.audit_logs "
                      "WHERE account_id = %s AND action = 'stripe.customer.deleted'", acc)
    assert audit == [(cus,)], audit
    # An invoice of the deleted customer, delivered late, still finds its account but
    # does not link the customer again.
    inv = {"id": "in_" + uuid.uuid4().hex[:14], "object": "invoice", "customer": cus,
           "status": "void", "amount_due": 0, "amount_paid": 0, "currency": "usd"}
    assert deliver(stack, stripe_event("invoice.payment_failed", inv, t - 1)).status == 200
    assert customer_of(stack, acc) is None
    r = checkout(stack, tok, tier="starter")
    assert r.status == 200, (r, customer_of(stack, acc))
    assert customer_of(stack, acc) not in (None, cus)
    assert stripe.sessions[r.json["id"]]["customer"] == customer_of(stack, acc)


def test_two_checkouts_at_once_leave_one_session_payable(stack, stripe, prov):
    """Two checkouts of one account running at the same time (two tabs): the first
    one's session is created at Stripe after the second's was created and recorded.
    Only one of the two sessions may stay open, or paying both makes two
    subscriptions on one account: the newest wins, the other request expires its own
    session and answers 409 checkout_superseded."""
    acc, _, tok = user(stack)
    first = checkout(stack, tok, tier="starter", interval="month")   # the customer exists now
    assert first.status == 200, first
    stripe.next("hang")              # one tab's session request is slow at Stripe...
    with ThreadPoolExecutor(2) as ex:
        a = ex.submit(checkout, stack, tok, tier="starter", interval="year")
        assert stripe.wait_for(lambda s: len(s.recorded("/v1/checkout/sessions")) == 2)
        b = checkout(stack, tok, tier="professional", interval="month")   # ... while the other runs to its end
        assert b.status == 200, b
        stripe.release()
        a = a.result()
    mine = {sid: s["status"] for sid, s in stripe.sessions.items() if s["client_reference_id"] == acc}
    open_ = [sid for sid, st in mine.items() if st == "open"]
    assert len(open_) == 1, (mine, attempts(stack, acc))
    assert open_ == [b.json["id"]], (mine, b)
    assert a.status == 409 and error(a)["code"] == "checkout_superseded", a
    states = {obj: st for kind, st, _, obj, _ in attempts(stack, acc) if kind == "checkout"}
    assert sorted(states.values()) == ["abandoned", "abandoned", "succeeded"], states
    assert states[b.json["id"]] == "succeeded", states


def test_the_slower_tabs_plan_clicked_again_gets_a_new_session(stack, stripe, prov):
    """The slower of two tabs was told checkout_superseded, and its session could not
    be expired (Stripe 5xx): clicking that plan again gets a new session, the one left
    payable, instead of the old one refused as superseded again."""
    acc, _, tok = user(stack)
    assert checkout(stack, tok, tier="starter", interval="month").status == 200
    stripe.next("hang")
    with ThreadPoolExecutor(2) as ex:
        a = ex.submit(checkout, stack, tok, tier="starter", interval="year")
        assert stripe.wait_for(lambda s: len(s.recorded("/v1/checkout/sessions")) == 2)
        b = checkout(stack, tok, tier="professional", interval="month")
        assert b.status == 200, b
        stripe.next(("status", 500), ("status", 500), ("status", 500))   # A's own expiry
        stripe.release()
        a = a.result()
    assert a.status == 409 and error(a)["code"] == "checkout_superseded", a
    again = checkout(stack, tok, tier="starter", interval="year")
    assert again.status == 200, (again, attempts(stack, acc))
    mine = {sid: s["status"] for sid, s in stripe.sessions.items() if s["client_reference_id"] == acc}
    assert [sid for sid, st in mine.items() if st == "open"] == [again.json["id"]], mine


def test_a_paid_older_session_still_refuses_the_next_click_when_an_expiry_failed(stack, stripe, prov):
    """An older session was paid (its webhook not delivered yet) and the new
    checkout's own session could not be expired (Stripe 5xx): the next click, even
    for the same plan, is refused before anything reaches Stripe, instead of being
    handed that still open session to pay a second time."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="starter", interval="month")
    assert a.status == 200, a
    stripe.complete(a.json["id"])      # paid; its webhook events are not delivered yet
    # The new session, the older one's expiry (400: not open) and its reading (complete)
    # go through; every try of expiring the new session fails.
    stripe.next(None, None, None, ("status", 500), ("status", 500), ("status", 500))
    b = checkout(stack, tok, tier="starter", interval="year")
    assert b.status == 409 and error(b)["code"] == "checkout_completed", b
    sent = len(stripe.recorded())
    again = checkout(stack, tok, tier="starter", interval="year")
    assert again.status == 409 and error(again)["code"] == "checkout_completed", \
        (again, attempts(stack, acc))
    assert len(stripe.recorded()) == sent
    states = {obj: st for kind, st, _, obj, _ in attempts(stack, acc) if kind == "checkout"}
    assert states[a.json["id"]] == "completed", states


def test_a_paid_session_blocks_checkout_only_until_its_subscription_is_recorded(stack, stripe, prov):
    """Once the paid session's subscription is recorded the account is refused for
    having a subscription; once that subscription is cancelled a new checkout is
    allowed again, and it expires the session left open by the refused one."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="starter", interval="month")
    assert a.status == 200, a
    events = stripe.complete(a.json["id"])
    stripe.next(None, None, None, ("status", 500), ("status", 500), ("status", 500))
    b = checkout(stack, tok, tier="starter", interval="year")
    assert b.status == 409 and error(b)["code"] == "checkout_completed", b
    [left_open] = [sid for sid, s in stripe.sessions.items()
                   if s["client_reference_id"] == acc and s["status"] == "open"]
    for ev in events:
        assert deliver(stack, ev).status == 200
    r = checkout(stack, tok, tier="starter", interval="year")
    assert r.status == 409 and error(r)["code"] == "subscription_exists", r
    sub = json.loads(json.dumps(events[1]["data"]["object"]))
    sub["status"] = "canceled"
    w = deliver(stack, stripe_event("customer.subscription.deleted", sub, int(time.time()) + 5))
    assert w.status == 200 and "failed" not in w.json, w
    c = checkout(stack, tok, tier="professional", interval="month")
    assert c.status == 200, (c, attempts(stack, acc))
    assert stripe.sessions[c.json["id"]]["status"] == "open"
    assert stripe.sessions[left_open]["status"] == "expired"


def mine(stack, tok):
    """GET my-instance as the customer: its JSON."""
    r = stack.call("GET", "my-instance", token=tok)
    assert r.status == 200, r
    return r.json


def paid(stack, stripe, tok, acc, status=None, tier="enterprise"):
    """A checkout the customer pays, its events delivered; returns them."""
    r = checkout(stack, tok, tier=tier)     # no trial on enterprise, nor a second one
    assert r.status == 200, r
    events = stripe.complete(r.json["id"], status=status)
    for ev in events:
        assert deliver(stack, ev).status == 200, ev["type"]
    return events


def test_a_cancellation_in_the_customer_portal_shows_when_the_subscription_ends_and_a_renewal_takes_it_back(
        stack, stripe, prov):
    """Stripe's flexible billing mode, new subscriptions' default, says a cancellation at
    the period's end made in the customer portal only as cancel_at (the period's end)
    with cancel_at_period_end false. The customer sees in my-instance when the
    subscription ends and that the instance runs until then; renewing it there takes
    that back."""
    acc, _, tok = user(stack)
    events = paid(stack, stripe, tok, acc)
    sub_id, t = events[1]["data"]["object"]["id"], events[1]["created"]
    [(sid,)] = stack.sql("SELECT id FROM public.subscriptions WHERE account_id = %s", acc)
    assert wait_status(stack, str(sid), "running", timeout=15)
    assert mine(stack, tok)["instance"]["notice"] is None
    assert portal(stack, tok).status == 200

    # The customer cancels in the portal. (Each event a second after the last: the
    # webhook orders one subscription's events by their time.)
    ev = stripe.portal_cancel(sub_id)
    ev["created"] = t + 1
    end = ev["data"]["object"]["cancel_at"]
    assert ev["data"]["object"]["cancel_at_period_end"] is False and end > t
    assert deliver(stack, ev).status == 200
    j = mine(stack, tok)
    assert datetime.fromisoformat(j["subscription"]["cancel_at"]).timestamp() == end, j["subscription"]
    assert j["subscription"]["cancel_at_period_end"] is False
    day = datetime.fromtimestamp(end, timezone.utc).strftime("%Y-%m-%d")
    assert j["instance"]["notice"] == {
        "code": "ends_at_period_end",
        "message": "Your subscription ends on %s (UTC): your instance runs until then." % day}, j
    assert j["instance"]["status"] == "running" and j["subscription"]["status"] == "active"

    # Renewed there: nothing ends any more.
    ev = stripe.portal_renew(sub_id)
    ev["created"] = t + 2
    assert deliver(stack, ev).status == 200
    j = mine(stack, tok)
    assert j["subscription"]["cancel_at"] is None and j["instance"]["notice"] is None, j


def end_subscription(stack, events, sid):
    """Stripe ends the subscription that `events` (paid()'s) created: its
    customer.subscription.deleted a second later; its instance is destroyed, its data
    kept for the account."""
    sub = dict(events[1]["data"]["object"], status="canceled")
    assert deliver(stack, stripe_event("customer.subscription.deleted", sub,
                                       events[1]["created"] + 1)).status == 200
    assert wait_status(stack, str(sid), "deprovisioned", timeout=30)


def test_a_returning_customer_whose_first_payment_is_processing_is_told_so_not_to_subscribe_again(
        stack, stripe, prov):
    """A customer whose subscription ended sees its destroyed instance and that its data
    is kept until a date: subscribe again before then. Once it has subscribed again by
    bank debit, the new subscription waits for its first payment and has no instance
    yet: my-instance says the payment is processing, not to subscribe again."""
    acc, _, tok = user(stack)
    events = paid(stack, stripe, tok, acc)
    [(sid,)] = stack.sql("SELECT id FROM public.subscriptions WHERE account_id = %s", acc)
    assert wait_status(stack, str(sid), "running", timeout=15)
    end_subscription(stack, events, sid)
    assert mine(stack, tok)["instance"]["notice"]["code"] == "data_kept"

    paid(stack, stripe, tok, acc, status="incomplete")
    j = mine(stack, tok)
    assert j["instance"]["status"] == "deprovisioned"
    assert j["instance"]["notice"] == {
        "code": "payment_processing",
        "message": "Your first payment is still processing (a bank debit takes a few days to "
                   "clear): your instance is created as soon as it clears."}, j


def test_a_returning_customer_waiting_for_its_first_payment_sees_its_new_subscription(
        stack, stripe, prov):
    """Beside its destroyed instance, a customer who has subscribed again (to another
    plan, by bank debit: no instance until the debit clears) sees the subscription the
    notice speaks of, its new one still processing, with that plan's limits: not the
    one that ended."""
    acc, _, tok = user(stack)
    events = paid(stack, stripe, tok, acc)
    [(sid,)] = stack.sql("SELECT id FROM public.subscriptions WHERE account_id = %s", acc)
    assert wait_status(stack, str(sid), "running", timeout=15)
    end_subscription(stack, events, sid)
    j = mine(stack, tok)
    assert (j["subscription"]["id"], j["subscription"]["status"]) == (str(sid), "cancelled"), j

    paid(stack, stripe, tok, acc, status="incomplete", tier="starter")
    [(new, agents)] = stack.sql("SELECT id, max_agents FROM public.subscriptions "
                                "WHERE account_id = %s AND id <> %s", acc, sid)
    j = mine(stack, tok)
    assert j["instance"]["status"] == "deprovisioned"
    assert j["instance"]["notice"]["code"] == "payment_processing", j
    assert j["subscription"]["id"] == str(new), j["subscription"]
    assert (j["subscription"]["status"], j["subscription"]["tier"]) == ("incomplete", "starter"), j
    assert j["subscription"]["cancelled_at"] is None, j["subscription"]
    assert (j["plan"]["tier"], j["plan"]["max_agents"]) == ("starter", agents), j["plan"]


def welcome_email(stack, resend, sid, to):
    """The welcome email of sid's live instance, once sent: (instance, the email)."""
    inst = wait_until(lambda: (lambda i: i if i["welcome_email_sent_at"] else None)(
        instance(stack, sid)), timeout=15, what="welcome email sent")
    [mail] = [m for m in resend.requests
              if m.headers["Idempotency-Key"] == "welcome-%s" % inst["id"]]
    assert mail.json["to"] == [to]
    return inst, mail


def test_a_returning_customer_is_told_its_mindroom_is_back_with_its_data(stack, stripe, prov, resend):
    """A new customer's welcome email says its MindRoom is ready. One who cancelled and
    subscribes again while its data is kept gets that data back in its new instance:
    its email says so (the same address, its rooms, agents and settings), instead of
    welcoming it as if it started from nothing."""
    acc, email, tok = user(stack)
    events = paid(stack, stripe, tok, acc)
    [(sid,)] = stack.sql("SELECT id FROM public.subscriptions WHERE account_id = %s", acc)
    first, mail = welcome_email(stack, resend, str(sid), email)
    assert mail.json["subject"] == "Your MindRoom is ready"
    assert mail.json["text"].startswith("Welcome to MindRoom!\n\nYour MindRoom instance is up "
                                        "and running at:\n\n  %s\n" % first["frontend_url"])
    assert "back" not in mail.json["text"] and "before" not in mail.json["text"]

    end_subscription(stack, events, sid)

    paid(stack, stripe, tok, acc)
    [(again,)] = stack.sql("SELECT id FROM public.subscriptions WHERE account_id = %s AND id <> %s",
                           acc, sid)
    second, mail = welcome_email(stack, resend, str(again), email)
    assert str(second["id"]) != str(first["id"]) and second["frontend_url"] == first["frontend_url"]
    assert stack.sql("SELECT storage_taken_by FROM public.instances WHERE id = %s",
                     first["id"]) == [(second["id"],)]
    assert mail.json["subject"] == "Your MindRoom is back"
    text = mail.json["text"]
    assert text.startswith("Welcome back to MindRoom!\n\nYour MindRoom is running again at:"
                           "\n\n  %s\n" % first["frontend_url"]), text
    assert "with the rooms, agents and settings it had before" in text, text
    assert "Welcome to MindRoom!" not in text and "up and running" not in text, text


def test_a_customer_who_subscribes_again_while_its_instance_is_removed_gets_its_data_back(
        stack, stripe, prov, resend):
    """The customer cancels and subscribes again before its instance's destroy is done
    (here the provisioner fails it for a while). The new subscription's event waits for
    that destroy (recorded, 503 instance_names_taken, so that Stripe or the worker's
    sweep applies it again) instead of starting an empty MindRoom beside the old one,
    whose data would then be kept for nobody; once the destroy is done the event is
    applied and the customer gets its MindRoom back, data and address."""
    acc, email, tok = user(stack)
    events = paid(stack, stripe, tok, acc)
    [(sid,)] = stack.sql("SELECT id FROM public.subscriptions WHERE account_id = %s", acc)
    first, _ = welcome_email(stack, resend, str(sid), email)

    prov.behave("fail")                     # the destroy fails, and is retried with backoff
    try:
        sub = dict(events[1]["data"]["object"], status="canceled")
        assert deliver(stack, stripe_event("customer.subscription.deleted", sub,
                                           events[1]["created"] + 1)).status == 200
        wait_until(lambda: instance(stack, str(sid))["attempts"] >= 1, timeout=15,
                   what="the destroy failed once")
        r = checkout(stack, tok, tier="enterprise")
        assert r.status == 200, r
        again = stripe.complete(r.json["id"])
        assert deliver(stack, again[0]).status == 200               # checkout.session.completed
        w = deliver(stack, again[1])                                # customer.subscription.created
        assert w.status == 503 and error(w) == {
            "code": "instance_names_taken",
            "message": "the account's instance %s is still being removed; this subscription's "
                       "instance is made on its data once it is" % first["dokku_app_name"]}, w
        assert stack.sql("SELECT status FROM public.stripe_events WHERE id = %s",
                         again[1]["id"]) == [("deferred",)]
        assert stack.sql("SELECT count(*) FROM public.instances i JOIN public.subscriptions s "
                         "ON s.id = i.subscription_id WHERE s.account_id = %s", acc) == [(1,)]
    finally:
        prov.behave("ok")
    assert wait_status(stack, str(sid), "deprovisioned", timeout=30)

    # Stripe delivers the event again (the worker's sweep would, too).
    assert deliver(stack, again[1]).status == 200
    [(new_sid,)] = stack.sql("SELECT id FROM public.subscriptions WHERE account_id = %s AND id <> %s",
                             acc, sid)
    second, mail = welcome_email(stack, resend, str(new_sid), email)
    assert second["frontend_url"] == first["frontend_url"]
    assert stack.sql("SELECT storage_taken_by FROM public.instances WHERE id = %s",
                     first["id"]) == [(second["id"],)]
    assert mail.json["subject"] == "Your MindRoom is back"


def test_a_subscription_whose_first_payment_is_processing_refuses_a_second_checkout(stack, stripe, prov):
    """Paid by bank debit: Stripe completes the session (payment_status unpaid) and
    keeps the subscription incomplete until the debit clears, days later. No
    instance runs meanwhile, and a second checkout (by card, "it did not work")
    would bill the customer twice; once the first payment is given up
    (incomplete_expired) the account can check out again."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="enterprise")
    assert a.status == 200, a
    events = stripe.complete(a.json["id"], status="incomplete")
    for ev in events:
        assert deliver(stack, ev).status == 200
    assert stack.sql("SELECT status::text FROM public.subscriptions WHERE account_id = %s",
                     acc) == [("incomplete",)]
    sent = len(stripe.recorded())
    r = checkout(stack, tok, tier="starter")
    assert r.status == 409, r
    assert error(r) == {"code": "subscription_exists",
                        "message": "this account already has a subscription (incomplete): its "
                                   "first payment is still being processed; a second checkout "
                                   "would charge twice"}
    assert len(stripe.recorded()) == sent
    assert [s for s in stripe.sessions.values()
            if s["client_reference_id"] == acc and s["status"] == "open"] == []
    sub = json.loads(json.dumps(events[1]["data"]["object"]))
    sub["status"] = "incomplete_expired"
    w = deliver(stack, stripe_event("customer.subscription.updated", sub, int(time.time()) + 5))
    assert w.status == 200 and "failed" not in w.json, w
    c = checkout(stack, tok, tier="starter")
    assert c.status == 200, (c, attempts(stack, acc))


def test_a_subscription_recorded_while_a_checkout_waits_for_stripe_leaves_no_second_session(stack, stripe, prov):
    """Tab 1's session is paid; tab 2's checkout passes step 1 (no subscription
    recorded yet) and waits for Stripe while tab 1's webhook records the subscription.
    Tab 2's step 5 then finds tab 1's session paid: the account has a live
    subscription, so tab 2's session must not stay open (paying it would make a second
    subscription on the account)."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="enterprise")
    assert a.status == 200, a
    events = stripe.complete(a.json["id"])          # tab 1 pays; its webhook is on its way
    stripe.next("hang")                             # tab 2's session request is slow at Stripe
    with ThreadPoolExecutor(1) as ex:
        b = ex.submit(checkout, stack, tok, tier="enterprise", interval="year")
        assert stripe.wait_for(lambda s: len(s.recorded("/v1/checkout/sessions")) == 2)
        for ev in events:                           # ... and tab 1's webhook lands meanwhile
            assert deliver(stack, ev).status == 200
        stripe.release()
        b = b.result()
    assert stack.sql("SELECT status::text FROM public.subscriptions WHERE account_id = %s",
                     acc) == [("active",)]
    mine = {sid: s["status"] for sid, s in stripe.sessions.items() if s["client_reference_id"] == acc}
    assert [sid for sid, st in mine.items() if st == "open"] == [], (b, mine, attempts(stack, acc))
    assert b.status == 409, b


def test_resubscribing_to_the_same_plan_after_cancelling_gets_a_payable_session(stack, stripe, prov):
    """A customer subscribes, cancels at once and subscribes again to the same plan
    within the hour: the checkout must hand out a new, open session, not the session
    already paid (a completed Checkout page nobody can pay)."""
    acc, _, tok = user(stack)
    a = checkout(stack, tok, tier="enterprise")
    assert a.status == 200, a
    events = stripe.complete(a.json["id"])
    for ev in events:
        assert deliver(stack, ev).status == 200
    sub = json.loads(json.dumps(events[1]["data"]["object"]))
    sub.update(status="canceled", canceled_at=int(time.time()) + 5)
    w = deliver(stack, stripe_event("customer.subscription.deleted", sub, int(time.time()) + 5))
    assert w.status == 200 and "failed" not in w.json, w
    again = checkout(stack, tok, tier="enterprise")
    assert again.status == 200, (again, attempts(stack, acc))
    assert again.json["id"] != a.json["id"], (again.json, stripe.sessions[a.json["id"]]["status"])
    assert stripe.sessions[again.json["id"]]["status"] == "open"
