/* test_stripe_api.c: the Stripe API client's pure parts: form encoding, the
 * retry decision and its backoff, the secret key's shape, Stripe's error body,
 * and reading response headers; and reading a list page by page against a peer
 * on 127.0.0.1 (peer.h's listener). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "mr_httpc.h"
#include "mr_stripe_api.h"
#include "peer.h"

static char *form_of(const char *json)
{
    cJSON *p = cJSON_Parse(json);
    assert_non_null(p);
    char *f = mr_stripe_api_form(p);
    cJSON_Delete(p);
    return f;
}

static void assert_form(const char *json, const char *want)
{
    char *f = form_of(json);
    assert_non_null(f);
    assert_string_equal(f, want);
    free(f);
}

static void test_form_nested_keys(void **state)
{
    (void)state;
    /* A checkout session's parameters, as Stripe's libraries flatten them. */
    assert_form("{\"mode\":\"subscription\",\"customer\":\"cus_1\","
                "\"line_items\":[{\"price\":\"price_starter\",\"quantity\":1}],"
                "\"metadata\":{\"account_id\":\"a-1\"},"
                "\"subscription_data\":{\"metadata\":{\"account_id\":\"a-1\"},\"trial_period_days\":14},"
                "\"allow_promotion_codes\":true}",
                "mode=subscription&customer=cus_1"
                "&line_items[0][price]=price_starter&line_items[0][quantity]=1"
                "&metadata[account_id]=a-1"
                "&subscription_data[metadata][account_id]=a-1"
                "&subscription_data[trial_period_days]=14"
                "&allow_promotion_codes=true");
    assert_form("{\"a\":[[1,2],{\"b\":[false]}]}", "a[0][0]=1&a[0][1]=2&a[1][b][0]=false");
}

static void test_form_escaping(void **state)
{
    (void)state;
    /* Values: everything outside A-Z a-z 0-9 - . _ ~ is %XX (space is %20, never +). */
    assert_form("{\"success_url\":\"https://x.test/ok?session_id={CHECKOUT_SESSION_ID}&a=b c\"}",
                "success_url=https%3A%2F%2Fx.test%2Fok%3Fsession_id%3D%7BCHECKOUT_SESSION_ID%7D"
                "%26a%3Db%20c");
    assert_form("{\"email\":\"a+b@x.test\",\"name\":\"Zo\\u00eb ~_-.\"}",
                "email=a%2Bb%40x.test&name=Zo%C3%AB%20~_-.");
    /* Keys: each segment escaped, the brackets kept. */
    assert_form("{\"metadata\":{\"a&b=c\":\"[x]\"}}", "metadata[a%26b%3Dc]=%5Bx%5D");
}

static void test_form_values(void **state)
{
    (void)state;
    assert_form("{}", "");
    assert_form("{\"metadata\":{},\"a\":[]}", "");        /* empty containers add nothing */
    assert_form("{\"description\":null}", "description=");  /* Stripe's "unset" */
    assert_form("{\"n\":-9007199254740991,\"z\":0}", "n=-9007199254740991&z=0");
    assert_form("{\"s\":\"\"}", "s=");
    /* Not representable: a fraction, an integer beyond 2^53, a bare value, too deep. */
    assert_null(form_of("{\"amount\":1.5}"));
    assert_null(form_of("{\"amount\":9007199254740993}"));
    assert_null(form_of("[1]"));
    assert_null(form_of("\"x\""));
    assert_null(form_of("{\"a\":{\"b\":{\"c\":{\"d\":{\"e\":{\"f\":{\"g\":{\"h\":{\"i\":1}}}}}}}}}"));
    assert_form("{\"a\":{\"b\":{\"c\":{\"d\":{\"e\":{\"f\":{\"g\":{\"h\":1}}}}}}}}",
                "a[b][c][d][e][f][g][h]=1");
    assert_null(mr_stripe_api_form(NULL));
}

