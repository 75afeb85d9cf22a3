/* test_lifecycle.c: the lifecycle's pure parts: the owed-work vocabulary, the
 * edges' answer for each standing of an instance (no wait), the provisioner
 * client's refusal of app names it must not put in a URL, the welcome text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "mindroom.h"
#include "mr_action.h"
#include "mr_instance.h"
#include "mr_provisioner.h"
#include "mr_resend.h"

static void test_action_vocabulary(void **state)
{
    (void)state;
    static const char *const words[] = {"create", "start", "update", "stop", "destroy", "email",
                                        "destroy_storage", "restart"};
    mr_action a;
    for (size_t i = 0; i < MR_ARRAY_LEN(words); i++) {
        assert_int_equal(mr_action_parse(words[i], &a), MR_OK);
        assert_int_equal(a, (mr_action)(MR_ACTION_CREATE + (int)i));
        assert_string_equal(mr_action_name(a), words[i]);
    }
    assert_int_equal(MR_ACTION_COUNT, MR_ACTION_CREATE + (int)MR_ARRAY_LEN(words));
    assert_int_equal(mr_action_parse(NULL, &a), MR_OK);
    assert_int_equal(a, MR_ACTION_NONE);
    assert_int_equal(mr_action_parse("", &a), MR_OK);
    assert_int_equal(a, MR_ACTION_NONE);
    assert_string_equal(mr_action_name(MR_ACTION_NONE), "none");
    /* Old words and near misses are not the vocabulary. */
    static const char *const bad[] = {"provision", "resume", "none", "Create", "create ", "delete"};
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        a = MR_ACTION_STOP;
        assert_int_equal(mr_action_parse(bad[i], &a), MR_EINVAL);
        assert_int_equal(a, MR_ACTION_NONE);
    }
    assert_string_equal(mr_action_name((mr_action)99), "none");
}

/* The status an edge answers (no wait) for an instance JSON. */
static int status_for(const char *instance_json, const char *mode)
{
    mr_instance_result res = {0};
    snprintf(res.outcome, sizeof res.outcome, "ok");
    if (mode)
        snprintf(res.mode, sizeof res.mode, "%s", mode);
    char buf[512];
    snprintf(buf, sizeof buf, "{\"outcome\":\"ok\",\"instance\":%s}", instance_json);
    res.reply = mr_json_parse(buf, strlen(buf));
    assert_non_null(res.reply);
    mr_instance_config cfg = {.wait_ms = 1000, .poll_ms = 10};
    int status = 0;
    cJSON *out = mr_instance_answer(NULL, NULL, &cfg, &res, 0, mr_now_ms(), &status);
    assert_non_null(out);
    assert_non_null(cJSON_GetObjectItemCaseSensitive(out, "instance"));
    if (mode)
        assert_string_equal(cJSON_GetObjectItemCaseSensitive(out, "mode")->valuestring, mode);
    assert_null(cJSON_GetObjectItemCaseSensitive(out, "error"));
    cJSON_Delete(out);
    mr_instance_result_free(&res);
    return status;
}

static void test_answer_without_wait(void **state)
{
    (void)state;
    /* Work owed: accepted, the worker does it. */
    assert_int_equal(status_for("{\"id\":\"x\",\"status\":\"provisioning\",\"owed_action\":\"create\","
                                "\"busy\":false,\"attempts\":0}", NULL), 202);
    assert_int_equal(status_for("{\"id\":\"x\",\"status\":\"running\",\"owed_action\":\"stop\","
                                "\"busy\":true,\"attempts\":0}", "stop"), 202);
    assert_int_equal(status_for("{\"id\":\"x\",\"status\":\"running\",\"owed_action\":\"update\","
                                "\"busy\":false,\"attempts\":2}", NULL), 202);
    /* Nothing owed: done. */
    assert_int_equal(status_for("{\"id\":\"x\",\"status\":\"running\",\"owed_action\":null,"
                                "\"busy\":false,\"attempts\":0}", NULL), 200);
    assert_int_equal(status_for("{\"id\":\"x\",\"status\":\"stopped\",\"busy\":false}", "stop"), 200);
    /* Only the welcome email owed: the running instance is done. */
    assert_int_equal(status_for("{\"id\":\"x\",\"status\":\"running\",\"owed_action\":\"email\","
                                "\"busy\":true,\"attempts\":0}", NULL), 200);
    /* A word SQL would never send is not taken for done. */
    assert_int_equal(status_for("{\"id\":\"x\",\"status\":\"running\",\"owed_action\":\"nuke\"}", NULL),
                     202);
}

static void test_provisioner_refuses_bad_app_names(void **state)
{
    (void)state;
    /* Refused before anything is sent: no HTTP handle is even needed. */
    mr_provisioner p = {.url = "http://127.0.0.1:1", .token = "t", .timeout_ms = 100,
                        .connect_timeout_ms = 100};
    static const char *const bad[] = {"", "Mindroom-x", "mindroom/../x", "a b", "x?y", "x%2f"};
    for (size_t i = 0; i < MR_ARRAY_LEN(bad); i++) {
        mr_provisioner_call call;
        mr_provisioner_app(NULL, &p, bad[i], MR_ACTION_STOP, 0, &call);
        assert_false(call.ok);
        assert_true(call.rejected);
        assert_string_equal(call.error, "invalid app name");
    }
    mr_provisioner_call call;
    /* Only start, stop and destroy have a route on an existing app. */
    mr_provisioner_app(NULL, &p, "mindroom-abc", MR_ACTION_EMAIL, 0, &call);
    assert_true(call.rejected);
    assert_string_equal(call.error, "no provisioner route for email");
    mr_provisioner_apply(NULL, &p, NULL, &call);
    assert_false(call.ok);
    assert_true(call.rejected);
}

static void test_welcome_text(void **state)
{
    (void)state;
    char *t = mr_resend_welcome_text("https://m0123456789ab.example.com", 0);
    assert_non_null(t);
    assert_non_null(strstr(t, "https://m0123456789ab.example.com"));
    assert_null(strstr(t, "back"));
    free(t);
    t = mr_resend_welcome_text(NULL, 0);
    assert_non_null(t);
    assert_non_null(strstr(t, "MindRoom"));
    free(t);
    /* A returning customer's: the same address, and its data is back. */
    t = mr_resend_welcome_text("https://m0123456789ab.example.com", 1);
    assert_non_null(t);
    assert_non_null(strstr(t, "https://m0123456789ab.example.com"));
    assert_non_null(strstr(t, "rooms, agents and settings it had before"));
    free(t);
    assert_string_equal(mr_resend_welcome_subject(0), "Your MindRoom is ready");
    assert_string_equal(mr_resend_welcome_subject(1), "Your MindRoom is back");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_action_vocabulary),
        cmocka_unit_test(test_answer_without_wait),
        cmocka_unit_test(test_provisioner_refuses_bad_app_names),
        cmocka_unit_test(test_welcome_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
