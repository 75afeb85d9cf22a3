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
 * MR_ETRANSIENT on no answer, a timeout or a 5xx/429, MR_EINVAL on another 4xx
 * (refused input). *outcome (may be NULL) gets whether Resend answered
 * (mr_httpc.h). err gets a safe one-line reason (never the key). All strings are
 * the caller's. */
mr_err mr_resend_send(mr_httpc *http, const mr_resend_config *cfg, const char *idempotency_key,
                      const char *to, const char *subject, const char *text,
                      mr_httpc_outcome *outcome, char *err, size_t errlen);

/* The welcome email's subject and body for an instance's frontend URL.
 * Returns malloc'd text the caller frees. */
char *mr_resend_welcome_text(const char *frontend_url);
#define MR_RESEND_WELCOME_SUBJECT "Your MindRoom is ready"

#endif
