/* mr_homeserver.c: Synapse's per-instance secrets (see mr_homeserver.h). */
#include "mr_homeserver.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>

#include "mr_b64.h"

int mr_homeserver_valid_key_id(const char *s)
{
    size_t n = 0;
    if (!s) return 0;
    for (; s[n]; n++) {
        char c = s[n];
        if (n >= MR_HS_KEY_ID_MAX) return 0;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_'))
            return 0;
    }
    return n > 0;
}

int mr_homeserver_valid_secret(const char *s)
{
    size_t n = 0;
    if (!s) return 0;
    for (; s[n]; n++) {
        char c = s[n];
        if (n >= MR_HS_SECRET_MAX) return 0;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              strchr("._~+/=-", c)))
            return 0;
    }
    return n >= MR_HS_SECRET_MIN;
}

mr_err mr_homeserver_signing_key(const unsigned char seed[MR_HS_SEED_LEN], const char *key_id,
                                 char *line, size_t linecap, char *verify, size_t verifycap)
{
    if (!mr_homeserver_valid_key_id(key_id)) return MR_EINVAL;
    EVP_PKEY *pk = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, seed, MR_HS_SEED_LEN);
    unsigned char pub[32];
    size_t publen = sizeof pub;
    int ok = pk && EVP_PKEY_get_raw_public_key(pk, pub, &publen) == 1 && publen == sizeof pub;
    EVP_PKEY_free(pk);
    if (!ok) return MR_EINTERNAL;
    char seed64[48];
    if (mr_b64_encode(seed, MR_HS_SEED_LEN, 0, seed64, sizeof seed64) != MR_OK ||
        mr_b64_encode(pub, sizeof pub, 0, verify, verifycap) != MR_OK) {
        OPENSSL_cleanse(seed64, sizeof seed64);
        return MR_EINTERNAL;
    }
    int n = snprintf(line, linecap, "ed25519 %s %s", key_id, seed64);
    OPENSSL_cleanse(seed64, sizeof seed64);
    return n > 0 && (size_t)n < linecap ? MR_OK : MR_EINTERNAL;
}

mr_err mr_homeserver_parse_signing_key(const char *line, size_t len,
                                       unsigned char seed[MR_HS_SEED_LEN], char *key_id,
                                       size_t idcap)
{
    if (!line) return MR_EINVAL;
    if (len > 0 && line[len - 1] == '\n') len--;
    if (len < 8 || memcmp(line, "ed25519 ", 8) != 0) return MR_EINVAL;
    const char *id = line + 8, *end = line + len;
    const char *sp = memchr(id, ' ', (size_t)(end - id));
    if (!sp || sp == id || (size_t)(sp - id) > MR_HS_KEY_ID_MAX || (size_t)(sp - id) >= idcap)
        return MR_EINVAL;
    char idbuf[MR_HS_KEY_ID_MAX + 1];
    memcpy(idbuf, id, (size_t)(sp - id));
    idbuf[sp - id] = '\0';
    if (!mr_homeserver_valid_key_id(idbuf)) return MR_EINVAL;
    unsigned char buf[MR_HS_SEED_LEN + 3];
    size_t n = 0;
    if (mr_b64_decode(sp + 1, (size_t)(end - sp - 1), 0, buf, sizeof buf, &n) != MR_OK ||
        n != MR_HS_SEED_LEN) {
        OPENSSL_cleanse(buf, sizeof buf);
        return MR_EINVAL;
    }
    memcpy(seed, buf, MR_HS_SEED_LEN);
    OPENSSL_cleanse(buf, sizeof buf);
    memcpy(key_id, idbuf, (size_t)(sp - id) + 1);
    return MR_OK;
}

static mr_err random_secret(char out[MR_HS_SECRET_LEN + 1])
{
    unsigned char b[32];
    mr_err e = RAND_bytes(b, sizeof b) == 1 ? MR_OK : MR_EINTERNAL;
    if (e == MR_OK) e = mr_b64_encode(b, sizeof b, MR_B64_URL, out, MR_HS_SECRET_LEN + 1);
    OPENSSL_cleanse(b, sizeof b);
    return e;
}

mr_err mr_homeserver_generate(mr_homeserver_secrets *out, char *err, size_t errlen)
{
    static const char letters[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    unsigned char seed[MR_HS_SEED_LEN], pick[4];
    memset(out, 0, sizeof *out);
    if (RAND_bytes(seed, sizeof seed) != 1 || RAND_bytes(pick, sizeof pick) != 1) {
        OPENSSL_cleanse(seed, sizeof seed);
        return mr_seterr(err, errlen, MR_EINTERNAL, "no randomness");
    }
    /* "a_" and four letters, like Synapse's own: 256 % 52 skews a letter's odds
     * slightly, which is harmless for an identifier that is not a secret. */
    snprintf(out->key_id, sizeof out->key_id, "a_%c%c%c%c", letters[pick[0] % 52],
             letters[pick[1] % 52], letters[pick[2] % 52], letters[pick[3] % 52]);
    mr_err e = mr_homeserver_signing_key(seed, out->key_id, out->signing_key,
                                         sizeof out->signing_key, out->verify_key,
                                         sizeof out->verify_key);
    OPENSSL_cleanse(seed, sizeof seed);
    if (e == MR_OK) e = random_secret(out->registration_shared_secret);
    if (e == MR_OK) e = random_secret(out->macaroon_secret_key);
    if (e == MR_OK) e = random_secret(out->form_secret);
    if (e != MR_OK) {
        mr_homeserver_wipe(out);
        return mr_seterr(err, errlen, MR_EINTERNAL, "cannot generate the homeserver's secrets");
    }
    return MR_OK;
}

void mr_homeserver_wipe(mr_homeserver_secrets *s)
{
    OPENSSL_cleanse(s, sizeof *s);
}
