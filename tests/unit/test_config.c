/* test_config.c: configuration values refused before a function starts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

#include "mindroom.h"

#define GOOD_SECRET "super-secret-jwt-token-with-at-least-32-characters-long"

static void test_secret(void **state)
{
    (void)state;
    char err[256];
    assert_int_equal(mr_config_check_secret("S", GOOD_SECRET, 32, err, sizeof(err)), MR_OK);
    assert_int_equal(mr_config_check_secret("S", NULL, 32, err, sizeof(err)), MR_EINVAL);
    assert_non_null(strstr(err, "S is required"));
    assert_int_equal(mr_config_check_secret("S", "", 32, err, sizeof(err)), MR_EINVAL);
    assert_int_equal(mr_config_check_secret("S", "short", 32, err, sizeof(err)), MR_EINVAL);
    assert_non_null(strstr(err, "too short"));
    assert_null(strstr(err, "short\"")); /* the value itself is never echoed */
    assert_int_equal(mr_config_check_secret("S", "0123456789012345678901234567890", 32, err,
                                            sizeof(err)), MR_EINVAL); /* 31 */
    assert_int_equal(mr_config_check_secret("S", "01234567890123456789012345678901", 32, err,
                                            sizeof(err)), MR_OK);     /* 32 */
    const char *ws[] = {" " GOOD_SECRET, GOOD_SECRET " ", GOOD_SECRET "\n", "\t" GOOD_SECRET,
                        GOOD_SECRET "\r\n"};
    for (size_t i = 0; i < MR_ARRAY_LEN(ws); i++) {
        assert_int_equal(mr_config_check_secret("SUPABASE_JWT_SECRET", ws[i], 32, err, sizeof(err)),
                         MR_EINVAL);
        assert_non_null(strstr(err, "SUPABASE_JWT_SECRET"));
        assert_null(strstr(err, GOOD_SECRET));
    }
    assert_int_equal(mr_config_check_secret("S", "super-secret\x01-jwt-token-with-at-least-32", 32,
                                            err, sizeof(err)), MR_EINVAL);
}

static void test_int(void **state)
{
    (void)state;
    char err[256];
    int64_t v = -1;
    assert_int_equal(mr_config_parse_int("N", NULL, 7, 1, 10, &v, err, sizeof(err)), MR_OK);
    assert_int_equal(v, 7);
    assert_int_equal(mr_config_parse_int("N", "", 7, 1, 10, &v, err, sizeof(err)), MR_OK);
    assert_int_equal(v, 7);
    assert_int_equal(mr_config_parse_int("N", "10", 7, 1, 10, &v, err, sizeof(err)), MR_OK);
    assert_int_equal(v, 10);
    assert_int_equal(mr_config_parse_int("N", "-3", 0, -5, 5, &v, err, sizeof(err)), MR_OK);
    assert_int_equal(v, -3);
    v = 99;
    assert_int_equal(mr_config_parse_int("MR_WORKERS", "11", 7, 1, 10, &v, err, sizeof(err)), MR_EINVAL);
    assert_non_null(strstr(err, "MR_WORKERS"));
    assert_non_null(strstr(err, "between 1 and 10"));
    assert_int_equal(mr_config_parse_int("N", "0", 7, 1, 10, &v, err, sizeof(err)), MR_EINVAL);
    const char *bad[] = {"abc", "1x", " 5", "5 ", "0x10", "1.5", "+", "-", "99999999999999999999",
                         "--1", "1e3"};
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++)
        assert_int_equal(mr_config_parse_int("N", bad[i], 7, INT64_MIN, INT64_MAX, &v, err,
                                             sizeof(err)), MR_EINVAL);
    assert_int_equal(v, 99); /* untouched on failure */
}

static void test_bool(void **state)
{
    (void)state;
    char err[256];
    int v = -1;
    const char *yes[] = {"1", "true", "TRUE", "yes", "on", "On"};
    const char *no[] = {"0", "false", "no", "off", "OFF"};
    for (size_t i = 0; i < MR_ARRAY_LEN(yes); i++) {
        assert_int_equal(mr_config_parse_bool("B", yes[i], 0, &v, err, sizeof(err)), MR_OK);
        assert_int_equal(v, 1);
    }
    for (size_t i = 0; i < MR_ARRAY_LEN(no); i++) {
        assert_int_equal(mr_config_parse_bool("B", no[i], 1, &v, err, sizeof(err)), MR_OK);
        assert_int_equal(v, 0);
    }
    assert_int_equal(mr_config_parse_bool("B", NULL, 1, &v, err, sizeof(err)), MR_OK);
    assert_int_equal(v, 1);
    assert_int_equal(mr_config_parse_bool("MR_FLAG", "maybe", 1, &v, err, sizeof(err)), MR_EINVAL);
    assert_non_null(strstr(err, "MR_FLAG"));
    assert_int_equal(mr_config_parse_bool("B", "2", 1, &v, err, sizeof(err)), MR_EINVAL);
    assert_int_equal(mr_config_parse_bool("B", " true", 1, &v, err, sizeof(err)), MR_EINVAL);
}

