/* mr_jwt.c: HS256 JWT verification and signing (Supabase legacy JWT secret).
 *
 * Order of checks: size and shape, then the header's alg (so alg "none" or an
 * asymmetric alg never reaches signature code), then the HMAC over the exact
 * "<header>.<payload>" bytes, and only then the payload is parsed. */
#include "mr_jwt.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "mr_json.h"

#define HS256_SIG_B64_LEN 43 /* 32 bytes, base64url, no padding */
#define MAX_HEADER_JSON 1024

static const char b64url_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

long mr_b64url_encode(const unsigned char *in, size_t len, char *out, size_t cap)
{
    size_t need = (len / 3) * 4 + ((len % 3) ? (len % 3) + 1 : 0);
    if (cap < need + 1)
        return -1;
    size_t o = 0, i = 0;
    for (; i + 2 < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = b64url_alphabet[(v >> 18) & 63];
        out[o++] = b64url_alphabet[(v >> 12) & 63];
        out[o++] = b64url_alphabet[(v >> 6) & 63];
        out[o++] = b64url_alphabet[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = b64url_alphabet[(v >> 18) & 63];
        out[o++] = b64url_alphabet[(v >> 12) & 63];
    } else if (len - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = b64url_alphabet[(v >> 18) & 63];
        out[o++] = b64url_alphabet[(v >> 12) & 63];
        out[o++] = b64url_alphabet[(v >> 6) & 63];
    }
    out[o] = '\0';
    return (long)o;
}

static int b64url_value(char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '-') return 62;
    if (c == '_') return 63;
    return -1;
}

long mr_b64url_decode(const char *in, size_t len, unsigned char *out, size_t cap)
{
    /* Strict: no padding, no whitespace, no standard-alphabet '+' '/', and no
     * stray bits in the last character, so every byte string has exactly one
     * accepted encoding. */
    if (len % 4 == 1)
        return -1;
    size_t need = (len / 4) * 3 + ((len % 4) ? (len % 4) - 1 : 0);
    if (need > cap)
        return -1;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        int v = b64url_value(in[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    if (acc != 0)
        return -1;
    return (long)o;
}

/* HMAC-SHA256 of data, base64url-encoded into out[HS256_SIG_B64_LEN + 1]. */
static int hs256_b64(const unsigned char *secret, size_t secret_len, const char *data,
                     size_t len, char *out)
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    if (!HMAC(EVP_sha256(), secret, (int)secret_len, (const unsigned char *)data, len, mac,
              &mac_len) || mac_len != 32)
        return -1;
    return mr_b64url_encode(mac, mac_len, out, HS256_SIG_B64_LEN + 1) == HS256_SIG_B64_LEN ? 0 : -1;
}

/* Decodes one base64url segment and parses it as a JSON object. */
static cJSON *decode_json_segment(const char *seg, size_t len, size_t max_json)
{
    size_t cap = (len / 4) * 3 + 3;
    if (cap > max_json)
        return NULL;
    unsigned char *buf = malloc(cap);
    if (!buf)
        return NULL;
    long n = mr_b64url_decode(seg, len, buf, cap);
    cJSON *obj = n < 0 ? NULL : mr_json_parse((const char *)buf, (size_t)n);
    free(buf);
    if (obj && !cJSON_IsObject(obj)) {
        cJSON_Delete(obj);
        return NULL;
    }
    return obj;
}

/* A NumericDate claim: absent -> 0, present -> must be a finite number. */
static int numeric_claim(const cJSON *payload, const char *key, int required, double *out)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(payload, key);
    if (!it)
        return required ? -1 : 0;
    if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble))
        return -1;
    *out = it->valuedouble;
    return 1;
}

