/* test_auth.c: who a request is, from Authorization and apikey, in each
 * SUPABASE_AUTH_MODE: API keys, legacy and internal HS256, ES256/RS256 against
 * a JWKS stored in the cache (the stand-in for Supabase Auth's endpoint), and
 * the settings that stop start-up. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "jwk_keys.h"
#include "mr_auth.h"

#define NOW ((time_t)1700000000)
#define LEGACY "legacy-jwt-secret-legacy-jwt-secret-0123456789"
#define PREVIOUS "previous-jwt-secret-previous-jwt-secret-012345"
#define INTERNAL "internal-secret-internal-secret-internal-0123"
#define SK1 "sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPvz"
#define SK2 "sb_secret_second-key-for-rotation-0123456"
#define PK1 "sb_publishable_ACJWlzQHlZjBrEguHvfOxg_3BJgxAaH"
#define URL "http://127.0.0.1:54421"
#define ISS URL "/auth/v1"
#define USER "6f1c1c5e-1111-2222-3333-444455556666"

static test_key ec1, rsa1;

static const char *const VARS[] = {
    "SUPABASE_AUTH_MODE", "SUPABASE_JWT_SECRET", "SUPABASE_JWT_SECRET_PREVIOUS", "SUPABASE_URL",
    "SUPABASE_JWKS_URL", "SUPABASE_JWT_ISSUER", "SUPABASE_SECRET_KEYS", "SUPABASE_PUBLISHABLE_KEYS",
    "MINDROOM_INTERNAL_SECRET", "MR_JWT_LEEWAY_S", "SUPABASE_JWKS_TTL_S", "SUPABASE_JWKS_REFETCH_S",
    "SUPABASE_JWKS_STALE_S", "SUPABASE_JWKS_TIMEOUT_MS",
};

static int setup(void **state)
{
    (void)state;
    tk_ec(&ec1, "ec-1");
    tk_rsa(&rsa1, "rsa-1", 2048);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    EVP_PKEY_free(ec1.key);
    EVP_PKEY_free(rsa1.key);
    return 0;
}

static void clear_env(void)
{
    for (size_t i = 0; i < MR_ARRAY_LEN(VARS); i++)
        unsetenv(VARS[i]);
}

/* Settings for `mode` with every kind of credential configured. */
static mr_auth *auth_for(const char *mode)
{
    clear_env();
    setenv("SUPABASE_AUTH_MODE", mode, 1);
    setenv("SUPABASE_JWT_SECRET", LEGACY, 1);
    setenv("SUPABASE_JWT_SECRET_PREVIOUS", PREVIOUS, 1);
    setenv("SUPABASE_URL", URL "/", 1);
    setenv("SUPABASE_SECRET_KEYS", SK1 "," SK2, 1);
    setenv("SUPABASE_PUBLISHABLE_KEYS", PK1, 1);
    setenv("MINDROOM_INTERNAL_SECRET", INTERNAL, 1);
    setenv("MR_JWT_LEEWAY_S", "0", 1);
    mr_auth *a = NULL;
    char err[256] = "";
    if (mr_auth_from_env(&a, err, sizeof(err)) != MR_OK)
        fail_msg("config refused: %s", err);
    if (mr_auth_jwks(a)) {
        /* What Supabase Auth's endpoint would serve, stored as a fetch would. */
        const test_key *keys[] = {&ec1, &rsa1};
        char *doc = tk_jwks(keys, 2);
        assert_int_equal(mr_jwks_cache_store(mr_auth_jwks(a), doc, strlen(doc), mr_now_ms(), err,
                                             sizeof(err)), MR_OK);
        free(doc);
    }
    return a;
}

typedef struct {
    mr_err e;
    mr_identity who;
    char why[256];
} outcome;

