/* mr_stripe.c: Stripe-Signature verification.
 *
 * Parsing is strict where being lenient could let a forgery through and
 * tolerant where Stripe's own libraries are: elements are split on ',' and
 * the first '='; elements with unknown keys (v0, future schemes) and empty
 * elements are skipped; nothing is trimmed. A missing, non-numeric or repeated
 * t is a malformed header (two different timestamps would make "which one was
 * signed" ambiguous). Every v1 is compared against every configured secret's
 * HMAC in constant time; a v1 that is not 64 hex digits simply never matches.
 *
 * Time window: t older than tolerance_s seconds, or more than
 * MR_STRIPE_MAX_FUTURE_S seconds ahead of our clock, is refused. */
#include "mr_stripe.h"
#include "mr_hmac.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* HMAC-SHA256 over the concatenation of up to two byte ranges. */
static void hmac2(const char *secret, const void *a, size_t alen, const void *b, size_t blen,
                  char hex[65])
{
    unsigned char out[32];
    const mr_hmac_part parts[2] = {{a, alen}, {b, blen}};
    if (!mr_hmac_sha256(secret, strlen(secret), parts, 2, out)) {
        /* Allocation failure inside OpenSSL: produce a value no header can
         * carry (not hex), so verification fails closed. */
        memset(hex, 'x', 64);
        hex[64] = '\0';
        return;
    }
    mr_hex(out, sizeof out, hex);
}

void mr_stripe_hmac_hex(const char *secret, const void *data, size_t len, char hex[65])
{
    hmac2(secret, data, len, NULL, 0, hex);
}

void mr_stripe_sign_hex(const char *secret, long long t, const char *body, size_t body_len,
                        char hex[65])
{
    char prefix[32];
    int n = snprintf(prefix, sizeof prefix, "%lld.", t);
    hmac2(secret, prefix, (size_t)n, body, body_len, hex);
}

/* Parses a decimal Unix timestamp: 1..18 digits, nothing else. */
static int parse_t(const char *s, size_t n, long long *out)
{
    long long v = 0;
    if (n == 0 || n > 18)
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 1;
}

mr_err mr_stripe_verify(const char *header, const char *body, size_t body_len,
                        const char *const *secrets, size_t nsecrets,
                        time_t now, long tolerance_s, char *err, size_t errlen)
{
    /* Expected signatures, one per secret; at most 16 secrets are honoured
     * (rotation needs two). */
    char expected[16][65];
    const char *p, *end;
    long long t = 0;
    int have_t = 0, nv1 = 0, match = 0;
    size_t hlen;

    if (header == NULL || body == NULL)
        return mr_seterr(err, errlen, MR_EINVAL, "malformed header");
    hlen = strnlen(header, MR_STRIPE_MAX_HEADER + 1);
    if (hlen == 0 || hlen > MR_STRIPE_MAX_HEADER)
        return mr_seterr(err, errlen, MR_EINVAL, "malformed header");
    if (nsecrets == 0 || secrets == NULL)
        return mr_seterr(err, errlen, MR_EINVAL, "no matching signature");
    if (nsecrets > MR_ARRAY_LEN(expected))
        nsecrets = MR_ARRAY_LEN(expected);

    /* Pass 1: the timestamp (must be known before any HMAC is computed). */
    for (p = header, end = header + hlen; p < end;) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *e = comma ? comma : end;
        if (e - p >= 2 && p[0] == 't' && p[1] == '=') {
            long long v;
            if (have_t || !parse_t(p + 2, (size_t)(e - p - 2), &v))
                return mr_seterr(err, errlen, MR_EINVAL, "malformed header");
            t = v;
            have_t = 1;
        } else if (e - p >= 3 && memcmp(p, "v1=", 3) == 0) {
            nv1++;
        }
        p = comma ? comma + 1 : end;
    }
    if (!have_t)
        return mr_seterr(err, errlen, MR_EINVAL, "malformed header");
    if (nv1 == 0)
        return mr_seterr(err, errlen, MR_EINVAL, "no v1 signature");
    if ((long long)now - t > tolerance_s || t - (long long)now > MR_STRIPE_MAX_FUTURE_S)
        return mr_seterr(err, errlen, MR_EINVAL, "timestamp outside tolerance");

    for (size_t i = 0; i < nsecrets; i++)
        mr_stripe_sign_hex(secrets[i], t, body, body_len, expected[i]);

    /* Pass 2: every v1 against every secret, without early exit. */
    for (p = header; p < end;) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *e = comma ? comma : end;
        if (e - p >= 3 && memcmp(p, "v1=", 3) == 0) {
            for (size_t i = 0; i < nsecrets; i++)
                match |= mr_ct_equal(p + 3, (size_t)(e - p - 3), expected[i], 64);
        }
        p = comma ? comma + 1 : end;
    }
    if (!match)
        return mr_seterr(err, errlen, MR_EINVAL, "no matching signature");
    return MR_OK;
}

mr_err mr_stripe_parse_secrets(const char *list, char **storage, const char **secrets,
                               size_t cap, size_t *n, char *err, size_t errlen)
{
    size_t count = 0, pos = 1;
    char *copy, *p;

    *storage = NULL;
    *n = 0;
    if (list == NULL || *list == '\0')
        return mr_seterr(err, errlen, MR_EINVAL, "no secret configured");
    copy = strdup(list);
    if (copy == NULL)
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");

    for (p = copy;; pos++) {
        char *comma = strchr(p, ',');
        if (comma != NULL)
            *comma = '\0';
        if (*p == '\0') {
            free(copy);
            return mr_seterr(err, errlen, MR_EINVAL, "secret %zu is empty", pos);
        }
        for (const char *c = p; *c; c++) {
            if (isspace((unsigned char)*c)) {
                free(copy);
                return mr_seterr(err, errlen, MR_EINVAL, "secret %zu contains whitespace", pos);
            }
        }
        if (count == cap) {
            free(copy);
            return mr_seterr(err, errlen, MR_EINVAL, "more than %zu secrets", cap);
        }
        secrets[count++] = p;
        if (comma == NULL)
            break;
        p = comma + 1;
    }
    *storage = copy;
    *n = count;
    return MR_OK;
}
