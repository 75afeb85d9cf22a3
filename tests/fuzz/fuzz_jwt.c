/* libFuzzer harness: JWT parsing and HS256 verification on arbitrary tokens,
 * plus a round trip: a token signed from fuzzed claims must verify, or the
 * claims were not a JSON object. 
 * fuzz-targets: lib/mr_jwt.c */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "mr_jwt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const unsigned char secret[] = "fuzz-secret-at-least-32-characters-long";
static const unsigned char previous[] = "fuzz-previous-secret-at-least-32-chars!";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *tok = malloc(size + 1);
    char err[128];
    mr_jwt_claims c;
    if (!tok)
        return 0;
    memcpy(tok, data, size);
    tok[size] = '\0';
    if (mr_jwt_verify(tok, secret, sizeof secret - 1, 1700000000, 0, &c, err, sizeof err) == MR_OK)
        mr_jwt_claims_free(&c);

    char *signed_tok = mr_jwt_sign(tok, secret, sizeof secret - 1);
    if (signed_tok) {
        mr_err one = mr_jwt_verify(signed_tok, secret, sizeof secret - 1, 1700000000, 0, &c, err,
                                   sizeof err);
        if (one == MR_OK)
            mr_jwt_claims_free(&c);
        /* Rotation: with `secret` as the previous one, the verdict must not change. */
        mr_err two = mr_jwt_verify2(signed_tok, previous, sizeof previous - 1, secret,
                                    sizeof secret - 1, 1700000000, 0, &c, err, sizeof err);
        if (two == MR_OK)
            mr_jwt_claims_free(&c);
        if (one != two)
            abort();
        free(signed_tok);
    }
    /* A token of the previous secret alone is refused without it. */
    char *prev_tok = mr_jwt_sign(tok, previous, sizeof previous - 1);
    if (prev_tok) {
        if (mr_jwt_verify(prev_tok, secret, sizeof secret - 1, 1700000000, 0, &c, err,
                          sizeof err) == MR_OK)
            abort();
        free(prev_tok);
    }
    free(tok);
    return 0;
}