static outcome call_ua(mr_auth *a, const char *authorization, const char *apikey,
                       const char *user_agent)
{
    outcome o;
    memset(&o, 0, sizeof(o));
    o.e = mr_auth_identify(a, NULL, authorization, apikey, user_agent, NOW, &o.who, o.why,
                           sizeof(o.why));
    if (o.e != MR_OK)
        assert_null(o.who.claims_json);
    return o;
}

static outcome call(mr_auth *a, const char *authorization, const char *apikey)
{
    return call_ua(a, authorization, apikey, "curl/8.5.0");
}

static outcome bearer(mr_auth *a, const char *token)
{
    char h[9000];
    snprintf(h, sizeof(h), "Bearer %s", token);
    return call(a, h, NULL);
}

static void done(outcome *o)
{
    free(o->who.claims_json);
}

static void expect_refused(mr_auth *a, const char *token, const char *why)
{
    outcome o = bearer(a, token);
    if (o.e != MR_EAUTH || !strstr(o.why, why))
        fail_msg("wanted 401 \"%s\", got %d \"%s\"", why, o.e, o.why);
    done(&o);
}

static void expect_role(mr_auth *a, const char *token, const char *role)
{
    outcome o = bearer(a, token);
    if (o.e != MR_OK)
        fail_msg("wanted %s, got %d \"%s\"", role, o.e, o.why);
    assert_string_equal(o.who.role, role);
    done(&o);
}

#define USER_CLAIMS(extra)                                                                      \
    "{\"iss\":\"" ISS "\",\"aud\":\"authenticated\",\"sub\":\"" USER "\",\"role\":\"authenticated\"," \
    "\"exp\":1700003600,\"iat\":1699996400" extra "}"

/* ---- settings ---- */

static void expect_config_error(const char *needle, const char *hidden)
{
    mr_auth *a = (mr_auth *)1;
    char err[256] = "";
    assert_int_equal(mr_auth_from_env(&a, err, sizeof(err)), MR_EINVAL);
    assert_null(a);
    if (!strstr(err, needle))
        fail_msg("wanted \"%s\" in \"%s\"", needle, err);
    if (hidden)
        assert_null(strstr(err, hidden));
}

static void test_settings_that_stop_start_up(void **state)
{
    (void)state;
    clear_env();
    expect_config_error("SUPABASE_JWT_SECRET is required", NULL); /* legacy is the default */
    setenv("SUPABASE_JWT_SECRET", "short-secret", 1);
    expect_config_error("SUPABASE_JWT_SECRET is too short", "short-secret");
    setenv("SUPABASE_JWT_SECRET", LEGACY, 1);
    setenv("SUPABASE_AUTH_MODE", "JWKS", 1);
    expect_config_error("SUPABASE_AUTH_MODE must be legacy, jwks or both", NULL);
    setenv("SUPABASE_AUTH_MODE", "jwks", 1);
    expect_config_error("SUPABASE_URL (or SUPABASE_JWKS_URL) is required", NULL);
    setenv("SUPABASE_URL", "127.0.0.1:54321", 1);
    expect_config_error("SUPABASE_URL must be an http:// or https:// URL", NULL);
    setenv("SUPABASE_URL", "http://a b", 1);
    expect_config_error("SUPABASE_URL contains whitespace", NULL);
    setenv("SUPABASE_URL", URL, 1);
    setenv("SUPABASE_JWKS_TTL_S", "0", 1);
    expect_config_error("SUPABASE_JWKS_TTL_S must be between 1 and 86400", NULL);
    unsetenv("SUPABASE_JWKS_TTL_S");
    const char *lists[][3] = {
        {"SUPABASE_SECRET_KEYS", PK1, "key 1 does not start with sb_secret_"},
        {"SUPABASE_SECRET_KEYS", SK1 ",sb_secret_tooshort", "key 2 is too short"},
        {"SUPABASE_SECRET_KEYS", SK1 ", " SK2, "secret 2 contains whitespace"},
        {"SUPABASE_SECRET_KEYS", SK1 ",", "secret 2 is empty"},
        {"SUPABASE_PUBLISHABLE_KEYS", SK1, "key 1 does not start with sb_publishable_"},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(lists); i++) {
        setenv(lists[i][0], lists[i][1], 1);
        expect_config_error(lists[i][2], "N7UND0Ugj");
        unsetenv(lists[i][0]);
    }
    setenv("MINDROOM_INTERNAL_SECRET", "tiny-internal", 1);
    expect_config_error("MINDROOM_INTERNAL_SECRET is too short", "tiny-internal");
    unsetenv("MINDROOM_INTERNAL_SECRET");
    /* jwks mode needs no legacy secret; a URL with trailing slashes is fine. */
    unsetenv("SUPABASE_JWT_SECRET");
    setenv("SUPABASE_URL", URL "//", 1);
    mr_auth *a = NULL;
    char err[256];
    assert_int_equal(mr_auth_from_env(&a, err, sizeof(err)), MR_OK);
    assert_int_equal(mr_auth_keys_mode(a), MR_KEYS_JWKS);
    assert_non_null(mr_auth_jwks(a));
    mr_auth_free(a);
    clear_env();
    setenv("SUPABASE_JWT_SECRET", LEGACY, 1);
    assert_int_equal(mr_auth_from_env(&a, err, sizeof(err)), MR_OK);
    assert_int_equal(mr_auth_keys_mode(a), MR_KEYS_LEGACY);
    assert_null(mr_auth_jwks(a));
    mr_auth_free(a);
}

