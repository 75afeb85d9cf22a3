/* mr_jwt.c: JWT parsing, HS256/ES256/RS256 signature checks, claim checks,
 * and HS256 signing.
 *
 * Order of checks: size and shape, then the header (so alg "none" or an alg
 * the caller does not allow never reaches signature code), then the signature
 * over the exact "<header>.<payload>" bytes, and only then the payload is
 * parsed. */
#include "mr_jwt.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>

#include "mr_b64.h"
#include "mr_hmac.h"
#include "mr_json.h"

#define HS256_SIG_B64_LEN 43 /* 32 bytes, base64url, no padding */
#define MAX_HEADER_JSON 1024

/* JWTs' base64url (no padding, strict) is mr_b64's. */
long mr_b64url_encode(const unsigned char *in, size_t len, char *out, size_t cap)
{
    if (mr_b64_encode(in, len, MR_B64_URL, out, cap) != MR_OK)
        return -1;
    return (long)mr_b64_encoded_len(len, MR_B64_URL);
}

long mr_b64url_decode(const char *in, size_t len, unsigned char *out, size_t cap)
{
    size_t n = 0;
    return mr_b64_decode(in, len, MR_B64_URL, out, cap, &n) == MR_OK ? (long)n : -1;
}

/* HMAC-SHA256 of data, base64url-encoded into out[HS256_SIG_B64_LEN + 1]. */
static int hs256_b64(const unsigned char *secret, size_t secret_len, const char *data,
                     size_t len, char *out)
{
    unsigned char mac[32];
    const mr_hmac_part part = {data, len};
    if (!mr_hmac_sha256(secret, secret_len, &part, 1, mac))
        return -1;
    return mr_b64url_encode(mac, sizeof mac, out, HS256_SIG_B64_LEN + 1) == HS256_SIG_B64_LEN ? 0 : -1;
}

/* Decodes one base64url segment and parses it as a JSON object with no key
 * given twice (at any depth) and no \u0000 in it (a claim would be read shorter
 * than it was signed). NULL when it is anything else. */
static cJSON *decode_json_segment(const char *seg, size_t len, size_t max_json)
{
    size_t cap = (len / 4) * 3 + 3;
    if (cap > max_json)
        return NULL;
    unsigned char *buf = malloc(cap);
    if (!buf)
        return NULL;
    long n = mr_b64url_decode(seg, len, buf, cap);
    cJSON *obj = n < 0 || mr_json_has_nul_escape((const char *)buf, (size_t)n)
                     ? NULL
                     : mr_json_parse((const char *)buf, (size_t)n);
    free(buf);
    if (obj && (!cJSON_IsObject(obj) || mr_json_has_duplicate_keys(obj))) {
        cJSON_Delete(obj);
        return NULL;
    }
    return obj;
}

/* Copies an optional string member into dst[cap]; 0 absent, 1 copied, -1 when
 * of the wrong type or too long. */
static int copy_str(const cJSON *obj, const char *key, char *dst, size_t cap)
{
    const char *s = NULL;
    mr_err e = mr_json_str(obj, key, &s);
    dst[0] = '\0';
    if (e == MR_ENOTFOUND)
        return 0;
    if (e != MR_OK || strlen(s) >= cap)
        return -1;
    memcpy(dst, s, strlen(s) + 1);
    return 1;
}

mr_err mr_jwt_split(const char *token, mr_jwt_parts *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    if (!token || !*token)
        return mr_seterr(err, errlen, MR_EAUTH, "missing token");
    size_t tlen = strnlen(token, MR_JWT_MAX_TOKEN + 1);
    if (tlen > MR_JWT_MAX_TOKEN)
        return mr_seterr(err, errlen, MR_EAUTH, "token too long");

    const char *dot1 = memchr(token, '.', tlen);
    const char *dot2 = dot1 ? memchr(dot1 + 1, '.', tlen - (size_t)(dot1 + 1 - token)) : NULL;
    if (!dot1 || !dot2 || memchr(dot2 + 1, '.', tlen - (size_t)(dot2 + 1 - token)))
        return mr_seterr(err, errlen, MR_EAUTH, "malformed token");
    size_t hlen = (size_t)(dot1 - token);
    out->token = token;
    out->signing_len = (size_t)(dot2 - token);
    out->payload = dot1 + 1;
    out->payload_len = (size_t)(dot2 - dot1 - 1);
    out->sig = dot2 + 1;
    out->sig_len = tlen - (size_t)(dot2 + 1 - token);
    if (hlen == 0 || out->payload_len == 0 || out->sig_len == 0)
        return mr_seterr(err, errlen, MR_EAUTH, "malformed token");

    cJSON *hdr = decode_json_segment(token, hlen, MAX_HEADER_JSON);
    if (!hdr)
        return mr_seterr(err, errlen, MR_EAUTH, "malformed token header");
    int alg = copy_str(hdr, "alg", out->alg, sizeof(out->alg));
    int kid = copy_str(hdr, "kid", out->kid, sizeof(out->kid));
    /* "crit" names extensions the verifier must understand (RFC 7515 4.1.11): this
     * one understands none. */
    int crit = cJSON_GetObjectItemCaseSensitive(hdr, "crit") != NULL;
    cJSON_Delete(hdr);
    if (crit)
        return mr_seterr(err, errlen, MR_EAUTH, "critical header extension not understood");
    if (alg != 1)
        return mr_seterr(err, errlen, MR_EAUTH, "alg not allowed");
    if (kid < 0)
        return mr_seterr(err, errlen, MR_EAUTH, "malformed kid");
    return MR_OK;
}

