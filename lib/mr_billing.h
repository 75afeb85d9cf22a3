/* mr_billing.h: Stripe API calls made for an account, each recorded as an
 * attempt before it is sent (public.billing_attempts and its functions,
 * sql/migrations/050_billing.sql), and the billing reads the session
 * functions share.
 *
 * One call: encode the request, fingerprint it (sha256 of path and form body),
 * and in one short transaction find or start its attempt. The account's
 * latest attempt of that kind with the same fingerprint is sent again with its
 * own Idempotency-Key while its outcome is unknown (so a lost answer is
 * replayed by Stripe, never duplicated); anything else starts a new attempt
 * with a new key (so an old key is never reused for a later, different
 * request). Then the request is sent (mr_stripe_api_post) with no
 * transaction open, and its outcome is recorded in another.
 *
 * Every transaction here runs as service_role with the account id the caller
 * passes, which must come from the verified JWT (r->who.sub), never from a
 * request body. */
#ifndef MR_BILLING_H
#define MR_BILLING_H

#include <stdint.h>
#include <cjson/cJSON.h>
#include "mr_common.h"
#include "mr_http.h"
#include "mr_stripe_api.h"

typedef struct {
    char *object_id;     /* the Stripe object's id (cus_..., cs_..., bps_...) */
    char *url;           /* its url, NULL when it has none (customers) */
    int64_t expires_at;  /* Unix seconds, 0 when it has none */
    int reused;          /* 1: answered from a stored attempt; Stripe was not called */
    char attempt_id[40]; /* reused checkout: that attempt's id (to record the session's
                            end); "" otherwise */
} mr_billing_result;

/* Makes the POST to `path` with `params` as attempt `kind` ("customer",
 * "checkout" or "portal") of account_id, as described above, finishing by
 * deadline_ms (an mr_now_ms() time). For kind "customer", the attempt records
 * the email it sends (params' "email"), the customer is linked to the account in
 * the transaction that records it, and object_id is the account's customer
 * afterwards.
 * Returns MR_OK with *out filled (the caller frees it with
 * mr_billing_result_free) and nothing replied; on failure the error, having
 * replied to r itself: 503 stripe_unavailable (transient: the attempt stays
 * pending and the next call resumes it), 502 stripe_error (refused: the
 * attempt is closed), or the database's error. */
mr_err mr_billing_call(mr_req *r, const mr_stripe_api_config *cfg, const char *account_id,
                       const char *kind, const char *path, const cJSON *params,
                       int64_t deadline_ms, mr_billing_result *out);
void mr_billing_result_free(mr_billing_result *res);

/* Runs one statement returning a single json/jsonb value (cast to text) in a
 * transaction as service_role, with text params. Returns MR_OK with *out set
 * to the parsed value (the caller frees it with cJSON_Delete); on failure the
 * error, having replied to r itself (503 when the database is unavailable). */
mr_err mr_billing_sql(mr_req *r, const char *sql, int nparams, const char *const *params,
                      cJSON **out);

/* The caller's account as billing sees it (public.billing_account). */
typedef struct {
    int found;                /* 0: no account for this user id */
    char email[320];
    char customer[256];       /* its Stripe customer, "" when none yet */
    char live_status[24];     /* a subscription a new checkout would duplicate, "" if none */
    int had_subscription;     /* ever subscribed (no second trial) */
    int checkout_paid;        /* a checkout session was paid, its subscription not recorded yet */
} mr_billing_account;

/* Reads account_id's billing view. Returns MR_OK (found may be 0), or the
 * error having replied to r itself. */
mr_err mr_billing_account_get(mr_req *r, const char *account_id, mr_billing_account *out);

/* The session functions act for a signed-in user. Returns 1 when r's caller is
 * one (role authenticated with a sub); otherwise replies 403 and returns 0. */
int mr_billing_require_user(mr_req *r);

#endif
