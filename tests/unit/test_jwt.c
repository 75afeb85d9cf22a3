/* test_jwt.c: HS256 verification against every way a token can be wrong. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "mindroom.h"

static const char SECRET[] = "super-secret-jwt-token-with-at-least-32-characters-long";
#define NOW ((time_t)1700000000)

static char *sign(const char *payload)
{
    char *t = mr_jwt_sign(payload, (const unsigned char *)SECRET, strlen(SECRET));
    assert_non_null(t);
    return t;
}

static mr_err verify(const char *tok, mr_jwt_claims *c, char *why)
{
    return mr_jwt_verify(tok, (const unsigned char *)SECRET, strlen(SECRET), NOW, 0, c, why, 128);
}

/* Builds header.payload.signature by hand, signing with `alg_md` (or leaving
 * the signature as given), so tokens the library would never make can be tested. */
static char *forge(const char *header, const char *payload, const EVP_MD *md, const char *sig)
{
    char h[512], p[2048], s[256];
    assert_true(mr_b64url_encode((const unsigned char *)header, strlen(header), h, sizeof(h)) > 0);
    assert_true(mr_b64url_encode((const unsigned char *)payload, strlen(payload), p, sizeof(p)) > 0);
    char *tok = malloc(strlen(h) + strlen(p) + 300);
    sprintf(tok, "%s.%s", h, p);
    if (md) {
        unsigned char mac[EVP_MAX_MD_SIZE];
        unsigned int n;
        HMAC(md, SECRET, (int)strlen(SECRET), (unsigned char *)tok, strlen(tok), mac, &n);
        assert_true(mr_b64url_encode(mac, n, s, sizeof(s)) > 0);
    } else {
        snprintf(s, sizeof(s), "%s", sig);
    }
    strcat(tok, ".");
    strcat(tok, s);
    return tok;
}

static void test_valid(void **state)
{
    (void)state;
    char *t = sign("{\"role\":\"authenticated\",\"sub\":\"6f1c1c5e-1111-2222-3333-444455556666\","
                   "\"exp\":1700003600,\"nbf\":1699999000,\"email\":\"a@b.c\"}");
    mr_jwt_claims c;
    char why[128] = "";
    assert_int_equal(verify(t, &c, why), MR_OK);
    assert_string_equal(c.role, "authenticated");
    assert_string_equal(c.sub, "6f1c1c5e-1111-2222-3333-444455556666");
    assert_non_null(strstr(c.claims_json, "\"email\":\"a@b.c\""));
    mr_jwt_claims_free(&c);
    assert_null(c.claims_json);
    free(t);
}

static void test_matches_independent_hmac(void **state)
{
    (void)state;
    /* A token built with OpenSSL directly verifies: the signing input is
     * exactly the two encoded segments joined by a dot. */
    char *t = forge("{\"alg\":\"HS256\",\"typ\":\"JWT\"}", "{\"role\":\"service_role\",\"exp\":1700000001}",
                    EVP_sha256(), NULL);
    mr_jwt_claims c;
    char why[128];
    assert_int_equal(verify(t, &c, why), MR_OK);
    assert_string_equal(c.role, "service_role");
    assert_string_equal(c.sub, "");
    mr_jwt_claims_free(&c);
    free(t);
}

static void test_tampered_payload(void **state)
{
    (void)state;
    char *t = sign("{\"role\":\"authenticated\",\"sub\":\"u\",\"exp\":1700003600}");
    char *t2 = sign("{\"role\":\"service_role\",\"sub\":\"u\",\"exp\":1700003600}");
    /* Splice the service_role payload between the original header and signature. */
    char *d1 = strchr(t, '.'), *d2 = strchr(d1 + 1, '.');
    char *e1 = strchr(t2, '.'), *e2 = strchr(e1 + 1, '.');
    char forged[2048];
    snprintf(forged, sizeof(forged), "%.*s%.*s%s", (int)(d1 - t), t, (int)(e2 - e1), e1, d2);
    mr_jwt_claims c;
    char why[128];
    assert_int_equal(verify(forged, &c, why), MR_EAUTH);
    assert_string_equal(why, "bad signature");
    assert_null(c.claims_json);
    free(t);
    free(t2);
}