/* ---- API keys ---- */

/* A secret key from a browser (its User-Agent) is refused in either header, as
 * Supabase's gateway does; servers' clients, and no User-Agent, keep it; the
 * publishable key and user sessions do not care. */
static void test_secret_keys_from_a_browser(void **state)
{
    (void)state;
    mr_auth *a = auth_for("jwks");
    const char *browsers[] = {
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/18.1 Mobile/15E148 Safari/604.1",
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(browsers); i++) {
        outcome o = call_ua(a, NULL, SK1, browsers[i]);
        assert_int_equal(o.e, MR_EAUTH);
        assert_non_null(strstr(o.why, "secret API key used from a browser"));
        assert_null(strstr(o.why, SK1));
        o = call_ua(a, "Bearer " SK2, SK2, browsers[i]);
        assert_int_equal(o.e, MR_EAUTH);
        o = call_ua(a, NULL, PK1, browsers[i]);
        assert_int_equal(o.e, MR_OK);
        assert_string_equal(o.who.role, "anon");
        done(&o);
    }
    const char *servers[] = {"curl/8.5.0", "node", "Deno/2.1.4", "python-requests/2.32.3",
                             "Go-http-client/1.1", "supabase-js-node/2.50.0", "", NULL,
                             "mozilla/5.0", "Mozilla"};
    for (size_t i = 0; i < MR_ARRAY_LEN(servers); i++) {
        outcome o = call_ua(a, NULL, SK1, servers[i]);
        if (o.e != MR_OK)
            fail_msg("User-Agent \"%s\": %s", servers[i] ? servers[i] : "(none)", o.why);
        assert_string_equal(o.who.role, "service_role");
        done(&o);
    }
    /* A wrong key from a browser is still just a wrong key. */
    outcome o = call_ua(a, NULL, SK1 "x", browsers[0]);
    assert_int_equal(o.e, MR_EAUTH);
    assert_string_equal(o.why, "invalid API key");
    mr_auth_free(a);
}

