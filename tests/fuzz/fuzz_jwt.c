/* libFuzzer harness: JWT parsing and verification on arbitrary tokens, through
 * every path a request takes (HS256 legacy and rotation, the whole credential
 * resolution of mr_auth in mode both: API keys, internal HS256, ES256/RS256
 * against a JWKS), and the same bytes as a JWKS document.
 * Round trips: a token signed from fuzzed claims (HS256, and ES256 with a key
 * made here) must verify exactly when the claims are a JSON object the rules
 * accept, and the two algorithms must agree on that.
 * fuzz-targets: lib/mr_jwt.c lib/mr_jwks.c lib/mr_auth.c */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>

#include "mr_auth.h"
#include "mr_jwks.h"
#include "mr_jwt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NOW 1700000000
static const unsigned char secret[] = "fuzz-secret-at-least-32-characters-long";
static const unsigned char previous[] = "fuzz-previous-secret-at-least-32-chars!";

static EVP_PKEY *ec;
static mr_auth *auth;

/* An EC key, its JWKS, and settings in mode both, made once. */
static void init(void)
{
    unsigned char pub[65];
    size_t n = 0;
    char x[64], y[64], doc[512], err[256];
    ec = EVP_EC_gen("P-256");
    if (!ec || EVP_PKEY_get_octet_string_param(ec, OSSL_PKEY_PARAM_PUB_KEY, pub, sizeof pub, &n) != 1)
        abort();
    mr_b64url_encode(pub + 1, 32, x, sizeof x);
    mr_b64url_encode(pub + 33, 32, y, sizeof y);
    snprintf(doc, sizeof doc,
             "{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"%s\",\"y\":\"%s\",\"kid\":\"k1\"}]}",
             x, y);
    setenv("SUPABASE_AUTH_MODE", "both", 1);
    setenv("SUPABASE_JWT_SECRET", (const char *)secret, 1);
    setenv("SUPABASE_JWT_SECRET_PREVIOUS", (const char *)previous, 1);
    setenv("MINDROOM_INTERNAL_SECRET", "fuzz-internal-secret-at-least-32-chars", 1);
    setenv("SUPABASE_URL", "http://127.0.0.1:1", 1);
    setenv("SUPABASE_SECRET_KEYS", "sb_secret_fuzzfuzzfuzzfuzzfuzz", 1);
    setenv("SUPABASE_PUBLISHABLE_KEYS", "sb_publishable_fuzzfuzzfuzzfuzz", 1);
    setenv("SUPABASE_JWKS_TTL_S", "86400", 1);
    setenv("SUPABASE_JWKS_REFETCH_S", "3600", 1);
    if (mr_auth_from_env(&auth, err, sizeof err) != MR_OK ||
        mr_jwks_cache_store(mr_auth_jwks(auth), doc, strlen(doc), mr_now_ms(), err, sizeof err) != MR_OK)
        abort();
}

/* ES256 over "<b64 header>.<b64 payload>" with the harness key, raw r||s. */
static char *es256_sign(const char *payload)
{
    static const char header[] = "{\"alg\":\"ES256\",\"kid\":\"k1\"}";
    size_t pl = strlen(payload), cap = 64 + (pl / 3 + 2) * 4 + 200;
    char *t = malloc(cap);
    unsigned char der[80], raw[64];
    size_t dl = sizeof der;
    if (!t)
        return NULL;
    long h = mr_b64url_encode((const unsigned char *)header, sizeof header - 1, t, cap);
    t[h] = '.';
    long p = mr_b64url_encode((const unsigned char *)payload, pl, t + h + 1, cap - (size_t)h - 1);
    size_t l = (size_t)(h + 1 + p);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (!md || EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, ec) != 1 ||
        EVP_DigestSign(md, der, &dl, (const unsigned char *)t, l) != 1)
        abort();
    EVP_MD_CTX_free(md);
    const unsigned char *dp = der;
    ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &dp, (long)dl);
    if (!sig || BN_bn2binpad(ECDSA_SIG_get0_r(sig), raw, 32) != 32 ||
        BN_bn2binpad(ECDSA_SIG_get0_s(sig), raw + 32, 32) != 32)
        abort();
    ECDSA_SIG_free(sig);
    t[l] = '.';
    mr_b64url_encode(raw, 64, t + l + 1, cap - l - 1);
    return t;
}

