/* mr_secrets.c: the keyring, AES-256-GCM sealing and keyed digests (see mr_secrets.h). */
#include "mr_secrets.h"

#include <ctype.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>

#include "mr_config.h"
#include "mr_b64.h"
#include "mr_hmac.h"

#define CT_PREFIX "mrs1:"
#define DIGEST_PREFIX "mrd1:"
#define PREFIX_LEN 5
#define HEADER_LEN (PREFIX_LEN + MR_SECRETS_KID_HEX + 1)   /* "mrs1:<kid>:" */

typedef struct {
    unsigned char aead[32];
    unsigned char digest[32];
    char kid[MR_SECRETS_KID_HEX + 1];
} ring_key;

struct mr_secrets {
    ring_key keys[1 + MR_SECRETS_MAX_PREVIOUS];   /* keys[0] is the current key */
    size_t n;
};

/* ---- primitives ---- */

mr_err mr_secrets_hkdf(const unsigned char *ikm, size_t ikmlen, const unsigned char *salt,
                       size_t saltlen, const unsigned char *info, size_t infolen,
                       unsigned char *out, size_t outlen)
{
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
    EVP_KDF_CTX *ctx = kdf ? EVP_KDF_CTX_new(kdf) : NULL;
    EVP_KDF_free(kdf);
    if (!ctx) return MR_EINTERNAL;
    OSSL_PARAM params[5], *p = params;
    char digest[] = "SHA256";
    *p++ = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0);
    *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)ikm, ikmlen);
    /* No salt: HKDF's default (HashLen zero bytes), as RFC 5869 specifies. */
    if (saltlen > 0)
        *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)salt, saltlen);
    if (infolen > 0)
        *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info, infolen);
    *p = OSSL_PARAM_construct_end();
    int ok = EVP_KDF_derive(ctx, out, outlen, params) > 0;
    EVP_KDF_CTX_free(ctx);
    return ok ? MR_OK : MR_EINTERNAL;
}

static mr_err gcm(int enc, const unsigned char key[32], const unsigned char nonce[12],
                  const unsigned char *aad, size_t aadlen, const unsigned char *in, size_t len,
                  unsigned char *out, unsigned char tag[16])
{
    if (len > (size_t)0x7fffffff || aadlen > (size_t)0x7fffffff) return MR_EINVAL;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) return MR_EINTERNAL;
    int n = 0, ok =
        EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL, enc) &&
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, MR_SECRETS_NONCE_LEN, NULL) &&
        EVP_CipherInit_ex(ctx, NULL, NULL, key, nonce, enc) &&
        (aadlen == 0 || EVP_CipherUpdate(ctx, NULL, &n, aad, (int)aadlen)) &&
        (len == 0 || EVP_CipherUpdate(ctx, out, &n, in, (int)len));
    /* Decrypting: the tag goes in before the final call, which checks it. */
    if (ok && !enc)
        ok = EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, MR_SECRETS_TAG_LEN, tag);
    int fin = ok && EVP_CipherFinal_ex(ctx, out + (len ? (size_t)n : 0), &n) > 0;
    if (fin && enc)
        fin = EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, MR_SECRETS_TAG_LEN, tag) > 0;
    EVP_CIPHER_CTX_free(ctx);
    if (!ok) return MR_EINTERNAL;
    return fin ? MR_OK : MR_EINVAL;
}

mr_err mr_secrets_gcm_seal(const unsigned char key[32], const unsigned char nonce[12],
                           const unsigned char *aad, size_t aadlen, const unsigned char *pt,
                           size_t len, unsigned char *ct, unsigned char tag[16])
{
    mr_err e = gcm(1, key, nonce, aad, aadlen, pt, len, ct, tag);
    return e == MR_EINVAL ? MR_EINTERNAL : e;
}

mr_err mr_secrets_gcm_open(const unsigned char key[32], const unsigned char nonce[12],
                           const unsigned char *aad, size_t aadlen, const unsigned char *ct,
                           size_t len, const unsigned char tag[16], unsigned char *pt)
{
    unsigned char t[16];
    memcpy(t, tag, sizeof t);
    mr_err e = gcm(0, key, nonce, aad, aadlen, ct, len, pt, t);
    /* Nothing of a failed open leaves here. */
    if (e != MR_OK && len > 0) OPENSSL_cleanse(pt, len);
    return e;
}

static int hmac_sha256(const unsigned char key[32], const char *context, const void *pt,
                       size_t len, unsigned char out[32])
{
    static const unsigned char zero = 0;
    /* context || 0x00 || plaintext: the NUL keeps ("ab", "c") and ("a", "bc") apart. */
    const mr_hmac_part parts[3] = {{context, strlen(context)}, {&zero, 1}, {pt, len}};
    return mr_hmac_sha256(key, 32, parts, 3, out);
}

