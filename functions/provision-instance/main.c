/* provision-instance: records that a subscription's MindRoom instance should run.
 *
 * POST {"subscription_id": uuid, "wait"?: bool, "rotate_token"?: bool} with a
 * service_role JWT; rotate_token replaces the instance's control-plane token in the
 * same transaction (the redeploy owed delivers the new one).
 * 202 while work is owed (the lifecycle worker does it), 200 when nothing is (or,
 * with wait, once done), 409 when the subscription is not entitled to an instance
 * (the message says when an operator's stop still holds its instance) or its
 * instance is being destroyed. An explicit request also lifts a retry
 * backoff. The model: lib/mr_instance.c, sql/migrations/040_owed_work.sql. */
#include <stdio.h>
#include <string.h>

#include "mindroom.h"
#include "mr_instance.h"

static mr_instance_config cfg;

static void init(void)
{
    mr_instance_config_load(&cfg);
}

static void handle(mr_req *r)
{
    static const char *const members[] = {"subscription_id", "wait", "rotate_token", NULL};
    char why[200];
    cJSON *body = mr_json_parse(r->body, r->body_len);
    if (mr_json_members(body, members, why, sizeof why) != MR_OK) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_body", "%s", why);
        return;
    }
    const char *sid = NULL;
    int wait = 0, rotate = 0;
    mr_err je = mr_json_bool(body, "wait", &wait);
    mr_err re = mr_json_bool(body, "rotate_token", &rotate);
    if (mr_json_str(body, "subscription_id", &sid) != MR_OK || !mr_is_uuid(sid)) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_subscription_id", "subscription_id must be a UUID");
        return;
    }
    if (je != MR_OK && je != MR_ENOTFOUND) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_wait", "wait must be a boolean");
        return;
    }
    if (re != MR_OK && re != MR_ENOTFOUND) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_rotate_token", "rotate_token must be a boolean");
        return;
    }
    char sub[40], err[256] = "";
    snprintf(sub, sizeof sub, "%s", sid);
    cJSON_Delete(body);

    mr_instance_result res;
    mr_err e = mr_instance_provision(r->db, &r->who, sub, rotate, &res, err, sizeof err);
    if (e != MR_OK) {
        mr_reply_err(r, e, err);
        return;
    }
    if (strcmp(res.outcome, "not_found") == 0) {
        mr_reply_error(r, 404, "not_found", "no subscription %s", sub);
    } else if (strcmp(res.outcome, "not_entitled") == 0) {
        const char *st = "unknown", *held = NULL;
        mr_json_str(res.reply, "subscription_status", &st);
        const cJSON *inst = mr_instance_of(&res);
        if (inst)
            mr_json_str(inst, "operator_stopped_at", &held);
        /* Refused, the operator's stop holds: paying again does not resume it. */
        mr_reply_error(r, 409, "not_entitled",
                       "subscription %s is %s: only trialing, active and past_due subscriptions "
                       "get an instance%s", sub, st,
                       held ? "; its instance stays stopped by an operator (billing does not "
                              "resume it): provision again once the subscription is entitled"
                            : "");
    } else if (strcmp(res.outcome, "conflict") == 0) {
        const char *msg = "conflict";
        mr_json_str(res.reply, "message", &msg);
        mr_reply_error(r, 409, "conflict", "%s", msg);
    } else {
        int status = 500;
        cJSON *out = mr_instance_answer(r->db, &r->who, &cfg, &res, wait, r->started_ms, &status);
        mr_reply_json(r, status, out);
    }
    mr_instance_result_free(&res);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "provision-instance",
        .methods = "POST",
        .auth = MR_AUTH_SERVICE,
        .init = init,
        .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