static void test_tampered_signature(void **state)
{
    (void)state;
    char *t = sign("{\"role\":\"service_role\",\"exp\":1700003600}");
    mr_jwt_claims c;
    char why[128];
    size_t n = strlen(t);
    /* Every position of the signature, including the last character whose
     * low bits carry no data in a lax decoder. */
    char *sig = strrchr(t, '.') + 1;
    for (char *p = sig; *p; p++) {
        char orig = *p;
        *p = orig == 'A' ? 'B' : 'A';
        assert_int_equal(verify(t, &c, why), MR_EAUTH);
        *p = orig;
    }
    t[n - 1] = '\0'; /* truncated */
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    free(t);
    /* Signed with a different secret. */
    const char other[] = "another-secret-another-secret-another-secret";
    t = mr_jwt_sign("{\"role\":\"service_role\",\"exp\":1700003600}", (const unsigned char *)other,
                    strlen(other));
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    assert_string_equal(why, "bad signature");
    free(t);
}

static void test_alg_none_and_others(void **state)
{
    (void)state;
    const char *payload = "{\"role\":\"service_role\",\"exp\":1700003600}";
    mr_jwt_claims c;
    char why[128];
    char *t = forge("{\"alg\":\"none\",\"typ\":\"JWT\"}", payload, NULL, "");
    assert_int_equal(verify(t, &c, why), MR_EAUTH); /* empty signature part */
    free(t);
    t = forge("{\"alg\":\"none\",\"typ\":\"JWT\"}", payload, NULL, "x");
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    assert_string_equal(why, "alg not allowed");
    free(t);
    /* RS256 "signed" with the HS secret: the classic key-confusion attack. */
    t = forge("{\"alg\":\"RS256\",\"typ\":\"JWT\"}", payload, EVP_sha256(), NULL);
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    assert_string_equal(why, "alg not allowed");
    free(t);
    t = forge("{\"alg\":\"HS512\",\"typ\":\"JWT\"}", payload, EVP_sha512(), NULL);
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    assert_string_equal(why, "alg not allowed");
    free(t);
    t = forge("{\"alg\":\"hs256\"}", payload, EVP_sha256(), NULL);
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    free(t);
    t = forge("{\"typ\":\"JWT\"}", payload, EVP_sha256(), NULL);
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    free(t);
    t = forge("[\"HS256\"]", payload, EVP_sha256(), NULL);
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    free(t);
}

static void test_expired_and_nbf(void **state)
{
    (void)state;
    mr_jwt_claims c;
    char why[128];
    char *t = sign("{\"role\":\"service_role\",\"exp\":1699999999}");
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    assert_string_equal(why, "expired");
    /* exp equal to now is already expired; leeway makes it acceptable. */
    free(t);
    t = sign("{\"role\":\"service_role\",\"exp\":1700000000}");
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    assert_int_equal(mr_jwt_verify(t, (const unsigned char *)SECRET, strlen(SECRET), NOW, 5, &c,
                                   why, sizeof(why)),
                     MR_OK);
    mr_jwt_claims_free(&c);
    free(t);
    t = sign("{\"role\":\"service_role\",\"exp\":1700003600,\"nbf\":1700000060}");
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    assert_string_equal(why, "not yet valid");
    free(t);
    t = sign("{\"role\":\"service_role\",\"exp\":1700003600,\"nbf\":1700000000}");
    assert_int_equal(verify(t, &c, why), MR_OK);
    mr_jwt_claims_free(&c);
    free(t);
    /* A token that never expires is refused. */
    t = sign("{\"role\":\"service_role\"}");
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    free(t);
    t = sign("{\"role\":\"service_role\",\"exp\":\"1700003600\"}");
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    free(t);
    t = sign("{\"role\":\"service_role\",\"exp\":1700003600,\"nbf\":true}");
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    free(t);
}

