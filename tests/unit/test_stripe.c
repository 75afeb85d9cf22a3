/* test_stripe.c: Stripe-Signature verification and secret-list parsing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "mr_stripe.h"

#define NOW 1700000000LL
#define SECRET "whsec_test_secret_0123456789"

static const char *const one_secret[] = {SECRET};
static const char BODY[] = "{\"id\":\"evt_1\",\"object\":\"event\",\"type\":\"customer.subscription.created\"}";

/* Builds "t=<t>,v1=<sig over body with secret>" into out. */
static void good_header(char *out, size_t cap, const char *secret, long long t,
                        const char *body, size_t len)
{
    char hex[65];
    mr_stripe_sign_hex(secret, t, body, len, hex);
    snprintf(out, cap, "t=%lld,v1=%s", t, hex);
}

static mr_err verify(const char *hdr, const char *body, size_t len, char *err)
{
    return mr_stripe_verify(hdr, body, len, one_secret, 1, (time_t)NOW, 300, err, 128);
}

/* Stripe's published vectors are HMAC-SHA256 over the raw strings (no "t."
 * prefix): they pin the primitive; sign_hex must be that primitive applied
 * to "<t>.<body>". */
static void test_published_vectors(void **state)
{
    (void)state;
    char hex[65];
    mr_stripe_hmac_hex("test_secret", "", 0, hex);
    assert_string_equal(hex, "f7f9bd47fb987337b5796fdc1fdb9ba221d0d5396814bfcaf9521f43fd8927fd");
    const char *obj = "{\"obj1\":\"hello\",\"obj2\":\"world\"}";
    mr_stripe_hmac_hex("test_secret", obj, strlen(obj), hex);
    assert_string_equal(hex, "bebb1a643997f419b315ddba19e6f5411e1ce7f810ba6d3617ce72823092f363");
}

/* Keyed contexts are kept per key (lib/mr_hmac.c): the same secret again,
 * secrets that are prefixes of one another and more secrets than are kept each
 * give what a one-shot HMAC gives, in any order and again later. */
static void test_kept_keys_match_one_shot_hmac(void **state)
{
    (void)state;
    const char *msg = "{\"obj1\":\"hello\",\"obj2\":\"world\"}";
    char secrets[12][32];
    for (int i = 0; i < 12; i++) {
        if (i % 2) /* test_secret1, test_secret3... */
            snprintf(secrets[i], sizeof secrets[i], "test_secret%d", i);
        else /* test_secre, test_secret, test_secrett...: prefixes of one another */
            snprintf(secrets[i], sizeof secrets[i], "test_secre%.*s", i / 2, "tttttt");
    }
    for (int round = 0; round < 3; round++) {
        for (int k = 0; k < 12; k++) {
            int i = round == 1 ? 11 - k : k;
            unsigned char want[32];
            unsigned int wlen = 0;
            HMAC(EVP_sha256(), secrets[i], (int)strlen(secrets[i]), (const unsigned char *)msg,
                 strlen(msg), want, &wlen);
            char want_hex[65], hex[65];
            mr_hex(want, sizeof want, want_hex);
            mr_stripe_hmac_hex(secrets[i], msg, strlen(msg), hex);
            assert_string_equal(hex, want_hex);
            mr_stripe_hmac_hex("test_secret", msg, strlen(msg), hex);
            assert_string_equal(hex, "bebb1a643997f419b315ddba19e6f5411e1ce7f810ba6d3617ce72823092f363");
        }
    }
}

static void test_sign_is_hmac_of_t_dot_body(void **state)
{
    (void)state;
    char a[65], b[65], buf[256];
    const char *obj = "{\"obj1\":\"hello\",\"obj2\":\"world\"}";
    mr_stripe_sign_hex("test_secret", 1234567890, obj, strlen(obj), a);
    int n = snprintf(buf, sizeof buf, "1234567890.%s", obj);
    mr_stripe_hmac_hex("test_secret", buf, (size_t)n, b);
    assert_string_equal(a, b);
    /* Not the raw-body vector: the timestamp is part of what is signed. */
    assert_string_not_equal(a, "bebb1a643997f419b315ddba19e6f5411e1ce7f810ba6d3617ce72823092f363");
}

static void test_valid(void **state)
{
    (void)state;
    char hdr[256], err[128];
    good_header(hdr, sizeof hdr, SECRET, NOW, BODY, strlen(BODY));
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_OK);
}

