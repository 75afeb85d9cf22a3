/* mr_secrets.h: tenant secrets at rest, AES-256-GCM under MINDROOM_SECRETS_KEY.
 *
 * A keyring holds the current key and up to MR_SECRETS_MAX_PREVIOUS earlier
 * ones. Every key is 32 random bytes, given base64-encoded (`openssl rand
 * -base64 32`). Nothing is used raw: HKDF-SHA256 derives from each key
 *
 *   its key id  (4 bytes, shown as 8 hex)  info "mindroom-secrets v1 kid"
 *   an AEAD key (32 bytes)                 info "mindroom-secrets v1 aead"
 *   a digest key (32 bytes)                info "mindroom-secrets v1 digest"
 *
 * Ciphertext (text, safe for any column):
 *
 *   mrs1:<kid>:<base64url, unpadded: nonce(12) || ciphertext || tag(16)>
 *
 * sealed with the current key, a fresh random nonce each time, and additional
 * data "mrs1:<kid>:" || context, where the caller's context names what the
 * value is and whose (e.g. "instance/<uuid>/HOMESERVER_FORM_SECRET"): a
 * ciphertext copied to another row or field fails to open. Opening looks the
 * kid up among all loaded keys, so a rotation is: load the new key as
 * current and the old one as previous, re-seal everything (mr_secrets_reseal),
 * then drop the old key.
 *
 * Digest (for change detection of plaintext, e.g. an app's environment):
 *
 *   mrd1:<kid>:<64 hex of HMAC-SHA256(digest key, context || 0x00 || plaintext)>
 *
 * A digest is compared under the key its kid names, not under the current
 * key, so rotating the key never changes the verdict "unchanged" and never
 * redeploys anything; the rotation pass re-tags stale digests as it re-seals.
 * A digest that never changed key would survive rotation without that pass,
 * but it would also make a leaked key useful forever against every stored
 * digest (a low-entropy value can be guessed offline); tying it to the
 * rotating key keeps rotation meaningful for digests too. */
#ifndef MR_SECRETS_H
#define MR_SECRETS_H

#include <stddef.h>
#include "mr_common.h"

#define MR_SECRETS_KEY_LEN 32
#define MR_SECRETS_MAX_PREVIOUS 3
#define MR_SECRETS_KID_HEX 8
#define MR_SECRETS_NONCE_LEN 12
#define MR_SECRETS_TAG_LEN 16
/* "mrd1:" kid ":" 64 hex */
#define MR_SECRETS_DIGEST_LEN (5 + MR_SECRETS_KID_HEX + 1 + 64)
/* A ciphertext longer than this is refused before any work (1 MiB of plaintext). */
#define MR_SECRETS_MAX_PLAINTEXT (1u << 20)

typedef struct mr_secrets mr_secrets;

/* Builds a keyring from base64 text: current (required) and previous (NULL
 * or "" for none, else up to MR_SECRETS_MAX_PREVIOUS keys separated by ',').
 * Each key must decode (standard alphabet, padded) to exactly 32 bytes, and
 * no two keys may share a key id. Returns MR_OK with *out (free with
 * mr_secrets_free), or MR_EINVAL with err naming which key is wrong (never
 * its value). */
mr_err mr_secrets_new(const char *current, const char *previous, mr_secrets **out,
                      char *err, size_t errlen);

/* mr_secrets_new from MINDROOM_SECRETS_KEY and MINDROOM_SECRETS_KEY_PREVIOUS.
 * A missing current key is an error, like a short or malformed one: callers
 * refuse to start without it. */
mr_err mr_secrets_load_env(mr_secrets **out, char *err, size_t errlen);

/* Wipes and frees a keyring; NULL is fine. */
void mr_secrets_free(mr_secrets *k);

/* The current key's id: 8 lowercase hex characters, owned by k. */
const char *mr_secrets_kid(const mr_secrets *k);

/* 1 when kid (a key id as a ciphertext or digest names it: 8 lowercase hex) is the
 * id of one of the loaded keys, current or previous, else 0. */
int mr_secrets_has_kid(const mr_secrets *k, const char *kid);

