/* test_log.c: JSON lines on stderr, and held lines (mr_log_hold): written together,
 * whole and in order, when flushed, at a warning, when no more fit, and never in
 * a process that does not hold. stderr is a pipe read back here. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mindroom.h"

static int rd = -1, saved = -1;

static int setup(void **state)
{
    (void)state;
    int p[2];
    if (pipe2(p, O_NONBLOCK) != 0)
        return -1;
    fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
    saved = dup(STDERR_FILENO);
    dup2(p[1], STDERR_FILENO);
    close(p[1]);
    rd = p[0];
    mr_log_init("test-log", MR_LOG_INFO);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    mr_log_hold(0);
    dup2(saved, STDERR_FILENO);
    close(saved);
    close(rd);
    return 0;
}

/* What was written to stderr since the last call, as one string (static). */
static const char *written(void)
{
    static char buf[1 << 16];
    size_t n = 0;
    for (;;) {
        ssize_t r = read(rd, buf + n, sizeof buf - 1 - n);
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    buf[n] = '\0';
    return buf;
}

static size_t count(const char *s, const char *what)
{
    size_t n = 0;
    for (const char *p = s; (p = strstr(p, what)) != NULL; p += strlen(what))
        n++;
    return n;
}

static void test_not_holding_writes_each_line_at_once(void **state)
{
    (void)state;
    mr_log(MR_LOG_INFO, "one");
    const char *w = written();
    assert_non_null(strstr(w, "\"level\":\"info\",\"function\":\"test-log\""));
    assert_non_null(strstr(w, "\"msg\":\"one\"}\n"));
    mr_log_request("rid-1", "POST", 200, 3, "service_role", NULL);
    assert_non_null(strstr(written(), "\"request_id\":\"rid-1\""));
}

static void test_held_lines_wait_for_a_flush_and_keep_their_order(void **state)
{
    (void)state;
    mr_log_hold(1);
    mr_log_request("rid-a", "POST", 200, 1, "service_role", NULL);
    mr_log_request("rid-b", "POST", 200, 1, "service_role", NULL);
    assert_string_equal(written(), ""); /* held */
    mr_log_flush();
    const char *w = written();
    assert_int_equal(count(w, "\n"), 2);
    assert_true(strstr(w, "rid-a") < strstr(w, "rid-b"));
    mr_log_flush(); /* nothing twice */
    assert_string_equal(written(), "");
    mr_log_hold(0);
}

static void test_a_warning_writes_what_is_held_and_itself(void **state)
{
    (void)state;
    mr_log_hold(1);
    mr_log(MR_LOG_INFO, "before");
    mr_log(MR_LOG_WARN, "trouble");
    const char *w = written();
    assert_int_equal(count(w, "\n"), 2);
    assert_true(strstr(w, "before") < strstr(w, "trouble"));
    mr_log(MR_LOG_DEBUG, "below the level"); /* never held nor written */
    mr_log_flush();
    assert_string_equal(written(), "");
    mr_log_hold(0);
}

static void test_lines_that_no_longer_fit_write_those_held_whole(void **state)
{
    (void)state;
    char big[1500];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    mr_log_hold(1);
    for (int i = 0; i < 5; i++)
        mr_log(MR_LOG_INFO, "%d %s", i, big); /* ~1.6 KB each: two fit in 4 KiB */
    const char *w = written();
    assert_int_equal(count(w, "\n"), 4); /* two writes of two lines; the fifth held */
    assert_int_equal(w[strlen(w) - 1], '\n');
    mr_log_hold(0); /* turning it off writes the rest */
    w = written();
    assert_int_equal(count(w, "\n"), 1);
    assert_non_null(strstr(w, "\"msg\":\"4 x"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_not_holding_writes_each_line_at_once),
        cmocka_unit_test(test_held_lines_wait_for_a_flush_and_keep_their_order),
        cmocka_unit_test(test_a_warning_writes_what_is_held_and_itself),
        cmocka_unit_test(test_lines_that_no_longer_fit_write_those_held_whole),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
