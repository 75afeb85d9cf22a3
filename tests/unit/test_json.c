/* test_json.c: typed getters at the edges of what a double can hold. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mindroom.h"

static cJSON *parse(const char *s)
{
    cJSON *j = mr_json_parse(s, strlen(s));
    assert_non_null(j);
    return j;
}

static void test_i64_edges(void **state)
{
    (void)state;
    cJSON *j = parse("{\"safe\":9007199254740991,\"neg_safe\":-9007199254740991,"
                     "\"p53\":9007199254740992,\"n53\":-9007199254740992,"
                     "\"p53p1\":9007199254740993,\"half\":1.5,\"exp\":1e3,\"huge\":1e400,"
                     "\"zero\":0,\"negz\":-0,\"str\":\"42\",\"bool\":true,\"nul\":null,"
                     "\"arr\":[1],\"int_max_plus\":2147483648}");
    int64_t v = 0;
    assert_int_equal(mr_json_i64(j, "safe", INT64_MIN, INT64_MAX, &v), MR_OK);
    assert_true(v == 9007199254740991LL);
    assert_int_equal(mr_json_i64(j, "neg_safe", INT64_MIN, INT64_MAX, &v), MR_OK);
    assert_true(v == -9007199254740991LL);
    /* 2^53+1 parses to the same double as 2^53: both are refused. */
    assert_int_equal(mr_json_i64(j, "p53", INT64_MIN, INT64_MAX, &v), MR_EINVAL);
    assert_int_equal(mr_json_i64(j, "n53", INT64_MIN, INT64_MAX, &v), MR_EINVAL);
    assert_int_equal(mr_json_i64(j, "p53p1", INT64_MIN, INT64_MAX, &v), MR_EINVAL);
    assert_int_equal(mr_json_i64(j, "half", INT64_MIN, INT64_MAX, &v), MR_EINVAL);
    assert_int_equal(mr_json_i64(j, "exp", INT64_MIN, INT64_MAX, &v), MR_OK);
    assert_true(v == 1000);
    assert_int_equal(mr_json_i64(j, "huge", INT64_MIN, INT64_MAX, &v), MR_EINVAL);
    assert_int_equal(mr_json_i64(j, "negz", INT64_MIN, INT64_MAX, &v), MR_OK);
    assert_true(v == 0);
    /* valueint would saturate here; the getter must not. */
    assert_int_equal(mr_json_i64(j, "int_max_plus", INT64_MIN, INT64_MAX, &v), MR_OK);
    assert_true(v == 2147483648LL);
    /* Caller's range. */
    assert_int_equal(mr_json_i64(j, "zero", 1, 10, &v), MR_EINVAL);
    assert_int_equal(mr_json_i64(j, "exp", 0, 999, &v), MR_EINVAL);
    assert_int_equal(mr_json_i64(j, "exp", 1000, 1000, &v), MR_OK);
    /* Wrong types and absence. */
    v = 7;
    assert_int_equal(mr_json_i64(j, "str", INT64_MIN, INT64_MAX, &v), MR_EINVAL);
    assert_int_equal(mr_json_i64(j, "bool", INT64_MIN, INT64_MAX, &v), MR_EINVAL);
    assert_int_equal(mr_json_i64(j, "arr", INT64_MIN, INT64_MAX, &v), MR_EINVAL);
    assert_int_equal(mr_json_i64(j, "nul", INT64_MIN, INT64_MAX, &v), MR_ENOTFOUND);
    assert_int_equal(mr_json_i64(j, "missing", INT64_MIN, INT64_MAX, &v), MR_ENOTFOUND);
    assert_true(v == 7); /* untouched on failure */
    cJSON_Delete(j);
}

