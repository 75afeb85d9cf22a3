/* mr_jwks.c: JWKS documents into OpenSSL public keys, and the cache policy of
 * mr_jwks.h (no I/O here). */
#include "mr_jwks.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/param_build.h>

#include "mr_json.h"
#include "mr_jwt.h"

#define MAX_KID 128
#define RSA_MIN_BYTES 256   /* 2048 bits (RFC 7518 3.3) */
#define RSA_MAX_BYTES 1024  /* 8192 bits: larger keys only cost verification time */

typedef struct {
    char kid[MAX_KID];
    EVP_PKEY *key;
} jwk;

struct mr_jwks {
    size_t n;
    jwk keys[MR_JWKS_MAX_KEYS];
};

/* Decodes a base64url member into out[cap]; returns its length, or -1 when
 * absent, not a string or not base64url. */
static long b64_member(const cJSON *k, const char *name, unsigned char *out, size_t cap)
{
    const char *s = NULL;
    if (mr_json_str(k, name, &s) != MR_OK)
        return -1;
    return mr_b64url_decode(s, strlen(s), out, cap);
}

/* Builds a key from OSSL parameters and checks it is a sound public key (an EC
 * point on the curve, an RSA exponent that makes sense). NULL otherwise. */
static EVP_PKEY *from_params(const char *type, OSSL_PARAM_BLD *bld)
{
    EVP_PKEY *key = NULL;
    OSSL_PARAM *params = bld ? OSSL_PARAM_BLD_to_param(bld) : NULL;
    EVP_PKEY_CTX *ctx = params ? EVP_PKEY_CTX_new_from_name(NULL, type, NULL) : NULL;
    if (!ctx || EVP_PKEY_fromdata_init(ctx) != 1 ||
        EVP_PKEY_fromdata(ctx, &key, EVP_PKEY_PUBLIC_KEY, params) != 1)
        key = NULL;
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    if (key) {
        EVP_PKEY_CTX *check = EVP_PKEY_CTX_new_from_pkey(NULL, key, NULL);
        if (!check || EVP_PKEY_public_check(check) != 1) {
            EVP_PKEY_free(key);
            key = NULL;
        }
        EVP_PKEY_CTX_free(check);
    }
    ERR_clear_error();
    return key;
}

static EVP_PKEY *ec_p256_key(const cJSON *k)
{
    const char *crv = NULL;
    unsigned char pt[65], x[33], y[33];
    if (mr_json_str(k, "crv", &crv) != MR_OK || strcmp(crv, "P-256") != 0 ||
        b64_member(k, "x", x, sizeof(x)) != 32 || b64_member(k, "y", y, sizeof(y)) != 32)
        return NULL;
    pt[0] = 0x04; /* uncompressed point: 04 || x || y */
    memcpy(pt + 1, x, 32);
    memcpy(pt + 33, y, 32);
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    EVP_PKEY *key = NULL;
    if (bld &&
        OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) == 1 &&
        OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pt, sizeof(pt)) == 1)
        key = from_params("EC", bld);
    OSSL_PARAM_BLD_free(bld);
    return key;
}

static EVP_PKEY *rsa_key(const cJSON *k)
{
    unsigned char nb[RSA_MAX_BYTES + 1], eb[16];
    long nl = b64_member(k, "n", nb, sizeof(nb)), el = b64_member(k, "e", eb, sizeof(eb));
    size_t lead = 0;
    while (nl > 0 && (long)lead < nl && nb[lead] == 0)
        lead++;
    if (nl < 0 || el <= 0 || nl - (long)lead < RSA_MIN_BYTES || nl - (long)lead > RSA_MAX_BYTES)
        return NULL;
    BIGNUM *n = BN_bin2bn(nb + lead, (int)(nl - (long)lead), NULL);
    BIGNUM *e = BN_bin2bn(eb, (int)el, NULL);
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    EVP_PKEY *key = NULL;
    if (n && e && bld && OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n) == 1 &&
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e) == 1)
        key = from_params("RSA", bld);
    OSSL_PARAM_BLD_free(bld);
    BN_free(n);
    BN_free(e);
    return key;
}

/* One member of "keys": a usable public key with its kid, or NULL to skip it. */
static EVP_PKEY *usable_key(const cJSON *k, const char **kid)
{
    const char *kty = NULL, *use = NULL, *alg = NULL;
    if (!cJSON_IsObject(k) || mr_json_str(k, "kty", &kty) != MR_OK ||
        mr_json_str(k, "kid", kid) != MR_OK || !**kid || strlen(*kid) >= MAX_KID)
        return NULL;
    mr_err ue = mr_json_str(k, "use", &use), ae = mr_json_str(k, "alg", &alg);
    if (ue == MR_EINVAL || (ue == MR_OK && strcmp(use, "sig") != 0) || ae == MR_EINVAL)
        return NULL;
    if (strcmp(kty, "EC") == 0 && (ae == MR_ENOTFOUND || strcmp(alg, "ES256") == 0))
        return ec_p256_key(k);
    if (strcmp(kty, "RSA") == 0 && (ae == MR_ENOTFOUND || strcmp(alg, "RS256") == 0))
        return rsa_key(k);
    return NULL;
}

void mr_jwks_free(mr_jwks *set)
{
    if (!set)
        return;
    for (size_t i = 0; i < set->n; i++)
        EVP_PKEY_free(set->keys[i].key);
    free(set);
}

