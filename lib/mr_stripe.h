/* mr_stripe.h: Stripe-Signature verification (webhooks), usable by ops tooling.
 *
 * Header: "t=<unix>,v1=<hex>[,v1=<hex>...][,v0=<hex>]". Signed payload:
 * "<t>.<raw body>", HMAC-SHA256 keyed with the whole "whsec_..." secret as
 * bytes, lowercase hex. Any v1 matching any configured secret passes; v0 is
 * never accepted; comparisons are constant time. */
#ifndef MR_STRIPE_H
#define MR_STRIPE_H

#include <stddef.h>
#include <time.h>
#include "mr_common.h"

#define MR_STRIPE_MAX_HEADER 4096   /* longer headers are rejected unparsed */
#define MR_STRIPE_MAX_FUTURE_S 300  /* a t this far ahead of our clock is refused */

/* Verifies. Returns MR_OK, or MR_EINVAL with err: "malformed header",
 * "no v1 signature", "timestamp outside tolerance", "no matching signature". */
mr_err mr_stripe_verify(const char *header, const char *body, size_t body_len,
                        const char *const *secrets, size_t nsecrets,
                        time_t now, long tolerance_s, char *err, size_t errlen);

/* Computes lowercase hex HMAC-SHA256(secret, data) into hex[65] (NUL-terminated).
 * The raw primitive, exposed so tests can check Stripe's published vectors. */
void mr_stripe_hmac_hex(const char *secret, const void *data, size_t len, char hex[65]);

/* Computes lowercase hex HMAC-SHA256(secret, "<t>.<body>") into hex[65]. */
void mr_stripe_sign_hex(const char *secret, long long t, const char *body, size_t body_len,
                        char hex[65]);

/* Splits a comma-separated STRIPE_WEBHOOK_SECRET list into secrets[] (pointers into
 * the malloc'd *storage the caller frees). Rejects empty entries and whitespace.
 * Returns MR_OK with *n set, or MR_EINVAL with err naming the position, not the value. */
mr_err mr_stripe_parse_secrets(const char *list, char **storage, const char **secrets,
                               size_t cap, size_t *n, char *err, size_t errlen);

#endif