static int is_kid(const char *s)
{
    for (int i = 0; i < MR_SECRETS_KID_HEX; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
    return 1;
}

/* ---- the keyring ---- */

static mr_err derive(const unsigned char master[32], ring_key *k)
{
    static const char kid_info[] = "mindroom-secrets v1 kid";
    static const char aead_info[] = "mindroom-secrets v1 aead";
    static const char digest_info[] = "mindroom-secrets v1 digest";
    unsigned char kid[4];
    if (mr_secrets_hkdf(master, 32, NULL, 0, (const unsigned char *)kid_info,
                        sizeof kid_info - 1, kid, sizeof kid) != MR_OK ||
        mr_secrets_hkdf(master, 32, NULL, 0, (const unsigned char *)aead_info,
                        sizeof aead_info - 1, k->aead, sizeof k->aead) != MR_OK ||
        mr_secrets_hkdf(master, 32, NULL, 0, (const unsigned char *)digest_info,
                        sizeof digest_info - 1, k->digest, sizeof k->digest) != MR_OK)
        return MR_EINTERNAL;
    mr_hex(kid, sizeof kid, k->kid);
    return MR_OK;
}

static mr_err add_key(mr_secrets *r, const char *b64, size_t len, const char *what,
                      char *err, size_t errlen)
{
    unsigned char master[48];
    size_t n = 0;
    if (len == 0)
        return mr_seterr(err, errlen, MR_EINVAL, "%s is empty", what);
    if (mr_b64_decode(b64, len, MR_B64_PAD, master, sizeof master, &n) != MR_OK ||
        n != MR_SECRETS_KEY_LEN) {
        OPENSSL_cleanse(master, sizeof master);
        return mr_seterr(err, errlen, MR_EINVAL,
                         "%s must be %d bytes in base64 (openssl rand -base64 32)", what,
                         MR_SECRETS_KEY_LEN);
    }
    ring_key *k = &r->keys[r->n];
    mr_err e = derive(master, k);
    OPENSSL_cleanse(master, sizeof master);
    if (e != MR_OK) return mr_seterr(err, errlen, e, "cannot derive keys from %s", what);
    for (size_t i = 0; i < r->n; i++)
        if (strcmp(r->keys[i].kid, k->kid) == 0)
            return mr_seterr(err, errlen, MR_EINVAL, "%s repeats a key already loaded (key id %s)",
                             what, k->kid);
    r->n++;
    return MR_OK;
}

mr_err mr_secrets_new(const char *current, const char *previous, mr_secrets **out,
                      char *err, size_t errlen)
{
    *out = NULL;
    if (!current || !*current)
        return mr_seterr(err, errlen, MR_EINVAL, "MINDROOM_SECRETS_KEY is required");
    mr_secrets *r = calloc(1, sizeof *r);
    if (!r) return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    mr_err e = add_key(r, current, strlen(current), "MINDROOM_SECRETS_KEY", err, errlen);
    for (const char *p = previous; e == MR_OK && p && *p;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (r->n > MR_SECRETS_MAX_PREVIOUS) {
            e = mr_seterr(err, errlen, MR_EINVAL,
                          "MINDROOM_SECRETS_KEY_PREVIOUS holds more than %d keys",
                          MR_SECRETS_MAX_PREVIOUS);
            break;
        }
        char what[64];
        snprintf(what, sizeof what, "MINDROOM_SECRETS_KEY_PREVIOUS key #%zu", r->n);
        e = add_key(r, p, len, what, err, errlen);
        p = comma ? comma + 1 : p + len;
        if (comma && !*p)
            e = mr_seterr(err, errlen, MR_EINVAL, "MINDROOM_SECRETS_KEY_PREVIOUS ends with ','");
    }
    if (e != MR_OK) {
        mr_secrets_free(r);
        return e;
    }
    *out = r;
    return MR_OK;
}

mr_err mr_secrets_load_env(mr_secrets **out, char *err, size_t errlen)
{
    return mr_secrets_new(mr_config_getenv("MINDROOM_SECRETS_KEY"),
                          mr_config_getenv("MINDROOM_SECRETS_KEY_PREVIOUS"),
                          out, err, errlen);
}

void mr_secrets_free(mr_secrets *k)
{
    if (!k) return;
    OPENSSL_cleanse(k, sizeof *k);
    free(k);
}

const char *mr_secrets_kid(const mr_secrets *k)
{
    return k->keys[0].kid;
}

int mr_secrets_instance_context(char *out, size_t cap, const char *instance_id, const char *kind,
                                const char *name)
{
    int n = snprintf(out, cap, "instance/%s/%s/%s", instance_id, kind, name);
    if (n <= 0 || (size_t)n >= cap)
        return -1;
    /* The id as PostgreSQL gives it back (lower case), however it was typed: a
     * context that differs in case would seal what nothing opens again. */
    for (char *p = out + 9, *end = out + 9 + strlen(instance_id); p < end; p++)
        *p = (char)tolower((unsigned char)*p);
    return 0;
}

static const ring_key *find(const mr_secrets *k, const char *kid)
{
    for (size_t i = 0; i < k->n; i++)
        if (memcmp(k->keys[i].kid, kid, MR_SECRETS_KID_HEX) == 0) return &k->keys[i];
    return NULL;
}

int mr_secrets_has_kid(const mr_secrets *k, const char *kid)
{
    return kid && strlen(kid) == MR_SECRETS_KID_HEX && is_kid(kid) && find(k, kid) != NULL;
}

/* aad = "mrs1:<kid>:" || context; malloc'd. */
static unsigned char *make_aad(const char *kid, const char *context, size_t *len)
{
    size_t cl = strlen(context);
    unsigned char *aad = malloc(HEADER_LEN + cl + 1);
    if (!aad) return NULL;
    memcpy(aad, CT_PREFIX, PREFIX_LEN);
    memcpy(aad + PREFIX_LEN, kid, MR_SECRETS_KID_HEX);
    aad[HEADER_LEN - 1] = ':';
    memcpy(aad + HEADER_LEN, context, cl);
    *len = HEADER_LEN + cl;
    return aad;
}

/* ---- ciphertexts ---- */

mr_err mr_secrets_seal(const mr_secrets *k, const char *context, const void *pt, size_t len,
                       char **out, char *err, size_t errlen)
{
    *out = NULL;
    if (len > MR_SECRETS_MAX_PLAINTEXT)
        return mr_seterr(err, errlen, MR_EINVAL, "plaintext over %u bytes",
                         MR_SECRETS_MAX_PLAINTEXT);
    const ring_key *key = &k->keys[0];
    size_t rawlen = MR_SECRETS_NONCE_LEN + len + MR_SECRETS_TAG_LEN, aadlen = 0;
    unsigned char *raw = malloc(rawlen);
    unsigned char *aad = make_aad(key->kid, context, &aadlen);
    size_t enclen = mr_b64_encoded_len(rawlen, MR_B64_URL);
    char *text = malloc(HEADER_LEN + enclen + 1);
    mr_err e = MR_EINTERNAL;
    if (!raw || !aad || !text) {
        mr_seterr(err, errlen, e, "out of memory");
        goto done;
    }
    /* A fresh random 96-bit nonce per seal: far below GCM's 2^32-messages
     * bound for random nonces under one key at any plausible volume. */
    if (RAND_bytes(raw, MR_SECRETS_NONCE_LEN) != 1) {
        mr_seterr(err, errlen, e, "no randomness");
        goto done;
    }
    if (mr_secrets_gcm_seal(key->aead, raw, aad, aadlen, pt, len, raw + MR_SECRETS_NONCE_LEN,
                            raw + MR_SECRETS_NONCE_LEN + len) != MR_OK) {
        mr_seterr(err, errlen, e, "encryption failed");
        goto done;
    }
    memcpy(text, aad, HEADER_LEN);
    if (mr_b64_encode(raw, rawlen, MR_B64_URL, text + HEADER_LEN, enclen + 1) != MR_OK) {
        mr_seterr(err, errlen, e, "encoding failed");
        goto done;
    }
    *out = text;
    text = NULL;
    e = MR_OK;
done:
    free(text);
    free(aad);
    free(raw);
    return e;
}

mr_err mr_secrets_parse(const char *ct, size_t ctlen, unsigned char *raw, size_t rawcap,
                        mr_secrets_parts *parts)
{
    size_t maxenc = mr_b64_encoded_len(MR_SECRETS_NONCE_LEN + MR_SECRETS_MAX_PLAINTEXT +
                                           MR_SECRETS_TAG_LEN, MR_B64_URL);
    if (!ct || ctlen <= HEADER_LEN || ctlen - HEADER_LEN > maxenc) return MR_EINVAL;
    if (memcmp(ct, CT_PREFIX, PREFIX_LEN) != 0 || !is_kid(ct + PREFIX_LEN) ||
        ct[HEADER_LEN - 1] != ':')
        return MR_EINVAL;
    size_t n = 0;
    if (mr_b64_decode(ct + HEADER_LEN, ctlen - HEADER_LEN, MR_B64_URL, raw, rawcap, &n) != MR_OK ||
        n < MR_SECRETS_NONCE_LEN + MR_SECRETS_TAG_LEN)
        return MR_EINVAL;
    memcpy(parts->kid, ct + PREFIX_LEN, MR_SECRETS_KID_HEX);
    parts->kid[MR_SECRETS_KID_HEX] = '\0';
    memcpy(parts->nonce, raw, MR_SECRETS_NONCE_LEN);
    parts->body = raw + MR_SECRETS_NONCE_LEN;
    parts->body_len = n - MR_SECRETS_NONCE_LEN;
    return MR_OK;
}

mr_err mr_secrets_open(const mr_secrets *k, const char *context, const char *ct, size_t ctlen,
                       unsigned char **pt, size_t *len, char *err, size_t errlen)
{
    *pt = NULL;
    *len = 0;
    if (!ct || ctlen <= HEADER_LEN)
        return mr_seterr(err, errlen, MR_EINVAL, "not a sealed secret");
    size_t rawcap = (ctlen - HEADER_LEN) / 4 * 3 + 3;
    unsigned char *raw = malloc(rawcap);
    if (!raw) return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    mr_secrets_parts parts;
    mr_err e = mr_secrets_parse(ct, ctlen, raw, rawcap, &parts);
    if (e != MR_OK) {
        free(raw);
        return mr_seterr(err, errlen, MR_EINVAL, "not a sealed secret");
    }
    const ring_key *key = find(k, parts.kid);
    if (!key) {
        free(raw);
        return mr_seterr(err, errlen, MR_EINVAL, "sealed with an unknown key (id %s)", parts.kid);
    }
    size_t clen = parts.body_len - MR_SECRETS_TAG_LEN, aadlen = 0;
    unsigned char *aad = make_aad(parts.kid, context, &aadlen);
    unsigned char *out = malloc(clen + 1);
    if (!aad || !out) {
        free(aad);
        free(out);
        free(raw);
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    }
    e = mr_secrets_gcm_open(key->aead, parts.nonce, aad, aadlen, parts.body, clen,
                            parts.body + clen, out);
    free(aad);
    free(raw);
    if (e != MR_OK) {
        free(out);
        return mr_seterr(err, errlen, e == MR_EINVAL ? MR_EINVAL : MR_EINTERNAL, "cannot open");
    }
    out[clen] = '\0';
    *pt = out;
    *len = clen;
    return MR_OK;
}

int mr_secrets_is_current(const mr_secrets *k, const char *ct, size_t ctlen)
{
    return ct && ctlen > HEADER_LEN && memcmp(ct, CT_PREFIX, PREFIX_LEN) == 0 &&
           memcmp(ct + PREFIX_LEN, k->keys[0].kid, MR_SECRETS_KID_HEX) == 0 &&
           ct[HEADER_LEN - 1] == ':';
}

mr_err mr_secrets_reseal(const mr_secrets *k, const char *context, const char *ct,
                         size_t ctlen, char **out, char *err, size_t errlen)
{
    unsigned char *pt = NULL;
    size_t len = 0;
    *out = NULL;
    mr_err e = mr_secrets_open(k, context, ct, ctlen, &pt, &len, err, errlen);
    if (e != MR_OK) return e;
    e = mr_secrets_seal(k, context, pt, len, out, err, errlen);
    OPENSSL_cleanse(pt, len);
    free(pt);
    return e;
}

/* ---- digests ---- */

static int digest_with(const ring_key *key, const char *context, const void *pt, size_t len,
                       char *out)
{
    unsigned char mac[32];
    if (!hmac_sha256(key->digest, context, pt, len, mac)) return 0;
    memcpy(out, DIGEST_PREFIX, PREFIX_LEN);
    memcpy(out + PREFIX_LEN, key->kid, MR_SECRETS_KID_HEX);
    out[HEADER_LEN - 1] = ':';
    mr_hex(mac, sizeof mac, out + HEADER_LEN);
    return 1;
}

mr_err mr_secrets_digest(const mr_secrets *k, const char *context, const void *pt, size_t len,
                         char *out)
{
    if (!digest_with(&k->keys[0], context, pt, len, out)) {
        out[0] = '\0';
        return MR_EINTERNAL;
    }
    return MR_OK;
}

int mr_secrets_digest_matches(const mr_secrets *k, const char *context, const void *pt,
                              size_t len, const char *stored, int *stale)
{
    if (stale) *stale = 0;
    if (!stored || strlen(stored) != MR_SECRETS_DIGEST_LEN ||
        memcmp(stored, DIGEST_PREFIX, PREFIX_LEN) != 0 || !is_kid(stored + PREFIX_LEN) ||
        stored[HEADER_LEN - 1] != ':')
        return 0;
    const ring_key *key = find(k, stored + PREFIX_LEN);
    if (!key) return 0;
    char mine[MR_SECRETS_DIGEST_LEN + 1];
    if (!digest_with(key, context, pt, len, mine)) return 0;
    int match = mr_ct_equal(mine, MR_SECRETS_DIGEST_LEN, stored, MR_SECRETS_DIGEST_LEN);
    if (match && stale) *stale = key != &k->keys[0];
    return match;
}
