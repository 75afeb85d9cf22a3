/* mr_stripe_api.h: requests to Stripe's API (https://api.stripe.com/v1/...).
 * (mr_stripe.h is the other direction: verifying Stripe's webhook signatures.)
 *
 * Requests are form-encoded from a cJSON object of parameters, flattened the
 * way Stripe's own libraries do it: a nested object becomes key[sub], an
 * array key[0], key[1]..., booleans "true"/"false", null an empty value.
 * Every request carries the pinned Stripe-Version, and every POST and DELETE the
 * caller's Idempotency-Key (one per attempt the caller stored before calling: see
 * mr_billing.h; Stripe replays a key's first answer for 24 hours and refuses
 * the key with other parameters). A GET reads and needs none.
 *
 * Retries follow stripe-node and stripe-go: a Stripe-Should-Retry header
 * decides when present; otherwise a connection error, a 409 (another request
 * with the same key is in flight) and any 5xx are retried, but never an answer
 * Stripe replayed (Idempotent-Replayed: true): Stripe keeps a key's first
 * answer once it began executing the request, a 500 included, and a retry with
 * that key only gets it again (res->replayed tells the caller). A 429 is retried
 * too: Stripe's libraries leave rate limits to the caller, and Stripe's
 * rate-limit guidance is to back off and retry; here the caller is a person
 * waiting for a checkout page. The delay before retry n (1, 2, ...) is
 * min(0.5 s * 2^(n-1), 5 s) times a random factor in [0.5, 1), never under
 * 0.5 s (stripe-node's rule). At most max_retries retries, and never past the
 * caller's deadline: each attempt's timeout is the time left.
 *
 * Stripe's error messages ({"error":{"type","code","message"}}) go to the log
 * with Stripe's Request-Id, never to a tenant: mr_stripe_api_reply_error
 * answers with one of two fixed messages. The secret key is never logged. */
#ifndef MR_STRIPE_API_H
#define MR_STRIPE_API_H

#include <stdint.h>
#include <cjson/cJSON.h>
#include "mr_common.h"
#include "mr_http.h"
#include "mr_httpc.h"

/* The API version every request asks for: the one whose payloads the webhook
 * reads first (current_period_end on subscription items). */
#define MR_STRIPE_API_VERSION "2025-03-31.basil"
#define MR_STRIPE_API_DEFAULT_BASE "https://api.stripe.com"

typedef struct {
    const char *secret_key;   /* STRIPE_SECRET_KEY, NULL when unset: not configured */
    int livemode;             /* 1 for sk_live_/rk_live_ keys, 0 for test keys */
    const char *base_url;     /* STRIPE_API_BASE (tests point it at a stand-in) */
    long deadline_ms;         /* STRIPE_DEADLINE_MS: every Stripe call of one request */
    long connect_timeout_ms;  /* STRIPE_CONNECT_TIMEOUT_MS: one connection attempt */
    int max_retries;          /* STRIPE_MAX_RETRIES: retries of one call */
    /* Optional (NULL from mr_stripe_api_config_load): polled during a call and
     * before each retry, with a NULL argument; non-zero ends the call at once
     * with MR_ETRANSIENT (outcome unknown: repeat it later with the same key). */
    int (*abort_cb)(void *arg);
} mr_stripe_api_config;

/* Reads the configuration (strings are the environment's own) and logs the
 * mode it found. A malformed value prints "config: ..." (never the key) and
 * exits 2. An unset
 * STRIPE_SECRET_KEY is not an error: secret_key is NULL, and the warning logged
 * says what that means for the caller (without_key: "payments answer 503
 * stripe_not_configured", see mr_stripe_api_reply_not_configured). */
void mr_stripe_api_config_load(mr_stripe_api_config *cfg, const char *without_key);

/* Checks a secret key's shape: sk_test_, sk_live_, rk_test_ or rk_live_
 * followed by at least 16 letters and digits. Returns MR_OK with *livemode
 * set (may be NULL), or MR_EINVAL with a message that never shows the key. */
mr_err mr_stripe_api_check_key(const char *key, int *livemode, char *err, size_t errlen);

/* Form-encodes params (a cJSON object) as described above; keys keep [ and ]
 * as they are, everything else outside A-Z a-z 0-9 - . _ ~ is %XX-encoded.
 * Numbers must be integers within +-2^53. Returns malloc'd text the caller
 * frees with free(), or NULL when params is not an object, holds a number that
 * is not an integer, nests deeper than 8 levels, or memory runs out. */
char *mr_stripe_api_form(const cJSON *params);

/* The retry decision for one answer: status 0 means no answer (a connection
 * error), should_retry is the Stripe-Should-Retry header's value or NULL.
 * Returns 1 when the request may be retried, 0 otherwise. */
int mr_stripe_api_retryable(long status, const char *should_retry);

