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
    c.tls = PROV_TLS_LETSENCRYPT;
    c.app_prefix = "mindroom-";
    c.matrix_host_tpl = "{subdomain}-matrix";
    c.min_memory_mb = 128;
    c.max_memory_mb = 8192;
    c.max_cpu_milli = 4000;
    c.max_storage_gb = 100;
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
    for (size_t i = 0; good[i]; i++) assert_true(mr_appenv_valid_key(good[i]));
    for (size_t i = 0; bad[i]; i++) assert_false(mr_appenv_valid_key(bad[i]));
}

/* What a request may not set (the provisioner's, Dokku's, what the container's
 * processes run by), and what an operator may not set on top of it (the control
 * plane's own, which the control plane itself sends). */
static void test_env_reserved(void **state)
{
    (void)state;
    const char *reserved[] = {"DOKKU_APP_TYPE", "PORT", "PATH", "HOME", "LD_PRELOAD",
                              "LD_LIBRARY_PATH", "PYTHONPATH", "MATRIX_HOMESERVER",
                              "MINDROOM_STORAGE_PATH", "MINDROOM_CONFIG_PATH",
                              "MINDROOM_CONFIG_TEMPLATE", MR_APPENV_MANAGED, NULL};
    const char *ours[] = {"MINDROOM_INSTANCE_ID", "MINDROOM_TIER", "MAX_AGENTS",
                          MR_APPENV_CONTROL_PLANE_TOKEN, MR_APPENV_CONTROL_PLANE_URL, NULL};
    const char *free_[] = {"OPENAI_API_KEY", "PATHS", "LDAP_URL", "MINDROOM_LOG_LEVEL", NULL};
    for (size_t i = 0; reserved[i]; i++) {
        assert_true(mr_appenv_reserved_key(reserved[i]));
        assert_false(mr_appenv_operator_key(reserved[i]));
    }
    for (size_t i = 0; ours[i]; i++) {
        assert_false(mr_appenv_reserved_key(ours[i]));
        assert_false(mr_appenv_operator_key(ours[i]));
    }
    for (size_t i = 0; free_[i]; i++) assert_true(mr_appenv_operator_key(free_[i]));
    assert_false(mr_appenv_operator_key("lower_key"));
}

/* An operator's variable is counted as the worker's request carries it: cJSON's
 * own printing of {"KEY":value}, for every byte a value may hold. */
static void test_env_json_size_is_what_cjson_prints(void **state)
{
    (void)state;
    char value[300];
    size_t n = 0;
    for (int c = 1; c < 256; c++)
        value[n++] = (char)c;
    strcpy(value + n, "caf\xc3\xa9 \xe2\x9c\x93");
    const char *values[] = {"", "plain", "a\"b\\c", "line\nfeed\r\n\t\b\f", "\x01\x1f\x7f",
                            value};
    for (size_t i = 0; i < sizeof values / sizeof *values; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "OPENAI_API_KEY", values[i]);
        char *printed = cJSON_PrintUnformatted(o);
        /* {"KEY":"value"}: the braces stand for the comma that follows in a list. */
        assert_int_equal(mr_appenv_json_size("OPENAI_API_KEY", values[i]), strlen(printed) - 1);
        cJSON_free(printed);
        cJSON_Delete(o);
    }
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
    const char *body = "{\"app\":\"mindroom-a\",\"subdomain\":\"sa\",\"memory_mb\":512,\"cpu\":0.25,"
                       "\"env\":{\"ZED\":\"z\",\"ALPHA\":\"line\\nbreak\",\"MID\":\"\"}}";
    assert_int_equal(prov_parse_spec(body, strlen(body), &c, &tree, s, err, sizeof err), MR_OK);
    assert_string_equal(s->app, "mindroom-a");
    assert_string_equal(s->subdomain, "sa");
    assert_true(s->lim.memory_mb == 512);
    assert_true(s->lim.cpu_milli == 250);
    assert_true(s->lim.storage_gb == 0);
    assert_false(s->hs.present);
    assert_int_equal(s->n_env, 3);
    assert_string_equal(s->env[0].key, "ALPHA");   /* sorted */
    assert_string_equal(s->env[0].value, "line\nbreak");
    assert_string_equal(s->env[1].key, "MID");
    assert_string_equal(s->env[2].key, "ZED");
    cJSON_Delete(tree);

    /* env is optional; cpu may be an integer; bounds are inclusive. */
    assert_int_equal(parse("{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":128,"
                           "\"cpu\":4}", s, err), MR_OK);
    assert_true(s->lim.cpu_milli == 4000 && s->n_env == 0);
    assert_int_equal(parse("{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":8192,"
                           "\"cpu\":0.01,\"env\":null,\"storage_gb\":100,\"homeserver\":null}",
                           s, err), MR_OK);
    assert_true(s->lim.storage_gb == 100 && s->lim.cpu_milli == 10);
    free(s);
}