static void test_env_wrappers(void **state)
{
    (void)state;
    setenv("MR_TEST_STR", "value", 1);
    assert_string_equal(mr_config_str("MR_TEST_STR", NULL), "value");
    unsetenv("MR_TEST_STR");
    assert_string_equal(mr_config_str("MR_TEST_STR", "dflt"), "dflt");
    setenv("MR_TEST_STR", "", 1); /* empty counts as unset */
    assert_string_equal(mr_config_str("MR_TEST_STR", "dflt"), "dflt");
    setenv("MR_TEST_INT", "12", 1);
    assert_int_equal(mr_config_int("MR_TEST_INT", 1, 0, 100), 12);
    setenv("MR_TEST_BOOL", "yes", 1);
    assert_int_equal(mr_config_bool("MR_TEST_BOOL", 0), 1);
    setenv("MR_TEST_SECRET", GOOD_SECRET, 1);
    assert_string_equal(mr_config_secret("MR_TEST_SECRET", NULL, 32), GOOD_SECRET);
    unsetenv("MR_TEST_SECRET");
    assert_string_equal(mr_config_secret("MR_TEST_SECRET", "fallback", 32), "fallback");
}

static void test_url(void **state)
{
    (void)state;
    char err[256];
    static const char *const good[] = {
        "https://app.mindroom.test/billing/done?session_id={CHECKOUT_SESSION_ID}",
        "http://127.0.0.1:3000/account", "https://x.test", "https://x.test/#plans"};
    for (size_t i = 0; i < MR_ARRAY_LEN(good); i++)
        assert_int_equal(mr_config_check_url("U", good[i], err, sizeof err), MR_OK);
    static const struct {
        const char *url, *says;
    } bad[] = {
        {NULL, "U is required but not set"},
        {"", "U is required but not set"},
        {"/billing/done", "U is not an absolute URL"},
        {"https://", "U is not an absolute URL"},
        {"javascript:alert(1)", "U is not an absolute URL"},
        {"ftp://x.test/", "U must be an http:// or https:// URL"},
        {"https://x.test/a b", "U contains whitespace or control characters"},
        {"https://x.test/\r\nSet-Cookie: a=b", "U contains whitespace or control characters"},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        assert_int_equal(mr_config_check_url("U", bad[i].url, err, sizeof err), MR_EINVAL);
        assert_string_equal(err, bad[i].says);
    }
    char longer[2100];
    memset(longer, 'a', sizeof longer - 1);
    memcpy(longer, "https://x.test/", 15);
    longer[sizeof longer - 1] = '\0';
    assert_int_equal(mr_config_check_url("U", longer, err, sizeof err), MR_EINVAL);
    assert_string_equal(err, "U is longer than 2048 characters");
}

/* A process keeps the secret settings it read, by any reader, and no other. */
static void test_seal(void **state)
{
    (void)state;
    setenv("STRIPE_SECRET_KEY", "sk_test_" GOOD_SECRET, 1);
    setenv("MINDROOM_SECRETS_KEY", GOOD_SECRET, 1);
    setenv("RESEND_API_KEY", "re_" GOOD_SECRET, 1);
    setenv("DOKKU_PROVISIONER_TOKEN", GOOD_SECRET, 1);
    setenv("CLUSTER_1_TOKEN", GOOD_SECRET, 1);
    setenv("MR_TEST_PLAIN", "kept", 1);
    char *resend = getenv("RESEND_API_KEY");
    assert_non_null(mr_config_secret("MINDROOM_SECRETS_KEY", NULL, 32));
    assert_non_null(mr_config_getenv("DOKKU_PROVISIONER_TOKEN"));
    /* Read, then given up. */
    assert_non_null(mr_config_getenv("STRIPE_SECRET_KEY"));
    mr_config_forget("STRIPE_SECRET_KEY");
    mr_config_seal(0);
    assert_string_equal(getenv("MINDROOM_SECRETS_KEY"), GOOD_SECRET);
    assert_string_equal(getenv("DOKKU_PROVISIONER_TOKEN"), GOOD_SECRET);
    assert_null(getenv("STRIPE_SECRET_KEY"));
    assert_null(getenv("RESEND_API_KEY"));
    assert_null(getenv("CLUSTER_1_TOKEN")); /* a provisioner target's */
    /* Its bytes, where /proc/PID/environ would still show them, are wiped. */
    for (size_t i = 0; i < strlen("re_" GOOD_SECRET); i++)
        assert_int_equal(resend[i], 0);
    assert_string_equal(getenv("MR_TEST_PLAIN"), "kept");
    assert_int_equal(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_secret),
        cmocka_unit_test(test_url),
        cmocka_unit_test(test_int),
        cmocka_unit_test(test_bool),
        cmocka_unit_test(test_env_wrappers),
        cmocka_unit_test(test_seal),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