mr_err mr_jwks_parse(const char *json, size_t len, mr_jwks **out, char *err, size_t errlen)
{
    *out = NULL;
    if (len > MR_JWKS_MAX_DOC)
        return mr_seterr(err, errlen, MR_EINVAL, "JWKS larger than %d bytes", MR_JWKS_MAX_DOC);
    cJSON *doc = mr_json_parse(json, len);
    const cJSON *keys = doc ? cJSON_GetObjectItemCaseSensitive(doc, "keys") : NULL;
    mr_err rc = MR_OK;
    if (!doc || !cJSON_IsObject(doc) || !cJSON_IsArray(keys))
        rc = mr_seterr(err, errlen, MR_EINVAL, "not a JWKS document (no \"keys\" array)");
    else if (mr_json_has_duplicate_keys(doc))
        rc = mr_seterr(err, errlen, MR_EINVAL, "JWKS has a duplicate JSON member");
    mr_jwks *set = rc == MR_OK ? calloc(1, sizeof(*set)) : NULL;
    if (rc == MR_OK && !set)
        rc = mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    for (const cJSON *k = rc == MR_OK ? keys->child : NULL; k && rc == MR_OK; k = k->next) {
        const char *kid = NULL;
        EVP_PKEY *key = usable_key(k, &kid);
        if (!key)
            continue;
        /* Two keys under one kid would make the lookup a guess. */
        if (mr_jwks_find(set, kid))
            rc = mr_seterr(err, errlen, MR_EINVAL, "JWKS names kid \"%.64s\" twice", kid);
        else if (set->n == MR_JWKS_MAX_KEYS)
            rc = mr_seterr(err, errlen, MR_EINVAL, "JWKS has more than %d keys", MR_JWKS_MAX_KEYS);
        if (rc != MR_OK) {
            EVP_PKEY_free(key);
            break;
        }
        memcpy(set->keys[set->n].kid, kid, strlen(kid) + 1);
        set->keys[set->n++].key = key;
    }
    cJSON_Delete(doc);
    if (rc != MR_OK) {
        mr_jwks_free(set);
        return rc;
    }
    *out = set;
    return MR_OK;
}

size_t mr_jwks_count(const mr_jwks *set)
{
    return set ? set->n : 0;
}

EVP_PKEY *mr_jwks_find(const mr_jwks *set, const char *kid)
{
    for (size_t i = 0; set && kid && i < set->n; i++)
        if (strcmp(set->keys[i].kid, kid) == 0)
            return set->keys[i].key;
    return NULL;
}

/* ---- the cache -------------------------------------------------------- */

struct mr_jwks_cache {
    mr_jwks_policy policy;
    mr_jwks *keys;          /* NULL until a fetch succeeded */
    int64_t fetched_ms;     /* last successful fetch */
    int64_t attempted_ms;   /* last attempt, successful or not */
    int attempted;          /* an attempt was made at all */
    int last_failed;        /* the last attempt failed */
    int64_t outage_ms;      /* first failed attempt since the keys stopped being fresh */
    int in_outage;          /* outage_ms is set (cleared by a successful fetch) */
};

mr_jwks_cache *mr_jwks_cache_new(const mr_jwks_policy *policy)
{
    mr_jwks_cache *c = calloc(1, sizeof(*c));
    if (c)
        c->policy = *policy;
    return c;
}

void mr_jwks_cache_free(mr_jwks_cache *c)
{
    if (!c)
        return;
    mr_jwks_free(c->keys);
    free(c);
}

static int fresh(const mr_jwks_cache *c, int64_t now_ms)
{
    return c->keys && now_ms - c->fetched_ms < c->policy.ttl_ms;
}

int mr_jwks_cache_should_fetch(const mr_jwks_cache *c, const char *kid, int64_t now_ms)
{
    if (c->attempted && now_ms - c->attempted_ms < c->policy.refetch_ms)
        return 0;
    return !fresh(c, now_ms) || !mr_jwks_find(c->keys, kid);
}

mr_err mr_jwks_cache_store(mr_jwks_cache *c, const char *doc, size_t len, int64_t now_ms,
                           char *err, size_t errlen)
{
    c->attempted = 1;
    c->attempted_ms = now_ms;
    c->last_failed = 1;
    /* The stale bound counts from the first failure once the keys are no longer
     * fresh, not from the last success: a worker nobody asked for a while has
     * not seen the endpoint fail, however old its keys are. */
    if (!c->in_outage && c->keys && !fresh(c, now_ms)) {
        c->in_outage = 1;
        c->outage_ms = now_ms;
    }
    mr_jwks *set;
    mr_err e = doc ? mr_jwks_parse(doc, len, &set, err, errlen)
                   : mr_seterr(err, errlen, MR_ETRANSIENT, "JWKS fetch failed");
    if (e != MR_OK)
        return e;
    mr_jwks_free(c->keys);
    c->keys = set;
    c->fetched_ms = now_ms;
    c->last_failed = 0;
    c->in_outage = 0;
    return MR_OK;
}

mr_err mr_jwks_cache_key(const mr_jwks_cache *c, const char *kid, int64_t now_ms,
                         EVP_PKEY **key, char *err, size_t errlen)
{
    *key = NULL;
    if (!c->keys)
        return mr_seterr(err, errlen, MR_ETRANSIENT, "signing keys unavailable (JWKS not fetched yet)");
    if (c->in_outage && now_ms - c->outage_ms >= c->policy.stale_ms)
        return mr_seterr(err, errlen, MR_ETRANSIENT,
                         "signing keys unavailable (JWKS unreachable for too long)");
    *key = mr_jwks_find(c->keys, kid);
    if (*key)
        return MR_OK;
    /* The refetch that could have found a new key failed: that says nothing
     * about the token, so the caller should come back rather than give up. */
    if (c->last_failed)
        return mr_seterr(err, errlen, MR_ETRANSIENT, "unknown key id and the JWKS could not be fetched");
    return mr_seterr(err, errlen, MR_EAUTH, "unknown key id");
}