static void test_empty_body_valid(void **state)
{
    (void)state;
    char hdr[256], err[128];
    good_header(hdr, sizeof hdr, SECRET, NOW, "", 0);
    assert_int_equal(verify(hdr, "", 0, err), MR_OK);
}

static void test_two_v1_second_matches(void **state)
{
    (void)state;
    char hex[65], hdr[512], err[128];
    mr_stripe_sign_hex(SECRET, NOW, BODY, strlen(BODY), hex);
    snprintf(hdr, sizeof hdr, "t=%lld,v1=%064d,v1=%s", NOW, 0, hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_OK);
    /* And the reverse order. */
    snprintf(hdr, sizeof hdr, "t=%lld,v1=%s,v1=%064d", NOW, hex, 0);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_OK);
}

static void test_two_v1_none_matches(void **state)
{
    (void)state;
    char hdr[512], err[128];
    snprintf(hdr, sizeof hdr, "t=%lld,v1=%064d,v1=%064d", NOW, 1, 2);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    assert_string_equal(err, "no matching signature");
}

static void test_v0_only_fails(void **state)
{
    (void)state;
    char hex[65], hdr[256], err[128];
    /* Even a v0 carrying the correct HMAC is not accepted. */
    mr_stripe_sign_hex(SECRET, NOW, BODY, strlen(BODY), hex);
    snprintf(hdr, sizeof hdr, "t=%lld,v0=%s", NOW, hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    assert_string_equal(err, "no v1 signature");
}

static void test_v1_plus_v0(void **state)
{
    (void)state;
    char hex[65], hdr[256], err[128];
    mr_stripe_sign_hex(SECRET, NOW, BODY, strlen(BODY), hex);
    snprintf(hdr, sizeof hdr, "t=%lld,v1=%s,v0=%064d", NOW, hex, 7);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_OK);
}

