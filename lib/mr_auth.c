/* mr_auth.c: the caller's identity from Authorization / apikey (rules in
 * mr_auth.h): settings, API keys, which JWT check an alg gets, and fetching the
 * JWKS when the cache asks for it. */
#include "mr_auth.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mr_config.h"
#include "mr_httpc.h"
#include "mr_jwt.h"
#include "mr_log.h"
#include "mr_stripe.h"

#define MAX_API_KEYS 16
#define API_KEY_MIN_BODY 16 /* characters after the sb_..._ prefix */
#define USER_AUDIENCE "authenticated"

static const char SECRET_PREFIX[] = "sb_secret_";
static const char PUBLISHABLE_PREFIX[] = "sb_publishable_";

typedef struct {
    char *storage; /* the list, cut in place; keys[] point into it */
    const char *keys[MAX_API_KEYS];
    size_t n;
} key_list;

struct mr_auth {
    mr_auth_keymode mode;
    long leeway_s;
    const char *legacy, *previous, *internal; /* NULL when not configured */
    char *jwks_url, *issuer;                  /* jwks and both only */
    long fetch_timeout_ms;
    mr_jwks_cache *jwks;
    key_list secret_keys, publishable_keys;
};

/* ---- settings ------------------------------------------------------------ */

static const char *env(const char *name)
{
    const char *v = mr_config_getenv(name);
    return v && *v ? v : NULL;
}

/* An optional secret: NULL when unset, else it must pass mr_config_check_secret. */
static mr_err opt_secret(const char *name, size_t min_len, const char **out, char *err,
                         size_t errlen)
{
    *out = env(name);
    return *out ? mr_config_check_secret(name, *out, min_len, err, errlen) : MR_OK;
}

static mr_err int_setting(const char *name, int64_t def, int64_t min, int64_t max, long *out,
                          char *err, size_t errlen)
{
    int64_t v;
    mr_err e = mr_config_parse_int(name, env(name), def, min, max, &v, err, errlen);
    *out = (long)v;
    return e;
}

/* An http(s) URL without whitespace; trailing slashes dropped unless `exact` (an issuer
 * is compared with a token's `iss` as it is written). malloc'd copy. */
static mr_err url_setting(const char *name, const char *value, int exact, char **out, char *err,
                          size_t errlen)
{
    *out = NULL;
    if (strncmp(value, "http://", 7) != 0 && strncmp(value, "https://", 8) != 0)
        return mr_seterr(err, errlen, MR_EINVAL, "%s must be an http:// or https:// URL", name);
    for (const char *c = value; *c; c++)
        if (*c <= ' ' || *c == 0x7f)
            return mr_seterr(err, errlen, MR_EINVAL, "%s contains whitespace or control characters",
                             name);
    size_t n = strlen(value);
    while (!exact && n > 0 && value[n - 1] == '/')
        n--;
    *out = strndup(value, n);
    return *out ? MR_OK : mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
}

/* "<SUPABASE_URL><suffix>", or the explicit setting `name` when given (as it is, when
 * `exact`). */
static mr_err derived_url(const char *name, const char *base, const char *suffix, int exact,
                          char **out, char *err, size_t errlen)
{
    const char *v = env(name);
    if (v)
        return url_setting(name, v, exact, out, err, errlen);
    if (!base)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "SUPABASE_URL (or %s) is required with SUPABASE_AUTH_MODE jwks or both", name);
    size_t n = strlen(base) + strlen(suffix) + 1;
    *out = malloc(n);
    if (!*out)
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    snprintf(*out, n, "%s%s", base, suffix);
    return MR_OK;
}

/* A comma-separated list of API keys, each with `prefix` and enough after it. */
static mr_err key_list_setting(const char *name, const char *prefix, key_list *out, char *err,
                               size_t errlen)
{
    char why[160];
    const char *v = env(name);
    memset(out, 0, sizeof(*out));
    if (!v)
        return MR_OK;
    if (mr_stripe_parse_secrets(v, &out->storage, out->keys, MAX_API_KEYS, &out->n, why,
                                sizeof(why)) != MR_OK)
        return mr_seterr(err, errlen, MR_EINVAL, "%s: %s", name, why);
    size_t plen = strlen(prefix);
    for (size_t i = 0; i < out->n; i++) {
        const char *k = out->keys[i];
        if (strncmp(k, prefix, plen) != 0)
            return mr_seterr(err, errlen, MR_EINVAL, "%s: key %zu does not start with %s", name,
                             i + 1, prefix);
        if (strlen(k) < plen + API_KEY_MIN_BODY)
            return mr_seterr(err, errlen, MR_EINVAL, "%s: key %zu is too short", name, i + 1);
        if (mr_config_check_secret(name, k, 0, why, sizeof(why)) != MR_OK)
            return mr_seterr(err, errlen, MR_EINVAL, "%s: key %zu contains control characters",
                             name, i + 1);
    }
    return MR_OK;
}