/* The delay before retry number `retry` (1 for the first), given a random
 * number in [0, 1). */
long mr_stripe_api_backoff_ms(int retry, double random01);

typedef struct {
    cJSON *object;           /* 2xx: the answer's object; free with mr_stripe_api_result_free */
    long status;             /* status of the last answer, 0 when none came */
    mr_httpc_outcome outcome; /* whether Stripe answered the last request sent
                                 (MR_HTTPC_UNSENT: none was) */
    int attempts;            /* requests sent */
    int replayed;            /* the last answer was a replay (Idempotent-Replayed: true) */
    char request_id[64];     /* Stripe's Request-Id of the last answer, "" if none */
    char error_type[48];     /* a refusal's error.type ("invalid_request_error", ...), or "" */
    char error_code[64];     /* a refusal's error.code ("resource_missing", ...), or "" */
    /* A refusal saying the object exists in the other mode than the key's (live or
     * test): Stripe answers 404 resource_missing, "No such subscription: '...'; a
     * similar object exists in live mode, but a test mode key was used to make this
     * request". The object is there: not one Stripe does not have. */
    int other_mode;
} mr_stripe_api_result;

/* POSTs form (from mr_stripe_api_form) to base_url + path ("/v1/customers")
 * with idempotency_key, retrying as described above until deadline_ms (an
 * mr_now_ms() time). Returns MR_OK with res->object set; MR_ETRANSIENT when
 * Stripe could not be reached or kept failing (retry later with the same
 * key); MR_EINTERNAL when Stripe refused the request (a 4xx that is not
 * retried: our configuration or our request is wrong; the same key would get
 * the same answer) or when not configured. err gets a one-line summary
 * without the key or Stripe's message. res is always filled and must be freed. */
mr_err mr_stripe_api_post(mr_httpc *http, const mr_stripe_api_config *cfg, const char *path,
                          const char *form, const char *idempotency_key, int64_t deadline_ms,
                          mr_stripe_api_result *res, char *err, size_t errlen);
/* The same for DELETE base_url + path ("/v1/subscriptions/sub_..."), without a
 * body. A refusal's status and error code are in res (Stripe answers 404
 * resource_missing for an object it does not have, or no longer has live, and
 * also for one of the other mode: then res->other_mode is set). */
mr_err mr_stripe_api_delete(mr_httpc *http, const mr_stripe_api_config *cfg, const char *path,
                            const char *idempotency_key, int64_t deadline_ms,
                            mr_stripe_api_result *res, char *err, size_t errlen);
/* The same for GET base_url + path, path carrying its query ("/v1/customers?email=..."
 * from mr_stripe_api_form): no key, no body; retried as a repeat changes nothing. */
mr_err mr_stripe_api_get(mr_httpc *http, const mr_stripe_api_config *cfg, const char *path,
                         int64_t deadline_ms, mr_stripe_api_result *res, char *err, size_t errlen);
void mr_stripe_api_result_free(mr_stripe_api_result *res);

/* Reads a whole Stripe list ("/v1/customers" with params, a cJSON object of its
 * filters, or NULL), the way Stripe's libraries page through one: pages of 100
 * (limit), each after the last object of the one before (starting_after) while
 * Stripe says has_more, every page a GET as above, all before deadline_ms. Calls
 * each(object, arg) for every object in Stripe's order (newest first). Returns MR_OK
 * once the last page is read; otherwise the failed page's error as for a GET, or
 * MR_EINTERNAL for a list that says it has more but does not advance (a page whose
 * last object has no id, or the same one again): never a partial list taken for the
 * whole. res holds the last page read either way; the caller frees it. */
mr_err mr_stripe_api_list(mr_httpc *http, const mr_stripe_api_config *cfg, const char *path,
                          const cJSON *params, int64_t deadline_ms,
                          void (*each)(const cJSON *object, void *arg), void *arg,
                          mr_stripe_api_result *res, char *err, size_t errlen);

/* Reads a Stripe error body into res->error_type / error_code / other_mode and
 * copies its message (for the log only) into msg. Returns 1 when body had
 * Stripe's error shape. Exposed for the tests and the fuzzer. */
int mr_stripe_api_parse_error(const char *body, size_t len, mr_stripe_api_result *res,
                              char *msg, size_t msglen);

/* Answers a failed mr_stripe_api_post (or _get, _delete, _list): MR_ETRANSIENT -> 503 stripe_unavailable,
 * anything else -> 502 stripe_error naming Stripe's request id (never its message). */
void mr_stripe_api_reply_error(mr_req *r, mr_err e, const mr_stripe_api_result *res);

/* Answers 503 stripe_not_configured (STRIPE_SECRET_KEY unset). */
void mr_stripe_api_reply_not_configured(mr_req *r);

#endif
