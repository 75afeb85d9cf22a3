/* mr_hmac.c: see mr_hmac.h.
 *
 * Each key's keyed HMAC context is kept, up to KEYED_MAX keys a process (each
 * worker after fork has its own copies): initialized with its key once, it is
 * re-initialized for each message without one, which OpenSSL 3 allows and which
 * skips looking SHA-256 up and hashing the key into its pads again (a third of a
 * Stripe signature check's time). The keys a process uses are few and fixed (the
 * webhook's secrets, the JWT secret, the secrets key); a key past the last slot
 * gets a context of its own for the one message. */
#include "mr_hmac.h"

#include <stdlib.h>
#include <string.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#define KEYED_MAX 8

static struct {
    unsigned char *key;
    size_t len;
    EVP_MAC_CTX *ctx;
} keyed[KEYED_MAX];

/* The key's context ready for a message; *once: the caller frees it after. */
static EVP_MAC_CTX *keyed_ctx(const void *key, size_t len, int *once)
{
    static EVP_MAC *mac;
    *once = 0;
    for (int i = 0; i < KEYED_MAX && keyed[i].key; i++)
        if (keyed[i].len == len && CRYPTO_memcmp(keyed[i].key, key, len) == 0)
            return EVP_MAC_init(keyed[i].ctx, NULL, 0, NULL) ? keyed[i].ctx : NULL;
    if (mac == NULL)
        mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    char digest[] = "SHA256";
    OSSL_PARAM params[2] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                            OSSL_PARAM_construct_end()};
    EVP_MAC_CTX *ctx = mac ? EVP_MAC_CTX_new(mac) : NULL;
    if (ctx == NULL || !EVP_MAC_init(ctx, key, len, params)) {
        EVP_MAC_CTX_free(ctx);
        return NULL;
    }
    for (int i = 0; i < KEYED_MAX; i++) {
        if (keyed[i].key)
            continue;
        if ((keyed[i].key = malloc(len ? len : 1)) == NULL)
            break;
        memcpy(keyed[i].key, key, len);
        keyed[i].len = len;
        keyed[i].ctx = ctx;
        return ctx;
    }
    *once = 1;
    return ctx;
}

int mr_hmac_sha256(const void *key, size_t keylen, const mr_hmac_part *parts, size_t n,
                   unsigned char out[32])
{
    size_t outlen = 0;
    int once = 0;
    EVP_MAC_CTX *ctx = keyed_ctx(key, keylen, &once);
    int ok = ctx != NULL;
    for (size_t i = 0; ok && i < n; i++)
        ok = parts[i].len == 0 || EVP_MAC_update(ctx, parts[i].data, parts[i].len);
    ok = ok && EVP_MAC_final(ctx, out, &outlen, 32) && outlen == 32;
    if (once)
        EVP_MAC_CTX_free(ctx);
    return ok;
}