static mr_err load(mr_auth *a, char *err, size_t errlen)
{
    const char *mode = env("SUPABASE_AUTH_MODE");
    mr_err e;
    if (!mode || strcmp(mode, "legacy") == 0)
        a->mode = MR_KEYS_LEGACY;
    else if (strcmp(mode, "jwks") == 0)
        a->mode = MR_KEYS_JWKS;
    else if (strcmp(mode, "both") == 0)
        a->mode = MR_KEYS_BOTH;
    else
        return mr_seterr(err, errlen, MR_EINVAL, "SUPABASE_AUTH_MODE must be legacy, jwks or both");

    if ((e = int_setting("MR_JWT_LEEWAY_S", 30, 0, 300, &a->leeway_s, err, errlen)) != MR_OK ||
        (e = opt_secret("MINDROOM_INTERNAL_SECRET", 32, &a->internal, err, errlen)) != MR_OK ||
        (e = key_list_setting("SUPABASE_SECRET_KEYS", SECRET_PREFIX, &a->secret_keys, err,
                              errlen)) != MR_OK ||
        (e = key_list_setting("SUPABASE_PUBLISHABLE_KEYS", PUBLISHABLE_PREFIX,
                              &a->publishable_keys, err, errlen)) != MR_OK)
        return e;

    if (a->mode != MR_KEYS_JWKS) {
        a->legacy = env("SUPABASE_JWT_SECRET");
        if ((e = mr_config_check_secret("SUPABASE_JWT_SECRET", a->legacy, 32, err, errlen)) != MR_OK ||
            (e = opt_secret("SUPABASE_JWT_SECRET_PREVIOUS", 32, &a->previous, err, errlen)) != MR_OK)
            return e;
    }
    if (a->mode == MR_KEYS_LEGACY)
        return MR_OK;

    char *base = NULL;
    const char *url = env("SUPABASE_URL");
    if (url && (e = url_setting("SUPABASE_URL", url, 0, &base, err, errlen)) != MR_OK)
        return e;
    e = derived_url("SUPABASE_JWKS_URL", base, "/auth/v1/.well-known/jwks.json", 0, &a->jwks_url,
                    err, errlen);
    if (e == MR_OK)
        e = derived_url("SUPABASE_JWT_ISSUER", base, "/auth/v1", 1, &a->issuer, err, errlen);
    free(base);
    if (e != MR_OK)
        return e;

    long ttl, refetch, stale;
    if ((e = int_setting("SUPABASE_JWKS_TTL_S", 600, 1, 86400, &ttl, err, errlen)) != MR_OK ||
        (e = int_setting("SUPABASE_JWKS_REFETCH_S", 30, 1, 3600, &refetch, err, errlen)) != MR_OK ||
        (e = int_setting("SUPABASE_JWKS_STALE_S", 3600, 0, 7 * 86400, &stale, err, errlen)) != MR_OK ||
        (e = int_setting("SUPABASE_JWKS_TIMEOUT_MS", 2000, 100, 30000, &a->fetch_timeout_ms, err,
                         errlen)) != MR_OK)
        return e;
    mr_jwks_policy policy = {.ttl_ms = ttl * 1000, .refetch_ms = refetch * 1000,
                             .stale_ms = stale * 1000};
    a->jwks = mr_jwks_cache_new(&policy);
    return a->jwks ? MR_OK : mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
}

mr_err mr_auth_from_env(mr_auth **out, char *err, size_t errlen)
{
    mr_auth *a = calloc(1, sizeof(*a));
    *out = NULL;
    if (!a)
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    mr_err e = load(a, err, errlen);
    if (e != MR_OK) {
        mr_auth_free(a);
        return e;
    }
    *out = a;
    return MR_OK;
}

void mr_auth_free(mr_auth *a)
{
    if (!a)
        return;
    free(a->jwks_url);
    free(a->issuer);
    mr_jwks_cache_free(a->jwks);
    free(a->secret_keys.storage);
    free(a->publishable_keys.storage);
    free(a);
}

mr_auth_keymode mr_auth_keys_mode(const mr_auth *a)
{
    return a->mode;
}

mr_jwks_cache *mr_auth_jwks(mr_auth *a)
{
    return a->jwks;
}