int mr_jwt_hs256_ok(const mr_jwt_parts *p, const unsigned char *secret, size_t secret_len)
{
    /* Compare the encoded signature text: the strict decoder makes the
     * encoding canonical, and this avoids decoding attacker bytes at all. */
    char expect[HS256_SIG_B64_LEN + 1];
    if (!secret || secret_len == 0 ||
        hs256_b64(secret, secret_len, p->token, p->signing_len, expect) != 0)
        return 0;
    return mr_ct_equal(expect, HS256_SIG_B64_LEN, p->sig, p->sig_len);
}

/* ES256's signature is r||s, 32 bytes each, big-endian (RFC 7518 3.4);
 * OpenSSL verifies the DER SEQUENCE of two INTEGERs. Returns a malloc'd DER
 * encoding in *der, or -1. */
static int es256_to_der(const unsigned char raw[64], unsigned char **der, int *der_len)
{
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(raw, 32, NULL), *s = BN_bin2bn(raw + 32, 32, NULL);
    int ok = sig && r && s && ECDSA_SIG_set0(sig, r, s) == 1;
    if (!ok) {
        BN_free(r);
        BN_free(s);
        ECDSA_SIG_free(sig);
        return -1;
    }
    *der = NULL;
    *der_len = i2d_ECDSA_SIG(sig, der); /* sig owns r and s now */
    ECDSA_SIG_free(sig);
    return *der_len > 0 ? 0 : -1;
}

/* ES256 is ECDSA on P-256 alone (RFC 7518 3.4): another 256-bit curve is not it. */
static int is_p256(EVP_PKEY *key)
{
    char name[64];
    if (!key || EVP_PKEY_get_base_id(key) != EVP_PKEY_EC ||
        EVP_PKEY_get_group_name(key, name, sizeof(name), NULL) != 1)
        return 0;
    int nid = OBJ_sn2nid(name);
    if (nid == NID_undef)
        nid = EC_curve_nist2nid(name);
    return nid == NID_X9_62_prime256v1;
}

/* RFC 7518 3.3: RS256 keys are at least 2048 bits. */
static int is_rsa2048(EVP_PKEY *key)
{
    return key && EVP_PKEY_get_base_id(key) == EVP_PKEY_RSA && EVP_PKEY_get_bits(key) >= 2048;
}

mr_err mr_jwt_verify_pkey(const mr_jwt_parts *p, const char *alg, EVP_PKEY *key,
                          char *err, size_t errlen)
{
    int is_es = strcmp(alg, "ES256") == 0, is_rs = strcmp(alg, "RS256") == 0;
    if (!is_es && !is_rs)
        return mr_seterr(err, errlen, MR_EAUTH, "alg not allowed");
    /* The key decides what the signature may be: an RSA key never verifies an
     * ES256 token and the other way round, whatever the header claims. */
    if (!(is_es ? is_p256(key) : is_rsa2048(key)))
        return mr_seterr(err, errlen, MR_EAUTH, "alg does not match the key");

    unsigned char raw[1024];
    long n = mr_b64url_decode(p->sig, p->sig_len, raw, sizeof(raw));
    if (n < 0 || (is_es && n != 64) || (is_rs && n != EVP_PKEY_get_size(key)))
        return mr_seterr(err, errlen, MR_EAUTH, "bad signature");
    unsigned char *der = NULL;
    const unsigned char *sig = raw;
    size_t sig_len = (size_t)n;
    if (is_es) {
        int der_len;
        if (es256_to_der(raw, &der, &der_len) != 0)
            return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
        sig = der;
        sig_len = (size_t)der_len;
    }
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int rc = md && EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, key) == 1
                 ? EVP_DigestVerify(md, sig, sig_len, (const unsigned char *)p->token, p->signing_len)
                 : -2;
    EVP_MD_CTX_free(md);
    OPENSSL_free(der);
    ERR_clear_error(); /* a refused signature leaves OpenSSL errors behind */
    if (rc == -2)
        return mr_seterr(err, errlen, MR_EINTERNAL, "signature check could not start");
    return rc == 1 ? MR_OK : mr_seterr(err, errlen, MR_EAUTH, "bad signature");
}