static void test_api_keys(void **state)
{
    (void)state;
    mr_auth *a = auth_for("jwks");
    /* sb_secret_ in apikey (either key of the rotated list), and in Bearer. */
    const char *secret_keys[] = {SK1, SK2};
    for (size_t i = 0; i < 2; i++) {
        outcome o = call(a, NULL, secret_keys[i]);
        assert_int_equal(o.e, MR_OK);
        assert_string_equal(o.who.role, "service_role");
        assert_string_equal(o.who.sub, "");
        assert_string_equal(o.who.claims_json, "{\"role\":\"service_role\"}");
        done(&o);
        expect_role(a, secret_keys[i], "service_role");
    }
    /* sb_publishable_ alone: anon. */
    outcome o = call(a, NULL, PK1);
    assert_int_equal(o.e, MR_OK);
    assert_string_equal(o.who.role, "anon");
    assert_string_equal(o.who.claims_json, "{\"role\":\"anon\"}");
    done(&o);
    expect_role(a, PK1, "anon");
    /* supabase-js sends the key in both headers. */
    o = call(a, "Bearer " SK1, SK1);
    assert_int_equal(o.e, MR_OK);
    assert_string_equal(o.who.role, "service_role");
    done(&o);
    /* Wrong keys, keys one character short or long, another kind's prefix. */
    const char *wrong[] = {"sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPvZ", "sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPv",
                           SK1 "x", "sb_publishable_ACJWlzQHlZjBrEguHvfOxg_3BJgxAaX", "sb_secret_",
                           "sb_", "sb_other_ACJWlzQHlZjBrEguHvfOxg_3BJgxAaH",
                           /* JWT-shaped after the prefix: never parsed as one */
                           "sb_eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.x"};
    for (size_t i = 0; i < MR_ARRAY_LEN(wrong); i++) {
        o = call(a, NULL, wrong[i]);
        assert_int_equal(o.e, MR_EAUTH);
        assert_string_equal(o.why, "invalid API key");
        done(&o);
        expect_refused(a, wrong[i], "invalid API key");
    }
    /* apikey that is neither an sb_ key nor a JWT; no credentials at all; another scheme. */
    o = call(a, NULL, "not-a-key");
    assert_int_equal(o.e, MR_EAUTH);
    o = call(a, NULL, NULL);
    assert_int_equal(o.e, MR_EAUTH);
    assert_non_null(strstr(o.why, "missing credentials"));
    o = call(a, "Basic " SK1, NULL);
    assert_int_equal(o.e, MR_EAUTH);
    assert_string_equal(o.why, "expected Authorization: Bearer <token>");
    /* Authorization wins: a bad bearer is not rescued by a good apikey. */
    o = call(a, "Bearer sb_secret_wrong-wrong-wrong-wrong", SK1);
    assert_int_equal(o.e, MR_EAUTH);
    mr_auth_free(a);

    /* Without SUPABASE_SECRET_KEYS no sb_secret_ key is anything. */
    clear_env();
    setenv("SUPABASE_JWT_SECRET", LEGACY, 1);
    assert_int_equal(mr_auth_from_env(&a, o.why, sizeof(o.why)), MR_OK);
    o = call(a, NULL, SK1);
    assert_int_equal(o.e, MR_EAUTH);
    o = call(a, NULL, PK1);
    assert_int_equal(o.e, MR_EAUTH);
    mr_auth_free(a);
}

/* ---- JWTs by mode ---- */