static void test_str_bool(void **state)
{
    (void)state;
    cJSON *j = parse("{\"s\":\"x\",\"n\":1,\"b\":false,\"t\":true,\"bs\":\"true\",\"z\":null,\"S\":\"upper\"}");
    const char *s = NULL;
    int b = -1;
    assert_int_equal(mr_json_str(j, "s", &s), MR_OK);
    assert_string_equal(s, "x");
    assert_int_equal(mr_json_str(j, "n", &s), MR_EINVAL);
    assert_int_equal(mr_json_str(j, "z", &s), MR_ENOTFOUND);
    assert_int_equal(mr_json_str(j, "S", &s), MR_OK);
    assert_string_equal(s, "upper"); /* case-sensitive: "s" and "S" differ */
    assert_int_equal(mr_json_bool(j, "b", &b), MR_OK);
    assert_int_equal(b, 0);
    assert_int_equal(mr_json_bool(j, "t", &b), MR_OK);
    assert_int_equal(b, 1);
    assert_int_equal(mr_json_bool(j, "bs", &b), MR_EINVAL);
    assert_int_equal(mr_json_bool(j, "n", &b), MR_EINVAL);
    assert_int_equal(mr_json_bool(j, "nope", &b), MR_ENOTFOUND);
    /* Getters on a non-object. */
    cJSON *arr = parse("[1,2]");
    assert_int_equal(mr_json_str(arr, "s", &s), MR_ENOTFOUND);
    assert_int_equal(mr_json_str(NULL, "s", &s), MR_ENOTFOUND);
    cJSON_Delete(arr);
    cJSON_Delete(j);
}

static void test_paths(void **state)
{
    (void)state;
    cJSON *j = parse("{\"data\":{\"object\":{\"customer\":\"cus_1\",\"items\":{\"data\":[{\"x\":1}]},"
                     "\"metadata\":{\"account_id\":\"a\"}}},\"type\":\"t\"}");
    const cJSON *c = mr_json_path(j, "data.object.customer");
    assert_non_null(c);
    assert_string_equal(c->valuestring, "cus_1");
    const char *s;
    assert_int_equal(mr_json_str(mr_json_path(j, "data.object.metadata"), "account_id", &s), MR_OK);
    assert_string_equal(s, "a");
    assert_true(cJSON_IsArray(mr_json_path(j, "data.object.items.data")));
    assert_ptr_equal(mr_json_path(j, "type"), cJSON_GetObjectItemCaseSensitive(j, "type"));
    assert_null(mr_json_path(j, "data.object.missing"));
    assert_null(mr_json_path(j, "data.object.customer.deeper")); /* through a string */
    assert_null(mr_json_path(j, "data.object.items.data.x"));   /* through an array */
    assert_null(mr_json_path(j, "data..object"));
    assert_null(mr_json_path(j, ".data"));
    assert_null(mr_json_path(j, "data."));
    assert_null(mr_json_path(j, "Data.object"));
    assert_null(mr_json_path(NULL, "data"));
    /* A missing intermediate object makes the getter say "not found". */
    assert_int_equal(mr_json_str(mr_json_path(j, "data.nothing"), "k", &s), MR_ENOTFOUND);
    cJSON_Delete(j);
}

static void test_parse_length(void **state)
{
    (void)state;
    const char buf[] = "{\"a\":1}{\"b\":2}";
    /* Exactly the first document: fine, though the buffer goes on. */
    cJSON *j = mr_json_parse(buf, 7);
    assert_non_null(j);
    cJSON_Delete(j);
    /* Both: trailing junk. */
    assert_null(mr_json_parse(buf, sizeof(buf) - 1));
    /* Cut inside the document. */
    assert_null(mr_json_parse(buf, 5));
    /* Trailing whitespace is not junk; a NUL or other bytes are. */
    j = mr_json_parse("{\"a\":1} \r\n\t", 11);
    assert_non_null(j);
    cJSON_Delete(j);
    assert_null(mr_json_parse("{\"a\":1}\0", 8));
    /* A raw NUL inside a string or a name (not the escape): malformed, never a
     * string that C reads as shorter than it is. */
    assert_null(mr_json_parse("{\"a\":\"ok\0; more\"}", 17));
    assert_null(mr_json_parse("{\"a\0b\":1}", 9));
    assert_null(mr_json_parse("{\"a\":1} x", 9));
    assert_null(mr_json_parse("", 0));
    assert_null(mr_json_parse("   ", 3));
    assert_null(mr_json_parse(NULL, 3));
    assert_null(mr_json_parse("{\"a\":}", 6));
    assert_null(mr_json_parse("{'a':1}", 7));
    /* Not NUL-terminated: the parser must stop at len (ASan checks the read). */
    char *heap = malloc(7);
    memcpy(heap, "[1,2,3]", 7);
    j = mr_json_parse(heap, 7);
    assert_non_null(j);
    assert_int_equal(cJSON_GetArraySize(j), 3);
    cJSON_Delete(j);
    memcpy(heap, "[1,2,3", 6);
    assert_null(mr_json_parse(heap, 6));
    free(heap);
    /* Scalars are documents too. */
    j = mr_json_parse("42", 2);
    assert_true(cJSON_IsNumber(j));
    cJSON_Delete(j);
}

