/* create-checkout-session: a Stripe Checkout Session (subscription mode) for
 * the caller's account.
 *
 * POST with a user's JWT (role authenticated) and {"tier": "...", "interval":
 * "month" | "year"} (interval defaults to month) or {"price_id": "price_..."}.
 * 200 {"id", "url", "expires_at"}: the browser goes to url.
 *
 *   1. The account (from the JWT's sub, never from the body): 404 without one;
 *      409 when it has a subscription a new one would duplicate (incomplete: its
 *      first payment is processing; trialing, active, past_due, unpaid, paused:
 *      changes go through the portal); 409
 *      checkout_completed while a checkout of it was paid and its subscription
 *      is not recorded yet (at most until Stripe stops retrying the webhook).
 *   2. The plan, from public.plans: 400 unknown_plan / inactive_plan.
 *   3. The account's Stripe customer; created by us when it has none, with
 *      metadata.account_id and the account's email, and stored on the account
 *      in the transaction that records the answer (the webhook links events
 *      through it). When an earlier attempt to create it ended without an
 *      answer saying what Stripe did, the one Stripe may have made is looked
 *      for first (find_customer).
 *   4. The session: client_reference_id and metadata.account_id (on the
 *      session and on the subscription it creates) = the account, success and
 *      cancel URLs from configuration only, the plan's trial days for an
 *      account that never had a subscription, promotion codes when
 *      STRIPE_ALLOW_PROMOTION_CODES is on.
 * Steps 3 and 4 are attempts (lib/mr_billing.h): a call repeated after a lost
 * answer gets the same customer and the same open session, never new ones. A
 * session answered again so is read at Stripe first: one that expired there (an
 * operator, the API) is recorded abandoned and a new one made; one complete (paid,
 * its subscription still on its way) is recorded paid and answered 409
 * checkout_completed.
 *   5. Only the newest session can be paid: the account's older sessions that
 *      may still be open are expired at Stripe and recorded abandoned
 *      (sql/migrations/122_checkout_supersedes.sql). Stripe refuses to expire one
 *      that is no longer open with the same 400 whether it was paid or had
 *      expired already (at its expires_at, by an operator), so that session is
 *      then read (GET): one that had expired is recorded abandoned and the new
 *      one goes ahead; a complete one was paid: it is recorded completed, the new
 *      one is expired too and the answer is 409 checkout_completed (the
 *      subscription is on its way; the next calls stop at step 1); one that
 *      cannot be read, or reads neither, is answered 503 with the new session
 *      not handed out (the customer tries again and it is asked about again).
 *      When a newer checkout of the account already has its session (two tabs,
 *      this one slower at Stripe), the new one is expired and the answer is 409
 *      checkout_superseded (127_checkout_one_payable.sql). One Stripe cannot be
 *      reached about now stays open until it expires (logged), and is never
 *      handed out.
 *
 * Without STRIPE_SECRET_KEY every call is answered 503 stripe_not_configured. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/rand.h>

#include "mindroom.h"
#include "mr_billing.h"
#include "mr_stripe_api.h"

static mr_stripe_api_config stripe;
static struct {
    const char *success_url;
    const char *cancel_url;
    int promotion_codes;
} cfg;

static void init(void)
{
    mr_stripe_api_config_load(&stripe, "payments answer 503 stripe_not_configured");
    if (!stripe.secret_key)
        return;
    cfg.success_url = mr_config_url("STRIPE_CHECKOUT_SUCCESS_URL", NULL);
    cfg.cancel_url = mr_config_url("STRIPE_CHECKOUT_CANCEL_URL", NULL);
    cfg.promotion_codes = mr_config_bool("STRIPE_ALLOW_PROMOTION_CODES", 0);
}


/* The body: exactly one of tier (with an optional interval) and price_id, and
 * nothing else. Fills the three (NULL when absent) or replies 400. */