static void test_jwks_mode(void **state)
{
    (void)state;
    mr_auth *a = auth_for("jwks");
    char *t;

    /* A Supabase user session, ES256 and RS256. */
    t = tk_sign(&ec1, "ES256", USER_CLAIMS(",\"email\":\"a@b.c\",\"app_metadata\":{\"provider\":\"email\"},"
                                           "\"session_id\":\"s1\",\"is_anonymous\":false,\"x\":1"));
    outcome o = bearer(a, t);
    assert_int_equal(o.e, MR_OK);
    assert_string_equal(o.who.role, "authenticated");
    assert_string_equal(o.who.sub, USER);
    /* What PostgreSQL sees: the checked fields, nothing else. */
    assert_string_equal(o.who.claims_json,
                        "{\"iss\":\"" ISS "\",\"sub\":\"" USER "\",\"aud\":\"authenticated\","
                        "\"exp\":1700003600,\"iat\":1699996400,\"role\":\"authenticated\","
                        "\"email\":\"a@b.c\",\"session_id\":\"s1\",\"is_anonymous\":false}");
    done(&o);
    free(t);
    t = tk_sign(&rsa1, "RS256", USER_CLAIMS(""));
    expect_role(a, t, "authenticated");
    free(t);
    /* supabase-js with a session: the user JWT, with the publishable key as apikey. */
    t = tk_sign(&ec1, "ES256", USER_CLAIMS(""));
    char h[4096];
    snprintf(h, sizeof(h), "Bearer %s", t);
    o = call(a, h, PK1);
    assert_int_equal(o.e, MR_OK);
    assert_string_equal(o.who.role, "authenticated");
    done(&o);
    free(t);
    /* aud as an array naming authenticated. */
    t = tk_sign(&ec1, "ES256", "{\"iss\":\"" ISS "\",\"aud\":[\"x\",\"authenticated\"],\"sub\":\"" USER
                               "\",\"role\":\"authenticated\",\"exp\":1700003600}");
    expect_role(a, t, "authenticated");
    free(t);

    struct {
        const char *payload, *why;
    } bad[] = {
        {"{\"iss\":\"" ISS "\",\"aud\":\"authenticated\",\"sub\":\"" USER "\",\"role\":\"authenticated\",\"exp\":1699999999}", "expired"},
        {USER_CLAIMS(",\"nbf\":1700000060"), "not yet valid"},
        {"{\"iss\":\"http://127.0.0.1:9999/auth/v1\",\"aud\":\"authenticated\",\"sub\":\"u\",\"role\":\"authenticated\",\"exp\":1700003600}", "wrong issuer"},
        {"{\"iss\":\"supabase-demo\",\"role\":\"service_role\",\"exp\":1700003600}", "wrong issuer"},
        {"{\"aud\":\"authenticated\",\"sub\":\"u\",\"role\":\"authenticated\",\"exp\":1700003600}", "wrong issuer"},
        {"{\"iss\":\"" ISS "\",\"aud\":\"anon\",\"sub\":\"u\",\"role\":\"authenticated\",\"exp\":1700003600}", "wrong audience"},
        {"{\"iss\":\"" ISS "\",\"sub\":\"u\",\"role\":\"authenticated\",\"exp\":1700003600}", "wrong audience"},
        {"{\"iss\":\"" ISS "\",\"aud\":[1],\"sub\":\"u\",\"role\":\"authenticated\",\"exp\":1700003600}", "wrong audience"},
        {"{\"iss\":\"" ISS "\",\"aud\":\"authenticated\",\"sub\":\"u\",\"role\":\"authenticated\"}", "missing or malformed exp"},
        /* Two subs: the C side and PostgreSQL's jsonb would each take another. */
        {"{\"iss\":\"" ISS "\",\"aud\":\"authenticated\",\"sub\":\"" USER "\",\"sub\":\"00000000-0000-0000-0000-000000000000\","
         "\"role\":\"authenticated\",\"exp\":1700003600}", "malformed token payload"},
        {USER_CLAIMS(",\"app_metadata\":{\"a\":1,\"a\":2}"), "malformed token payload"},
        {USER_CLAIMS(",\"email\":5"), "malformed email"},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        t = tk_sign(&ec1, "ES256", bad[i].payload);
        expect_refused(a, t, bad[i].why);
        free(t);
    }

    /* alg confusion. HS256 with the public key as the HMAC secret, naming its kid. */
    char header[128];
    snprintf(header, sizeof(header), "{\"alg\":\"HS256\",\"kid\":\"%s\",\"typ\":\"JWT\"}", ec1.kid);
    t = tk_hs256(header, USER_CLAIMS(""), (const unsigned char *)ec1.jwk, strlen(ec1.jwk));
    expect_refused(a, t, "bad signature");
    free(t);
    /* none, with and without a signature part. */
    char *none = tk_signing_input("{\"alg\":\"none\",\"kid\":\"ec-1\"}", USER_CLAIMS(""), &(size_t){0});
    strcat(none, ".");
    expect_refused(a, none, "malformed token");
    strcat(none, "AAAA");
    expect_refused(a, none, "alg not allowed");
    free(none);
    /* An ES256 token naming the RSA key, and an RS256 one naming the EC key. */
    t = tk_sign_as(&ec1, "{\"alg\":\"ES256\",\"kid\":\"rsa-1\"}", USER_CLAIMS(""), 0);
    expect_refused(a, t, "alg does not match the key");
    free(t);
    t = tk_sign_as(&rsa1, "{\"alg\":\"RS256\",\"kid\":\"ec-1\"}", USER_CLAIMS(""), 0);
    expect_refused(a, t, "alg does not match the key");
    free(t);
    /* No kid; a kid the set lacks (the refetch is not due yet: 401 at once). */
    t = tk_sign_as(&ec1, "{\"alg\":\"ES256\"}", USER_CLAIMS(""), 0);
    expect_refused(a, t, "missing kid");
    free(t);
    t = tk_sign_as(&ec1, "{\"alg\":\"ES256\",\"kid\":\"ec-9\"}", USER_CLAIMS(""), 0);
    expect_refused(a, t, "unknown key id");
    free(t);

    /* Legacy HS256 tokens are not accepted in jwks mode; internal ones are,
     * when short-lived. */
    t = tk_hs256("{\"alg\":\"HS256\"}", "{\"role\":\"service_role\",\"exp\":1700003600}",
                 (const unsigned char *)LEGACY, strlen(LEGACY));
    expect_refused(a, t, "bad signature");
    free(t);
    t = tk_hs256("{\"alg\":\"HS256\"}", "{\"role\":\"service_role\",\"exp\":1700086400}",
                 (const unsigned char *)INTERNAL, strlen(INTERNAL));
    expect_role(a, t, "service_role");
    free(t);
    t = tk_hs256("{\"alg\":\"HS256\"}", "{\"role\":\"service_role\",\"exp\":1700086401}",
                 (const unsigned char *)INTERNAL, strlen(INTERNAL));
    expect_refused(a, t, "lifetime longer than 86400 s");
    free(t);
    mr_auth_free(a);
}

