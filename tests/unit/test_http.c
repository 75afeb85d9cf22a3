/* test_http.c: the request parsers the runtime trusts with untrusted input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "mindroom.h"

static void test_content_length(void **state)
{
    (void)state;
    size_t len = 99;
    assert_int_equal(mr_http_content_length(NULL, 100, &len), MR_OK);
    assert_int_equal(len, 0);
    assert_int_equal(mr_http_content_length("", 100, &len), MR_OK);
    assert_int_equal(len, 0);
    assert_int_equal(mr_http_content_length("0", 100, &len), MR_OK);
    assert_int_equal(len, 0);
    assert_int_equal(mr_http_content_length("100", 100, &len), MR_OK);
    assert_int_equal(len, 100);
    assert_int_equal(mr_http_content_length("0042", 100, &len), MR_OK);
    assert_int_equal(len, 42);
    assert_int_equal(mr_http_content_length("101", 100, &len), MR_ETOOBIG);
    assert_int_equal(mr_http_content_length("65537", 65536, &len), MR_ETOOBIG);
    /* Far past SIZE_MAX: must not wrap around to something small. */
    assert_int_equal(mr_http_content_length("18446744073709551617", 100, &len), MR_ETOOBIG);
    assert_int_equal(mr_http_content_length("99999999999999999999999999999999", SIZE_MAX, &len),
                     MR_ETOOBIG);
    /* A cap smaller than one digit. */
    assert_int_equal(mr_http_content_length("5", 0, &len), MR_ETOOBIG);
    assert_int_equal(mr_http_content_length("0", 0, &len), MR_OK);
    assert_int_equal(mr_http_content_length("9", 9, &len), MR_OK);
    assert_int_equal(len, 9);
    const char *bad[] = {"-1", "+5", " 5", "5 ", "0x10", "1e3", "12a", "abc", "-0", "1.0", "\t1"};
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++)
        assert_int_equal(mr_http_content_length(bad[i], 100, &len), MR_EINVAL);
}

typedef struct {
    const char *data;
    size_t len, pos, chunk;
} feed;

static int feed_read(void *ctx, char *buf, int n)
{
    feed *f = ctx;
    size_t k = f->len - f->pos;
    if (k > (size_t)n)
        k = (size_t)n;
    if (k > f->chunk)
        k = f->chunk;
    memcpy(buf, f->data + f->pos, k);
    f->pos += k;
    return (int)k;
}

static int failing_read(void *ctx, char *buf, int n)
{
    (void)ctx;
    (void)buf;
    (void)n;
    return -1;
}

static void test_read_exact(void **state)
{
    (void)state;
    mr_err e;
    /* Bytes arriving in small pieces are reassembled. */
    feed f = {"{\"a\":1}", 7, 0, 2};
    char *b = mr_http_read_exact(feed_read, &f, 7, &e);
    assert_non_null(b);
    assert_int_equal(e, MR_OK);
    assert_string_equal(b, "{\"a\":1}");
    free(b);
    /* A short read (client promised 10, sent 7) is an error, not a shorter body. */
    feed s = {"{\"a\":1}", 7, 0, 100};
    assert_null(mr_http_read_exact(feed_read, &s, 10, &e));
    assert_int_equal(e, MR_EINVAL);
    /* Only len bytes are taken even when more are available. */
    feed m = {"abcdef", 6, 0, 100};
    b = mr_http_read_exact(feed_read, &m, 3, &e);
    assert_string_equal(b, "abc");
    free(b);
    /* Zero length: an empty, NUL-terminated buffer. */
    b = mr_http_read_exact(feed_read, &m, 0, &e);
    assert_non_null(b);
    assert_string_equal(b, "");
    free(b);
    assert_null(mr_http_read_exact(failing_read, NULL, 5, &e));
    assert_int_equal(e, MR_EINVAL);
    /* Binary content with a NUL inside is kept byte for byte. */
    feed z = {"a\0b", 3, 0, 1};
    b = mr_http_read_exact(feed_read, &z, 3, &e);
    assert_memory_equal(b, "a\0b", 4);
    free(b);
}

