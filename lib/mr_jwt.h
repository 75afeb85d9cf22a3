/* mr_jwt.h: HS256 JSON Web Tokens exactly as Supabase's legacy JWT secret makes them.
 *
 * Only alg HS256 is accepted (none, HS384, RS256... are rejected before any
 * signature work); the signature is compared in constant time; `exp` in the
 * past and `nbf` in the future are rejected (no leeway unless configured). */
#ifndef MR_JWT_H
#define MR_JWT_H

#include <stddef.h>
#include <time.h>
#include "mr_common.h"

#define MR_JWT_MAX_TOKEN 8192

typedef struct {
    char role[64];      /* "service_role", "authenticated", "anon"... */
    char sub[64];       /* user id (uuid) or "" */
    char *claims_json;  /* the verified payload, compact JSON; owned, free with mr_jwt_claims_free */
} mr_jwt_claims;

/* Verifies `token` (the part after "Bearer ") with `secret` at time `now`.
 * Returns MR_OK and fills *out (caller frees with mr_jwt_claims_free), or
 * MR_EAUTH with err saying why ("expired", "bad signature", "alg not allowed"...). */
mr_err mr_jwt_verify(const char *token, const unsigned char *secret, size_t secret_len,
                     time_t now, long leeway_s, mr_jwt_claims *out, char *err, size_t errlen);

/* The same, accepting a signature by either `secret` or `previous` (NULL or
 * length 0: none), for rotating SUPABASE_JWT_SECRET without downtime
 * (SUPABASE_JWT_SECRET_PREVIOUS). Every other check is unchanged. */
mr_err mr_jwt_verify2(const char *token, const unsigned char *secret, size_t secret_len,
                      const unsigned char *previous, size_t previous_len, time_t now,
                      long leeway_s, mr_jwt_claims *out, char *err, size_t errlen);

void mr_jwt_claims_free(mr_jwt_claims *c);

/* Signs a JSON payload object text with HS256. Returns a malloc'd token the
 * caller frees, or NULL on allocation failure. For tests and mindroomctl. */
char *mr_jwt_sign(const char *payload_json, const unsigned char *secret, size_t secret_len);

/* base64url without padding. Returns bytes written, or -1 when out is too small
 * / input malformed. Exposed for tests and the Stripe module's neighbours. */
long mr_b64url_encode(const unsigned char *in, size_t len, char *out, size_t cap);
long mr_b64url_decode(const char *in, size_t len, unsigned char *out, size_t cap);

#endif