static void test_legacy_and_both_modes(void **state)
{
    (void)state;
    const char *svc = "{\"iss\":\"supabase-demo\",\"role\":\"service_role\",\"exp\":1700003600}";
    char *by_legacy = tk_hs256("{\"alg\":\"HS256\"}", svc, (const unsigned char *)LEGACY, strlen(LEGACY));
    char *by_prev = tk_hs256("{\"alg\":\"HS256\"}", svc, (const unsigned char *)PREVIOUS, strlen(PREVIOUS));
    char *by_internal = tk_hs256("{\"alg\":\"HS256\"}", svc, (const unsigned char *)INTERNAL, strlen(INTERNAL));
    char *es = tk_sign(&ec1, "ES256", USER_CLAIMS(""));
    /* Legacy: today's HS256, rotation included; no JWKS at all. */
    mr_auth *a = auth_for("legacy");
    expect_role(a, by_legacy, "service_role");
    expect_role(a, by_prev, "service_role");
    expect_role(a, by_internal, "service_role");
    expect_refused(a, es, "alg not allowed");
    /* The legacy anon key in apikey alone is anon (then 403 in the runtime). */
    char *anon = tk_hs256("{\"alg\":\"HS256\"}", "{\"iss\":\"supabase-demo\",\"role\":\"anon\",\"exp\":1700003600}",
                          (const unsigned char *)LEGACY, strlen(LEGACY));
    outcome o = call(a, NULL, anon);
    assert_int_equal(o.e, MR_OK);
    assert_string_equal(o.who.role, "anon");
    done(&o);
    free(anon);
    mr_auth_free(a);
    /* Both: everything above. */
    a = auth_for("both");
    expect_role(a, by_legacy, "service_role");
    expect_role(a, by_prev, "service_role");
    expect_role(a, by_internal, "service_role");
    expect_role(a, es, "authenticated");
    mr_auth_free(a);
    free(by_legacy);
    free(by_prev);
    free(by_internal);
    free(es);
}

