/* deprovision-instance: stops or destroys an instance.
 *
 * POST {"instance_id": uuid} or {"subscription_id": uuid}, optional "mode":
 * "stop" (keep the app and its data; provision-instance resumes it) or "destroy"
 * (remove the app; deprovisioned). Without a mode: destroy when the subscription is
 * cancelled or incomplete_expired, stop otherwise. "wait": true answers when done.
 * 202 once claimed, 200 when nothing is owed (already stopped/destroyed). */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "mindroom.h"
#include "mr_instance.h"

static mr_instance_config cfg;

static void init(void)
{
    mr_instance_config_load(&cfg);
    cfg.function = "deprovision-instance";
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
    const char *iid = NULL, *sid = NULL, *mode = NULL;
    int wait = 0;
    mr_err ie = mr_json_str(body, "instance_id", &iid);
    mr_err se = mr_json_str(body, "subscription_id", &sid);
    mr_err me = mr_json_str(body, "mode", &mode);
    mr_err we = mr_json_bool(body, "wait", &wait);
    const char *bad = NULL;
    if ((ie == MR_OK) == (se == MR_OK) || ie == MR_EINVAL || se == MR_EINVAL)
        bad = "exactly one of instance_id and subscription_id is required";
    else if ((ie == MR_OK && !mr_instance_is_uuid(iid)) || (se == MR_OK && !mr_instance_is_uuid(sid)))
        bad = "instance_id and subscription_id must be UUIDs";
    else if (me == MR_EINVAL || (me == MR_OK && strcmp(mode, "stop") != 0 && strcmp(mode, "destroy") != 0))
        bad = "mode must be \"stop\" or \"destroy\"";
    else if (we == MR_EINVAL)
        bad = "wait must be a boolean";
    if (bad) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_body", "%s", bad);
        return;
    }
    char inst[40] = "", sub[40] = "", md[8] = "", owner[128], err[256] = "";
    if (ie == MR_OK) snprintf(inst, sizeof inst, "%s", iid);
    if (se == MR_OK) snprintf(sub, sizeof sub, "%s", sid);
    if (me == MR_OK) snprintf(md, sizeof md, "%s", mode);
    cJSON_Delete(body);
    snprintf(owner, sizeof owner, "deprovision-instance:%d:%s", (int)getpid(), r->request_id);
    /* Claim only with a job slot free (see mr_instance.h); otherwise leave it owed. */
    int slot = mr_instance_slot_acquire();

    mr_instance_result res;
    mr_err e = mr_instance_deprovision(r->db, &r->who, &cfg, *inst ? inst : NULL,
                                       *sub ? sub : NULL, *md ? md : NULL,
                                       slot >= 0 ? owner : NULL,
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
        if (*inst) mr_reply_error(r, 404, "not_found", "no instance %s", inst);
        else mr_reply_error(r, 404, "not_found", "no subscription %s", sub);
        return;
    }
    /* A subscription that never had an instance has nothing to stop or destroy. */
    if (strcmp(res.outcome, "none") == 0) {
        cJSON *out = cJSON_CreateObject();
        cJSON_AddNullToObject(out, "instance");
        cJSON_AddStringToObject(out, "mode", res.mode);
        mr_instance_result_free(&res);
        mr_reply_json(r, 200, out);
        return;
    }
    mr_instance_reply(r, &cfg, &res, wait, slot, owner);
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