typedef struct {
    char tier[32], interval[8], price_id[256];
    int by_price;
} choice;

static int read_choice(mr_req *r, choice *c)
{
    static const char *const members[] = {"tier", "interval", "price_id", NULL};
    char why[200];
    memset(c, 0, sizeof(*c));
    cJSON *body = mr_json_parse(r->body, r->body_len);
    const char *bad = NULL;
    if (!cJSON_IsObject(body)) {
        bad = "body must be a JSON object";
    } else {
        for (const cJSON *it = body->child; it && !bad; it = it->next)
            if (strcmp(it->string, "tier") != 0 && strcmp(it->string, "interval") != 0 &&
                strcmp(it->string, "price_id") != 0)
                bad = "unknown field: only tier, interval and price_id are accepted (the account "
                      "is always the caller's)";
        if (!bad && mr_json_members(body, members, why, sizeof why) != MR_OK)
            bad = why; /* a member given twice */
    }
    const char *tier = NULL, *interval = NULL, *price = NULL;
    mr_err te = MR_ENOTFOUND, ie = MR_ENOTFOUND, pe = MR_ENOTFOUND;
    if (!bad) {
        te = mr_json_str(body, "tier", &tier);
        ie = mr_json_str(body, "interval", &interval);
        pe = mr_json_str(body, "price_id", &price);
        if (te == MR_EINVAL || ie == MR_EINVAL || pe == MR_EINVAL)
            bad = "tier, interval and price_id must be strings";
        else if ((te == MR_OK) == (pe == MR_OK))
            bad = "give either tier (and interval) or price_id";
        else if (pe == MR_OK && ie == MR_OK)
            bad = "interval goes with tier; a price_id already has one";
        else if (ie == MR_OK && strcmp(interval, "month") != 0 && strcmp(interval, "year") != 0)
            bad = "interval must be \"month\" or \"year\"";
        else if ((te == MR_OK && (!*tier || strlen(tier) >= sizeof c->tier)) ||
                 (pe == MR_OK && (!*price || strlen(price) >= sizeof c->price_id)))
            bad = "tier or price_id has an impossible length";
    }
    if (bad) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_body", "%s", bad);
        return 0;
    }
    c->by_price = pe == MR_OK;
    snprintf(c->tier, sizeof c->tier, "%s", te == MR_OK ? tier : "");
    snprintf(c->interval, sizeof c->interval, "%s", ie == MR_OK ? interval : "month");
    snprintf(c->price_id, sizeof c->price_id, "%s", pe == MR_OK ? price : "");
    cJSON_Delete(body);
    return 1;
}

/* What expiring a checkout session at Stripe came to. */
typedef enum {
    EXPIRED,      /* expired now, or Stripe has no such session (another key's): nothing to pay */
    WAS_EXPIRED,  /* no longer open because it had expired already (it lapsed, an operator or
                     another checkout of the account expired it): nothing to pay */
    COMPLETE,     /* no longer open because it was completed: paid, or its payment processing */
    NOT_EXPIRED,  /* no answer, or another refusal: it stays open until it expires */
    UNSURE,       /* refused as no longer open, but what it is now could not be read */
    OPEN          /* read: still open (a session about to be handed out again) */
} expiry;

/* What a checkout session is now: GET /v1/checkout/sessions/{id} and its status, for
 * one Stripe refused to expire and for one about to be handed out again. Stripe
 * refuses the expiry of any session that is not open with the same 400
 * (invalid_request_error, no code, the status only in its message), whether it was
 * paid or had merely expired already. Fills why for a COMPLETE one (for the attempt's
 * record) and returns COMPLETE, WAS_EXPIRED, OPEN or UNSURE (not read, or neither). */
