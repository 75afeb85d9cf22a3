/* mr_itoken.h: an instance's credential for talking to the control plane.
 *
 * A token is "mri_<key id>_<secret>": the key id is 16 lowercase hex digits (64
 * random bits, public: it names the credential's row), the secret 43 base64url
 * characters (256 random bits). nginx rate-limits per whole token of exactly the
 * shape mr_itoken_parse accepts (the maps in nginx/dev.conf and
 * nginx/mindroom.conf: keep them in step). The lifecycle worker generates one per
 * instance and delivers it in the app's environment
 * (MINDROOM_CONTROL_PLANE_TOKEN); PostgreSQL keeps its key id and the SHA-256 of
 * the whole token (public.instance_tokens), and the token itself only sealed
 * (instance_secrets). A high-entropy token needs no slow hash: SHA-256 is enough.
 * track-usage parses a presented token, finds the row by key id and compares the
 * hashes in constant time. */
#ifndef MR_ITOKEN_H
#define MR_ITOKEN_H

#include <stddef.h>
#include "mr_common.h"

#define MR_ITOKEN_PREFIX "mri_"
#define MR_ITOKEN_KEY_ID_LEN 16
#define MR_ITOKEN_SECRET_LEN 43
#define MR_ITOKEN_LEN (4 + MR_ITOKEN_KEY_ID_LEN + 1 + MR_ITOKEN_SECRET_LEN)
#define MR_ITOKEN_HASH_HEX_LEN 64

/* Generates a new token from the system's randomness (OpenSSL's RAND_bytes).
 * Fills token, key_id and hash_hex (lowercase SHA-256 of token), all
 * NUL-terminated and caller-owned. Returns MR_OK, or MR_EINTERNAL when no
 * randomness could be had (nothing usable is left in the buffers). The caller
 * wipes token when done with it. */
mr_err mr_itoken_generate(char token[MR_ITOKEN_LEN + 1], char key_id[MR_ITOKEN_KEY_ID_LEN + 1],
                          char hash_hex[MR_ITOKEN_HASH_HEX_LEN + 1]);

/* Checks that the len bytes at s have a token's shape and copies its key id into
 * key_id. Returns MR_OK, or MR_EAUTH for anything else (a JWT, an API key, a
 * token of another length or alphabet). Reads no byte past len. */
mr_err mr_itoken_parse(const char *s, size_t len, char key_id[MR_ITOKEN_KEY_ID_LEN + 1]);

/* The lowercase hex SHA-256 of the len bytes at s, into hash_hex ("" when OpenSSL
 * cannot compute it: no provider). */
void mr_itoken_hash_hex(const char *s, size_t len, char hash_hex[MR_ITOKEN_HASH_HEX_LEN + 1]);

/* 1 when SHA-256(s) equals the stored lowercase hex hash, compared in constant
 * time (the time depends on neither value); 0 otherwise, also for a stored hash
 * that is not 64 lowercase hex digits. */
int mr_itoken_verify(const char *s, size_t len, const char *stored_hex);

#endif
