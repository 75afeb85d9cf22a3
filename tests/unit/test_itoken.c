/* test_itoken.c: instance tokens (lib/mr_itoken.c) and what an instance's usage
 * report may say (functions/track-usage/report.c): the shapes accepted, and
 * everything else refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/sha.h>

#include "mindroom.h"
#include "mr_itoken.h"

/* The module under test is part of the function's binary, not of libmindroom. */
#include "../../functions/track-usage/report.c"

static int is_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return s[n] == '\0';
}

static void test_generate(void **state)
{
    (void)state;
    char t1[MR_ITOKEN_LEN + 1], k1[MR_ITOKEN_KEY_ID_LEN + 1], h1[MR_ITOKEN_HASH_HEX_LEN + 1];
    char t2[MR_ITOKEN_LEN + 1], k2[MR_ITOKEN_KEY_ID_LEN + 1], h2[MR_ITOKEN_HASH_HEX_LEN + 1];
    assert_int_equal(mr_itoken_generate(t1, k1, h1), MR_OK);
    assert_int_equal(mr_itoken_generate(t2, k2, h2), MR_OK);
    assert_int_equal(strlen(t1), MR_ITOKEN_LEN);
    assert_int_equal(MR_ITOKEN_LEN, 64);
    assert_memory_equal(t1, "mri_", 4);
    assert_true(is_hex(k1, MR_ITOKEN_KEY_ID_LEN) && is_hex(h1, MR_ITOKEN_HASH_HEX_LEN));
    assert_memory_equal(t1 + 4, k1, MR_ITOKEN_KEY_ID_LEN);
    assert_int_equal(t1[20], '_');
    /* Two tokens share nothing: neither key id nor secret nor hash. */
    assert_string_not_equal(k1, k2);
    assert_string_not_equal(t1 + 21, t2 + 21);
    assert_string_not_equal(h1, h2);
    /* The hash is SHA-256 of the whole token, as PostgreSQL stores it. */
    char h[MR_ITOKEN_HASH_HEX_LEN + 1];
    mr_itoken_hash_hex(t1, strlen(t1), h);
    assert_string_equal(h, h1);
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)t1, strlen(t1), md);
    char x[3];
    snprintf(x, sizeof x, "%02x", md[0]);
    assert_memory_equal(h1, x, 2);
    /* What was generated parses back to its key id and verifies against its hash. */
    char k[MR_ITOKEN_KEY_ID_LEN + 1];
    assert_int_equal(mr_itoken_parse(t1, strlen(t1), k), MR_OK);
    assert_string_equal(k, k1);
    assert_true(mr_itoken_verify(t1, strlen(t1), h1));
    assert_false(mr_itoken_verify(t1, strlen(t1), h2));
    assert_false(mr_itoken_verify(t2, strlen(t2), h1));
}

/* The lifecycle worker's supervisor draws a token before it forks its workers
 * (payload_prime: OpenSSL's generator is then built once and shared). Each worker
 * must still draw its own: OpenSSL reseeds the generator in a process of another
 * pid. Were it not reseeded, the two workers would draw the same token. */
static void test_generate_after_fork(void **state)
{
    (void)state;
    char tok[4][MR_ITOKEN_LEN + 1], kid[MR_ITOKEN_KEY_ID_LEN + 1], hash[MR_ITOKEN_HASH_HEX_LEN + 1];
    assert_int_equal(mr_itoken_generate(tok[0], kid, hash), MR_OK);
    for (int c = 1; c <= 2; c++) {
        int fds[2];
        assert_int_equal(pipe(fds), 0);
        fflush(NULL);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            char t[MR_ITOKEN_LEN + 1], k[MR_ITOKEN_KEY_ID_LEN + 1], h[MR_ITOKEN_HASH_HEX_LEN + 1];
            int ok = mr_itoken_generate(t, k, h) == MR_OK &&
                     write(fds[1], t, sizeof t) == (ssize_t)sizeof t;
            _exit(ok ? 0 : 1);
        }
        close(fds[1]);
        assert_int_equal(read(fds[0], tok[c], sizeof tok[c]), (ssize_t)sizeof tok[c]);
        close(fds[0]);
        int st = 0;
        assert_int_equal(waitpid(pid, &st, 0), pid);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    assert_int_equal(mr_itoken_generate(tok[3], kid, hash), MR_OK);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(strlen(tok[i]), MR_ITOKEN_LEN);
        for (int j = i + 1; j < 4; j++)
            assert_string_not_equal(tok[i], tok[j]);
    }
}