static void test_leeway(void **state)
{
    (void)state;
    mr_auth *a = auth_for("jwks");
    mr_auth_free(a);
    setenv("MR_JWT_LEEWAY_S", "30", 1);
    char err[160];
    assert_int_equal(mr_auth_from_env(&a, err, sizeof(err)), MR_OK);
    const test_key *keys[] = {&ec1};
    char *doc = tk_jwks(keys, 1);
    assert_int_equal(mr_jwks_cache_store(mr_auth_jwks(a), doc, strlen(doc), mr_now_ms(), err, sizeof(err)), MR_OK);
    free(doc);
    const char *p29 = "{\"iss\":\"" ISS "\",\"aud\":\"authenticated\",\"sub\":\"u\",\"role\":\"authenticated\",\"exp\":1699999971}";
    const char *p30 = "{\"iss\":\"" ISS "\",\"aud\":\"authenticated\",\"sub\":\"u\",\"role\":\"authenticated\",\"exp\":1699999970}";
    const char *nbf = USER_CLAIMS(",\"nbf\":1700000030");
    const char *nbf31 = USER_CLAIMS(",\"nbf\":1700000031");
    char *t = tk_sign(&ec1, "ES256", p29);
    expect_role(a, t, "authenticated");
    free(t);
    t = tk_sign(&ec1, "ES256", p30);
    expect_refused(a, t, "expired");
    free(t);
    t = tk_sign(&ec1, "ES256", nbf);
    expect_role(a, t, "authenticated");
    free(t);
    t = tk_sign(&ec1, "ES256", nbf31);
    expect_refused(a, t, "not yet valid");
    free(t);
    mr_auth_free(a);
}

/* A token Supabase Auth's OAuth 2.1 server issued to a third-party app: the
 * user's role and sub, marked as the app's, and client_id handed on to SQL so RLS
 * can tell it from the user's own session. */
static void test_oauth_client_tokens(void **state)
{
    (void)state;
    mr_auth *a = auth_for("jwks");
    char *t = tk_sign(&ec1, "ES256", USER_CLAIMS(
        ",\"session_id\":\"s1\",\"client_id\":\"9a8b7c6d-5e4f-3a2b-1c0d-9e8f7a6b5c4d\","
        "\"scope\":\"openid email\""));
    outcome o = bearer(a, t);
    assert_int_equal(o.e, MR_OK);
    assert_string_equal(o.who.role, "authenticated");
    assert_string_equal(o.who.sub, USER);
    assert_int_equal(o.who.oauth_client, 1);
    assert_string_equal(o.who.claims_json,
                        "{\"iss\":\"" ISS "\",\"sub\":\"" USER "\",\"aud\":\"authenticated\","
                        "\"exp\":1700003600,\"iat\":1699996400,\"role\":\"authenticated\","
                        "\"session_id\":\"s1\",\"client_id\":\"9a8b7c6d-5e4f-3a2b-1c0d-9e8f7a6b5c4d\"}");
    done(&o);
    free(t);
    /* The user's own session, and API keys, are nobody's app. */
    t = tk_sign(&ec1, "ES256", USER_CLAIMS(""));
    o = bearer(a, t);
    assert_int_equal(o.e, MR_OK);
    assert_int_equal(o.who.oauth_client, 0);
    done(&o);
    free(t);
    o = call(a, NULL, SK1);
    assert_int_equal(o.e, MR_OK);
    assert_int_equal(o.who.oauth_client, 0);
    done(&o);
    /* A client_id that is not a string is no client SQL could name: refused, never
     * read as "no client". An empty one is still a client (SQL sees it not null). */
    t = tk_sign(&ec1, "ES256", USER_CLAIMS(",\"client_id\":42"));
    expect_refused(a, t, "malformed client_id");
    free(t);
    t = tk_sign(&ec1, "ES256", USER_CLAIMS(",\"client_id\":\"\""));
    o = bearer(a, t);
    assert_int_equal(o.e, MR_OK);
    assert_int_equal(o.who.oauth_client, 1);
    done(&o);
    free(t);
    mr_auth_free(a);
}