static expiry read_session(mr_req *r, const char *session, int64_t deadline, char *why,
                           size_t len)
{
    char path[320], err[256] = "";
    snprintf(path, sizeof path, "/v1/checkout/sessions/%s", session);
    mr_stripe_api_result res;
    mr_err e = mr_stripe_api_get(r->http, &stripe, path, deadline, &res, err, sizeof err);
    const char *status = "", *payment = "";
    if (e == MR_OK) {
        mr_json_str(res.object, "status", &status);
        mr_json_str(res.object, "payment_status", &payment);
    }
    expiry x = UNSURE;
    /* A complete session's subscription exists whatever its payment_status: "unpaid"
     * is a payment still processing (a bank debit), "no_payment_required" a trial. */
    if (strcmp(status, "complete") == 0)
        x = COMPLETE;
    else if (strcmp(status, "expired") == 0 && strcmp(payment, "paid") != 0)
        x = WAS_EXPIRED;
    else if (strcmp(status, "open") == 0)
        x = OPEN;
    if (x == COMPLETE)
        snprintf(why, len, "complete at Stripe (payment_status %.40s)", payment);
    else if (e != MR_OK)
        mr_log(MR_LOG_WARN, "reading checkout session %.64s failed: %s", session, err);
    else if (x == UNSURE)
        mr_log(MR_LOG_ERROR, "checkout session %.64s is no longer open but %.40s (payment_status "
               "%.40s) at Stripe (request %s)", session, status, payment, res.request_id);
    mr_stripe_api_result_free(&res);
    return x;
}

/* Expires checkout session `session` at Stripe, as `expiry` above says; a refusal as
 * no longer open (400) is settled by reading the session (read_session, which fills
 * why for a COMPLETE one). Each call has a key of its own, which makes its retries
 * the same request: Stripe keeps a key's first answer for a day, a 500 too, so a key
 * of the session alone would get that 500 back at every later call and leave the
 * session payable; expiring a session twice is harmless (the second is the 400). */
static expiry expire_session(mr_req *r, const char *session, int64_t deadline, char *why,
                             size_t len)
{
    char path[320], key[320], err[256] = "", nonce_hex[2 * 12 + 1];
    unsigned char nonce[12];
    if (RAND_bytes(nonce, sizeof nonce) != 1) {
        mr_log(MR_LOG_ERROR, "could not expire checkout session %.64s: no randomness for its "
               "key", session);
        return NOT_EXPIRED;
    }
    mr_hex(nonce, sizeof nonce, nonce_hex);
    snprintf(path, sizeof path, "/v1/checkout/sessions/%s/expire", session);
    snprintf(key, sizeof key, "mindroom-expire-%s-%s", session, nonce_hex);
    mr_stripe_api_result res;
    mr_err e = mr_stripe_api_post(r->http, &stripe, path, "", key, deadline, &res, err, sizeof err);
    long status = res.status;
    mr_stripe_api_result_free(&res);
    if (e == MR_OK || (e == MR_EINTERNAL && status == 404))
        return EXPIRED;
    if (e == MR_EINTERNAL && status == 400) {
        expiry x = read_session(r, session, deadline, why, len);
        if (x == OPEN)
            mr_log(MR_LOG_ERROR, "checkout session %.64s was refused its expiry, yet reads open",
                   session);
        return x == OPEN ? UNSURE : x;
    }
    mr_log(MR_LOG_WARN, "could not expire checkout session %.64s: %s", session, err);
    return NOT_EXPIRED;
}

/* Records a checkout attempt abandoned (its session expired, or no longer open).
 * MR_OK, or the database's failure, answered. */
static mr_err abandon(mr_req *r, const char *attempt, const char *why)
{
    const char *q[2] = {attempt, why};
    cJSON *v = NULL;
    mr_err e = mr_billing_sql(r, "SELECT public.billing_checkout_abandoned($1, $2)::text", 2, q, &v);
    cJSON_Delete(v);
    return e;
}

/* Records a checkout attempt whose session Stripe reads complete (why: what it read):
 * paid. Sets *paid when the account now has a paid checkout whose subscription is not
 * recorded yet (public.billing_checkout_paid_pending). MR_OK, or the database's
 * failure, answered. */
