/* mr_resend.h: transactional email through the Resend API (POST {base}/emails).
 *
 * One call, one deadline, an Idempotency-Key so that a retry after a lost answer
 * does not send twice. The API key goes only into the Authorization header. */
#ifndef MR_RESEND_H
#define MR_RESEND_H

#include "mr_common.h"
#include "mr_httpc.h"

typedef struct {
    const char *base_url;        /* e.g. https://api.resend.com (no trailing slash needed) */
    const char *api_key;         /* must be non-empty */
    const char *from;            /* "MindRoom <hello@example.com>" */
    long timeout_ms;             /* total deadline; 0 -> 10000 */
} mr_resend_config;

/* Sends one plain-text email to a single recipient. Returns MR_OK on a 2xx,
 * MR_ETRANSIENT on no answer, a timeout, a 5xx or 429, a 409
 * concurrent_idempotent_requests or a refused key (401; 403 other than
 * validation_error), MR_EINVAL when Resend refuses this email (any other 4xx: it
 * would be refused again). *outcome (may be NULL) gets whether Resend answered
 * (mr_httpc.h); *retry_after_s (may be NULL) the seconds of Resend's retry-after
 * header, else 0. err gets a safe one-line reason with Resend's error name and
 * message (never the key). All strings are the caller's. */
mr_err mr_resend_send(mr_httpc *http, const mr_resend_config *cfg, const char *idempotency_key,
                      const char *to, const char *subject, const char *text,
                      mr_httpc_outcome *outcome, long *retry_after_s, char *err, size_t errlen);

/* The welcome email's body for an instance's frontend URL (NULL or "": a placeholder);
 * returning: the instance took over a destroyed instance's kept data (a customer who
 * subscribed again), and the email says its rooms, agents and settings are back.
 * Returns malloc'd text the caller frees (NULL: out of memory). */
char *mr_resend_welcome_text(const char *frontend_url, int returning);
/* The welcome email's subject (a static string), returning as above. */
const char *mr_resend_welcome_subject(int returning);

#endif
