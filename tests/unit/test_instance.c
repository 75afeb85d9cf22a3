/* test_instance.c: the lifecycle's pure parts: UUID check, the HTTP answer for
 * each outcome, job slots across processes, the welcome text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mindroom.h"
#include "mr_instance.h"
#include "mr_resend.h"

static void test_is_uuid(void **state)
{
    (void)state;
    assert_true(mr_instance_is_uuid("5eed5eed-0000-4000-8000-000000000101"));
    assert_true(mr_instance_is_uuid("ABCDEF00-0000-4000-8000-00000000abcd"));
    assert_false(mr_instance_is_uuid(NULL));
    assert_false(mr_instance_is_uuid(""));
    assert_false(mr_instance_is_uuid("5eed5eed000040008000000000000101"));      /* no dashes */
    assert_false(mr_instance_is_uuid("5eed5eed-0000-4000-8000-00000000010"));   /* short */
    assert_false(mr_instance_is_uuid("5eed5eed-0000-4000-8000-0000000001011")); /* long */
    assert_false(mr_instance_is_uuid("5eed5eed-0000-4000-8000-00000000010g"));  /* not hex */
    assert_false(mr_instance_is_uuid("5eed5eed-0000-4000-8000+000000000101"));  /* bad dash */
    assert_false(mr_instance_is_uuid("5eed5eed-0000-4000-8000-00000000010\n"));
    assert_false(mr_instance_is_uuid("'; drop table x; --000000000000000000"));
}

/* A result as the SQL functions return it. */
static mr_instance_result result(const char *json, const char *failed_action)
{
    mr_instance_result res;
    memset(&res, 0, sizeof res);
    res.reply = mr_json_parse(json, strlen(json));
    assert_non_null(res.reply);
    const char *s = NULL;
    if (mr_json_str(res.reply, "outcome", &s) == MR_OK)
        strncpy(res.outcome, s, sizeof res.outcome - 1);
    if (failed_action) strncpy(res.failed_action, failed_action, sizeof res.failed_action - 1);
    return res;
}

static int status_of(const char *json, const char *failed_action, int waited, char **code)
{
    mr_instance_result res = result(json, failed_action);
    int status = 0;
    cJSON *out = mr_instance_response(&res, waited, &status);
    assert_non_null(cJSON_GetObjectItemCaseSensitive(out, "instance"));
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(out, "error");
    const char *c = NULL;
    if (e) assert_int_equal(mr_json_str(e, "code", &c), MR_OK);
    if (code) *code = c ? strdup(c) : NULL;
    /* Never the lease token or the environment, whatever the reply held. */
    char *text = mr_json_print(out);
    assert_null(strstr(text, "environment_vars"));
    assert_null(strstr(text, "\"token\""));
    free(text);
    cJSON_Delete(out);
    mr_instance_result_free(&res);
    return status;
}

static void test_response_status(void **state)
{
    (void)state;
    char *code = NULL;
    const char *claimed = "{\"outcome\":\"claimed\",\"instance\":{\"status\":\"provisioning\",\"busy\":true},"
                          "\"step\":{\"action\":\"create\",\"token\":\"secret-token\"}}";
    assert_int_equal(status_of(claimed, NULL, 0, NULL), 202);
    const char *email = "{\"outcome\":\"claimed\",\"instance\":{\"status\":\"running\",\"busy\":true},"
                        "\"step\":{\"action\":\"email\",\"token\":\"t\"}}";
    assert_int_equal(status_of(email, NULL, 0, NULL), 200);
    assert_int_equal(status_of("{\"outcome\":\"done\",\"instance\":{\"status\":\"running\",\"busy\":false}}",
                               NULL, 0, NULL), 200);
    assert_int_equal(status_of("{\"outcome\":\"busy\",\"instance\":{\"status\":\"provisioning\",\"busy\":true}}",
                               NULL, 0, NULL), 202);
    assert_int_equal(status_of("{\"outcome\":\"queued\",\"instance\":{\"status\":\"provisioning\",\"busy\":false}}",
                               NULL, 0, NULL), 202);

    /* Waited for: the final state decides. */
    assert_int_equal(status_of("{\"outcome\":\"done\",\"instance\":{\"status\":\"running\",\"busy\":false}}",
                               NULL, 1, &code), 200);
    assert_null(code);
    assert_int_equal(status_of("{\"outcome\":\"failed\",\"instance\":{\"status\":\"failed\",\"busy\":false,"
                               "\"last_error\":\"rejected: provisioner create answered 400\"}}",
                               "create", 1, &code), 502);
    assert_string_equal(code, "provisioner_rejected");
    free(code);
    assert_int_equal(status_of("{\"outcome\":\"failed\",\"instance\":{\"status\":\"failed\",\"busy\":false,"
                               "\"last_error\":\"provisioner create: timed out\"}}",
                               "create", 1, &code), 503);
    assert_string_equal(code, "provisioner_unavailable");
    free(code);
    /* A failed stop leaves the app running: still a failure for the waiting caller. */
    assert_int_equal(status_of("{\"outcome\":\"failed\",\"instance\":{\"status\":\"running\",\"busy\":false,"
                               "\"last_error\":\"provisioner stop answered 500\"}}",
                               "stop", 1, &code), 503);
    free(code);
    /* A failed welcome email never fails provisioning. */
    assert_int_equal(status_of("{\"outcome\":\"failed\",\"instance\":{\"status\":\"running\",\"busy\":false,"
                               "\"last_error\":null,\"welcome_email_error\":\"resend answered 500\"}}",
                               "email", 1, &code), 200);
    assert_null(code);
    /* Still someone else's when the wait ran out, or taken over: as it stands. */
    assert_int_equal(status_of("{\"outcome\":\"busy\",\"instance\":{\"status\":\"provisioning\",\"busy\":true}}",
                               NULL, 1, NULL), 202);
    assert_int_equal(status_of("{\"outcome\":\"lost\",\"instance\":{\"status\":\"provisioning\",\"busy\":true}}",
                               NULL, 1, NULL), 202);
    /* The holder died while we waited: its lease is gone but the work is not done. */
    assert_int_equal(status_of("{\"outcome\":\"busy\",\"instance\":{\"status\":\"provisioning\",\"busy\":false}}",
                               NULL, 1, NULL), 202);
    assert_int_equal(status_of("{\"outcome\":\"busy\",\"instance\":{\"status\":\"stopped\",\"busy\":false}}",
                               NULL, 1, NULL), 200);
}

