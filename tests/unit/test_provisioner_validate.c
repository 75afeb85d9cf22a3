/* test_provisioner_validate.c: the dokku-provisioner's input rules, the only
 * thing standing between a request and a `dokku` command line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

/* The module under test is part of the function's binary, not of libmindroom. */
#include "../../functions/dokku-provisioner/validate.c"

static prov_config cfg(void)
{
    prov_config c;
    memset(&c, 0, sizeof c);
    c.base_domain = "mr.test";
    c.tls = 1;
    c.min_memory_mb = 128;
    c.max_memory_mb = 8192;
    c.max_cpu_milli = 4000;
    return c;
}

static void test_names(void **state)
{
    (void)state;
    const char *good[] = {"a", "mindroom-0123456789ab", "a-", "z9", NULL};
    const char *bad[] = {"", "A", "-a", "1a", "a;rm -rf /", "../x", "a b", "a_b", "a.b",
                         "a\nb", "\xc3\xa4", NULL};
    for (size_t i = 0; good[i]; i++) assert_true(prov_valid_name(good[i]));
    for (size_t i = 0; bad[i]; i++) assert_false(prov_valid_name(bad[i]));
    char n[70];
    memset(n, 'a', sizeof n);
    n[63] = '\0';
    assert_true(prov_valid_name(n));   /* 63 characters */
    n[63] = 'a';
    n[64] = '\0';
    assert_false(prov_valid_name(n));  /* 64 */
    assert_false(prov_valid_name(NULL));
}

static void test_env_keys(void **state)
{
    (void)state;
    const char *good[] = {"A", "_", "A_B9", "OPENAI_API_KEY", NULL};
    const char *bad[] = {"", "a", "1A", "A=B", "A B", "A-B", "A\n", "\xc3\x84", NULL};
    for (size_t i = 0; good[i]; i++) assert_true(prov_valid_env_key(good[i]));
    for (size_t i = 0; bad[i]; i++) assert_false(prov_valid_env_key(bad[i]));
}

static void test_images(void **state)
{
    (void)state;
    char ok[200], hex[65];
    memset(hex, 'a', 64);
    hex[64] = '\0';
    snprintf(ok, sizeof ok, "ghcr.io/org/mindroom@sha256:%s", hex);
    assert_true(prov_valid_image(ok));
    snprintf(ok, sizeof ok, "localhost:5000/mindroom:v1@sha256:%s", hex);
    assert_true(prov_valid_image(ok));
    snprintf(ok, sizeof ok, "mindroom@sha256:%.63s", hex);
    assert_false(prov_valid_image(ok));
    snprintf(ok, sizeof ok, "mindroom@sha256:%sA", hex);
    assert_false(prov_valid_image(ok));
    snprintf(ok, sizeof ok, "mindroom@sha512:%s", hex);
    assert_false(prov_valid_image(ok));
    snprintf(ok, sizeof ok, "Mind room@sha256:%s", hex);
    assert_false(prov_valid_image(ok));
    snprintf(ok, sizeof ok, "@sha256:%s", hex);
    assert_false(prov_valid_image(ok));
    assert_false(prov_valid_image("mindroom:latest"));
    assert_false(prov_valid_image(NULL));
}

static mr_err parse(const char *body, prov_spec *spec, char *err)
{
    prov_config c = cfg();
    cJSON *tree = NULL;
    mr_err e = prov_parse_spec(body, strlen(body), &c, &tree, spec, err, 256);
    cJSON_Delete(tree);
    return e;
}

static void test_parse_good(void **state)
{
    (void)state;
    prov_spec *s = calloc(1, sizeof *s);
    char err[256];
    prov_config c = cfg();
    cJSON *tree = NULL;
    const char *body = "{\"app\":\"mr-a\",\"subdomain\":\"sa\",\"memory_mb\":512,\"cpu\":0.25,"
                       "\"env\":{\"ZED\":\"z\",\"ALPHA\":\"line\\nbreak\",\"MID\":\"\"}}";
    assert_int_equal(prov_parse_spec(body, strlen(body), &c, &tree, s, err, sizeof err), MR_OK);
    assert_string_equal(s->app, "mr-a");
    assert_string_equal(s->subdomain, "sa");
    assert_true(s->memory_mb == 512);
    assert_true(s->cpu_milli == 250);
    assert_int_equal(s->n_env, 3);
    assert_string_equal(s->env[0].key, "ALPHA");   /* sorted */
    assert_string_equal(s->env[0].value, "line\nbreak");
    assert_string_equal(s->env[1].key, "MID");
    assert_string_equal(s->env[2].key, "ZED");
    cJSON_Delete(tree);

    /* env is optional; cpu may be an integer; bounds are inclusive. */
    assert_int_equal(parse("{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":128,\"cpu\":4}",
                           s, err), MR_OK);
    assert_true(s->cpu_milli == 4000 && s->n_env == 0);
    assert_int_equal(parse("{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":8192,\"cpu\":0.001,"
                           "\"env\":null}", s, err), MR_OK);
    free(s);
}

