/* libFuzzer harness: the sealed-secret parser and opener on arbitrary text.
 * Whatever parses must describe itself consistently; nothing that was not
 * sealed by the ring may open; and a value sealed from the input must open
 * to exactly the input (and only under its own context).
 * fuzz-targets: lib/mr_secrets.c lib/mr_b64.c */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mr_secrets.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* base64 of 32 bytes 0x11 and 32 bytes 0x22. */
static const char cur[] = "ERERERERERERERERERERERERERERERERERERERERERE=";
static const char prev[] = "IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiI=";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static mr_secrets *ring;
    char err[128];
    if (!ring && mr_secrets_new(cur, prev, &ring, err, sizeof err) != MR_OK) abort();
    const char *text = (const char *)data;

    unsigned char *raw = malloc(size + 4);
    if (!raw) return 0;
    mr_secrets_parts parts;
    if (mr_secrets_parse(text, size, raw, size + 4, &parts) == MR_OK) {
        if (size < 14 || memcmp(text, "mrs1:", 5) != 0 || strlen(parts.kid) != 8) abort();
        if (parts.body_len < MR_SECRETS_TAG_LEN || parts.body < raw ||
            parts.body + parts.body_len > raw + size + 4)
            abort();
    }
    free(raw);

    /* Whatever opens is a well-formed ciphertext of a loaded key (the seed
     * corpus holds a genuine one), and re-sealing it keeps its plaintext. */
    unsigned char *pt = NULL;
    size_t len = 0;
    if (mr_secrets_open(ring, "ctx", text, size, &pt, &len, err, sizeof err) == MR_OK) {
        unsigned char *raw2 = malloc(size + 4), *pt2 = NULL;
        size_t len2 = 0;
        char *again = NULL;
        if (!raw2 || mr_secrets_parse(text, size, raw2, size + 4, &parts) != MR_OK) abort();
        if (mr_secrets_reseal(ring, "ctx", text, size, &again, err, sizeof err) != MR_OK ||
            !mr_secrets_is_current(ring, again, strlen(again)) ||
            mr_secrets_open(ring, "ctx", again, strlen(again), &pt2, &len2, err, sizeof err) !=
                MR_OK ||
            len2 != len || (len && memcmp(pt, pt2, len) != 0))
            abort();
        free(raw2);
        free(pt2);
        free(again);
        free(pt);
        pt = NULL;
    } else if (pt) {
        abort();
    }

    /* Round trip of the input as a plaintext. */
    char *ct = NULL;
    if (mr_secrets_seal(ring, "ctx", data, size, &ct, err, sizeof err) != MR_OK) abort();
    if (mr_secrets_open(ring, "ctx", ct, strlen(ct), &pt, &len, err, sizeof err) != MR_OK ||
        len != size || (size && memcmp(pt, data, size) != 0))
        abort();
    free(pt);
    pt = NULL;
    if (mr_secrets_open(ring, "other", ct, strlen(ct), &pt, &len, err, sizeof err) == MR_OK)
        abort();
    free(ct);

    char dg[MR_SECRETS_DIGEST_LEN + 1];
    if (mr_secrets_digest(ring, "ctx", data, size, dg) != MR_OK) abort();
    if (!mr_secrets_digest_matches(ring, "ctx", data, size, dg, NULL)) abort();
    char *stored = malloc(size + 1);
    if (stored) {
        memcpy(stored, data, size);
        stored[size] = '\0';
        (void)mr_secrets_digest_matches(ring, "ctx", data, size, stored, NULL);
        free(stored);
    }
    return 0;
}