/* The context an instance's secret is sealed and digested for (instance_secrets:
 * "instance/<uuid>/<kind>/<name>", the uuid in lower case however it is given), so a
 * ciphertext opens only for its own row.
 * Returns 0, or -1 when it does not fit in cap. */
#define MR_SECRETS_CONTEXT_MAX 400 /* "instance/" uuid "/" kind "/" a 255-byte name */
int mr_secrets_instance_context(char *out, size_t cap, const char *instance_id, const char *kind,
                                const char *name);

/* Seals len bytes of pt under the current key. Returns MR_OK with *out a
 * malloc'd NUL-terminated ciphertext the caller frees, or MR_EINVAL (plaintext
 * over MR_SECRETS_MAX_PLAINTEXT) / MR_EINTERNAL (OpenSSL or memory). */
mr_err mr_secrets_seal(const mr_secrets *k, const char *context, const void *pt, size_t len,
                       char **out, char *err, size_t errlen);

/* Opens a ciphertext sealed for context with any loaded key. Returns MR_OK
 * with *pt (malloc'd, len bytes plus a NUL the length does not count; the
 * caller wipes and frees it) or MR_EINVAL: malformed, unknown key id, or
 * failed authentication (tampered, wrong key, wrong context): one message,
 * "cannot open", for all of them after the parse. */
mr_err mr_secrets_open(const mr_secrets *k, const char *context, const char *ct, size_t ctlen,
                       unsigned char **pt, size_t *len, char *err, size_t errlen);

/* 1 when ct is sealed with the current key (nothing to re-seal), else 0. */
int mr_secrets_is_current(const mr_secrets *k, const char *ct, size_t ctlen);

/* Opens ct with any loaded key and seals it again with the current key.
 * Returns as mr_secrets_open / mr_secrets_seal; *out is malloc'd. */
mr_err mr_secrets_reseal(const mr_secrets *k, const char *context, const char *ct,
                         size_t ctlen, char **out, char *err, size_t errlen);

/* The parts of a ciphertext, for the parser's tests and fuzzing. */
typedef struct {
    char kid[MR_SECRETS_KID_HEX + 1];
    unsigned char nonce[MR_SECRETS_NONCE_LEN];
    const unsigned char *body;  /* ciphertext || tag, points into raw */
    size_t body_len;            /* at least MR_SECRETS_TAG_LEN */
} mr_secrets_parts;

/* Parses ct without any key. raw (rawcap bytes) receives the decoded payload
 * that parts->body points into. Returns MR_OK or MR_EINVAL. */
mr_err mr_secrets_parse(const char *ct, size_t ctlen, unsigned char *raw, size_t rawcap,
                        mr_secrets_parts *parts);

/* Writes the digest of pt for context under the current key into
 * out[MR_SECRETS_DIGEST_LEN + 1]. Returns MR_OK or MR_EINTERNAL. */
mr_err mr_secrets_digest(const mr_secrets *k, const char *context, const void *pt, size_t len,
                         char *out);

/* 1 when stored is the digest of pt for context under the loaded key it
 * names (compared in constant time), else 0 (also for an unknown key id or a
 * malformed digest). *stale (may be NULL) is set to 1 on a match under a key
 * that is not current: store a fresh mr_secrets_digest then. */
int mr_secrets_digest_matches(const mr_secrets *k, const char *context, const void *pt,
                              size_t len, const char *stored, int *stale);

/* The primitives, exported for known-answer tests. */
mr_err mr_secrets_hkdf(const unsigned char *ikm, size_t ikmlen, const unsigned char *salt,
                       size_t saltlen, const unsigned char *info, size_t infolen,
                       unsigned char *out, size_t outlen);
mr_err mr_secrets_gcm_seal(const unsigned char key[32], const unsigned char nonce[12],
                           const unsigned char *aad, size_t aadlen, const unsigned char *pt,
                           size_t len, unsigned char *ct, unsigned char tag[16]);
mr_err mr_secrets_gcm_open(const unsigned char key[32], const unsigned char nonce[12],
                           const unsigned char *aad, size_t aadlen, const unsigned char *ct,
                           size_t len, const unsigned char tag[16], unsigned char *pt);

#endif
