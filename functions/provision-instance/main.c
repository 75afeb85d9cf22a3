/* provision-instance: creates or resumes a subscription's MindRoom instance.
 *
 * POST {"subscription_id": uuid, "wait"?: bool} with a service_role JWT.
 * 202 once the work is claimed (it then runs in this worker after the answer),
 * 200 when nothing is owed (or when waited for), 409 when the subscription is not
 * entitled to an instance. The lifecycle itself is lib/mr_instance.c and
 * sql/migrations/020_lifecycle.sql. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "mindroom.h"
#include "mr_instance.h"

static mr_instance_config cfg;

static void init(void)
{
    mr_instance_config_load(&cfg);
    cfg.function = "provision-instance";
    mr_instance_slots_init(cfg.jobs);
}

static void handle(mr_req *r)
{
    cJSON *body = mr_json_parse(r->body, r->body_len);
    if (!cJSON_IsObject(body)) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_body", "body must be a JSON object");
        return;
    }
    const char *sid = NULL;
    int wait = 0;
    mr_err je = mr_json_bool(body, "wait", &wait);
    if (mr_json_str(body, "subscription_id", &sid) != MR_OK || !mr_instance_is_uuid(sid)) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_subscription_id", "subscription_id must be a UUID");
        return;
    }
    if (je != MR_OK && je != MR_ENOTFOUND) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_wait", "wait must be a boolean");
        return;
    }
    char sub[40], owner[128], err[256] = "";
    snprintf(sub, sizeof sub, "%s", sid);
    cJSON_Delete(body);
    snprintf(owner, sizeof owner, "provision-instance:%d:%s", (int)getpid(), r->request_id);
    /* Claim only with a job slot free (see mr_instance.h); otherwise leave it owed. */
    int slot = mr_instance_slot_acquire();

    mr_instance_result res;
    mr_err e = mr_instance_provision(r->db, &r->who, &cfg, sub, slot >= 0 ? owner : NULL,
                                     &res, err, sizeof err);
    if (e != MR_OK || strcmp(res.outcome, "claimed") != 0) {
        mr_instance_slot_release(slot); /* no steps for this worker to run */
        slot = -1;
    }
    if (e != MR_OK) {
        mr_reply_err(r, e, err);
        return;
    }
    if (strcmp(res.outcome, "not_found") == 0) {
        mr_instance_result_free(&res);
        mr_reply_error(r, 404, "not_found", "no subscription %s", sub);
        return;
    }
    if (strcmp(res.outcome, "not_entitled") == 0) {
        const char *st = "unknown";
        mr_json_str(res.reply, "subscription_status", &st);
        mr_reply_error(r, 409, "not_entitled",
                       "subscription %s is %s: only trialing, active and past_due subscriptions "
                       "get an instance", sub, st);
        mr_instance_result_free(&res);
        return;
    }
    if (strcmp(res.outcome, "conflict") == 0) {
        const char *msg = "conflict";
        mr_json_str(res.reply, "message", &msg);
        mr_reply_error(r, 409, "conflict", "%s", msg);
        mr_instance_result_free(&res);
        return;
    }
    mr_instance_reply(r, &cfg, &res, wait, slot, owner);
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