static void test_claim_shapes(void **state)
{
    (void)state;
    mr_jwt_claims c;
    char why[128];
    const char *bad[] = {
        "{\"exp\":1700003600}",                               /* no role */
        "{\"role\":5,\"exp\":1700003600}",                    /* role not a string */
        "{\"role\":\"authenticated\",\"sub\":7,\"exp\":1700003600}",
        "{\"role\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\","
        "\"exp\":1700003600}",                                /* role too long */
        "[1,2,3]",
        "\"just a string\"",
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        char *t = sign(bad[i]);
        assert_int_equal(verify(t, &c, why), MR_EAUTH);
        assert_null(c.claims_json);
        free(t);
    }
}

static void test_garbage_and_shape(void **state)
{
    (void)state;
    mr_jwt_claims c;
    char why[128];
    const char *bad[] = {
        "", "garbage", "a.b", "a.b.c.d", "..", "a..c", ".b.c", "a.b.",
        "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0",      /* missing signature */
        "eyJhbGciOiJIUzI1NiJ9!.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.abc", /* bad base64 */
        "eyJhbGciOiJIUzI1NiJ9=.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.abc", /* padding */
        "e.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.abc",                     /* length % 4 == 1 */
        "eyJhbGciOiJIUzI1NiJ9 .x.y",
        "bm90IGpzb24.e30.abc",                                       /* header not JSON */
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        assert_int_equal(verify(bad[i], &c, why), MR_EAUTH);
        assert_null(c.claims_json);
    }
    assert_int_equal(verify(NULL, &c, why), MR_EAUTH);
    /* Standard base64 '+' '/' in place of '-' '_' is not base64url. */
    char *t = sign("{\"role\":\"service_role\",\"exp\":1700003600,\"x\":\"\xfb\xff\xbf\"}");
    char *p = strchr(t, '.');
    int changed = 0;
    for (; *p; p++) {
        if (*p == '-') { *p = '+'; changed = 1; }
        if (*p == '_') { *p = '/'; changed = 1; }
    }
    if (changed)
        assert_int_equal(verify(t, &c, why), MR_EAUTH);
    free(t);
}

static void test_huge_token(void **state)
{
    (void)state;
    mr_jwt_claims c;
    char why[128];
    size_t n = MR_JWT_MAX_TOKEN * 4;
    char *big = malloc(n + 1);
    memset(big, 'A', n);
    big[100] = '.';
    big[200] = '.';
    big[n] = '\0';
    assert_int_equal(verify(big, &c, why), MR_EAUTH);
    assert_string_equal(why, "token too long");
    free(big);
    /* Just under the cap, a well-signed token still verifies: the cap is on
     * size alone, not a side effect of some other check. */
    char *payload = malloc(MR_JWT_MAX_TOKEN);
    snprintf(payload, MR_JWT_MAX_TOKEN, "{\"role\":\"service_role\",\"exp\":1700003600,\"p\":\"%0*d\"}",
             5900, 0);
    char *t = sign(payload);
    assert_true(strlen(t) > MR_JWT_MAX_TOKEN - 400 && strlen(t) <= MR_JWT_MAX_TOKEN);
    assert_int_equal(verify(t, &c, why), MR_OK);
    mr_jwt_claims_free(&c);
    free(t);
    free(payload);
}

static void test_b64url_roundtrip(void **state)
{
    (void)state;
    unsigned char in[64], out[64];
    char enc[128];
    for (size_t len = 0; len < sizeof(in); len++) {
        for (size_t i = 0; i < len; i++)
            in[i] = (unsigned char)(i * 37 + len * 11);
        long e = mr_b64url_encode(in, len, enc, sizeof(enc));
        assert_true(e >= 0);
        assert_null(strpbrk(enc, "+/="));
        long d = mr_b64url_decode(enc, (size_t)e, out, sizeof(out));
        assert_int_equal(d, (long)len);
        assert_memory_equal(in, out, len);
    }
    assert_int_equal(mr_b64url_encode(in, 3, enc, 4), -1); /* no room for the NUL */
    assert_int_equal(mr_b64url_decode("QUJD", 4, out, 2), -1);
    assert_int_equal(mr_b64url_decode("QR", 2, out, 8), -1); /* stray low bits */
}