static void test_retry_decision(void **state)
{
    (void)state;
    /* No answer at all: retried. */
    assert_int_equal(mr_stripe_api_retryable(0, NULL), 1);
    /* Conflicts (a concurrent request with the same key), rate limits, server errors. */
    const long again[] = {409, 429, 500, 502, 503, 504, 599};
    for (size_t i = 0; i < MR_ARRAY_LEN(again); i++)
        assert_int_equal(mr_stripe_api_retryable(again[i], NULL), 1);
    /* Refusals: the same request gets the same answer. */
    const long never[] = {400, 401, 402, 403, 404, 405, 410, 422};
    for (size_t i = 0; i < MR_ARRAY_LEN(never); i++)
        assert_int_equal(mr_stripe_api_retryable(never[i], NULL), 0);
    /* Stripe-Should-Retry decides whenever it is there. */
    assert_int_equal(mr_stripe_api_retryable(500, "false"), 0);
    assert_int_equal(mr_stripe_api_retryable(429, "false"), 0);
    assert_int_equal(mr_stripe_api_retryable(400, "true"), 1);
    assert_int_equal(mr_stripe_api_retryable(429, "true"), 1);
    /* Any other value is no instruction. */
    assert_int_equal(mr_stripe_api_retryable(500, "maybe"), 1);
    assert_int_equal(mr_stripe_api_retryable(400, "TRUE"), 0);
    /* A connection error has no header to read. */
    assert_int_equal(mr_stripe_api_retryable(0, "false"), 1);
}

static void test_backoff(void **state)
{
    (void)state;
    /* min(0.5 s * 2^(n-1), 5 s) * [0.5, 1), never under 0.5 s. */
    assert_int_equal(mr_stripe_api_backoff_ms(1, 0.0), 500);
    assert_int_equal(mr_stripe_api_backoff_ms(1, 0.999), 500);
    assert_int_equal(mr_stripe_api_backoff_ms(2, 0.0), 500);
    assert_int_equal(mr_stripe_api_backoff_ms(2, 0.5), 750);
    assert_in_range(mr_stripe_api_backoff_ms(2, 0.9999), 999, 1000);
    assert_int_equal(mr_stripe_api_backoff_ms(3, 0.0), 1000);
    assert_in_range(mr_stripe_api_backoff_ms(3, 0.9999), 1999, 2000);
    assert_int_equal(mr_stripe_api_backoff_ms(4, 0.0), 2000);
    assert_int_equal(mr_stripe_api_backoff_ms(5, 0.0), 2500);   /* the 5 s cap, halved */
    assert_in_range(mr_stripe_api_backoff_ms(5, 0.9999), 4999, 5000);
    assert_in_range(mr_stripe_api_backoff_ms(40, 0.9999), 4999, 5000);
    /* Jitter spreads the delays over the whole range. */
    long lo = 1 << 30, hi = 0;
    for (int i = 0; i < 100; i++) {
        long d = mr_stripe_api_backoff_ms(3, i / 100.0);
        lo = d < lo ? d : lo;
        hi = d > hi ? d : hi;
    }
    assert_int_equal(lo, 1000);
    assert_in_range(hi, 1970, 1999);
    /* Out-of-range input is clamped, never a longer or negative delay. */
    assert_int_equal(mr_stripe_api_backoff_ms(0, 0.0), 500);
    assert_int_equal(mr_stripe_api_backoff_ms(2, -1.0), 500);
    assert_int_equal(mr_stripe_api_backoff_ms(2, 1.0), 500);
}

