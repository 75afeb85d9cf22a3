/* mr_itoken.c: see mr_itoken.h. */
#include "mr_itoken.h"

#include <string.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include "mr_b64.h"

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

void mr_itoken_hash_hex(const char *s, size_t len, char hash_hex[MR_ITOKEN_HASH_HEX_LEN + 1])
{
    unsigned char md[SHA256_DIGEST_LENGTH];
    if (!SHA256((const unsigned char *)s, len, md)) { /* OpenSSL 3: no provider for it */
        hash_hex[0] = '\0';
        return;
    }
    mr_hex(md, sizeof md, hash_hex);
}

mr_err mr_itoken_generate(char token[MR_ITOKEN_LEN + 1], char key_id[MR_ITOKEN_KEY_ID_LEN + 1],
                          char hash_hex[MR_ITOKEN_HASH_HEX_LEN + 1])
{
    unsigned char kid[MR_ITOKEN_KEY_ID_LEN / 2], secret[32];
    char enc[MR_ITOKEN_SECRET_LEN + 1];
    token[0] = key_id[0] = hash_hex[0] = '\0';
    if (RAND_bytes(kid, sizeof kid) != 1 || RAND_bytes(secret, sizeof secret) != 1 ||
        mr_b64_encode(secret, sizeof secret, MR_B64_URL, enc, sizeof enc) != MR_OK) {
        OPENSSL_cleanse(secret, sizeof secret);
        return MR_EINTERNAL;
    }
    mr_hex(kid, sizeof kid, key_id);
    memcpy(token, MR_ITOKEN_PREFIX, 4);
    memcpy(token + 4, key_id, MR_ITOKEN_KEY_ID_LEN);
    token[4 + MR_ITOKEN_KEY_ID_LEN] = '_';
    memcpy(token + 5 + MR_ITOKEN_KEY_ID_LEN, enc, MR_ITOKEN_SECRET_LEN);
    token[MR_ITOKEN_LEN] = '\0';
    mr_itoken_hash_hex(token, MR_ITOKEN_LEN, hash_hex);
    OPENSSL_cleanse(secret, sizeof secret);
    OPENSSL_cleanse(enc, sizeof enc);
    if (!hash_hex[0]) {
        OPENSSL_cleanse(token, MR_ITOKEN_LEN + 1);
        key_id[0] = '\0';
        return MR_EINTERNAL;
    }
    return MR_OK;
}

mr_err mr_itoken_parse(const char *s, size_t len, char key_id[MR_ITOKEN_KEY_ID_LEN + 1])
{
    key_id[0] = '\0';
    if (!s || len != MR_ITOKEN_LEN || memcmp(s, MR_ITOKEN_PREFIX, 4) != 0 ||
        s[4 + MR_ITOKEN_KEY_ID_LEN] != '_')
        return MR_EAUTH;
    for (size_t i = 4; i < 4 + MR_ITOKEN_KEY_ID_LEN; i++)
        if (hex_value(s[i]) < 0)
            return MR_EAUTH;
    /* The secret must be the one canonical base64url text of 32 bytes. */
    unsigned char raw[32];
    size_t n = 0;
    mr_err e = mr_b64_decode(s + 5 + MR_ITOKEN_KEY_ID_LEN, MR_ITOKEN_SECRET_LEN, MR_B64_URL, raw,
                             sizeof raw, &n);
    OPENSSL_cleanse(raw, sizeof raw);
    if (e != MR_OK || n != sizeof raw)
        return MR_EAUTH;
    memcpy(key_id, s + 4, MR_ITOKEN_KEY_ID_LEN);
    key_id[MR_ITOKEN_KEY_ID_LEN] = '\0';
    return MR_OK;
}

int mr_itoken_verify(const char *s, size_t len, const char *stored_hex)
{
    unsigned char want[SHA256_DIGEST_LENGTH], got[SHA256_DIGEST_LENGTH];
    if (!stored_hex || strlen(stored_hex) != MR_ITOKEN_HASH_HEX_LEN)
        return 0;
    for (size_t i = 0; i < sizeof want; i++) {
        int hi = hex_value(stored_hex[2 * i]), lo = hex_value(stored_hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return 0;
        want[i] = (unsigned char)(hi << 4 | lo);
    }
    if (!SHA256((const unsigned char *)s, len, got))
        return 0;
    return mr_ct_equal(got, sizeof got, want, sizeof want);
}