/* Copies an optional string claim into dst[cap]; -1 when of the wrong type or too long. */
static int string_claim(const cJSON *payload, const char *key, char *dst, size_t cap)
{
    const char *s = NULL;
    mr_err e = mr_json_str(payload, key, &s);
    dst[0] = '\0';
    if (e == MR_ENOTFOUND)
        return 0;
    if (e != MR_OK || strlen(s) >= cap)
        return -1;
    memcpy(dst, s, strlen(s) + 1);
    return 1;
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
    size_t plen = (size_t)(dot2 - dot1 - 1);
    size_t slen = tlen - (size_t)(dot2 + 1 - token);
    if (hlen == 0 || plen == 0 || slen == 0)
        return mr_seterr(err, errlen, MR_EAUTH, "malformed token");

    /* Header first: the algorithm is decided by us, never by the token. */
    cJSON *hdr = decode_json_segment(token, hlen, MAX_HEADER_JSON);
    if (!hdr)
        return mr_seterr(err, errlen, MR_EAUTH, "malformed token header");
    const char *alg = NULL;
    int alg_ok = mr_json_str(hdr, "alg", &alg) == MR_OK && strcmp(alg, "HS256") == 0;
    cJSON_Delete(hdr);
    if (!alg_ok)
        return mr_seterr(err, errlen, MR_EAUTH, "alg not allowed");

    /* Compare the encoded signature text: the strict decoder makes the
     * encoding canonical, and this avoids decoding attacker bytes at all. */
    char expect[HS256_SIG_B64_LEN + 1];
    if (hs256_b64(secret, secret_len, token, (size_t)(dot2 - token), expect) != 0)
        return mr_seterr(err, errlen, MR_EINTERNAL, "hmac failed");
    int sig_ok = mr_ct_equal(expect, HS256_SIG_B64_LEN, dot2 + 1, slen);
    /* During a rotation, a token signed with the previous secret passes too. */
    if (!sig_ok && previous != NULL && previous_len > 0) {
        if (hs256_b64(previous, previous_len, token, (size_t)(dot2 - token), expect) != 0)
            return mr_seterr(err, errlen, MR_EINTERNAL, "hmac failed");
        sig_ok = mr_ct_equal(expect, HS256_SIG_B64_LEN, dot2 + 1, slen);
    }
    if (!sig_ok)
        return mr_seterr(err, errlen, MR_EAUTH, "bad signature");

    cJSON *payload = decode_json_segment(dot1 + 1, plen, MR_JWT_MAX_TOKEN);
    if (!payload)
        return mr_seterr(err, errlen, MR_EAUTH, "malformed token payload");

    mr_err rc = MR_OK;
    double exp = 0, nbf = 0;
    /* Every Supabase token carries exp; one without it would never expire. */
    if (numeric_claim(payload, "exp", 1, &exp) < 0)
        rc = mr_seterr(err, errlen, MR_EAUTH, "missing or malformed exp");
    else if ((double)now >= exp + (double)leeway_s)
        rc = mr_seterr(err, errlen, MR_EAUTH, "expired");
    else {
        int has_nbf = numeric_claim(payload, "nbf", 0, &nbf);
        if (has_nbf < 0)
            rc = mr_seterr(err, errlen, MR_EAUTH, "malformed nbf");
        else if (has_nbf > 0 && (double)now + (double)leeway_s < nbf)
            rc = mr_seterr(err, errlen, MR_EAUTH, "not yet valid");
    }
    if (rc == MR_OK && string_claim(payload, "role", out->role, sizeof(out->role)) != 1)
        rc = mr_seterr(err, errlen, MR_EAUTH, "missing or malformed role");
    if (rc == MR_OK && string_claim(payload, "sub", out->sub, sizeof(out->sub)) < 0)
        rc = mr_seterr(err, errlen, MR_EAUTH, "malformed sub");
    if (rc == MR_OK) {
        out->claims_json = mr_json_print(payload);
        if (!out->claims_json)
            rc = mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    }
    cJSON_Delete(payload);
    if (rc != MR_OK)
        memset(out, 0, sizeof(*out));
    return rc;
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
