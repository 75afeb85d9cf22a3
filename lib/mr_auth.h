/* mr_auth.h: who is calling, from the request's Authorization and apikey
 * headers, as Supabase clients send them.
 *
 * Credentials, in this order (the first present one decides; nothing falls
 * through to another on failure):
 *   1. Authorization: Bearer <x>. Any other scheme is refused.
 *   2. apikey: <x>, when there is no Authorization header.
 * An <x> starting with "sb_" is an API key, never parsed as a JWT:
 *   sb_secret_...       equal (constant time) to one of SUPABASE_SECRET_KEYS:
 *                       the service_role identity, except from a browser
 *                       (User-Agent "Mozilla/..."): 401, as Supabase refuses it
 *   sb_publishable_...  equal to one of SUPABASE_PUBLISHABLE_KEYS: the anon
 *                       identity (which every function refuses with 403)
 * anything else is a JWT, accepted by its alg as the mode allows:
 *   HS256  signed with MINDROOM_INTERNAL_SECRET (every mode; exp at most
 *          MR_AUTH_INTERNAL_MAX_S ahead), or with SUPABASE_JWT_SECRET /
 *          SUPABASE_JWT_SECRET_PREVIOUS (modes legacy and both)
 *   ES256, RS256  (modes jwks and both) a key of the project's JWKS named by
 *          kid, of the alg's type; iss must be the project's issuer; a token of
 *          role authenticated must have aud "authenticated"
 * exp is required and nbf honoured everywhere, with MR_JWT_LEEWAY_S of skew.
 * A user JWT with a publishable apikey (supabase-js with a session) is the
 * user: Authorization wins.
 *
 * Environment (read by mr_auth_from_env, once, before fork):
 *   SUPABASE_AUTH_MODE          legacy (default) | jwks | both
 *   SUPABASE_JWT_SECRET         legacy, both: required, >= 32 characters
 *   SUPABASE_JWT_SECRET_PREVIOUS  optional second legacy secret (rotation)
 *   SUPABASE_URL                jwks, both: the project URL; gives the defaults
 *   SUPABASE_JWKS_URL           default <SUPABASE_URL>/auth/v1/.well-known/jwks.json
 *   SUPABASE_JWT_ISSUER         default <SUPABASE_URL>/auth/v1
 *   SUPABASE_JWKS_TTL_S (600), SUPABASE_JWKS_REFETCH_S (30),
 *   SUPABASE_JWKS_STALE_S (3600), SUPABASE_JWKS_TIMEOUT_MS (2000): mr_jwks.h
 *   SUPABASE_SECRET_KEYS, SUPABASE_PUBLISHABLE_KEYS  comma-separated (rotation)
 *   MINDROOM_INTERNAL_SECRET    optional, >= 32 characters
 *   MR_JWT_LEEWAY_S             0..300, default 30 */
#ifndef MR_AUTH_H
#define MR_AUTH_H

#include <stddef.h>
#include <time.h>
#include "mr_common.h"
#include "mr_http.h"
#include "mr_jwks.h"

/* Tokens signed with MINDROOM_INTERNAL_SECRET may not live longer than this. */
#define MR_AUTH_INTERNAL_MAX_S 86400

typedef enum { MR_KEYS_LEGACY, MR_KEYS_JWKS, MR_KEYS_BOTH } mr_auth_keymode;

typedef struct mr_auth mr_auth;

/* Reads and checks the settings above. Returns MR_OK with *out (free with
 * mr_auth_free), or MR_EINVAL with err naming the variable (never a value). */
mr_err mr_auth_from_env(mr_auth **out, char *err, size_t errlen);
void mr_auth_free(mr_auth *a);

mr_auth_keymode mr_auth_keys_mode(const mr_auth *a);

/* The JWKS cache (NULL in legacy mode), owned by a. Exposed for tests, which
 * store a document in it instead of serving one. */
mr_jwks_cache *mr_auth_jwks(mr_auth *a);

/* Identifies the caller from the raw header values (NULL or "" when absent;
 * user_agent only decides whether a secret key comes from a browser) at
 * wall-clock time `now`, fetching the JWKS with `http` when the cache asks for
 * it (http NULL: a fetch fails). Returns MR_OK with *who filled (claims_json
 * malloc'd: the caller frees it), MR_EAUTH (401) or MR_ETRANSIENT (503, the
 * signing keys cannot be had) with err saying why; never a secret in err. */
mr_err mr_auth_identify(mr_auth *a, mr_httpc *http, const char *authorization,
                        const char *apikey, const char *user_agent, time_t now,
                        mr_identity *who, char *err, size_t errlen);

#endif