static mr_err identify(const char *authorization, const char *apikey)
{
    mr_identity who;
    char err[256];
    mr_err e = mr_auth_identify(auth, NULL, authorization, apikey, NULL, NOW, &who, err, sizeof err);
    if (e == MR_OK)
        free(who.claims_json);
    else if (who.claims_json)
        abort(); /* a refusal hands nothing on */
    return e;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *tok = malloc(size + 1);
    char *hdr = malloc(size + 8);
    char err[128];
    mr_jwt_claims c;
    if (!ec)
        init();
    if (!tok || !hdr) {
        free(tok);
        free(hdr);
        return 0;
    }
    memcpy(tok, data, size);
    tok[size] = '\0';

    /* The bytes as a token, every way a request can present one. */
    if (mr_jwt_verify(tok, secret, sizeof secret - 1, NOW, 0, &c, err, sizeof err) == MR_OK)
        mr_jwt_claims_free(&c);
    snprintf(hdr, size + 8, "Bearer %s", tok);
    identify(hdr, NULL);
    identify(NULL, tok);
    identify(tok, NULL);

    /* The bytes as a JWKS document. */
    mr_jwks *set;
    if (mr_jwks_parse((const char *)data, size, &set, err, sizeof err) == MR_OK) {
        if (mr_jwks_count(set) > MR_JWKS_MAX_KEYS)
            abort();
        mr_jwks_free(set);
    }

    /* Round trips with the bytes as claims. */
    char *signed_tok = mr_jwt_sign(tok, secret, sizeof secret - 1);
    if (signed_tok) {
        mr_err one = mr_jwt_verify(signed_tok, secret, sizeof secret - 1, NOW, 0, &c, err, sizeof err);
        if (one == MR_OK)
            mr_jwt_claims_free(&c);
        /* Rotation: with `secret` as the previous one, the verdict must not change. */
        mr_err two = mr_jwt_verify2(signed_tok, previous, sizeof previous - 1, secret,
                                    sizeof secret - 1, NOW, 0, &c, err, sizeof err);
        if (two == MR_OK)
            mr_jwt_claims_free(&c);
        if (one != two)
            abort();
        /* ES256 over the same claims, checked with the same (leeway-only)
         * rules, passes exactly when HS256 did. */
        char *es = es256_sign(tok);
        mr_jwt_parts p;
        mr_err three = mr_jwt_split(es, &p, err, sizeof err);
        EVP_PKEY *key = NULL;
        if (three == MR_OK)
            three = mr_jwks_cache_key(mr_auth_jwks(auth), "k1", mr_now_ms(), &key, err, sizeof err);
        if (three == MR_OK)
            three = mr_jwt_verify_pkey(&p, "ES256", key, err, sizeof err);
        if (three == MR_OK) {
            mr_jwt_rules rules = {.leeway_s = 0};
            three = mr_jwt_read_claims(&p, &rules, NOW, &c, err, sizeof err);
            if (three == MR_OK)
                mr_jwt_claims_free(&c);
        }
        if (three != one && strlen(tok) * 4 / 3 + 200 < MR_JWT_MAX_TOKEN)
            abort();
        free(es);
        free(signed_tok);
    }
    /* A token of the previous secret alone is refused without it. */
    char *prev_tok = mr_jwt_sign(tok, previous, sizeof previous - 1);
    if (prev_tok) {
        if (mr_jwt_verify(prev_tok, secret, sizeof secret - 1, NOW, 0, &c, err, sizeof err) == MR_OK)
            abort();
        free(prev_tok);
    }
    free(tok);
    free(hdr);
    return 0;
}