/* ---- one request ---------------------------------------------------------- */

static mr_err set_identity(mr_identity *who, const char *role, const char *sub, int oauth_client,
                           char *claims, char *err, size_t errlen)
{
    if (!claims)
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    snprintf(who->role, sizeof(who->role), "%s", role);
    snprintf(who->sub, sizeof(who->sub), "%s", sub);
    who->oauth_client = oauth_client;
    who->claims_json = claims;
    return MR_OK;
}

/* 1 when key equals one of the list, compared in constant time against every
 * entry (no early exit: the time does not say which one matched). */
static int key_listed(const key_list *l, const char *key)
{
    int found = 0;
    size_t n = strlen(key);
    for (size_t i = 0; i < l->n; i++)
        found |= mr_ct_equal(l->keys[i], strlen(l->keys[i]), key, n);
    return found;
}

/* Whether a request comes from a browser, as Supabase's API gateway decides it
 * for secret keys: by its User-Agent. Every browser's starts "Mozilla/" (a
 * compatibility token no server-side client sends: curl, Node's fetch, Deno,
 * Python, Go name themselves), and a page's script cannot replace it in
 * Chromium or Safari. */
static int from_browser(const char *user_agent)
{
    return user_agent && strncmp(user_agent, "Mozilla/", 8) == 0;
}

/* An sb_ key: Supabase's API keys are opaque strings, never JWTs. */
static mr_err api_key(const mr_auth *a, const char *key, const char *user_agent, mr_identity *who,
                      char *err, size_t errlen)
{
    if (strncmp(key, SECRET_PREFIX, strlen(SECRET_PREFIX)) == 0 && key_listed(&a->secret_keys, key)) {
        /* A secret key bypasses RLS; in a browser it has leaked into a page (CORS
         * lets any page call here). Refused like Supabase does, without saying
         * more than that: the key is valid, and it must be rotated. */
        if (from_browser(user_agent))
            return mr_seterr(err, errlen, MR_EAUTH,
                             "secret API key used from a browser: secret keys are for servers "
                             "only (a browser sends the publishable key and the user's session)");
        return set_identity(who, "service_role", "", 0, strdup("{\"role\":\"service_role\"}"), err,
                            errlen);
    }
    if (strncmp(key, PUBLISHABLE_PREFIX, strlen(PUBLISHABLE_PREFIX)) == 0 &&
        key_listed(&a->publishable_keys, key))
        return set_identity(who, "anon", "", 0, strdup("{\"role\":\"anon\"}"), err, errlen);
    return mr_seterr(err, errlen, MR_EAUTH, "invalid API key");
}

/* Brings the JWKS up to date if the cache asks for it (at most one fetch). */
static void refresh_jwks(mr_auth *a, mr_httpc *http, const char *kid)
{
    if (!mr_jwks_cache_should_fetch(a->jwks, kid, mr_now_ms()))
        return;
    static const char *const headers[] = {"Accept: application/json", NULL};
    mr_httpc_req req = {.method = "GET", .url = a->jwks_url, .headers = headers,
                        .connect_timeout_ms = a->fetch_timeout_ms,
                        .timeout_ms = a->fetch_timeout_ms, .max_body = MR_JWKS_MAX_DOC};
    mr_httpc_resp resp = {0};
    char why[256];
    mr_err e = http ? mr_httpc_do(http, &req, &resp, why, sizeof(why))
                    : mr_seterr(why, sizeof(why), MR_ETRANSIENT, "no HTTP client");
    if (e == MR_OK && resp.status != 200)
        e = mr_seterr(why, sizeof(why), MR_ETRANSIENT, "HTTP %ld", resp.status);
    e = mr_jwks_cache_store(a->jwks, e == MR_OK ? resp.body : NULL, resp.body_len, mr_now_ms(),
                            e == MR_OK ? why : NULL, sizeof(why));
    mr_httpc_resp_free(&resp);
    if (e == MR_OK)
        mr_log(MR_LOG_INFO, "JWKS fetched from %s", a->jwks_url);
    else
        mr_log(MR_LOG_WARN, "JWKS fetch from %s failed: %s", a->jwks_url, why);
}

