/* libFuzzer harness: Stripe-Signature parsing and verification.
 * Input layout: header bytes, a NUL, then the body. The harness also signs the
 * body with a known secret and checks that the verifier accepts a well-formed
 * header built from that signature, so a parser change that rejects valid
 * headers fails here too, not only a crash. 
 * fuzz-targets: lib/mr_stripe.c */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "mr_stripe.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const secrets[] = { "whsec_fuzz_secret_one", "whsec_fuzz_secret_two" };
    const uint8_t *nul = memchr(data, 0, size);
    size_t hlen = nul ? (size_t)(nul - data) : size;
    const char *body = nul ? (const char *)nul + 1 : "";
    size_t blen = nul ? size - hlen - 1 : 0;
    char *header = malloc(hlen + 1);
    char err[128];
    if (!header)
        return 0;
    memcpy(header, data, hlen);
    header[hlen] = '\0';
    (void)mr_stripe_verify(header, body, blen, secrets, 2, 1700000000, 300, err, sizeof err);

    /* The header bytes as a STRIPE_WEBHOOK_SECRET list (the config parser). */
    char *storage;
    const char *list[8];
    size_t n;
    if (mr_stripe_parse_secrets(header, &storage, list, 8, &n, err, sizeof err) == MR_OK) {
        if (n == 0 || n > 8)
            abort();
        for (size_t i = 0; i < n; i++)
            if (!*list[i] || strpbrk(list[i], " \t\r\n,"))
                abort();
        free(storage);
    }
    free(header);

    char hex[65], good[160];
    mr_stripe_sign_hex(secrets[1], 1700000000, body, blen, hex);
    snprintf(good, sizeof good, "t=1700000000,v1=%s", hex);
    if (mr_stripe_verify(good, body, blen, secrets, 2, 1700000000, 300, err, sizeof err) != MR_OK)
        abort();
    return 0;
}
