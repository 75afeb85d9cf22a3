/* mr_common.h: error codes and small helpers shared by every libmindroom module.
 *
 * Convention: a fallible call returns an mr_err (MR_OK == 0) and,
 * where it can say more, fills a caller-owned buffer `err` of `errlen` bytes
 * with a one-line message that is safe to log and to show a caller (never a
 * secret, never SQL text). */
#ifndef MR_COMMON_H
#define MR_COMMON_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    MR_OK = 0,
    MR_EINVAL,      /* bad input from a caller: 400 */
    MR_EAUTH,       /* missing or invalid credentials: 401 */
    MR_EFORBIDDEN,  /* valid credentials, wrong role: 403 */
    MR_ENOTFOUND,   /* unknown id: 404 */
    MR_ECONFLICT,   /* illegal state change: 409 */
    MR_ETOOBIG,     /* body over the cap: 413 */
    MR_ETRANSIENT,  /* database or upstream down, retry later: 503 */
    MR_EINTERNAL    /* a bug or an impossible state: 500 */
} mr_err;

#define MR_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Returns a static, lowercase name for an error ("invalid", "transient"...). */
const char *mr_err_name(mr_err e);

/* Returns the HTTP status that an error maps to (400, 401, ... 503). */
int mr_err_status(mr_err e);

/* Writes a formatted message into err (if err != NULL) and returns e. */
mr_err mr_seterr(char *err, size_t errlen, mr_err e, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Constant-time comparison of two byte strings. Returns 1 when equal.
 * Time depends only on the lengths, never on the contents. */
int mr_ct_equal(const void *a, size_t alen, const void *b, size_t blen);

/* Monotonic milliseconds, for durations and deadlines. */
int64_t mr_now_ms(void);
/* The same clock in nanoseconds (CLOCK_MONOTONIC: one clock for every process of
 * the host, so times may be compared across processes). */
int64_t mr_now_ns(void);

/* Writes n bytes as 2n lowercase hex digits and a NUL into out (2n + 1 bytes). */
void mr_hex(const void *in, size_t n, char *out);

/* Whether s is a canonical textual UUID (8-4-4-4-12 hex digits). NULL is not. */
int mr_is_uuid(const char *s);

/* Who is calling, as Row Level Security should see it: the role and the claims a
 * transaction runs with (mr_db_tx / mr_db_call apply them with set_config), and
 * the request it came with, for audit rows (set as mindroom.request). */
typedef struct {
    char role[64];       /* "service_role", "authenticated", or "" (the connecting role) */
    char sub[64];        /* auth.uid() for users, "" otherwise */
    int oauth_client;    /* 1: a token Supabase Auth's OAuth 2.1 server issued to a
                            third-party app (client_id); what it may call: mr_app */
    char *claims_json;   /* the claims as JSON, or NULL; owned by whoever filled it */
    const char *request_json; /* {"ip", "user_agent", "request_id"} of the HTTP request, or
                                 NULL (no request: the worker, tools); borrowed from the
                                 runtime, valid until the request ends */
} mr_identity;

/* The identity of the control plane's own work (the worker, recording health):
 * service_role with {"role":"service_role"}. */
extern const mr_identity mr_service_identity;

#endif
