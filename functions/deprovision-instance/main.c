/* deprovision-instance: records that an instance should stop or be destroyed.
 *
 * POST {"instance_id": uuid} or {"subscription_id": uuid}, optional "mode":
 * "stop" (keep the apps and their data; provision-instance resumes it) or "destroy"
 * (remove the apps; deprovisioned, final; the storage is kept for the retention
 * period, MINDROOM_RETENTION_DAYS). Without a mode: what the subscription's status
 * asks for (destroy when cancelled or incomplete_expired), stop otherwise.
 * "purge": true (with "mode": "destroy") destroys the storage too, at once; on an
 * instance already destroyed it ends the retention now.
 * 202 while work is owed (the lifecycle worker does it), 200 when nothing is (or,
 * with "wait": true, once done). */
#include <stdio.h>
#include <string.h>

#include "mindroom.h"
#include "mr_action.h"
#include "mr_instance.h"

static mr_instance_config cfg;

static void init(void)
{
    mr_instance_config_load(&cfg);
}

static void handle(mr_req *r)
{
    static const char *const members[] = {"instance_id", "subscription_id", "mode", "wait",
                                          "purge", NULL};
    char why[200];
    cJSON *body = mr_json_parse(r->body, r->body_len);
    if (mr_json_members(body, members, why, sizeof why) != MR_OK) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_body", "%s", why);
        return;
    }
    const char *iid = NULL, *sid = NULL, *mode = NULL;
    int wait = 0, purge = 0;
    mr_err ie = mr_json_str(body, "instance_id", &iid);
    mr_err se = mr_json_str(body, "subscription_id", &sid);
    mr_err me = mr_json_str(body, "mode", &mode);
    mr_err we = mr_json_bool(body, "wait", &wait);
    mr_err pe = mr_json_bool(body, "purge", &purge);
    /* The mode is the owed action asked for: stop or destroy, nothing else. */
    mr_action ma = MR_ACTION_NONE;
    if (me == MR_OK && mr_action_parse(mode, &ma) != MR_OK)
        ma = MR_ACTION_NONE;
    const char *bad = NULL;
    if ((ie == MR_OK) == (se == MR_OK) || ie == MR_EINVAL || se == MR_EINVAL)
        bad = "exactly one of instance_id and subscription_id is required";
    else if ((ie == MR_OK && !mr_is_uuid(iid)) || (se == MR_OK && !mr_is_uuid(sid)))
        bad = "instance_id and subscription_id must be UUIDs";
    else if (me == MR_EINVAL || (me == MR_OK && ma != MR_ACTION_STOP && ma != MR_ACTION_DESTROY))
        bad = "mode must be \"stop\" or \"destroy\"";
    else if (we == MR_EINVAL || pe == MR_EINVAL)
        bad = "wait and purge must be booleans";
    else if (purge && ma != MR_ACTION_DESTROY)
        bad = "purge goes with \"mode\": \"destroy\"";
    if (bad) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_body", "%s", bad);
        return;
    }
    char inst[40] = "", sub[40] = "", err[256] = "";
    if (ie == MR_OK) snprintf(inst, sizeof inst, "%s", iid);
    if (se == MR_OK) snprintf(sub, sizeof sub, "%s", sid);
    cJSON_Delete(body);

    mr_instance_result res;
    mr_err e = mr_instance_deprovision(r->db, &r->who, *inst ? inst : NULL, *sub ? sub : NULL,
                                       ma != MR_ACTION_NONE ? mr_action_name(ma) : NULL, purge, &res,
                                       err, sizeof err);
    if (e != MR_OK) {
        mr_reply_err(r, e, err);
        return;
    }
    if (strcmp(res.outcome, "not_found") == 0) {
        if (*inst) mr_reply_error(r, 404, "not_found", "no instance %s", inst);
        else mr_reply_error(r, 404, "not_found", "no subscription %s", sub);
    } else if (strcmp(res.outcome, "none") == 0) {
        /* A subscription that never had an instance has nothing to stop or destroy. */
        cJSON *out = cJSON_CreateObject();
        cJSON_AddNullToObject(out, "instance");
        cJSON_AddStringToObject(out, "mode", res.mode);
        mr_reply_json(r, 200, out);
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
        .name = "deprovision-instance",
        .methods = "POST",
        .auth = MR_AUTH_SERVICE,
        .init = init,
        .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