static void test_duplicate_keys(void **state)
{
    (void)state;
    struct {
        const char *json;
        int dup;
    } cases[] = {
        {"{}", 0}, {"[]", 0}, {"{\"a\":1,\"b\":{\"a\":1}}", 0}, {"[{\"a\":1},{\"a\":2}]", 0},
        {"{\"a\":1,\"a\":1}", 1}, {"{\"a\":{\"b\":[{\"c\":1,\"c\":2}]}}", 1},
        {"{\"a\":1,\"\\u0061\":2}", 1}, {"{\"A\":1,\"a\":2}", 0}, {"\"s\"", 0},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(cases); i++) {
        cJSON *j = mr_json_parse(cases[i].json, strlen(cases[i].json));
        assert_non_null(j);
        assert_int_equal(mr_json_has_duplicate_keys(j), cases[i].dup);
        cJSON_Delete(j);
    }
    assert_int_equal(mr_json_has_duplicate_keys(NULL), 0);
}

/* Objects past the pairwise limit are checked by sorting their names: the same
 * answers wherever the repeated name is, nested too. */
static void test_duplicate_keys_many_members(void **state)
{
    (void)state;
    enum { N = 5000 };
    char *buf = malloc(N * 16 + 64);
    assert_non_null(buf);
    for (int variant = 0; variant < 5; variant++) {
        size_t o = 0;
        o += (size_t)sprintf(buf + o, variant == 4 ? "{\"x\":{" : "{");
        for (int i = 0; i < N; i++) {
            /* variant 1: the last repeats the first; 2: two neighbours; 3: the middle
             * repeats the last; 4: nested, the last repeats the first. */
            int k = (variant == 1 || variant == 4) && i == N - 1 ? 0
                    : variant == 2 && i == 1                     ? 0
                    : variant == 3 && i == N / 2                 ? N - 1
                                                                 : i;
            o += (size_t)sprintf(buf + o, "%s\"k%d\":%d", i ? "," : "", k, i);
        }
        o += (size_t)sprintf(buf + o, variant == 4 ? "}}" : "}");
        cJSON *j = mr_json_parse(buf, o);
        assert_non_null(j);
        assert_int_equal(mr_json_has_duplicate_keys(j), variant != 0);
        cJSON_Delete(j);
    }
    free(buf);
}

static void test_nul_escape(void **state)
{
    (void)state;
    struct {
        const char *json;
        int nul;
    } cases[] = {
        {"{\"a\":\"\\u0000\"}", 1},       {"{\"a\\u0000\":1}", 1},
        {"[\"x\\u0000y\"]", 1},             {"{\"a\":\"\\\\u0000\"}", 0},
        {"{\"a\":\"\\\\\\u0000\"}", 1}, {"{\"a\":\"\\u0001\"}", 0},
        {"{\"a\":\"u0000\"}", 0},           {"{\"a\":\"\\u000\"}", 0},
        {"\\u0000", 1},                    {"\\u000", 0},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(cases); i++)
        assert_int_equal(mr_json_has_nul_escape(cases[i].json, strlen(cases[i].json)), cases[i].nul);
    /* Only the given length is read. */
    assert_int_equal(mr_json_has_nul_escape("\"\\u0000\"", 4), 0);
}