/* An issuer set explicitly is the `iss` Supabase Auth writes, trailing slash and all:
 * compared as it is written, never trimmed like the URLs. */
static void test_explicit_issuer_is_exact(void **state)
{
    (void)state;
    const test_key *keys[] = {&ec1};
    char err[256] = "", *doc = tk_jwks(keys, 1);
    const char *issuers[] = {"https://auth.example.com/", "https://auth.example.com"};
    for (size_t i = 0; i < 2; i++) {
        clear_env();
        setenv("SUPABASE_AUTH_MODE", "jwks", 1);
        setenv("SUPABASE_JWKS_URL", "http://127.0.0.1:1/jwks.json", 1);
        setenv("SUPABASE_JWT_ISSUER", issuers[i], 1);
        setenv("MR_JWT_LEEWAY_S", "0", 1);
        mr_auth *a = NULL;
        assert_int_equal(mr_auth_from_env(&a, err, sizeof(err)), MR_OK);
        assert_int_equal(mr_jwks_cache_store(mr_auth_jwks(a), doc, strlen(doc), mr_now_ms(), err,
                                             sizeof(err)), MR_OK);
        char claims[512];
        for (size_t j = 0; j < 2; j++) {
            snprintf(claims, sizeof(claims), "{\"iss\":\"%s\",\"aud\":\"authenticated\",\"sub\":\"" USER
                     "\",\"role\":\"authenticated\",\"exp\":1700003600,\"iat\":1699996400}", issuers[j]);
            char *t = tk_sign(&ec1, "ES256", claims);
            outcome o = bearer(a, t);
            if (i == j) {
                assert_int_equal(o.e, MR_OK);
            } else {
                assert_int_equal(o.e, MR_EAUTH);
                assert_non_null(strstr(o.why, "wrong issuer"));
            }
            done(&o);
            free(t);
        }
        mr_auth_free(a);
    }
    free(doc);
}

static void test_no_keys_is_503(void **state)
{
    (void)state;
    clear_env();
    setenv("SUPABASE_AUTH_MODE", "jwks", 1);
    setenv("SUPABASE_JWKS_URL", "http://127.0.0.1:1/jwks.json", 1);
    setenv("SUPABASE_JWT_ISSUER", ISS, 1);
    mr_auth *a = NULL;
    char err[160];
    assert_int_equal(mr_auth_from_env(&a, err, sizeof(err)), MR_OK);
    char *t = tk_sign(&ec1, "ES256", USER_CLAIMS(""));
    /* No HTTP client here: the fetch fails and there is nothing to trust. */
    outcome o = bearer(a, t);
    assert_int_equal(o.e, MR_ETRANSIENT);
    assert_non_null(strstr(o.why, "signing keys unavailable"));
    free(t);
    mr_auth_free(a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_settings_that_stop_start_up),
        cmocka_unit_test(test_api_keys),
        cmocka_unit_test(test_secret_keys_from_a_browser),
        cmocka_unit_test(test_jwks_mode),
        cmocka_unit_test(test_legacy_and_both_modes),
        cmocka_unit_test(test_leeway),
        cmocka_unit_test(test_oauth_client_tokens),
        cmocka_unit_test(test_explicit_issuer_is_exact),
        cmocka_unit_test(test_no_keys_is_503),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