static void test_secret_key_shape(void **state)
{
    (void)state;
    char err[256];
    int live = -1;
    assert_int_equal(mr_stripe_api_check_key("sk_test_4eC39HqLyjWDarjtT1zdp7dc", &live, err,
                                             sizeof err), MR_OK);
    assert_int_equal(live, 0);
    assert_int_equal(mr_stripe_api_check_key("sk_live_51H0000000000000000000000", &live, err,
                                             sizeof err), MR_OK);
    assert_int_equal(live, 1);
    assert_int_equal(mr_stripe_api_check_key("rk_live_51H0000000000000000000000", &live, err,
                                             sizeof err), MR_OK);
    assert_int_equal(live, 1);
    assert_int_equal(mr_stripe_api_check_key("rk_test_51H0000000000000000000000", &live, err,
                                             sizeof err), MR_OK);
    assert_int_equal(live, 0);
    /* The shortest key accepted: 16 letters and digits after the prefix. */
    assert_int_equal(mr_stripe_api_check_key("sk_test_0123456789abcdef", NULL, err, sizeof err),
                     MR_OK);

    static const struct {
        const char *key, *says;
    } bad[] = {
        {"pk_test_4eC39HqLyjWDarjtT1zdp7dc", "publishable key"},
        {"whsec_4eC39HqLyjWDarjtT1zdp7dcAAAA", "webhook signing secret"},
        {"sk_test_4eC39HqLyjWDarj", "too short"},
        {"rk_live_4eC39HqLyjWDarj", "too short"},
        {"sk_test_4eC39Hq-yjWDarjtT1zdp7dc", "characters"},
        {"sk_prod_4eC39HqLyjWDarjtT1zdp7dc", "must be a secret key"},
        {" sk_test_4eC39HqLyjWDarjtT1zdp7dc", "whitespace"},
        {"sk_test_4eC39HqLyjWDarjtT1zdp7dc\n", "whitespace"},
        {"", "required"},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        assert_int_equal(mr_stripe_api_check_key(bad[i].key, NULL, err, sizeof err), MR_EINVAL);
        assert_non_null(strstr(err, bad[i].says));
        assert_non_null(strstr(err, "STRIPE_SECRET_KEY"));
        assert_null(strstr(err, "4eC39Hq")); /* never the key itself */
    }
    assert_int_equal(mr_stripe_api_check_key(NULL, NULL, err, sizeof err), MR_EINVAL);
}

static void test_stripe_error_body(void **state)
{
    (void)state;
    mr_stripe_api_result r;
    char msg[64];
    memset(&r, 0, sizeof r);
    const char *body = "{\"error\":{\"type\":\"invalid_request_error\",\"code\":\"resource_missing\","
                       "\"param\":\"customer\",\"message\":\"No such customer: 'cus_x'\"}}";
    assert_int_equal(mr_stripe_api_parse_error(body, strlen(body), &r, msg, sizeof msg), 1);
    assert_string_equal(r.error_type, "invalid_request_error");
    assert_string_equal(r.error_code, "resource_missing");
    assert_string_equal(msg, "No such customer: 'cus_x'");
    assert_int_equal(r.other_mode, 0);

    /* The object is there, in the other mode: Stripe says so in the message only. */
    static const char *const modes[] = {"live", "test"};
    for (size_t i = 0; i < MR_ARRAY_LEN(modes); i++) {
        char other[320];
        snprintf(other, sizeof other,
                 "{\"error\":{\"type\":\"invalid_request_error\",\"code\":\"resource_missing\","
                 "\"message\":\"No such subscription: 'sub_x'; a similar object exists in %s "
                 "mode, but a %s mode key was used to make this request.\"}}",
                 modes[i], modes[1 - i]);
        memset(&r, 0, sizeof r);
        assert_int_equal(mr_stripe_api_parse_error(other, strlen(other), &r, NULL, 0), 1);
        assert_string_equal(r.error_code, "resource_missing");
        assert_int_equal(r.other_mode, 1);
    }

    memset(&r, 0, sizeof r);
    body = "{\"error\":{\"type\":\"idempotency_error\",\"message\":\"Keys for idempotent requests\"}}";
    assert_int_equal(mr_stripe_api_parse_error(body, strlen(body), &r, msg, sizeof msg), 1);
    assert_string_equal(r.error_type, "idempotency_error");
    assert_string_equal(r.error_code, "");

    static const char *const not_stripe[] = {"", "<html>bad gateway</html>", "{\"error\":\"x\"}",
                                             "{\"error\":{\"type\":1}} trailing", "[]"};
    for (size_t i = 0; i < MR_ARRAY_LEN(not_stripe); i++) {
        memset(&r, 0, sizeof r);
        int shaped = mr_stripe_api_parse_error(not_stripe[i], strlen(not_stripe[i]), &r, msg,
                                               sizeof msg);
        assert_int_equal(shaped, 0);
        assert_string_equal(r.error_type, "");
        assert_string_equal(msg, "");
    }
    /* A type that is not a string is not copied. */
    memset(&r, 0, sizeof r);
    body = "{\"error\":{\"type\":7,\"code\":null}}";
    assert_int_equal(mr_stripe_api_parse_error(body, strlen(body), &r, msg, sizeof msg), 1);
    assert_string_equal(r.error_type, "");
}