static mr_err v2(const char *secret, const char *tok, const char *prev, mr_jwt_claims *c, char *why)
{
    return mr_jwt_verify2(tok, (const unsigned char *)secret, strlen(secret),
                          (const unsigned char *)prev, prev ? strlen(prev) : 0, NOW, 0, c, why, 128);
}

/* Rotation: SUPABASE_JWT_SECRET_PREVIOUS. A token of either secret passes; a
 * third secret's does not; the other checks (expiry) still apply to the
 * previous secret's tokens; without a previous secret, its tokens fail. */
static void test_previous_secret(void **state)
{
    (void)state;
    static const char NEWER[] = "the-new-jwt-secret-after-rotation-0123456789";
    static const char OTHER[] = "some-other-secret-that-was-never-configured!";
    const char *payload = "{\"role\":\"service_role\",\"exp\":1700003600}";
    char *by_old = mr_jwt_sign(payload, (const unsigned char *)SECRET, strlen(SECRET));
    char *by_new = mr_jwt_sign(payload, (const unsigned char *)NEWER, strlen(NEWER));
    char *by_other = mr_jwt_sign(payload, (const unsigned char *)OTHER, strlen(OTHER));
    char *old_expired = mr_jwt_sign("{\"role\":\"service_role\",\"exp\":1699999999}",
                                    (const unsigned char *)SECRET, strlen(SECRET));
    mr_jwt_claims c;
    char why[128];
    assert_int_equal(v2(NEWER, by_new, SECRET, &c, why), MR_OK);
    assert_string_equal(c.role, "service_role");
    mr_jwt_claims_free(&c);
    assert_int_equal(v2(NEWER, by_old, SECRET, &c, why), MR_OK);
    mr_jwt_claims_free(&c);
    assert_int_equal(v2(NEWER, by_other, SECRET, &c, why), MR_EAUTH);
    assert_string_equal(why, "bad signature");
    assert_null(c.claims_json);
    assert_int_equal(v2(NEWER, old_expired, SECRET, &c, why), MR_EAUTH);
    assert_string_equal(why, "expired");
    const char *none = NULL;
    assert_int_equal(v2(NEWER, by_old, none, &c, why), MR_EAUTH);
    assert_string_equal(why, "bad signature");
    assert_int_equal(v2(NEWER, by_new, none, &c, why), MR_OK);
    mr_jwt_claims_free(&c);
    free(by_old);
    free(by_new);
    free(by_other);
    free(old_expired);
}

/* A key given twice means two things to two readers (cJSON's getters take the
 * first, PostgreSQL's jsonb the last): refused at any depth, header included.
 * What is handed on is rebuilt from the checked claims only. */
