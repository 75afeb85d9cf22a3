/* jwk_keys.h: key pairs the unit tests own, their JWKs, and tokens signed with
 * them, made with OpenSSL directly (not with libmindroom's code under test).
 * Included by test_jwks.c and test_auth.c. */
#ifndef JWK_KEYS_H
#define JWK_KEYS_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rsa.h>

#include "mr_jwt.h"

#define TK_UNUSED __attribute__((unused))

typedef struct {
    EVP_PKEY *key;
    char kid[64];
    char jwk[1400]; /* the public JWK, JSON */
} test_key;

static TK_UNUSED void tk_b64(const unsigned char *in, size_t len, char *out, size_t cap)
{
    assert_true(mr_b64url_encode(in, len, out, cap) >= 0);
}

static TK_UNUSED void tk_ec(test_key *k, const char *kid)
{
    unsigned char pub[65];
    size_t n = 0;
    char x[64], y[64];
    k->key = EVP_EC_gen("P-256");
    assert_non_null(k->key);
    assert_int_equal(EVP_PKEY_get_octet_string_param(k->key, OSSL_PKEY_PARAM_PUB_KEY, pub,
                                                     sizeof(pub), &n), 1);
    assert_int_equal(n, 65);
    tk_b64(pub + 1, 32, x, sizeof(x));
    tk_b64(pub + 33, 32, y, sizeof(y));
    snprintf(k->kid, sizeof(k->kid), "%s", kid);
    snprintf(k->jwk, sizeof(k->jwk),
             "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"%s\",\"y\":\"%s\",\"kid\":\"%s\","
             "\"alg\":\"ES256\",\"use\":\"sig\",\"key_ops\":[\"verify\"],\"ext\":true}",
             x, y, kid);
}

static TK_UNUSED void tk_rsa(test_key *k, const char *kid, unsigned bits)
{
    BIGNUM *n = NULL, *e = NULL;
    unsigned char nb[1024], eb[8];
    char ns[1100], es[16];
    k->key = EVP_RSA_gen(bits);
    assert_non_null(k->key);
    assert_int_equal(EVP_PKEY_get_bn_param(k->key, OSSL_PKEY_PARAM_RSA_N, &n), 1);
    assert_int_equal(EVP_PKEY_get_bn_param(k->key, OSSL_PKEY_PARAM_RSA_E, &e), 1);
    int nl = BN_bn2bin(n, nb), el = BN_bn2bin(e, eb);
    tk_b64(nb, (size_t)nl, ns, sizeof(ns));
    tk_b64(eb, (size_t)el, es, sizeof(es));
    BN_free(n);
    BN_free(e);
    snprintf(k->kid, sizeof(k->kid), "%s", kid);
    snprintf(k->jwk, sizeof(k->jwk),
             "{\"kty\":\"RSA\",\"n\":\"%s\",\"e\":\"%s\",\"kid\":\"%s\",\"alg\":\"RS256\","
             "\"use\":\"sig\"}", ns, es, kid);
}

/* {"keys":[...]} of the given keys; caller frees. */
static TK_UNUSED char *tk_jwks(const test_key *const *keys, size_t n)
{
    size_t cap = 32;
    for (size_t i = 0; i < n; i++)
        cap += strlen(keys[i]->jwk) + 1;
    char *doc = malloc(cap);
    assert_non_null(doc);
    strcpy(doc, "{\"keys\":[");
    for (size_t i = 0; i < n; i++) {
        if (i)
            strcat(doc, ",");
        strcat(doc, keys[i]->jwk);
    }
    strcat(doc, "]}");
    return doc;
}

/* "<b64(header)>.<b64(payload)>" into a malloc'd buffer with room for a signature. */
static TK_UNUSED char *tk_signing_input(const char *header, const char *payload, size_t *capp)
{
    size_t hl = strlen(header), pl = strlen(payload);
    size_t cap = (hl + pl) * 2 + 2048;
    char *t = malloc(cap);
    *capp = cap;
    assert_non_null(t);
    long n = mr_b64url_encode((const unsigned char *)header, hl, t, cap);
    assert_true(n > 0);
    t[n] = '.';
    assert_true(mr_b64url_encode((const unsigned char *)payload, pl, t + n + 1, cap - (size_t)n - 1) > 0);
    return t;
}

/* A token over header and payload signed with k: RS256 as PKCS#1 v1.5, ES256
 * as the raw r||s JWS wants (or, with der=1, the DER form JWS does not allow). */
static TK_UNUSED char *tk_sign_as(const test_key *k, const char *header, const char *payload, int der)
{
    size_t cap;
    char *t = tk_signing_input(header, payload, &cap);
    unsigned char sig[1024], raw[64];
    size_t sl = sizeof(sig);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    assert_int_equal(EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, k->key), 1);
    assert_int_equal(EVP_DigestSign(md, sig, &sl, (const unsigned char *)t, strlen(t)), 1);
    EVP_MD_CTX_free(md);
    const unsigned char *out = sig;
    if (EVP_PKEY_get_base_id(k->key) == EVP_PKEY_EC && !der) {
        const unsigned char *p = sig;
        ECDSA_SIG *es = d2i_ECDSA_SIG(NULL, &p, (long)sl);
        assert_non_null(es);
        assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_r(es), raw, 32), 32);
        assert_int_equal(BN_bn2binpad(ECDSA_SIG_get0_s(es), raw + 32, 32), 32);
        ECDSA_SIG_free(es);
        out = raw;
        sl = 64;
    }
    size_t l = strlen(t);
    t[l] = '.';
    tk_b64(out, sl, t + l + 1, cap - l - 1);
    return t;
}

/* The usual header for k: {"alg":alg,"kid":kid,"typ":"JWT"}. */
static TK_UNUSED char *tk_sign(const test_key *k, const char *alg, const char *payload)
{
    char header[160];
    snprintf(header, sizeof(header), "{\"alg\":\"%s\",\"kid\":\"%s\",\"typ\":\"JWT\"}", alg, k->kid);
    return tk_sign_as(k, header, payload, 0);
}

/* An HS256 token over header and payload with secret (any bytes). */
static TK_UNUSED char *tk_hs256(const char *header, const char *payload, const unsigned char *secret,
                                size_t secret_len)
{
    size_t cap;
    char *t = tk_signing_input(header, payload, &cap);
    unsigned char mac[32];
    unsigned int ml = 0;
    assert_non_null(HMAC(EVP_sha256(), secret, (int)secret_len, (const unsigned char *)t, strlen(t),
                         mac, &ml));
    size_t l = strlen(t);
    t[l] = '.';
    tk_b64(mac, ml, t + l + 1, cap - l - 1);
    return t;
}

#endif