/* What mr_instance_slot_acquire returns in a fresh process (one that holds no
 * slot, like another worker), which then exits without releasing it. */
static int acquire_elsewhere(void)
{
    int fd[2];
    assert_int_equal(pipe(fd), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int got = mr_instance_slot_acquire();
        _exit(write(fd[1], &got, sizeof got) == (ssize_t)sizeof got ? 0 : 3);
    }
    int got = -2;
    assert_int_equal(read(fd[0], &got, sizeof got), (ssize_t)sizeof got);
    waitpid(pid, NULL, 0);
    close(fd[0]);
    close(fd[1]);
    return got;
}

static pid_t holder = -1;

static int kill_holder(void **state)
{
    (void)state;
    if (holder > 0) {
        kill(holder, SIGKILL);
        waitpid(holder, NULL, 0);
        holder = -1;
    }
    return 0;
}

/* Slots are shared across fork; a slot whose holder died is taken back. */
static void test_slots(void **state)
{
    (void)state;
    mr_instance_slots_init(2);
    int a = mr_instance_slot_acquire();
    assert_true(a >= 0);

    int fd[2];
    assert_int_equal(pipe(fd), 0);
    holder = fork();
    assert_true(holder >= 0);
    if (holder == 0) {
        /* A live worker inside a job: takes the other slot and keeps it. */
        int b = mr_instance_slot_acquire();
        if (write(fd[1], &b, sizeof b) != (ssize_t)sizeof b) _exit(3);
        for (;;) pause();
    }
    int b = -2;
    assert_int_equal(read(fd[0], &b, sizeof b), (ssize_t)sizeof b);
    close(fd[0]);
    close(fd[1]);
    assert_true(b >= 0 && b != a);

    /* Both held by live processes: a third worker finds none. */
    assert_int_equal(acquire_elsewhere(), -1);
    /* The holder dies mid-job (SIGKILL): its slot comes back. */
    kill_holder(NULL);
    assert_int_equal(acquire_elsewhere(), b);
    /* That prober exited holding it: dead again, so it is free once more. */
    assert_int_equal(acquire_elsewhere(), b);
    /* A released slot is free. */
    mr_instance_slot_release(a);
    int again = acquire_elsewhere();
    assert_true(again == a || again == b);
}

static void test_welcome_text(void **state)
{
    (void)state;
    char *t = mr_resend_welcome_text("https://m0123456789ab.example.com");
    assert_non_null(t);
    assert_non_null(strstr(t, "https://m0123456789ab.example.com"));
    free(t);
    t = mr_resend_welcome_text(NULL);
    assert_non_null(t);
    assert_non_null(strstr(t, "MindRoom"));
    free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_is_uuid),
        cmocka_unit_test(test_response_status),
        cmocka_unit_test_teardown(test_slots, kill_holder),
        cmocka_unit_test(test_welcome_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