/* docker-local's least CPU limit is Docker's least --cpus, 0.01; k3s takes 1m. */
static void test_cpu_floor_by_scheduler(void **state)
{
    (void)state;
    prov_spec *s = calloc(1, sizeof *s);
    char err[256];
    const char *body = "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,"
                       "\"cpu\":0.009,\"storage_gb\":1}";
    prov_config c = cfg();
    cJSON *tree = NULL;
    assert_int_equal(prov_parse_spec(body, strlen(body), &c, &tree, s, err, sizeof err),
                     MR_EINVAL);
    assert_non_null(strstr(err, "0.01"));
    cJSON_Delete(tree);
    tree = NULL;
    c.scheduler = PROV_SCHED_K3S;
    assert_int_equal(prov_parse_spec(body, strlen(body), &c, &tree, s, err, sizeof err), MR_OK);
    assert_true(s->lim.cpu_milli == 9);
    cJSON_Delete(tree);
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
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b.c\",\"memory_mb\":512,\"cpu\":1}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":127,\"cpu\":1}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":8193,\"cpu\":1}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512.5,\"cpu\":1}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":\"512\",\"cpu\":1}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":0}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":-1}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":4.0001}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":0.0005}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1e400}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":\"1\"}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"x\":1}",
        "{\"app\":\"mindroom-a\",\"app\":\"b\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":[]}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"a\":\"1\"}}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"A=B\":\"1\"}}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"A B\":\"1\"}}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"A\":1}}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"A\":null}}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"A\":\"1\",\"A\":\"2\"}}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"DOKKU_X\":\"1\"}}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"env\":{\"MATRIX_HOMESERVER\":\"1\"}}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"storage_gb\":0}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"storage_gb\":101}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"homeserver\":{}}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1,\"homeserver\":[]}",
        "{\"app\":\"other\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1}",
        "{\"app\":\"mindroom-a-matrix\",\"subdomain\":\"b\",\"memory_mb\":512,\"cpu\":1}",
        "{\"app\":\"mindroom-a\",\"subdomain\":\"b-\",\"memory_mb\":512,\"cpu\":1}",
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
    assert_int_equal(parse("{\"app\":\"mindroom-a\",\"subdomain\":\"b\",\"memory_mb\":512,"
                           "\"cpu\":1,\"env\":{\"OK\":\"s3cr3t-value\",\"bad key\":\"s3cr3t-2\"}}",
                           s, err),
                     MR_EINVAL);
    assert_null(strstr(err, "s3cr3t"));
    assert_null(strstr(err, "bad key"));
    free(s);
}

/* Dokku reads the environment as JSON: a value must be UTF-8 to arrive unchanged. */
static void test_env_values_are_utf8(void **state)
{
    (void)state;
    prov_spec *s = calloc(1, sizeof *s);
    char err[256], body[256];
    const char *good[] = {"", "plain", "h\xc3\xa9llo \xe2\x98\x83", "\xf0\x9f\x98\x80",
                          "\xf4\x8f\xbf\xbf", "\x7f\x01\ttab", NULL};
    const char *bad[] = {"\xff", "a\xc3", "\xc0\xaf", "\xc1\xbf", "\xe0\x80\xaf",
                         "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xf8\x88\x80\x80\x80",
                         "\x80", "\xe2\x98", NULL};
    for (int pass = 0; pass < 2; pass++) {
        const char *const *list = pass ? bad : good;
        for (size_t i = 0; list[i]; i++) {
            snprintf(body, sizeof body, "{\"app\":\"mindroom-a\",\"subdomain\":\"b\","
                     "\"memory_mb\":512,\"cpu\":1,\"env\":{\"KEY\":\"%s\"}}", list[i]);
            err[0] = '\0';
            mr_err e = parse(body, s, err);
            if (pass == 0 && e != MR_OK) fail_msg("refused #%zu: %s", i, err);
            if (pass == 1 && e != MR_EINVAL) fail_msg("accepted #%zu", i);
            if (pass == 1) assert_non_null(strstr(err, "KEY"));
        }
    }
    free(s);
}

