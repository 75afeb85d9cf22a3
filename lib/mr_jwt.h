/* mr_jwt.h: JSON Web Tokens as Supabase makes them: HS256 (the legacy JWT
 * secret, and MINDROOM_INTERNAL_SECRET), ES256 and RS256 (JWT signing keys,
 * public keys from the project's JWKS, see mr_jwks.h).
 *
 * A token is checked in this order: size and shape, the header (alg, kid;
 * duplicate keys refused), the signature over the exact "<header>.<payload>"
 * bytes, and only then the payload is parsed (duplicate keys refused at any
 * depth), its times and its issuer and audience checked. The algorithm is the
 * caller's decision (mr_auth.c): the header only says which check to try.
 *
 * The claims handed on (mr_jwt_claims.claims_json, which becomes PostgreSQL's
 * request.jwt.claims) are rebuilt from the checked fields, never the payload
 * text: what SQL sees is exactly what was verified. */
#ifndef MR_JWT_H
#define MR_JWT_H

#include <stddef.h>
#include <time.h>
#include <openssl/evp.h>
#include "mr_common.h"

#define MR_JWT_MAX_TOKEN 8192

typedef struct {
    char role[64];      /* "service_role", "authenticated", "anon"... */
    char sub[64];       /* user id (uuid) or "" */
    int oauth_client;   /* 1 when the token names a client_id: Supabase Auth's OAuth 2.1
                           server issued it to a third-party app the user authorised */
    char *claims_json;  /* the verified claims, compact JSON; owned, free with mr_jwt_claims_free */
} mr_jwt_claims;

/* A token cut at its dots, with its header read. Pointers point into the token
 * the caller passed (valid as long as it is). */
typedef struct {
    const char *token;
    size_t signing_len;      /* bytes of "<header>.<payload>": the signed input */
    const char *payload;     /* base64url payload segment */
    size_t payload_len;
    const char *sig;         /* base64url signature segment */
    size_t sig_len;
    char alg[16];            /* the header's alg; a longer one is refused at split */
    char kid[128];           /* the header's kid, "" when absent */
} mr_jwt_parts;

/* What the payload must satisfy besides a signature. */
typedef struct {
    long leeway_s;           /* allowed clock skew on exp and nbf */
    const char *issuer;      /* iss must equal it; NULL: not checked */
    const char *user_audience; /* a token with role "authenticated" must name it in
                                  aud (string, or array holding it); NULL: not checked */
    long max_lifetime_s;     /* exp may lie at most this far after now; 0: no bound */
} mr_jwt_rules;

/* Cuts `token` into its parts and reads the header (a JSON object with a
 * string alg, an optional string kid, no duplicate keys). Returns MR_OK, or
 * MR_EAUTH with err saying why. Nothing is allocated. */
mr_err mr_jwt_split(const char *token, mr_jwt_parts *out, char *err, size_t errlen);

/* 1 when the token's signature is HMAC-SHA256 of its signing input under
 * `secret` (compared in constant time), else 0. Does not look at alg. */
int mr_jwt_hs256_ok(const mr_jwt_parts *p, const unsigned char *secret, size_t secret_len);

/* Checks the signature with a public key: alg "ES256" (P-256 key; the JWS
 * signature is the raw 64-byte r||s of RFC 7518 3.4, not DER) or "RS256" (RSA
 * key, PKCS#1 v1.5, SHA-256). The key's type must suit alg. Returns MR_OK, or
 * MR_EAUTH ("bad signature", "alg does not match the key"...). */
mr_err mr_jwt_verify_pkey(const mr_jwt_parts *p, const char *alg, EVP_PKEY *key,
                          char *err, size_t errlen);

/* Parses the payload of an already verified token and checks it against
 * `rules` at time `now`: exp required, nbf optional, both numbers; role a
 * string; sub, if present, a string. Returns MR_OK and fills *out (free with
 * mr_jwt_claims_free), or MR_EAUTH with err saying why and *out zeroed. */
mr_err mr_jwt_read_claims(const mr_jwt_parts *p, const mr_jwt_rules *rules, time_t now,
                          mr_jwt_claims *out, char *err, size_t errlen);

/* HS256 in one call: alg must be HS256 and the signature must match `secret`
 * or, when given (length > 0), `previous` (SUPABASE_JWT_SECRET_PREVIOUS,
 * during a rotation); then mr_jwt_read_claims with only a leeway. Returns
 * MR_OK and fills *out (caller frees with mr_jwt_claims_free), or MR_EAUTH
 * with err saying why ("expired", "bad signature", "alg not allowed"...). */
mr_err mr_jwt_verify(const char *token, const unsigned char *secret, size_t secret_len,
                     time_t now, long leeway_s, mr_jwt_claims *out, char *err, size_t errlen);
mr_err mr_jwt_verify2(const char *token, const unsigned char *secret, size_t secret_len,
                      const unsigned char *previous, size_t previous_len, time_t now,
                      long leeway_s, mr_jwt_claims *out, char *err, size_t errlen);

void mr_jwt_claims_free(mr_jwt_claims *c);

/* Signs a JSON payload object text with HS256. Returns a malloc'd token the
 * caller frees, or NULL on allocation failure. For tests and mindroomctl. */
char *mr_jwt_sign(const char *payload_json, const unsigned char *secret, size_t secret_len);

/* base64url without padding: mr_b64 with MR_B64_URL, returning the length. Returns
 * bytes written, or -1 when out is too small / input malformed. */
long mr_b64url_encode(const unsigned char *in, size_t len, char *out, size_t cap);
long mr_b64url_decode(const char *in, size_t len, unsigned char *out, size_t cap);

#endif