static void test_duplicate_keys_and_rebuilt_claims(void **state)
{
    (void)state;
    mr_jwt_claims c;
    char why[128];
    const char *dup[] = {
        "{\"role\":\"authenticated\",\"sub\":\"a\",\"sub\":\"b\",\"exp\":1700003600}",
        "{\"role\":\"authenticated\",\"role\":\"service_role\",\"exp\":1700003600}",
        "{\"role\":\"service_role\",\"exp\":1700003600,\"app_metadata\":{\"x\":1,\"x\":2}}",
        "{\"role\":\"service_role\",\"exp\":1700003600,\"l\":[{\"k\":1,\"k\":1}]}",
        "{\"role\":\"service_role\",\"exp\":1700003600,\"ro\\u006ce\":\"x\"}", /* "role" escaped */
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(dup); i++) {
        char *t = sign(dup[i]);
        assert_int_equal(verify(t, &c, why), MR_EAUTH);
        assert_string_equal(why, "malformed token payload");
        assert_null(c.claims_json);
        free(t);
    }
    char *t = forge("{\"alg\":\"HS256\",\"alg\":\"HS256\"}", "{\"role\":\"service_role\",\"exp\":1700003600}",
                    EVP_sha256(), NULL);
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    assert_string_equal(why, "malformed token header");
    free(t);
    /* Members outside the kept set (and nulls) are not passed on. */
    t = sign("{\"role\":\"authenticated\",\"sub\":\"u1\",\"exp\":1700003600,\"email\":null,"
             "\"app_metadata\":{\"role\":\"service_role\"},\"request.jwt.claim.role\":\"x\"}");
    assert_int_equal(verify(t, &c, why), MR_OK);
    assert_string_equal(c.claims_json, "{\"sub\":\"u1\",\"exp\":1700003600,\"role\":\"authenticated\"}");
    mr_jwt_claims_free(&c);
    free(t);
}

/* What the library would read must be what was signed: a \u0000 in a claim would
 * end it early in C ("service_role\u0000x" read as service_role), so a payload
 * or header holding that escape is refused; an escaped backslash before "u0000"
 * is not that escape. A header naming a critical extension (RFC 7515 4.1.11) is
 * refused, as none is understood here. */
static void test_nul_escape_and_crit(void **state)
{
    (void)state;
    mr_jwt_claims c;
    char why[128];
    const char *nul[] = {
        "{\"role\":\"service_role\\u0000x\",\"exp\":1700003600}",
        "{\"role\":\"authenticated\",\"sub\":\"a\\u0000b\",\"exp\":1700003600}",
        "{\"role\":\"authenticated\",\"sub\":\"a\",\"email\":\"\\\\\\u0000\",\"exp\":1700003600}",
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(nul); i++) { /* the last: "\\\u0000" */
        char *t = sign(nul[i]);
        assert_int_equal(verify(t, &c, why), MR_EAUTH);
        assert_string_equal(why, "malformed token payload");
        assert_null(c.claims_json);
        free(t);
    }
    char *t = sign("{\"role\":\"authenticated\",\"sub\":\"a\",\"email\":\"x\\\\u0000\",\"exp\":1700003600}");
    assert_int_equal(verify(t, &c, why), MR_OK); /* "x\\u0000": a backslash, then u0000 */
    assert_string_equal(c.sub, "a");
    mr_jwt_claims_free(&c);
    free(t);
    t = forge("{\"alg\":\"HS256\",\"typ\":\"JWT\",\"crit\":[\"b64\"],\"b64\":false}",
              "{\"role\":\"service_role\",\"exp\":1700003600}", EVP_sha256(), NULL);
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    assert_string_equal(why, "critical header extension not understood");
    assert_null(c.claims_json);
    free(t);
    t = forge("{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"k\\u0000x\"}",
              "{\"role\":\"service_role\",\"exp\":1700003600}", EVP_sha256(), NULL);
    assert_int_equal(verify(t, &c, why), MR_EAUTH);
    assert_string_equal(why, "malformed token header");
    free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid),
        cmocka_unit_test(test_matches_independent_hmac),
        cmocka_unit_test(test_tampered_payload),
        cmocka_unit_test(test_tampered_signature),
        cmocka_unit_test(test_alg_none_and_others),
        cmocka_unit_test(test_expired_and_nbf),
        cmocka_unit_test(test_claim_shapes),
        cmocka_unit_test(test_garbage_and_shape),
        cmocka_unit_test(test_huge_token),
        cmocka_unit_test(test_b64url_roundtrip),
        cmocka_unit_test(test_previous_secret),
        cmocka_unit_test(test_duplicate_keys_and_rebuilt_claims),
        cmocka_unit_test(test_nul_escape_and_crit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