static void test_response_headers(void **state)
{
    (void)state;
    char hdrs[] = "Content-Type: application/json\r\nRequest-Id:  req_123 \r\n"
                  "stripe-should-retry: false\r\nIdempotent-Replayed: true\r\nX: \r\n";
    mr_httpc_resp resp = {.status = 200, .headers = hdrs};
    char v[8];
    char big[64];
    assert_int_equal(mr_httpc_resp_header(&resp, "Request-Id", big, sizeof big), 1);
    assert_string_equal(big, "req_123");
    assert_int_equal(mr_httpc_resp_header(&resp, "Stripe-Should-Retry", v, sizeof v), 1);
    assert_string_equal(v, "false");
    assert_int_equal(mr_httpc_resp_header(&resp, "X", v, sizeof v), 1);
    assert_string_equal(v, "");
    assert_int_equal(mr_httpc_resp_header(&resp, "Request", v, sizeof v), 0); /* a prefix is not a name */
    assert_string_equal(v, "");
    assert_int_equal(mr_httpc_resp_header(&resp, "Content-Type", v, sizeof v), 1);
    assert_string_equal(v, "applica");                                       /* cut to fit */
    resp.headers = NULL;
    assert_int_equal(mr_httpc_resp_header(&resp, "Request-Id", v, sizeof v), 0);
}

/* A child that answers `n` connections in turn with pages[i] (a JSON body), each
 * request's first line written to `lines` (a pipe). */
static pid_t pages_peer(int lfd, const char *const *pages, int n, int lines)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        for (int i = 0; i < n; i++) {
            int c = accept(lfd, NULL, NULL);
            char buf[4096], out[4096];
            ssize_t got = c >= 0 ? read(c, buf, sizeof buf - 1) : -1;
            if (got <= 0)
                _exit(1);
            buf[got] = '\0';
            size_t first = strcspn(buf, "\r\n");
            buf[first] = '\n';
            if (write(lines, buf, first + 1) != (ssize_t)(first + 1))
                _exit(1);
            int len = snprintf(out, sizeof out, "HTTP/1.1 200 OK\r\nContent-Type: application/json"
                               "\r\nRequest-Id: req_%d\r\nContent-Length: %zu\r\n"
                               "Connection: close\r\n\r\n%s", i + 1, strlen(pages[i]), pages[i]);
            if (write(c, out, (size_t)len) != len)
                _exit(1);
            close(c);
        }
        _exit(0);
    }
    return pid;
}

static void collect(const cJSON *object, void *arg)
{
    char *ids = arg;
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(object, "id");
    strcat(ids, cJSON_IsString(id) ? id->valuestring : "?");
    strcat(ids, " ");
}

/* Lists "/v1/customers" filtered by email against `n` pages; the objects seen go to
 * ids, the requests' first lines to lines. */
