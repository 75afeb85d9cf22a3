/* mr_jwks.h: a project's public signing keys (a JWKS document, RFC 7517) and
 * the per-process cache that decides when to fetch them again.
 *
 * Keys kept from a document: kty "EC" on crv "P-256" (ES256) and kty "RSA" of
 * at least 2048 bits (RS256), each with a kid, "use" absent or "sig", "alg"
 * absent or the one its type allows. Anything else (an "oct" secret, another
 * curve, an encryption key) is skipped: a symmetric key is never taken from a
 * JWKS, so an HS256 token can never be checked against a public key.
 *
 * The cache does no I/O: mr_jwks_cache_should_fetch says whether a fetch is due,
 * the caller fetches (mr_auth.c, with mr_httpc) and hands the outcome to
 * mr_jwks_cache_store, then asks mr_jwks_cache_key. Times are monotonic
 * milliseconds (mr_now_ms()). The rules:
 *   - keys are fresh for ttl after the last successful fetch; then refetched;
 *   - a kid not in the set triggers a refetch, but fetches (of any cause) are at
 *     least `refetch` apart, so a flood of made-up kids costs one fetch per
 *     interval;
 *   - when fetching fails, the last keys keep being served until `stale` after
 *     the first failed fetch since they stopped being fresh (an idle worker's
 *     old keys get the whole bound when its first fetch fails); then, and
 *     before any fetch ever succeeded, the answer is MR_ETRANSIENT (503). */
#ifndef MR_JWKS_H
#define MR_JWKS_H

#include <stddef.h>
#include <stdint.h>
#include <openssl/evp.h>
#include "mr_common.h"

#define MR_JWKS_MAX_KEYS 16
#define MR_JWKS_MAX_DOC 65536  /* bytes of a JWKS document accepted */

typedef struct mr_jwks mr_jwks;

/* Parses a JWKS document of `len` bytes. Returns MR_OK with *out (free with
 * mr_jwks_free; zero usable keys is a valid set), or MR_EINVAL with err saying
 * why (not JSON, no "keys" array, a key given twice, a duplicate JSON member,
 * more than MR_JWKS_MAX_KEYS usable keys). */
mr_err mr_jwks_parse(const char *json, size_t len, mr_jwks **out, char *err, size_t errlen);
void mr_jwks_free(mr_jwks *set);

/* Number of usable keys in the set. */
size_t mr_jwks_count(const mr_jwks *set);

/* The public key with this kid, or NULL. Owned by the set. */
EVP_PKEY *mr_jwks_find(const mr_jwks *set, const char *kid);

typedef struct {
    int64_t ttl_ms;      /* fresh this long after a successful fetch */
    int64_t refetch_ms;  /* at least this long between two fetch attempts */
    int64_t stale_ms;    /* served this long past ttl while fetches fail */
} mr_jwks_policy;

typedef struct mr_jwks_cache mr_jwks_cache;

/* An empty cache with `policy`. Returns NULL when out of memory; free with
 * mr_jwks_cache_free. */
mr_jwks_cache *mr_jwks_cache_new(const mr_jwks_policy *policy);
void mr_jwks_cache_free(mr_jwks_cache *c);

/* 1 when a fetch should be attempted now to answer for `kid` (no keys yet,
 * keys no longer fresh, or kid unknown) and the last attempt is at least
 * `refetch` ago; else 0. */
int mr_jwks_cache_should_fetch(const mr_jwks_cache *c, const char *kid, int64_t now_ms);

/* Records a fetch attempt at now_ms: `doc` (len bytes) is the body of a 200
 * answer, or NULL when the fetch failed. A document that does not parse counts
 * as a failure and the keys already held stay. Returns MR_OK when new keys were
 * taken, else MR_EINVAL / MR_ETRANSIENT with err saying why (for the log). */
mr_err mr_jwks_cache_store(mr_jwks_cache *c, const char *doc, size_t len, int64_t now_ms,
                           char *err, size_t errlen);

/* The key for `kid`: MR_OK with *key (owned by the cache, valid until the next
 * store), MR_EAUTH when the current keys do not hold kid, MR_ETRANSIENT when
 * there are no keys to trust (none fetched yet, or stale past the bound, or
 * the kid is unknown and the refetch that should have found it failed). */
mr_err mr_jwks_cache_key(const mr_jwks_cache *c, const char *kid, int64_t now_ms,
                         EVP_PKEY **key, char *err, size_t errlen);

#endif