/* A NumericDate claim: absent -> 0, present -> must be a finite number. */
static int numeric_claim(const cJSON *payload, const char *key, double *out)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(payload, key);
    if (!it || cJSON_IsNull(it))
        return 0;
    if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble))
        return -1;
    *out = it->valuedouble;
    return 1;
}

/* aud is a string or an array of strings (RFC 7519 4.1.3). 1 when it names
 * `want`, 0 when it does not, -1 when it is neither shape. */
static int aud_names(const cJSON *aud, const char *want)
{
    if (cJSON_IsString(aud))
        return strcmp(aud->valuestring, want) == 0;
    if (!cJSON_IsArray(aud))
        return -1;
    int found = 0;
    for (const cJSON *a = aud->child; a; a = a->next) {
        if (!cJSON_IsString(a))
            return -1;
        found |= strcmp(a->valuestring, want) == 0;
    }
    return found;
}

/* The claims PostgreSQL sees: these members and nothing else, each copied only
 * after its type is checked. What RLS and SQL functions read (auth.uid(),
 * auth.role(), auth.jwt()) comes from here. */
static const struct {
    const char *key;
    int type; /* cJSON type flag */
} kept_claims[] = {
    {"iss", cJSON_String}, {"sub", cJSON_String}, {"aud", cJSON_String | cJSON_Array},
    {"exp", cJSON_Number}, {"iat", cJSON_Number}, {"role", cJSON_String},
    {"email", cJSON_String}, {"phone", cJSON_String}, {"session_id", cJSON_String},
    {"aal", cJSON_String}, {"is_anonymous", cJSON_True | cJSON_False},
    {"client_id", cJSON_String},
};

static mr_err rebuild_claims(const cJSON *payload, char **out, char *err, size_t errlen)
{
    cJSON *c = cJSON_CreateObject();
    if (!c)
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    for (size_t i = 0; i < MR_ARRAY_LEN(kept_claims); i++) {
        const cJSON *it = cJSON_GetObjectItemCaseSensitive(payload, kept_claims[i].key);
        if (!it || cJSON_IsNull(it))
            continue;
        /* aud_names() < 0: an array holding anything but strings. */
        if (!(it->type & kept_claims[i].type) ||
            (cJSON_IsArray(it) && aud_names(it, "") < 0)) {
            cJSON_Delete(c);
            return mr_seterr(err, errlen, MR_EAUTH, "malformed %s", kept_claims[i].key);
        }
        cJSON *copy = cJSON_Duplicate(it, 1);
        if (!copy || !cJSON_AddItemToObject(c, kept_claims[i].key, copy)) {
            cJSON_Delete(copy);
            cJSON_Delete(c);
            return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
        }
    }
    *out = mr_json_print(c);
    cJSON_Delete(c);
    return *out ? MR_OK : mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
}