static void test_empty_and_duplicate_elements(void **state)
{
    (void)state;
    char hex[65], hdr[512], err[128];
    mr_stripe_sign_hex(SECRET, NOW, BODY, strlen(BODY), hex);
    /* Empty elements are skipped. */
    snprintf(hdr, sizeof hdr, ",t=%lld,,v1=%s,", NOW, hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_OK);
    /* A repeated identical v1 is harmless. */
    snprintf(hdr, sizeof hdr, "t=%lld,v1=%s,v1=%s", NOW, hex, hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_OK);
    /* A repeated t is ambiguous: refused, even when both are equal. */
    snprintf(hdr, sizeof hdr, "t=%lld,t=%lld,v1=%s", NOW, NOW, hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    assert_string_equal(err, "malformed header");
    /* "v1=" with nothing after it never matches. */
    snprintf(hdr, sizeof hdr, "t=%lld,v1=", NOW);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    assert_string_equal(err, "no matching signature");
    /* Only commas. */
    assert_int_equal(verify(",,,", BODY, strlen(BODY), err), MR_EINVAL);
    assert_string_equal(err, "malformed header");
    assert_int_equal(verify("", BODY, strlen(BODY), err), MR_EINVAL);
}

static void test_non_hex_and_wrong_case_v1(void **state)
{
    (void)state;
    char hex[65], hdr[256], err[128];
    mr_stripe_sign_hex(SECRET, NOW, BODY, strlen(BODY), hex);
    snprintf(hdr, sizeof hdr, "t=%lld,v1=%s", NOW,
             "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz");
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    assert_string_equal(err, "no matching signature");
    /* Uppercase hex of the right value: Stripe sends lowercase, we compare exactly. */
    for (char *c = hex; *c; c++)
        if (*c >= 'a' && *c <= 'f')
            *c = (char)(*c - 'a' + 'A');
    snprintf(hdr, sizeof hdr, "t=%lld,v1=%s", NOW, hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    /* Truncated and extended signatures. */
    mr_stripe_sign_hex(SECRET, NOW, BODY, strlen(BODY), hex);
    snprintf(hdr, sizeof hdr, "t=%lld,v1=%.63s", NOW, hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    snprintf(hdr, sizeof hdr, "t=%lld,v1=%s0", NOW, hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    /* Whitespace is not trimmed. */
    snprintf(hdr, sizeof hdr, "t=%lld, v1=%s", NOW, hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
}

static void test_missing_or_bad_t(void **state)
{
    (void)state;
    char hex[65], hdr[256], err[128];
    mr_stripe_sign_hex(SECRET, NOW, BODY, strlen(BODY), hex);
    snprintf(hdr, sizeof hdr, "v1=%s", hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    assert_string_equal(err, "malformed header");
    snprintf(hdr, sizeof hdr, "t=,v1=%s", hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    snprintf(hdr, sizeof hdr, "t=-5,v1=%s", hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    snprintf(hdr, sizeof hdr, "t=%lldx,v1=%s", NOW, hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    snprintf(hdr, sizeof hdr, "t=99999999999999999999999,v1=%s", hex);
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    assert_int_equal(mr_stripe_verify(NULL, BODY, strlen(BODY), one_secret, 1, (time_t)NOW, 300,
                                      err, sizeof err), MR_EINVAL);
}

static void test_huge_header(void **state)
{
    (void)state;
    char err[128];
    size_t n = MR_STRIPE_MAX_HEADER + 100;
    char *hdr = malloc(n + 1);
    assert_non_null(hdr);
    char hex[65];
    mr_stripe_sign_hex(SECRET, NOW, BODY, strlen(BODY), hex);
    /* A valid signature followed by padding up to beyond the cap: refused unparsed. */
    int k = snprintf(hdr, n + 1, "t=%lld,v1=%s,", NOW, hex);
    memset(hdr + k, ',', n - (size_t)k);
    hdr[n] = '\0';
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    assert_string_equal(err, "malformed header");
    /* Exactly at the cap still parses. */
    hdr[MR_STRIPE_MAX_HEADER] = '\0';
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_OK);
    free(hdr);
}

static void test_body_one_byte_or_whitespace(void **state)
{
    (void)state;
    char hdr[256], err[128];
    const char *signed_body = "{\"id\":\"evt_1\",\"amount\":100}";
    good_header(hdr, sizeof hdr, SECRET, NOW, signed_body, strlen(signed_body));
    assert_int_equal(verify(hdr, signed_body, strlen(signed_body), err), MR_OK);
    const char *one_byte = "{\"id\":\"evt_1\",\"amount\":101}";
    assert_int_equal(verify(hdr, one_byte, strlen(one_byte), err), MR_EINVAL);
    assert_string_equal(err, "no matching signature");
    const char *spaced = "{\"id\": \"evt_1\", \"amount\": 100}";
    assert_int_equal(verify(hdr, spaced, strlen(spaced), err), MR_EINVAL);
    const char *newline = "{\"id\":\"evt_1\",\"amount\":100}\n";
    assert_int_equal(verify(hdr, newline, strlen(newline), err), MR_EINVAL);
    /* The length is explicit: a NUL inside the body counts. */
    char with_nul[64];
    memcpy(with_nul, signed_body, strlen(signed_body) + 1);
    assert_int_equal(verify(hdr, with_nul, strlen(signed_body) + 1, err), MR_EINVAL);
}

static void test_tolerance(void **state)
{
    (void)state;
    char hdr[256], err[128];
    good_header(hdr, sizeof hdr, SECRET, NOW - 300, BODY, strlen(BODY));
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_OK);
    good_header(hdr, sizeof hdr, SECRET, NOW - 301, BODY, strlen(BODY));
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    assert_string_equal(err, "timestamp outside tolerance");
    good_header(hdr, sizeof hdr, SECRET, NOW + MR_STRIPE_MAX_FUTURE_S, BODY, strlen(BODY));
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_OK);
    good_header(hdr, sizeof hdr, SECRET, NOW + MR_STRIPE_MAX_FUTURE_S + 1, BODY, strlen(BODY));
    assert_int_equal(verify(hdr, BODY, strlen(BODY), err), MR_EINVAL);
    assert_string_equal(err, "timestamp outside tolerance");
    /* A configured tolerance is honoured. */
    good_header(hdr, sizeof hdr, SECRET, NOW - 1000, BODY, strlen(BODY));
    assert_int_equal(mr_stripe_verify(hdr, BODY, strlen(BODY), one_secret, 1, (time_t)NOW, 1000,
                                      err, sizeof err), MR_OK);
    assert_int_equal(mr_stripe_verify(hdr, BODY, strlen(BODY), one_secret, 1, (time_t)NOW, 999,
                                      err, sizeof err), MR_EINVAL);
}

static void test_rotation_and_wrong_secret(void **state)
{
    (void)state;
    char hdr[256], err[128];
    const char *const two[] = {"whsec_old", "whsec_new"};
    good_header(hdr, sizeof hdr, "whsec_new", NOW, BODY, strlen(BODY));
    assert_int_equal(mr_stripe_verify(hdr, BODY, strlen(BODY), two, 2, (time_t)NOW, 300,
                                      err, sizeof err), MR_OK);
    good_header(hdr, sizeof hdr, "whsec_old", NOW, BODY, strlen(BODY));
    assert_int_equal(mr_stripe_verify(hdr, BODY, strlen(BODY), two, 2, (time_t)NOW, 300,
                                      err, sizeof err), MR_OK);
    good_header(hdr, sizeof hdr, "whsec_other", NOW, BODY, strlen(BODY));
    assert_int_equal(mr_stripe_verify(hdr, BODY, strlen(BODY), two, 2, (time_t)NOW, 300,
                                      err, sizeof err), MR_EINVAL);
    /* A prefix of the secret is a different key. */
    good_header(hdr, sizeof hdr, "whsec_ne", NOW, BODY, strlen(BODY));
    assert_int_equal(mr_stripe_verify(hdr, BODY, strlen(BODY), two, 2, (time_t)NOW, 300,
                                      err, sizeof err), MR_EINVAL);
    assert_int_equal(mr_stripe_verify(hdr, BODY, strlen(BODY), NULL, 0, (time_t)NOW, 300,
                                      err, sizeof err), MR_EINVAL);
}

static void test_parse_secrets(void **state)
{
    (void)state;
    char *storage = NULL, err[128];
    const char *s[4];
    size_t n = 99;

    assert_int_equal(mr_stripe_parse_secrets("whsec_a", &storage, s, 4, &n, err, sizeof err), MR_OK);
    assert_int_equal(n, 1);
    assert_string_equal(s[0], "whsec_a");
    free(storage);

    assert_int_equal(mr_stripe_parse_secrets("whsec_a,whsec_b", &storage, s, 4, &n, err, sizeof err),
                     MR_OK);
    assert_int_equal(n, 2);
    assert_string_equal(s[0], "whsec_a");
    assert_string_equal(s[1], "whsec_b");
    free(storage);

    static const char *const bad[] = {
        "", "whsec_a,", ",whsec_a", "whsec_a,,whsec_b", " whsec_a", "whsec_a ",
        "whsec_a, whsec_b", "whsec_a\n", "whsec\ta", "whsec_a,whsec_b\r",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        storage = (char *)1;
        assert_int_equal(mr_stripe_parse_secrets(bad[i], &storage, s, 4, &n, err, sizeof err),
                         MR_EINVAL);
        assert_null(storage);
        /* The message names the position, never the value. */
        assert_null(strstr(err, "whsec"));
    }
    assert_int_equal(mr_stripe_parse_secrets(NULL, &storage, s, 4, &n, err, sizeof err), MR_EINVAL);
    mr_stripe_parse_secrets("whsec_a, whsec_b", &storage, s, 4, &n, err, sizeof err);
    assert_string_equal(err, "secret 2 contains whitespace");

    assert_int_equal(mr_stripe_parse_secrets("a,b,c,d,e", &storage, s, 4, &n, err, sizeof err),
                     MR_EINVAL);
    assert_null(storage);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_published_vectors),
        cmocka_unit_test(test_kept_keys_match_one_shot_hmac),
        cmocka_unit_test(test_sign_is_hmac_of_t_dot_body),
        cmocka_unit_test(test_valid),
        cmocka_unit_test(test_empty_body_valid),
        cmocka_unit_test(test_two_v1_second_matches),
        cmocka_unit_test(test_two_v1_none_matches),
        cmocka_unit_test(test_v0_only_fails),
        cmocka_unit_test(test_v1_plus_v0),
        cmocka_unit_test(test_empty_and_duplicate_elements),
        cmocka_unit_test(test_non_hex_and_wrong_case_v1),
        cmocka_unit_test(test_missing_or_bad_t),
        cmocka_unit_test(test_huge_header),
        cmocka_unit_test(test_body_one_byte_or_whitespace),
        cmocka_unit_test(test_tolerance),
        cmocka_unit_test(test_rotation_and_wrong_secret),
        cmocka_unit_test(test_parse_secrets),
    };
    return cmocka_run_group_tests_name("stripe", tests, NULL, NULL);
}