/* Which secret an HS256 token may be signed with, and what that implies. */
static mr_err hs256(const mr_auth *a, const mr_jwt_parts *p, mr_jwt_rules *rules, char *err,
                    size_t errlen)
{
    if (a->mode != MR_KEYS_JWKS &&
        (mr_jwt_hs256_ok(p, (const unsigned char *)a->legacy, strlen(a->legacy)) ||
         (a->previous && mr_jwt_hs256_ok(p, (const unsigned char *)a->previous, strlen(a->previous)))))
        return MR_OK;
    if (a->internal && mr_jwt_hs256_ok(p, (const unsigned char *)a->internal, strlen(a->internal))) {
        /* Our own tools' tokens: short-lived by rule, not by convention. */
        rules->max_lifetime_s = MR_AUTH_INTERNAL_MAX_S;
        return MR_OK;
    }
    if (a->mode == MR_KEYS_JWKS && !a->internal)
        return mr_seterr(err, errlen, MR_EAUTH, "invalid token: alg not allowed");
    return mr_seterr(err, errlen, MR_EAUTH, "invalid token: bad signature");
}

static mr_err asymmetric(mr_auth *a, mr_httpc *http, const mr_jwt_parts *p, mr_jwt_rules *rules,
                         char *err, size_t errlen)
{
    char why[160];
    EVP_PKEY *key;
    if (a->mode == MR_KEYS_LEGACY)
        return mr_seterr(err, errlen, MR_EAUTH, "invalid token: alg not allowed");
    if (!p->kid[0])
        return mr_seterr(err, errlen, MR_EAUTH, "invalid token: missing kid");
    refresh_jwks(a, http, p->kid);
    mr_err e = mr_jwks_cache_key(a->jwks, p->kid, mr_now_ms(), &key, why, sizeof(why));
    if (e == MR_OK)
        e = mr_jwt_verify_pkey(p, p->alg, key, why, sizeof(why));
    if (e != MR_OK)
        return mr_seterr(err, errlen, e, e == MR_EAUTH ? "invalid token: %s" : "%s", why);
    rules->issuer = a->issuer;
    rules->user_audience = USER_AUDIENCE;
    return MR_OK;
}

static mr_err jwt(mr_auth *a, mr_httpc *http, const char *token, time_t now, mr_identity *who,
                  char *err, size_t errlen)
{
    char why[160];
    mr_jwt_parts p;
    mr_jwt_rules rules = {.leeway_s = a->leeway_s};
    mr_err e = mr_jwt_split(token, &p, why, sizeof(why));
    if (e != MR_OK)
        return mr_seterr(err, errlen, e, "invalid token: %s", why);
    /* The header only says which check to try; what may pass is decided here. */
    if (strcmp(p.alg, "HS256") == 0)
        e = hs256(a, &p, &rules, err, errlen);
    else if (strcmp(p.alg, "ES256") == 0 || strcmp(p.alg, "RS256") == 0)
        e = asymmetric(a, http, &p, &rules, err, errlen);
    else
        e = mr_seterr(err, errlen, MR_EAUTH, "invalid token: alg not allowed");
    if (e != MR_OK)
        return e;
    mr_jwt_claims c;
    e = mr_jwt_read_claims(&p, &rules, now, &c, why, sizeof(why));
    if (e != MR_OK)
        return mr_seterr(err, errlen, e, e == MR_EAUTH ? "invalid token: %s" : "%s", why);
    return set_identity(who, c.role, c.sub, c.oauth_client, c.claims_json, err, errlen);
}

/* Three base64url parts: the shape of a legacy anon or service_role key sent
 * in apikey. Anything else there is neither a JWT nor an sb_ key. */
static int looks_like_jwt(const char *s)
{
    int dots = 0;
    for (; *s; s++) {
        if (*s == '.')
            dots++;
        else if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') ||
                   (*s >= '0' && *s <= '9') || *s == '-' || *s == '_'))
            return 0;
    }
    return dots == 2;
}

mr_err mr_auth_identify(mr_auth *a, mr_httpc *http, const char *authorization,
                        const char *apikey, const char *user_agent, time_t now,
                        mr_identity *who, char *err, size_t errlen)
{
    const char *cred;
    memset(who, 0, sizeof(*who));
    if (authorization && *authorization) {
        cred = mr_http_bearer(authorization);
        if (!cred)
            return mr_seterr(err, errlen, MR_EAUTH, "expected Authorization: Bearer <token>");
    } else if (apikey && *apikey) {
        cred = apikey;
        if (strncmp(cred, "sb_", 3) != 0 && !looks_like_jwt(cred))
            return mr_seterr(err, errlen, MR_EAUTH, "invalid API key");
    } else {
        return mr_seterr(err, errlen, MR_EAUTH,
                         "missing credentials: send Authorization: Bearer <token> or apikey");
    }
    if (strncmp(cred, "sb_", 3) == 0)
        return api_key(a, cred, user_agent, who, err, errlen);
    return jwt(a, http, cred, now, who, err, errlen);
}