/* A body's members: each one known, once; the message names the member. */
static void test_members(void **state)
{
    (void)state;
    static const char *const names[] = {"subscription_id", "wait", "rotate_token", NULL};
    struct {
        const char *json, *message; /* NULL: accepted */
    } cases[] = {
        {"{}", NULL},
        {"{\"subscription_id\":\"x\",\"wait\":true,\"rotate_token\":null}", NULL},
        {"{\"rotate_tokens\":true}",
         "unknown member \"rotate_tokens\": the body has only \"subscription_id\", \"wait\" and "
         "\"rotate_token\""},
        {"{\"wait\":true,\"wait\":false}", "\"wait\" is given twice"},
        {"{\"wait\":true,\"w\\u0061it\":false}", "\"wait\" is given twice"},
        {"[]", "body must be a JSON object"},
    };
    char err[200];
    for (size_t i = 0; i < MR_ARRAY_LEN(cases); i++) {
        cJSON *j = mr_json_parse(cases[i].json, strlen(cases[i].json));
        assert_non_null(j);
        err[0] = '\0';
        mr_err e = mr_json_members(j, names, err, sizeof err);
        assert_int_equal(e, cases[i].message ? MR_EINVAL : MR_OK);
        if (cases[i].message)
            assert_string_equal(err, cases[i].message);
        cJSON_Delete(j);
    }
    assert_int_equal(mr_json_members(NULL, names, err, sizeof err), MR_EINVAL);
    static const char *const one[] = {"instance_id", NULL};
    cJSON *j = mr_json_parse("{\"x\":1}", 7);
    assert_int_equal(mr_json_members(j, one, err, sizeof err), MR_EINVAL);
    assert_string_equal(err, "unknown member \"x\": the body has only \"instance_id\"");
    cJSON_Delete(j);
}

static void test_print(void **state)
{
    (void)state;
    cJSON *j = parse("{ \"a\" : [ 1, 2 ],\n \"b\": \"x\\\"y\" }");
    char *s = mr_json_print(j);
    assert_string_equal(s, "{\"a\":[1,2],\"b\":\"x\\\"y\"}");
    free(s);
    cJSON_Delete(j);
    assert_null(mr_json_print(NULL));
}

/* Frees that cJSON makes while a secret is set count the blocks that still hold it. */
static const char *g_secret;
static int g_freed_with_secret;

static void *hook_malloc(size_t n)
{
    return malloc(n);
}

static void hook_free(void *p)
{
    if (p && g_secret && memmem(p, malloc_usable_size(p), g_secret, strlen(g_secret)))
        g_freed_with_secret++;
    free(p);
}

/* A POST /apps body's size: the secret first, so that every copy made while the
 * buffer grows holds it. */
static cJSON *env_with_secret(const char *secret)
{
    cJSON *env = cJSON_CreateObject();
    cJSON_AddStringToObject(env, "OPENAI_API_KEY", secret);
    for (int i = 0; i < 400; i++) {
        char name[32];
        snprintf(name, sizeof name, "VARIABLE_%03d", i);
        cJSON_AddStringToObject(env, name, "a value of about forty bytes, not secret");
    }
    return env;
}

static void test_print_wiped_leaves_no_copy_in_freed_memory(void **state)
{
    (void)state;
    const char *secret = "sk-live-0123456789abcdefghijklmnopqrstuv";
    cJSON *env = env_with_secret(secret);
    cJSON_Hooks hooks = {hook_malloc, hook_free};
    cJSON_InitHooks(&hooks);

    /* The plain print leaves copies behind (the check can see them)... */
    g_secret = secret;
    g_freed_with_secret = 0;
    char *plain = mr_json_print(env);
    int plain_left = g_freed_with_secret;
    /* ...the wiped one none, and prints the same text. */
    g_freed_with_secret = 0;
    char *wiped = mr_json_print_wiped(env);
    int wiped_left = g_freed_with_secret;
    g_secret = NULL;
    cJSON_InitHooks(NULL);

    assert_true(plain_left > 0);
    assert_int_equal(wiped_left, 0);
    assert_non_null(wiped);
    assert_true(strlen(wiped) > 16384); /* past three doublings of the first buffer */
    assert_string_equal(wiped, plain);
    free(plain);
    free(wiped);
    cJSON_Delete(env);
    assert_null(mr_json_print_wiped(NULL));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_i64_edges),
        cmocka_unit_test(test_str_bool),
        cmocka_unit_test(test_paths),
        cmocka_unit_test(test_parse_length),
        cmocka_unit_test(test_print),
        cmocka_unit_test(test_print_wiped_leaves_no_copy_in_freed_memory),
        cmocka_unit_test(test_duplicate_keys),
        cmocka_unit_test(test_duplicate_keys_many_members),
        cmocka_unit_test(test_nul_escape),
        cmocka_unit_test(test_members),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