static void test_parse_refuses_other_shapes(void **state)
{
    (void)state;
    const char *good = "mri_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    char k[MR_ITOKEN_KEY_ID_LEN + 1];
    assert_int_equal(strlen(good), MR_ITOKEN_LEN);
    assert_int_equal(mr_itoken_parse(good, strlen(good), k), MR_OK);
    assert_string_equal(k, "0123456789abcdef");
    static const char *const bad[] = {
        "",
        "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.sig",          /* a JWT */
        "sb_secret_0123456789abcdef0123456789abcdef0123456789abcdef012345", /* an API key */
        "mrx_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  /* prefix */
        "mri_0123456789ABCDEF_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  /* uppercase key id */
        "mri_0123456789abcdeg_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  /* not hex */
        "mri_0123456789abcdef-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  /* separator */
        "mri_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB",  /* stray bits */
        "mri_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA+",  /* alphabet */
        "mri_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",   /* short */
        "mri_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", /* long */
        "mri_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",  /* padding */
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        assert_int_equal(mr_itoken_parse(bad[i], strlen(bad[i]), k), MR_EAUTH);
        assert_string_equal(k, "");
    }
    /* The length given decides, not a NUL: a valid token followed by more is not one. */
    char longer[80];
    snprintf(longer, sizeof longer, "%sX", good);
    assert_int_equal(mr_itoken_parse(longer, strlen(longer), k), MR_EAUTH);
    assert_int_equal(mr_itoken_parse(good, MR_ITOKEN_LEN - 1, k), MR_EAUTH);
    assert_int_equal(mr_itoken_parse(NULL, 0, k), MR_EAUTH);
}

static void test_verify_refuses_malformed_hashes(void **state)
{
    (void)state;
    char t[MR_ITOKEN_LEN + 1], k[MR_ITOKEN_KEY_ID_LEN + 1], h[MR_ITOKEN_HASH_HEX_LEN + 1];
    assert_int_equal(mr_itoken_generate(t, k, h), MR_OK);
    char upper[MR_ITOKEN_HASH_HEX_LEN + 1];
    for (size_t i = 0; i <= MR_ITOKEN_HASH_HEX_LEN; i++)
        upper[i] = (h[i] >= 'a' && h[i] <= 'f') ? (char)(h[i] - 32) : h[i];
    int has_letter = strcmp(upper, h) != 0;
    if (has_letter)
        assert_false(mr_itoken_verify(t, strlen(t), upper));
    assert_false(mr_itoken_verify(t, strlen(t), NULL));
    assert_false(mr_itoken_verify(t, strlen(t), ""));
    char shorter[MR_ITOKEN_HASH_HEX_LEN];
    memcpy(shorter, h, sizeof shorter - 1);
    shorter[sizeof shorter - 1] = '\0';
    assert_false(mr_itoken_verify(t, strlen(t), shorter));
    /* One flipped digit. */
    char was = h[10];
    h[10] = was == '0' ? '1' : '0';
    assert_false(mr_itoken_verify(t, strlen(t), h));
    /* A token that differs in one character does not verify. */
    h[10] = was;
    assert_true(mr_itoken_verify(t, strlen(t), h));
    t[40] = t[40] == 'A' ? 'B' : 'A';
    assert_false(mr_itoken_verify(t, strlen(t), h));
}