static void test_app_names(void **state)
{
    (void)state;
    prov_config c = cfg();
    const char *good[] = {"mindroom-0123456789ab", "mindroom-a", "mindroom-" "abcdefghijklmnopqrstuvwx",
                          NULL};
    const char *bad[] = {"mindroom-", "mindroom", "other-app", "dokku", "xmindroom-a",
                         "mindroom-a-matrix", "mindroom-a-data", "mindroom-A", "mindroom-a_b",
                         "mindroom-" "abcdefghijklmnopqrstuvwxy", "Mindroom-a", NULL};
    for (size_t i = 0; good[i]; i++)
        if (!prov_valid_app(&c, good[i])) fail_msg("refused %s", good[i]);
    for (size_t i = 0; bad[i]; i++)
        if (prov_valid_app(&c, bad[i])) fail_msg("accepted %s", bad[i]);
    assert_false(prov_valid_app(&c, NULL));
    c.app_prefix = "mr-";
    assert_true(prov_valid_app(&c, "mr-x1"));
    assert_false(prov_valid_app(&c, "mindroom-x1"));

    /* The longest app's derived names stay within Dokku's limits (storage: 45). */
    prov_names n;
    prov_names_of("mindroom-abcdefghijklmnopqrstuvwx", &n);
    assert_string_equal(n.hs_app, "mindroom-abcdefghijklmnopqrstuvwx-matrix");
    assert_string_equal(n.data, "mindroom-abcdefghijklmnopqrstuvwx-data");
    assert_string_equal(n.hs_data, "mindroom-abcdefghijklmnopqrstuvwx-matrix-data");
    assert_string_equal(n.network, "mindroom-abcdefghijklmnopqrstuvwx-net");
    assert_int_equal(strlen(n.hs_data), 45);
}

static void test_hosts(void **state)
{
    (void)state;
    const char *good[] = {"a", "mr.test", "a-b.c9.example.com", "xn--bcher-kva.example", NULL};
    const char *bad[] = {"", "A.b", "a..b", ".a", "a.", "-a.b", "a-.b", "a b", "a_b.c", "a:8448",
                         NULL};
    for (size_t i = 0; good[i]; i++) assert_true(prov_valid_host(good[i]));
    for (size_t i = 0; bad[i]; i++)
        if (prov_valid_host(bad[i])) fail_msg("accepted %s", bad[i]);
    char label[70];
    memset(label, 'a', 64);
    label[64] = '\0';
    assert_false(prov_valid_host(label));
    label[63] = '\0';
    assert_true(prov_valid_host(label));

    prov_config c = cfg();
    char out[300];
    assert_int_equal(prov_matrix_host(&c, "mindroom-a", "sa", out, sizeof out), MR_OK);
    assert_string_equal(out, "sa-matrix.mr.test");
    c.matrix_host_tpl = "matrix-{app}";
    assert_int_equal(prov_matrix_host(&c, "mindroom-a", "sa", out, sizeof out), MR_OK);
    assert_string_equal(out, "matrix-mindroom-a.mr.test");
    /* Always one label under the base domain: the wildcard covers it. */
    c.matrix_host_tpl = "matrix.{subdomain}";
    assert_int_equal(prov_matrix_host(&c, "mindroom-a", "sa", out, sizeof out), MR_EINVAL);
    c.matrix_host_tpl = "{subdomain}-matrix";
    char sub[64];
    memset(sub, 's', 57);
    sub[57] = '\0';
    assert_int_equal(prov_matrix_host(&c, "mindroom-a", sub, out, sizeof out), MR_EINVAL);
    sub[56] = '\0';
    assert_int_equal(prov_matrix_host(&c, "mindroom-a", sub, out, sizeof out), MR_OK);
    c.matrix_host_tpl = "{nope}";
    assert_int_equal(prov_matrix_host(&c, "mindroom-a", "sa", out, sizeof out), MR_EINVAL);
}

