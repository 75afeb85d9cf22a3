/* test_httpc.c: whether a peer answered (mr_httpc_resp.outcome), against real
 * sockets on 127.0.0.1: a forked child plays each peer. No answer is a closed
 * port, a listener that never accepts, or a connection closed before a status
 * line; an error status, a too-large body and an answer stalled after its status
 * line are answers; an aborted call and a bad URL are neither. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "mindroom.h"
#include "peer.h"

static mr_err get(int port, long timeout_ms, size_t max_body, int (*abort_cb)(void *),
                  mr_httpc_resp *resp)
{
    char url[64], err[200];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/x", port);
    mr_httpc_req req = {.method = "GET", .url = url, .connect_timeout_ms = timeout_ms,
                        .timeout_ms = timeout_ms, .max_body = max_body, .abort_cb = abort_cb};
    mr_httpc *c = mr_httpc_open();
    assert_non_null(c);
    mr_err e = mr_httpc_do(c, &req, resp, err, sizeof err);
    mr_httpc_close(c);
    return e;
}

static void closed_port_is_no_answer(void **state)
{
    (void)state;
    int port, fd = listener(&port);
    close(fd);
    mr_httpc_resp r;
    assert_int_equal(get(port, 2000, 0, NULL, &r), MR_ETRANSIENT);
    assert_int_equal(r.outcome, MR_HTTPC_NO_ANSWER);
    mr_httpc_resp_free(&r);
}

static void listener_that_never_accepts_is_no_answer(void **state)
{
    (void)state;
    int port, fd = listener(&port);
    mr_httpc_resp r;
    assert_int_equal(get(port, 300, 0, NULL, &r), MR_ETRANSIENT);
    assert_int_equal(r.outcome, MR_HTTPC_NO_ANSWER);
    mr_httpc_resp_free(&r);
    close(fd);
}

static void closed_before_a_status_line_is_no_answer(void **state)
{
    (void)state;
    int port, fd = listener(&port);
    pid_t pid = peer(fd, NULL, 0);
    mr_httpc_resp r;
    assert_int_equal(get(port, 2000, 0, NULL, &r), MR_ETRANSIENT);
    assert_int_equal(r.outcome, MR_HTTPC_NO_ANSWER);
    mr_httpc_resp_free(&r);
    reap(pid);
    close(fd);
}

static void error_status_is_an_answer(void **state)
{
    (void)state;
    int port, fd = listener(&port);
    pid_t pid = peer(fd, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", 2);
    mr_httpc_resp r;
    assert_int_equal(get(port, 2000, 0, NULL, &r), MR_OK);
    assert_int_equal(r.status, 503);
    assert_int_equal(r.outcome, MR_HTTPC_ANSWERED);
    mr_httpc_resp_free(&r);
    reap(pid);
    close(fd);
}

static void too_large_is_an_answer(void **state)
{
    (void)state;
    int port, fd = listener(&port);
    char answer[1200];
    int n = snprintf(answer, sizeof answer, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
    memset(answer + n, 'x', 1000);
    answer[n + 1000] = '\0';
    pid_t pid = peer(fd, answer, 2);
    mr_httpc_resp r;
    assert_int_equal(get(port, 2000, 100, NULL, &r), MR_ETRANSIENT);
    assert_int_equal(r.outcome, MR_HTTPC_ANSWERED);
    mr_httpc_resp_free(&r);
    reap(pid);
    close(fd);
}

static void stalled_after_its_status_line_is_an_answer(void **state)
{
    (void)state;
    int port, fd = listener(&port);
    pid_t pid = peer(fd, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", 5);
    mr_httpc_resp r;
    assert_int_equal(get(port, 400, 0, NULL, &r), MR_ETRANSIENT);
    assert_int_equal(r.outcome, MR_HTTPC_ANSWERED);
    mr_httpc_resp_free(&r);
    reap(pid);
    close(fd);
}

static int always(void *arg)
{
    (void)arg;
    return 1;
}

static void aborted_is_neither(void **state)
{
    (void)state;
    int port, fd = listener(&port);
    mr_httpc_resp r;
    assert_int_equal(get(port, 3000, 0, always, &r), MR_ETRANSIENT);
    assert_int_equal(r.outcome, MR_HTTPC_ABORTED);
    mr_httpc_resp_free(&r);
    close(fd);
}

static void bad_scheme_is_unsent(void **state)
{
    (void)state;
    char err[200];
    mr_httpc_req req = {.method = "GET", .url = "ftp://127.0.0.1/x"};
    mr_httpc *c = mr_httpc_open();
    mr_httpc_resp r;
    assert_int_equal(mr_httpc_do(c, &req, &r, err, sizeof err), MR_EINVAL);
    assert_int_equal(r.outcome, MR_HTTPC_UNSENT);
    mr_httpc_resp_free(&r);
    mr_httpc_close(c);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(closed_port_is_no_answer),
        cmocka_unit_test(listener_that_never_accepts_is_no_answer),
        cmocka_unit_test(closed_before_a_status_line_is_no_answer),
        cmocka_unit_test(error_status_is_an_answer),
        cmocka_unit_test(too_large_is_an_answer),
        cmocka_unit_test(stalled_after_its_status_line_is_an_answer),
        cmocka_unit_test(aborted_is_neither),
        cmocka_unit_test(bad_scheme_is_unsent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
