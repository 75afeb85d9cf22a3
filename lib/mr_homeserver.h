/* mr_homeserver.h: a Matrix homeserver's (Synapse's) per-instance secrets.
 *
 * Generated once per instance by the control plane, kept sealed (mr_secrets),
 * and handed to the dokku-provisioner, which writes them into the
 * homeserver's storage before its first deploy:
 *
 *   signing key        Synapse's signing key file, one line:
 *                      "ed25519 <key id> <seed, standard base64 without padding>"
 *                      (the format of signedjson's write_signing_keys; the key id
 *                      is "a_" and four letters, as Synapse generates it)
 *   registration_shared_secret, macaroon_secret_key, form_secret
 *                      32 random bytes each, base64url without padding (43 characters)
 *
 * The signing key is the homeserver's identity for federation: generate it
 * once and never replace it. */
#ifndef MR_HOMESERVER_H
#define MR_HOMESERVER_H

#include <stddef.h>
#include "mr_common.h"

#define MR_HS_SEED_LEN 32
#define MR_HS_SECRET_LEN 43          /* 32 bytes, base64url, unpadded */
#define MR_HS_KEY_ID_MAX 32
#define MR_HS_SIGNING_KEY_MAX 96     /* "ed25519 " + id + " " + 43 + NUL, with room */
#define MR_HS_SECRET_MIN 32
#define MR_HS_SECRET_MAX 128

typedef struct {
    char signing_key[MR_HS_SIGNING_KEY_MAX];   /* the file's one line, no newline */
    char key_id[MR_HS_KEY_ID_MAX + 1];         /* "a_AbCd" */
    char verify_key[48];                       /* public key, standard base64 unpadded */
    char registration_shared_secret[MR_HS_SECRET_LEN + 1];
    char macaroon_secret_key[MR_HS_SECRET_LEN + 1];
    char form_secret[MR_HS_SECRET_LEN + 1];
} mr_homeserver_secrets;

/* Fills *out with fresh secrets from OpenSSL's CSPRNG. Returns MR_OK, or
 * MR_EINTERNAL with err filled. Wipe with mr_homeserver_wipe when done. */
mr_err mr_homeserver_generate(mr_homeserver_secrets *out, char *err, size_t errlen);

/* The signing key line and verify key of a given seed and key id. line gets
 * at most MR_HS_SIGNING_KEY_MAX bytes, verify 48. Returns MR_OK, MR_EINVAL
 * (bad key id) or MR_EINTERNAL. */
mr_err mr_homeserver_signing_key(const unsigned char seed[MR_HS_SEED_LEN], const char *key_id,
                                 char *line, size_t linecap, char *verify, size_t verifycap);

/* Parses a signing key line (one optional trailing "\n"). Returns MR_OK with
 * the seed and key id (idcap bytes, NUL included), else MR_EINVAL. */
mr_err mr_homeserver_parse_signing_key(const char *line, size_t len,
                                       unsigned char seed[MR_HS_SEED_LEN], char *key_id,
                                       size_t idcap);

/* 1 when s is an acceptable shared secret: MR_HS_SECRET_MIN..MR_HS_SECRET_MAX
 * characters of [A-Za-z0-9._~+/=-] (the generated ones, hex, or base64). */
int mr_homeserver_valid_secret(const char *s);

/* 1 when s is a key id Synapse accepts: [A-Za-z0-9_], 1..MR_HS_KEY_ID_MAX. */
int mr_homeserver_valid_key_id(const char *s);

/* Wipes *s. */
void mr_homeserver_wipe(mr_homeserver_secrets *s);

#endif