static mr_err record_paid(mr_req *r, const char *attempt, const char *why, int *paid)
{
    const char *q[2] = {attempt, why};
    cJSON *v = NULL;
    mr_err e = mr_billing_sql(r, "SELECT public.billing_checkout_completed($1, $2)::text", 2, q, &v);
    int p = 0;
    if (e == MR_OK && mr_json_bool(v, "paid", &p) == MR_OK && p)
        *paid = 1;
    cJSON_Delete(v);
    return e;
}

/* Why an attempt is abandoned whose session Stripe found expired already. */
#define WAS_EXPIRED_WHY "no longer open at Stripe: it had expired already (at its expires_at, " \
                        "or expired by an operator or another checkout of the account)"

/* Takes back this request's own session, which must not be paid: expires it at
 * Stripe and records its attempt `mine` abandoned (why). One Stripe reads complete was
 * paid (an earlier call answered it): recorded so, *paid set as record_paid does. One
 * Stripe could not be reached or read about stays recorded as it is: the account's
 * next checkout expires it as an older one, and none is handed it meanwhile. MR_OK, or
 * the database's failure, answered. */
static mr_err withdraw(mr_req *r, const char *mine, const char *session, int64_t deadline,
                       const char *why, int *paid)
{
    char seen[120] = "";
    expiry x = expire_session(r, session, deadline, seen, sizeof seen);
    if (!mine[0] || x == NOT_EXPIRED || x == UNSURE)
        return MR_OK;
    if (x == COMPLETE)
        return record_paid(r, mine, seen, paid);
    return abandon(r, mine, x == WAS_EXPIRED ? WAS_EXPIRED_WHY : why);
}

/* Step 5, for the session this request has. Returns 1 when it stands, 0 when a
 * checkout of the account was paid and its subscription is not recorded yet, or a
 * newer checkout of the account was started (answered 409 here), or an older session
 * is no longer open and what it is now could not be read (answered 503: the next call
 * is answered this session again and asks again), or the database failed (answered). */
static int supersede_older(mr_req *r, const char *account, const char *session, int64_t deadline)
{
    const char *p[2] = {account, session};
    cJSON *j;
    if (mr_billing_sql(r, "SELECT public.billing_checkout_older_open($1, $2)::text", 2, p, &j) !=
        MR_OK)
        return 0;
    int paid = 0, newer = 0, unsure = 0;
    char mine[40] = "";
    const char *m = NULL;
    if (mr_json_str(j, "attempt_id", &m) == MR_OK)
        snprintf(mine, sizeof mine, "%s", m);
    mr_json_bool(j, "newer", &newer);
    mr_json_bool(j, "paid", &paid);
    const cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(j, "older"))
    {
        const char *attempt = NULL, *older = NULL;
        if (mr_json_str(it, "attempt_id", &attempt) != MR_OK ||
            mr_json_str(it, "session_id", &older) != MR_OK)
            continue;
        char seen[120] = "";
        expiry x = expire_session(r, older, deadline, seen, sizeof seen);
        mr_err e = MR_OK;
        if (x == EXPIRED)
            e = abandon(r, attempt, "expired: a newer checkout of the account replaced it");
        else if (x == WAS_EXPIRED)
            e = abandon(r, attempt, WAS_EXPIRED_WHY);
        else if (x == COMPLETE)
            e = record_paid(r, attempt, seen, &paid);
        else if (x == UNSURE)
            unsure = 1;
        if (e != MR_OK) {
            cJSON_Delete(j);
            return 0;
        }
    }
    cJSON_Delete(j);
    /* It may have been paid: handing out a second payable session could bill twice,
     * and taking it for paid would refuse the account for days. */
    if (!paid && !newer && unsure) {
        mr_stripe_api_reply_error(r, MR_ETRANSIENT, NULL);
        return 0;
    }
    if (!paid && !newer)
        return 1;
    /* A paid session's subscription is on its way, and this one must not make a
     * second; or another tab's checkout started after this one and already has its
     * session (its step 5 ran before this session existed): the newest wins. */
    if (withdraw(r, mine, session, deadline,
                 paid ? "expired: another checkout of the account was paid"
                      : "expired: a newer checkout of the account was started",
                 &paid) != MR_OK)
        return 0;
    if (paid)
        mr_reply_error(r, 409, "checkout_completed",
                       "another checkout of this account was paid; its subscription is being "
                       "set up (manage it in the billing portal)");
    else
        mr_reply_error(r, 409, "checkout_superseded",
                       "a newer checkout of this account was started; use that one");
    return 0;
}