#define HS_OK "\"memory_mb\":256,\"cpu\":0.25,\"server_name\":\"sa-matrix.mr.test\"," \
              "\"signing_key\":\"ed25519 a_AbCd nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A\"," \
              "\"registration_shared_secret\":\"reg-0123456789abcdef0123456789abcdef\"," \
              "\"macaroon_secret_key\":\"mac-0123456789abcdef0123456789abcdef\"," \
              "\"form_secret\":\"frm-0123456789abcdef0123456789abcdef\""
#define APP_OK "\"app\":\"mindroom-a\",\"subdomain\":\"sa\",\"memory_mb\":512,\"cpu\":1"

static void test_homeserver(void **state)
{
    (void)state;
    prov_spec *s = calloc(1, sizeof *s);
    char err[256];
    prov_config c = cfg();
    cJSON *tree = NULL;
    const char *ok = "{" APP_OK ",\"homeserver\":{" HS_OK ",\"storage_gb\":7}}";
    assert_int_equal(prov_parse_spec(ok, strlen(ok), &c, &tree, s, err, sizeof err), MR_OK);
    assert_true(s->hs.present);
    assert_true(s->hs.lim.memory_mb == 256 && s->hs.lim.cpu_milli == 250);
    assert_true(s->hs.lim.storage_gb == 7);
    assert_string_equal(s->hs.server_name, "sa-matrix.mr.test");
    assert_string_equal(s->hs.form_secret, "frm-0123456789abcdef0123456789abcdef");
    cJSON_Delete(tree);

    const char *bad[] = {
        "{" APP_OK ",\"homeserver\":{" HS_OK ",\"extra\":1}}",
        "{" APP_OK ",\"homeserver\":{" HS_OK ",\"cpu\":1}}",              /* duplicate */
        "{" APP_OK ",\"homeserver\":{\"cpu\":0.25}}",
        NULL};
    for (size_t i = 0; bad[i]; i++)
        if (parse(bad[i], s, err) != MR_EINVAL) fail_msg("accepted: %s", bad[i]);

    /* Wrong secrets are named, never shown. */
    assert_int_equal(parse("{" APP_OK ",\"homeserver\":{\"memory_mb\":256,\"cpu\":0.25,"
                           "\"server_name\":\"sa-matrix.mr.test\",\"signing_key\":\"ed25519 a_X "
                           "SECRETSEED\",\"registration_shared_secret\":\"x\",\"macaroon_secret_key\":"
                           "\"x\",\"form_secret\":\"x\"}}", s, err), MR_EINVAL);
    assert_non_null(strstr(err, "signing_key"));
    assert_null(strstr(err, "SECRETSEED"));
    assert_int_equal(parse("{" APP_OK ",\"homeserver\":{\"memory_mb\":256,\"cpu\":0.25,"
                           "\"server_name\":\"sa-matrix.mr.test\",\"signing_key\":"
                           "\"ed25519 a_AbCd nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A\","
                           "\"registration_shared_secret\":\"reg-0123456789abcdef0123456789abcdef\","
                           "\"macaroon_secret_key\":\"SHORTSECRET\",\"form_secret\":\"x\"}}", s, err),
                     MR_EINVAL);
    assert_non_null(strstr(err, "macaroon_secret_key"));
    assert_null(strstr(err, "SHORTSECRET"));
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
    c.tls = PROV_TLS_OFF;
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
        cmocka_unit_test(test_env_reserved),
        cmocka_unit_test(test_env_json_size_is_what_cjson_prints),
        cmocka_unit_test(test_images),
        cmocka_unit_test(test_parse_good),
        cmocka_unit_test(test_cpu_floor_by_scheduler),
        cmocka_unit_test(test_env_values_are_utf8),
        cmocka_unit_test(test_parse_bad),
        cmocka_unit_test(test_env_values_never_in_messages),
        cmocka_unit_test(test_app_names),
        cmocka_unit_test(test_hosts),
        cmocka_unit_test(test_homeserver),
        cmocka_unit_test(test_cpu_format),
        cmocka_unit_test(test_urls),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