static mr_err list_pages(const char *const *pages, int n, char *ids, char *lines, size_t cap,
                         char *err, size_t errlen)
{
    int port, fds[2];
    int lfd = listener(&port);
    assert_int_equal(pipe(fds), 0);
    pid_t pid = pages_peer(lfd, pages, n, fds[1]);
    close(fds[1]);
    char base[64];
    snprintf(base, sizeof base, "http://127.0.0.1:%d", port);
    mr_stripe_api_config cfg = {.secret_key = "sk_test_0123456789abcdefghij", .base_url = base,
                                .deadline_ms = 5000, .connect_timeout_ms = 1000};
    mr_httpc *http = mr_httpc_open();
    cJSON *q = cJSON_Parse("{\"email\": \"a@b.example\"}");
    mr_stripe_api_result res;
    ids[0] = '\0';
    mr_err e = mr_stripe_api_list(http, &cfg, "/v1/customers", q, mr_now_ms() + 5000, collect, ids,
                                  &res, err, errlen);
    mr_stripe_api_result_free(&res);
    cJSON_Delete(q);
    mr_httpc_close(http);
    reap(pid);
    close(lfd);
    size_t got = 0;
    ssize_t r;
    while (got + 1 < cap && (r = read(fds[0], lines + got, cap - 1 - got)) > 0)
        got += (size_t)r;
    lines[got] = '\0';
    close(fds[0]);
    return e;
}

static void test_list_reads_every_page(void **state)
{
    (void)state;
    const char *pages[] = {
        "{\"object\":\"list\",\"has_more\":true,\"data\":[{\"id\":\"cus_c\"},{\"id\":\"cus_b\"}]}",
        "{\"object\":\"list\",\"has_more\":false,\"data\":[{\"id\":\"cus_a\"}]}"};
    char ids[256], lines[1024], err[256] = "";
    assert_int_equal(list_pages(pages, 2, ids, lines, sizeof lines, err, sizeof err), MR_OK);
    assert_string_equal(ids, "cus_c cus_b cus_a ");
    assert_string_equal(lines,
        "GET /v1/customers?email=a%40b.example&limit=100 HTTP/1.1\n"
        "GET /v1/customers?email=a%40b.example&limit=100&starting_after=cus_b HTTP/1.1\n");
}

static void test_list_that_does_not_advance(void **state)
{
    (void)state;
    /* The same last object again, then a page with none: neither is the list's end. */
    const char *same[] = {
        "{\"object\":\"list\",\"has_more\":true,\"data\":[{\"id\":\"cus_b\"}]}",
        "{\"object\":\"list\",\"has_more\":true,\"data\":[{\"id\":\"cus_b\"}]}"};
    char ids[256], lines[1024], err[256] = "";
    assert_int_equal(list_pages(same, 2, ids, lines, sizeof lines, err, sizeof err), MR_EINTERNAL);
    assert_string_equal(ids, "cus_b cus_b ");
    assert_non_null(strstr(err, "does not advance after page 2 (request req_2)"));
    const char *empty[] = {"{\"object\":\"list\",\"has_more\":true,\"data\":[]}"};
    assert_int_equal(list_pages(empty, 1, ids, lines, sizeof lines, err, sizeof err), MR_EINTERNAL);
    assert_string_equal(ids, "");
    assert_non_null(strstr(err, "does not advance after page 1"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_form_nested_keys),
        cmocka_unit_test(test_form_escaping),
        cmocka_unit_test(test_form_values),
        cmocka_unit_test(test_retry_decision),
        cmocka_unit_test(test_backoff),
        cmocka_unit_test(test_secret_key_shape),
        cmocka_unit_test(test_stripe_error_body),
        cmocka_unit_test(test_response_headers),
        cmocka_unit_test(test_list_reads_every_page),
        cmocka_unit_test(test_list_that_does_not_advance),
    };
    return cmocka_run_group_tests_name("stripe_api", tests, NULL, NULL);
}