/* The oldest customer made for an account (metadata.account_id) among those listed
 * (mr_stripe_api_list's each). */
typedef struct {
    const char *account;
    char id[256];      /* "" until one is found */
    int64_t created;
} oldest_customer;

static void keep_oldest(const cJSON *c, void *arg)
{
    oldest_customer *o = arg;
    const char *id = NULL, *of = NULL;
    int64_t created = 0;
    if (mr_json_str(c, "id", &id) != MR_OK || strlen(id) >= sizeof o->id ||
        mr_json_str(cJSON_GetObjectItemCaseSensitive(c, "metadata"), "account_id", &of) != MR_OK ||
        strcmp(of, o->account) != 0)
        return;
    mr_json_i64(c, "created", 0, INT64_MAX, &created);
    if (created < o->created) {
        o->created = created;
        snprintf(o->id, sizeof o->id, "%s", id);
    }
}

/* Step 3's guard against a second customer: while one of the account's customer
 * attempts is unsure (closed without a customer: a 500 Stripe kept for its key, an
 * attempt given up; or pending with another email, which will not be resumed), Stripe
 * may have made a customer for it. Stripe's customers are listed by each email those
 * attempts sent and by the one this request sends (public.billing_customer_emails:
 * Stripe's filter is the exact email, and the user may have changed theirs since);
 * the list is consistent, unlike Stripe's search. The oldest made for this account
 * (metadata.account_id) becomes the account's (public.billing_customer_found).
 * MR_OK with customer filled when one was found and left "" when none was; otherwise
 * the failure, answered (503 when Stripe cannot be asked: nothing is made blind). */
static mr_err find_customer(mr_req *r, const char *account, const char *email, int64_t deadline,
                            char *customer, size_t len)
{
    const char *ap[2] = {account, email};
    cJSON *emails;
    mr_err e = mr_billing_sql(r, "SELECT to_json(public.billing_customer_emails($1::uuid, $2))"
                                 "::text", 2, ap, &emails);
    if (e != MR_OK)
        return e;
    /* The oldest customer of this account under any of them. Stripe lists newest
     * first, so every page is read (mr_stripe_api_list). */
    oldest_customer found = {.account = account, .created = INT64_MAX};
    const cJSON *address;
    cJSON_ArrayForEach(address, emails) {
        if (!cJSON_IsString(address))
            continue;
        cJSON *q = cJSON_CreateObject();
        cJSON_AddStringToObject(q, "email", address->valuestring);
        mr_stripe_api_result res;
        char err[256] = "";
        e = mr_stripe_api_list(r->http, &stripe, "/v1/customers", q, deadline, keep_oldest, &found,
                               &res, err, sizeof err);
        cJSON_Delete(q);
        if (e != MR_OK) {
            mr_log(MR_LOG_WARN, "billing: cannot look for the customer of account %s: %s", account,
                   err);
            mr_stripe_api_reply_error(r, e, &res);
        }
        mr_stripe_api_result_free(&res);
        if (e != MR_OK)
            break;
    }
    cJSON_Delete(emails);
    if (e == MR_OK && found.id[0]) {
        const char *fp[3] = {account, found.id, stripe.livemode ? "true" : "false"};
        cJSON *v;
        if ((e = mr_billing_sql(r, "SELECT to_json(public.billing_customer_found($1::uuid, $2, "
                                   "$3::boolean))::text", 3, fp, &v)) == MR_OK) {
            snprintf(customer, len, "%s", cJSON_IsString(v) ? v->valuestring : "");
            mr_log(MR_LOG_INFO, "billing: account %s: its customer %s found at Stripe, not made "
                   "again (request %s)", account, customer, r->request_id);
            cJSON_Delete(v);
        }
    }
    return e;
}

