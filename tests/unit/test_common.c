/* test_common.c: constant-time comparison, the error -> HTTP mapping, the UUID check. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "mindroom.h"

static void test_ct_equal(void **state)
{
    (void)state;
    assert_true(mr_ct_equal("abc", 3, "abc", 3));
    assert_false(mr_ct_equal("abc", 3, "abd", 3));
    assert_false(mr_ct_equal("abc", 3, "xbc", 3));
    assert_false(mr_ct_equal("abc", 3, "abcd", 4)); /* prefix is not equal */
    assert_false(mr_ct_equal("abcd", 4, "abc", 3));
    assert_true(mr_ct_equal("", 0, "", 0));
    assert_false(mr_ct_equal("", 0, "a", 1));
    assert_false(mr_ct_equal("a", 1, "", 0));
    /* Embedded NULs are compared, not treated as terminators. */
    assert_false(mr_ct_equal("a\0b", 3, "a\0c", 3));
    assert_true(mr_ct_equal("a\0b", 3, "a\0b", 3));
    /* A longer b whose extra byte is zero still differs in length. */
    assert_false(mr_ct_equal("ab", 2, "ab\0", 3));
}

static void test_hex(void **state)
{
    (void)state;
    const unsigned char b[] = {0x00, 0x0f, 0x10, 0xa5, 0xff};
    char out[2 * sizeof b + 2];
    memset(out, 'x', sizeof out);
    mr_hex(b, sizeof b, out);
    assert_string_equal(out, "000f10a5ff"); /* lowercase, NUL-terminated */
    assert_int_equal(out[sizeof out - 1], 'x'); /* nothing past 2n + 1 */
    mr_hex(b, 0, out);
    assert_string_equal(out, "");
}

static void test_is_uuid(void **state)
{
    (void)state;
    assert_true(mr_is_uuid("5eed5eed-0000-4000-8000-000000000101"));
    assert_true(mr_is_uuid("ABCDEF00-0000-4000-8000-00000000abcd"));
    assert_false(mr_is_uuid(NULL));
    assert_false(mr_is_uuid(""));
    assert_false(mr_is_uuid("5eed5eed000040008000000000000101"));      /* no dashes */
    assert_false(mr_is_uuid("5eed5eed-0000-4000-8000-00000000010"));   /* short */
    assert_false(mr_is_uuid("5eed5eed-0000-4000-8000-0000000001011")); /* long */
    assert_false(mr_is_uuid("5eed5eed-0000-4000-8000-00000000010g"));  /* not hex */
    assert_false(mr_is_uuid("5eed5eed-0000-4000-8000+000000000101"));  /* bad dash */
    assert_false(mr_is_uuid("5eed5eed-0000-4000-8000-00000000010\n"));
    assert_false(mr_is_uuid("'; drop table x; --000000000000000000"));
}

static void test_err_mapping(void **state)
{
    (void)state;
    struct { mr_err e; int status; const char *name; } m[] = {
        {MR_OK, 200, "ok"},
        {MR_EINVAL, 400, "invalid"},
        {MR_EAUTH, 401, "unauthorized"},
        {MR_EFORBIDDEN, 403, "forbidden"},
        {MR_ENOTFOUND, 404, "not_found"},
        {MR_ECONFLICT, 409, "conflict"},
        {MR_ETOOBIG, 413, "too_big"},
        {MR_ETRANSIENT, 503, "transient"},
        {MR_EINTERNAL, 500, "internal"},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(m); i++) {
        assert_int_equal(mr_err_status(m[i].e), m[i].status);
        assert_string_equal(mr_err_name(m[i].e), m[i].name);
    }
    /* Out-of-range values are a bug, reported as one. */
    assert_int_equal(mr_err_status((mr_err)99), 500);
    assert_string_equal(mr_err_name((mr_err)-1), "internal");
}

static void test_seterr(void **state)
{
    (void)state;
    char err[8];
    assert_int_equal(mr_seterr(err, sizeof(err), MR_ECONFLICT, "x=%d", 123456789), MR_ECONFLICT);
    assert_string_equal(err, "x=12345"); /* truncated, always terminated */
    assert_int_equal(mr_seterr(NULL, 0, MR_EINVAL, "ignored"), MR_EINVAL);
}

static void test_now_ms(void **state)
{
    (void)state;
    int64_t a = mr_now_ms();
    struct timespec ts = {0, 20 * 1000000};
    nanosleep(&ts, NULL);
    int64_t b = mr_now_ms();
    assert_true(b - a >= 20);
    assert_true(b - a < 5000);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ct_equal),
        cmocka_unit_test(test_hex),
        cmocka_unit_test(test_is_uuid),
        cmocka_unit_test(test_err_mapping),
        cmocka_unit_test(test_seterr),
        cmocka_unit_test(test_now_ms),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