static void test_parse_bad(void **state)
{
    (void)state;
    prov_spec *s = calloc(1, sizeof *s);
    char err[256];
    const char *bad[] = {
        "", "{", "[]", "null", "\"x\"", "{}",
        "{\"app\":\"A\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1}",
        "{\"app\":\"a\",\"subdomain\":\"b.c\",\"memory_mb\":512,\"cpu\":1}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":127,\"cpu\":1}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":8193,\"cpu\":1}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512.5,\"cpu\":1}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":\"512\",\"cpu\":1}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":0}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":-1}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":4.0001}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":0.0005}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1e400}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":\"1\"}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"x\":1}",
        "{\"app\":\"a\",\"app\":\"b\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":[]}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"a\":\"1\"}}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"A=B\":\"1\"}}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"A B\":\"1\"}}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"A\":1}}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"A\":null}}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"A\":\"1\",\"A\":\"2\"}}",
        "{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"DOKKU_X\":\"1\"}}",
        NULL,
    };
    for (size_t i = 0; bad[i]; i++) {
        err[0] = '\0';
        mr_err e = parse(bad[i], s, err);
        if (e != MR_EINVAL) fail_msg("accepted: %s", bad[i]);
        assert_true(err[0] != '\0');
    }
    free(s);
}

static void test_env_values_never_in_messages(void **state)
{
    (void)state;
    prov_spec *s = calloc(1, sizeof *s);
    char err[256];
    assert_int_equal(parse("{\"app\":\"a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,"
                           "\"env\":{\"OK\":\"s3cr3t-value\",\"bad key\":\"s3cr3t-2\"}}", s, err),
                     MR_EINVAL);
    assert_null(strstr(err, "s3cr3t"));
    assert_null(strstr(err, "bad key"));
    free(s);
}

static void test_cpu_format(void **state)
{
    (void)state;
    char b[32];
    prov_format_cpu(1000, b, sizeof b);
    assert_string_equal(b, "1");
    prov_format_cpu(500, b, sizeof b);
    assert_string_equal(b, "0.5");
    prov_format_cpu(1250, b, sizeof b);
    assert_string_equal(b, "1.25");
    prov_format_cpu(1, b, sizeof b);
    assert_string_equal(b, "0.001");
    prov_format_cpu(12030, b, sizeof b);
    assert_string_equal(b, "12.03");
}

static void test_urls(void **state)
{
    (void)state;
    prov_config c = cfg();
    char out[64];
    assert_int_equal(prov_expand_url("{scheme}://{subdomain}.{domain}/api", "app", "sub", &c,
                                     out, sizeof out), MR_OK);
    assert_string_equal(out, "https://sub.mr.test/api");
    c.tls = 0;
    assert_int_equal(prov_expand_url("{scheme}://x/{app}", "app", "sub", &c, out, sizeof out),
                     MR_OK);
    assert_string_equal(out, "http://x/app");
    assert_int_equal(prov_expand_url("{scheme}://{nope}", "a", "s", &c, out, sizeof out),
                     MR_EINVAL);
    assert_int_equal(prov_expand_url("https://{subdomain}.{domain}", "a",
                                     "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                                     &c, out, sizeof out), MR_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_env_keys),
        cmocka_unit_test(test_images),
        cmocka_unit_test(test_parse_good),
        cmocka_unit_test(test_parse_bad),
        cmocka_unit_test(test_env_values_never_in_messages),
        cmocka_unit_test(test_cpu_format),
        cmocka_unit_test(test_urls),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