/* A checkout of the account was paid and its subscription is not recorded yet. */
static void reply_checkout_paid(mr_req *r)
{
    mr_reply_error(r, 409, "checkout_completed",
                   "a checkout of this account was paid; its subscription is being set up "
                   "(manage it in the billing portal)");
}

static void handle(mr_req *r)
{
    if (!stripe.secret_key) {
        mr_stripe_api_reply_not_configured(r);
        return;
    }
    if (!mr_billing_require_user(r))
        return;
    choice c;
    if (!read_choice(r, &c))
        return;
    const char *account = r->who.sub;
    int64_t deadline = r->started_ms + stripe.deadline_ms;

    /* 1. The account. */
    mr_billing_account acc;
    if (mr_billing_account_get(r, account, &acc) != MR_OK)
        return;
    if (!acc.found) {
        mr_reply_error(r, 404, "no_account", "no account for this user");
        return;
    }
    if (acc.live_status[0]) {
        mr_reply_error(r, 409, "subscription_exists", "this account already has a subscription (%s): %s",
                       acc.live_status,
                       strcmp(acc.live_status, "incomplete") == 0
                           ? "its first payment is still being processed; a second checkout "
                             "would charge twice"
                           : "change or cancel it in the billing portal (create-portal-session)");
        return;
    }
    /* Its subscription is on its way: anything sent now could be paid a second time
     * (a session a failed expiry left open would be answered again). */
    if (acc.checkout_paid) {
        reply_checkout_paid(r);
        return;
    }

    /* 2. The plan. */
    const char *pp[3] = {c.by_price ? NULL : c.tier, c.by_price ? NULL : c.interval,
                         c.by_price ? c.price_id : NULL};
    cJSON *plan;
    if (mr_billing_sql(r, "SELECT public.billing_checkout_plan($1, $2, $3)::text", 3, pp, &plan) !=
        MR_OK)
        return;
    const char *result = "", *price = NULL;
    int64_t trial_days = 0;
    mr_json_str(plan, "result", &result);
    mr_json_str(plan, "price_id", &price);
    mr_json_i64(plan, "trial_days", 0, 730, &trial_days);
    if (strcmp(result, "ok") != 0 || !price) {
        if (strcmp(result, "inactive") == 0)
            mr_reply_error(r, 400, "inactive_plan", "that plan is no longer offered (list-plans "
                           "shows what is)");
        else if (c.by_price)
            mr_reply_error(r, 400, "unknown_plan", "no plan has the price %.64s", c.price_id);
        else
            mr_reply_error(r, 400, "unknown_plan", "no plan for tier %.32s and interval %s",
                           c.tier, c.interval);
        cJSON_Delete(plan);
        return;
    }
    char price_id[256];
    snprintf(price_id, sizeof price_id, "%s", price);
    cJSON_Delete(plan);

    /* 3. The customer. */
    char customer[256];
    snprintf(customer, sizeof customer, "%s", acc.customer);
    if (!customer[0] &&
        find_customer(r, account, acc.email, deadline, customer, sizeof customer) != MR_OK)
        return;
    if (!customer[0]) {
        cJSON *p = cJSON_CreateObject();
        cJSON_AddStringToObject(p, "email", acc.email);
        cJSON_AddStringToObject(cJSON_AddObjectToObject(p, "metadata"), "account_id", account);
        mr_billing_result cust;
        mr_err e = mr_billing_call(r, &stripe, account, "customer", "/v1/customers", p, deadline,
                                   &cust);
        cJSON_Delete(p);
        if (e != MR_OK)
            return;
        snprintf(customer, sizeof customer, "%s", cust.object_id);
        mr_billing_result_free(&cust);
    }

    /* 4. The session. */
    cJSON *p = cJSON_CreateObject();
    cJSON_AddStringToObject(p, "mode", "subscription");
    cJSON_AddStringToObject(p, "customer", customer);
    cJSON_AddStringToObject(p, "client_reference_id", account);
    cJSON *item = cJSON_CreateObject();
    cJSON_AddStringToObject(item, "price", price_id);
    cJSON_AddNumberToObject(item, "quantity", 1);
    cJSON_AddItemToArray(cJSON_AddArrayToObject(p, "line_items"), item);
    cJSON_AddStringToObject(p, "success_url", cfg.success_url);
    cJSON_AddStringToObject(p, "cancel_url", cfg.cancel_url);
    cJSON_AddStringToObject(cJSON_AddObjectToObject(p, "metadata"), "account_id", account);
    cJSON *sub = cJSON_AddObjectToObject(p, "subscription_data");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(sub, "metadata"), "account_id", account);
    /* One trial per account: a returning customer pays from the start. */
    if (trial_days > 0 && !acc.had_subscription)
        cJSON_AddNumberToObject(sub, "trial_period_days", (double)trial_days);
    if (cfg.promotion_codes)
        cJSON_AddTrueToObject(p, "allow_promotion_codes");
    mr_billing_result s;
    mr_err e = mr_billing_call(r, &stripe, account, "checkout", "/v1/checkout/sessions", p,
                               deadline, &s);
    /* A session answered again from its attempt (the same plan clicked again within the
     * hour) may have ended at Stripe since: expired there (by an operator, through the
     * API), or paid with its subscription still on its way. Read, it is recorded so,
     * and an expired one replaced by a new session; one that cannot be read is handed
     * out as before. */
    int paid = 0;
    if (e == MR_OK && s.reused && s.attempt_id[0]) {
        char seen[120] = "";
        expiry x = read_session(r, s.object_id, deadline, seen, sizeof seen);
        if (x == WAS_EXPIRED || x == COMPLETE) {
            e = x == COMPLETE ? record_paid(r, s.attempt_id, seen, &paid)
                              : abandon(r, s.attempt_id, WAS_EXPIRED_WHY);
            mr_billing_result_free(&s);
            if (e == MR_OK && !paid)
                e = mr_billing_call(r, &stripe, account, "checkout", "/v1/checkout/sessions", p,
                                    deadline, &s);
        }
    }
    cJSON_Delete(p);
    if (e != MR_OK)
        return;
    if (paid) {
        reply_checkout_paid(r);
        return;
    }
    if (!s.url) {
        mr_billing_result_free(&s);
        mr_reply_error(r, 502, "stripe_error", "the payment provider sent a session without a URL");
        return;
    }

    /* 5. Only the newest session can be paid. */
    if (!supersede_older(r, account, s.object_id, deadline)) {
        mr_billing_result_free(&s);
        return;
    }
    cJSON *out = cJSON_CreateObject();
    cJSON_AddStringToObject(out, "id", s.object_id);
    cJSON_AddStringToObject(out, "url", s.url);
    if (s.expires_at)
        cJSON_AddNumberToObject(out, "expires_at", (double)s.expires_at);
    else
        cJSON_AddNullToObject(out, "expires_at");
    mr_billing_result_free(&s);
    mr_reply_json(r, 200, out);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "create-checkout-session",
        .methods = "POST",
        .auth = MR_AUTH_USER,
        .init = init,
        .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