/* Every check of the payload; the first failure is the answer. */
static mr_err check_claims(const cJSON *payload, const mr_jwt_rules *rules, time_t now,
                           mr_jwt_claims *out, char *err, size_t errlen)
{
    double exp = 0, nbf = 0, t = (double)now, leeway = (double)rules->leeway_s;
    /* Every Supabase token carries exp; one without it would never expire. */
    if (numeric_claim(payload, "exp", &exp) != 1)
        return mr_seterr(err, errlen, MR_EAUTH, "missing or malformed exp");
    if (t >= exp + leeway)
        return mr_seterr(err, errlen, MR_EAUTH, "expired");
    if (rules->max_lifetime_s > 0 && exp > t + (double)rules->max_lifetime_s + leeway)
        return mr_seterr(err, errlen, MR_EAUTH, "lifetime longer than %ld s", rules->max_lifetime_s);
    int has_nbf = numeric_claim(payload, "nbf", &nbf);
    if (has_nbf < 0)
        return mr_seterr(err, errlen, MR_EAUTH, "malformed nbf");
    if (has_nbf > 0 && t + leeway < nbf)
        return mr_seterr(err, errlen, MR_EAUTH, "not yet valid");
    if (rules->issuer) {
        const char *iss = NULL;
        if (mr_json_str(payload, "iss", &iss) != MR_OK || strcmp(iss, rules->issuer) != 0)
            return mr_seterr(err, errlen, MR_EAUTH, "wrong issuer");
    }
    if (copy_str(payload, "role", out->role, sizeof(out->role)) != 1)
        return mr_seterr(err, errlen, MR_EAUTH, "missing or malformed role");
    if (copy_str(payload, "sub", out->sub, sizeof(out->sub)) < 0)
        return mr_seterr(err, errlen, MR_EAUTH, "malformed sub");
    if (rules->user_audience && strcmp(out->role, "authenticated") == 0) {
        const cJSON *aud = cJSON_GetObjectItemCaseSensitive(payload, "aud");
        if (!aud || aud_names(aud, rules->user_audience) != 1)
            return mr_seterr(err, errlen, MR_EAUTH, "wrong audience");
    }
    /* Supabase Auth's OAuth 2.1 server names the app a token was issued to in
     * client_id (absent from the user's own sessions). Present as SQL sees it:
     * not null; rebuild_claims refuses any type but a string. */
    const cJSON *cid = cJSON_GetObjectItemCaseSensitive(payload, "client_id");
    out->oauth_client = cid && !cJSON_IsNull(cid);
    return rebuild_claims(payload, &out->claims_json, err, errlen);
}

mr_err mr_jwt_read_claims(const mr_jwt_parts *p, const mr_jwt_rules *rules, time_t now,
                          mr_jwt_claims *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    cJSON *payload = decode_json_segment(p->payload, p->payload_len, MR_JWT_MAX_TOKEN);
    if (!payload)
        return mr_seterr(err, errlen, MR_EAUTH, "malformed token payload");
    mr_err rc = check_claims(payload, rules, now, out, err, errlen);
    cJSON_Delete(payload);
    if (rc != MR_OK) {
        free(out->claims_json);
        memset(out, 0, sizeof(*out));
    }
    return rc;
}

mr_err mr_jwt_verify(const char *token, const unsigned char *secret, size_t secret_len,
                     time_t now, long leeway_s, mr_jwt_claims *out, char *err, size_t errlen)
{
    return mr_jwt_verify2(token, secret, secret_len, NULL, 0, now, leeway_s, out, err, errlen);
}

mr_err mr_jwt_verify2(const char *token, const unsigned char *secret, size_t secret_len,
                      const unsigned char *previous, size_t previous_len, time_t now,
                      long leeway_s, mr_jwt_claims *out, char *err, size_t errlen)
{
    mr_jwt_parts p;
    memset(out, 0, sizeof(*out));
    mr_err e = mr_jwt_split(token, &p, err, errlen);
    if (e != MR_OK)
        return e;
    /* The algorithm is decided by us, never by the token. */
    if (strcmp(p.alg, "HS256") != 0)
        return mr_seterr(err, errlen, MR_EAUTH, "alg not allowed");
    /* During a rotation, a token signed with the previous secret passes too. */
    if (!mr_jwt_hs256_ok(&p, secret, secret_len) &&
        !(previous && previous_len > 0 && mr_jwt_hs256_ok(&p, previous, previous_len)))
        return mr_seterr(err, errlen, MR_EAUTH, "bad signature");
    mr_jwt_rules rules = {.leeway_s = leeway_s};
    return mr_jwt_read_claims(&p, &rules, now, out, err, errlen);
}

void mr_jwt_claims_free(mr_jwt_claims *c)
{
    if (!c)
        return;
    free(c->claims_json);
    c->claims_json = NULL;
}

char *mr_jwt_sign(const char *payload_json, const unsigned char *secret, size_t secret_len)
{
    static const char header[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    size_t plen = strlen(payload_json);
    size_t hb = (sizeof(header) - 1 + 2) / 3 * 4 + 1;
    size_t pb = (plen + 2) / 3 * 4 + 1;
    char *tok = malloc(hb + pb + HS256_SIG_B64_LEN + 3);
    if (!tok)
        return NULL;
    long n = mr_b64url_encode((const unsigned char *)header, sizeof(header) - 1, tok, hb);
    size_t o = (size_t)n;
    tok[o++] = '.';
    n = mr_b64url_encode((const unsigned char *)payload_json, plen, tok + o, pb);
    o += (size_t)n;
    if (hs256_b64(secret, secret_len, tok, o, tok + o + 1) != 0) {
        free(tok);
        return NULL;
    }
    tok[o] = '.';
    return tok;
}
