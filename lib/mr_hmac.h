/* mr_hmac.h: HMAC-SHA256, the one implementation the project uses (Stripe's
 * signatures, HS256 tokens, the sealed secrets' digests, the provisioner's
 * fingerprints). */
#ifndef MR_HMAC_H
#define MR_HMAC_H

#include <stddef.h>

typedef struct {
    const void *data;
    size_t len;
} mr_hmac_part;

/* out = HMAC-SHA256(key, the concatenation of the n parts). Returns 1, or 0 when
 * OpenSSL fails (out is then not to be used). The keyed context of each key is
 * kept, up to 8 keys a process (see mr_hmac.c). */
int mr_hmac_sha256(const void *key, size_t keylen, const mr_hmac_part *parts, size_t n,
                   unsigned char out[32]);

#endif