static mr_err parse(const char *body, tu_report *r, char *err, size_t n)
{
    return tu_report_parse(body, strlen(body), r, err, n);
}

static void test_report_accepts(void **state)
{
    (void)state;
    tu_report r;
    char err[200];
    assert_int_equal(parse("", &r, err, sizeof err), MR_OK);
    assert_string_equal(r.agent, "");
    assert_string_equal(r.tool, "");
    assert_int_equal(parse("{}", &r, err, sizeof err), MR_OK);
    assert_int_equal(parse("{\"agent\":\"general\",\"tool\":\"web_search\"}", &r, err, sizeof err), MR_OK);
    assert_string_equal(r.agent, "general");
    assert_string_equal(r.tool, "web_search");
    assert_int_equal(parse("{\"agent\":null,\"tool\":\"a-b.c:d@e\"}", &r, err, sizeof err), MR_OK);
    assert_string_equal(r.agent, "");
    assert_string_equal(r.tool, "a-b.c:d@e");
    char max[100];
    snprintf(max, sizeof max, "{\"agent\":\"%064d\"}", 0);
    assert_int_equal(parse(max, &r, err, sizeof err), MR_OK);
    assert_int_equal(strlen(r.agent), TU_NAME_MAX);
}

static void test_report_refuses(void **state)
{
    (void)state;
    tu_report r;
    char err[200];
    char toolong[100];
    snprintf(toolong, sizeof toolong, "{\"agent\":\"%065d\"}", 0);
    const char *const bad[] = {
        "[]", "\"general\"", "null", "{", "{\"agent\":\"general\"} x",
        "{\"agent\":\"\"}", "{\"agent\":\"two words\"}", "{\"agent\":\"semi;colon\"}",
        "{\"agent\":\"quote'\"}", "{\"agent\":\"caf\xc3\xa9\"}", "{\"agent\":\"tab\\t\"}",
        "{\"agent\":7}", "{\"agent\":true}", "{\"agent\":[\"a\"]}", "{\"tool\":{}}",
        "{\"agent\":\"a\",\"agent\":\"b\"}", "{\"instance_id\":\"x\"}", "{\"agent\":\"a\",\"n\":1}",
        "{\"agent\":\"a\\u0000b\"}", toolong,
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        memset(&r, 'x', sizeof r);
        err[0] = '\0';
        assert_int_equal(parse(bad[i], &r, err, sizeof err), MR_EINVAL);
        assert_true(err[0] != '\0');
        assert_string_equal(r.agent, "");
        assert_string_equal(r.tool, "");
    }
    /* The message names the member, never echoes the value. */
    assert_int_equal(parse("{\"agent\":\"<script>\"}", &r, err, sizeof err), MR_EINVAL);
    assert_null(strstr(err, "<script>"));
    assert_non_null(strstr(err, "agent"));
}

/* A raw NUL byte (not the escape \u0000) inside a name: invalid JSON (RFC 8259
 * forbids raw control characters in strings), but cJSON copies it and the C
 * string ends there, so the report must still be refused whole. */
static void test_report_refuses_raw_nul(void **state)
{
    (void)state;
    tu_report r;
    char err[200];
    static const char body[] = "{\"agent\":\"general\0; DROP\"}";
    memset(&r, 'x', sizeof r);
    assert_int_equal(tu_report_parse(body, sizeof body - 1, &r, err, sizeof err), MR_EINVAL);
    assert_string_equal(r.agent, "");
    static const char key[] = "{\"agent\0junk\":\"general\"}";
    assert_int_equal(tu_report_parse(key, sizeof key - 1, &r, err, sizeof err), MR_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_generate),
        cmocka_unit_test(test_generate_after_fork),
        cmocka_unit_test(test_parse_refuses_other_shapes),
        cmocka_unit_test(test_verify_refuses_malformed_hashes),
        cmocka_unit_test(test_report_accepts),
        cmocka_unit_test(test_report_refuses),
        cmocka_unit_test(test_report_refuses_raw_nul),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