static void test_bearer(void **state)
{
    (void)state;
    assert_string_equal(mr_http_bearer("Bearer abc.def.ghi"), "abc.def.ghi");
    assert_string_equal(mr_http_bearer("bearer abc"), "abc");
    assert_string_equal(mr_http_bearer("BEARER   abc"), "abc");
    assert_string_equal(mr_http_bearer("Bearer\tabc"), "abc");
    assert_null(mr_http_bearer(NULL));
    assert_null(mr_http_bearer(""));
    assert_null(mr_http_bearer("Bearer"));
    assert_null(mr_http_bearer("Bearer "));
    assert_null(mr_http_bearer("Bearerabc"));
    assert_null(mr_http_bearer("Basic dXNlcjpwYXNz"));
    assert_null(mr_http_bearer("Token abc"));
}

static void test_query_param(void **state)
{
    (void)state;
    char out[32];
    assert_int_equal(mr_http_query_param("id=42&mode=stop", "mode", out, sizeof(out)), MR_OK);
    assert_string_equal(out, "stop");
    assert_int_equal(mr_http_query_param("id=42&mode=stop", "id", out, sizeof(out)), MR_OK);
    assert_string_equal(out, "42");
    assert_int_equal(mr_http_query_param("a=x%20y+z%2B", "a", out, sizeof(out)), MR_OK);
    assert_string_equal(out, "x y z+");
    assert_int_equal(mr_http_query_param("flag&b=1", "flag", out, sizeof(out)), MR_OK);
    assert_string_equal(out, "");
    /* A key given twice is ambiguous: refused, whichever value is valid. */
    assert_int_equal(mr_http_query_param("a=1&a=2", "a", out, sizeof(out)), MR_EINVAL);
    assert_int_equal(mr_http_query_param("a=1&b=2&a", "a", out, sizeof(out)), MR_EINVAL);
    assert_int_equal(mr_http_query_param("a=1&%61=1", "a", out, sizeof(out)), MR_EINVAL);
    assert_int_equal(mr_http_query_param("%69d=7", "id", out, sizeof(out)), MR_OK);
    assert_string_equal(out, "7");
    /* Key match is exact, not a prefix. */
    assert_int_equal(mr_http_query_param("idx=1&xid=2", "id", out, sizeof(out)), MR_ENOTFOUND);
    assert_int_equal(mr_http_query_param("", "id", out, sizeof(out)), MR_ENOTFOUND);
    assert_int_equal(mr_http_query_param(NULL, "id", out, sizeof(out)), MR_ENOTFOUND);
    assert_int_equal(mr_http_query_param("&&=&id", "id", out, sizeof(out)), MR_OK);
    /* Bad escapes, an encoded NUL, and overflow are errors, not truncations. */
    assert_int_equal(mr_http_query_param("a=%zz", "a", out, sizeof(out)), MR_EINVAL);
    assert_int_equal(mr_http_query_param("a=%4", "a", out, sizeof(out)), MR_EINVAL);
    assert_int_equal(mr_http_query_param("a=%", "a", out, sizeof(out)), MR_EINVAL);
    assert_int_equal(mr_http_query_param("a=x%00y", "a", out, sizeof(out)), MR_EINVAL);
    char small[4];
    assert_int_equal(mr_http_query_param("a=abcd", "a", small, sizeof(small)), MR_EINVAL);
    assert_int_equal(mr_http_query_param("a=abc", "a", small, sizeof(small)), MR_OK);
    assert_string_equal(small, "abc");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_content_length),
        cmocka_unit_test(test_read_exact),
        cmocka_unit_test(test_bearer),
        cmocka_unit_test(test_query_param),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
