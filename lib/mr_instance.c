/* mr_instance.c: see mr_instance.h. The rules (what is owed, which transition a
 * step makes, backoff) live in SQL; this file records requests and reads the
 * instance back, one round trip each. */
#include "mr_instance.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mr_action.h"
#include "mr_config.h"
#include "mr_deadlines.h"
#include "mr_json.h"
#include "mr_log.h"

static const mr_db_stmt provision_stmt = {
    "mr_instance_provision", "SELECT public.lifecycle_provision($1::uuid)::text", 1};
static const mr_db_stmt provision_rotating_stmt = {
    "mr_instance_provision_rotating", "SELECT public.lifecycle_provision_rotating($1::uuid)::text", 1};
static const mr_db_stmt deprovision_stmt = {
    "mr_instance_deprovision",
    "SELECT public.lifecycle_deprovision($1::uuid, $2::uuid, $3, $4::boolean)::text", 4};
static const mr_db_stmt get_stmt = {
    "mr_instance_get", "SELECT public.lifecycle_get($1::uuid)::text", 1};

void mr_instance_config_load(mr_instance_config *cfg)
{
    cfg->wait_ms = (long)mr_config_int("MR_PROVISION_WAIT_MS", MR_DL_WAIT_MS, 100, 4 * 3600000);
    cfg->poll_ms = 200;
    /* The wait's last poll may start as it ends, and a database that does not
     * answer it is given up on only after its answer window (lib/mr_db.c): both
     * must end before nginx gives up on the request. */
    int64_t window = mr_db_answer_window_ms(
        mr_config_int("MR_DB_STATEMENT_TIMEOUT_MS", MR_DL_DB_STATEMENT_MS, 0, 24 * 3600 * 1000), 1);
    if (cfg->wait_ms + window >= (int64_t)MR_DL_NGINX_LIFECYCLE_S * 1000) {
        fprintf(stderr, "config: MR_PROVISION_WAIT_MS (%ld ms) and its last poll's answer window "
                "(MR_DB_STATEMENT_TIMEOUT_MS + %d ms: %lld ms) must end before nginx's %d s read "
                "timeout for provision-instance and deprovision-instance\n", cfg->wait_ms,
                MR_DL_DB_ANSWER_SLACK_MS, (long long)window, MR_DL_NGINX_LIFECYCLE_S);
        exit(2);
    }
}

void mr_instance_result_free(mr_instance_result *res)
{
    if (!res)
        return;
    cJSON_Delete(res->reply);
    res->reply = NULL;
}

const cJSON *mr_instance_of(const mr_instance_result *res)
{
    const cJSON *i = res->reply ? cJSON_GetObjectItemCaseSensitive(res->reply, "instance") : NULL;
    return cJSON_IsObject(i) ? i : NULL;
}

static mr_err request(mr_db *db, const mr_identity *who, const mr_db_stmt *stmt,
                      const char *const *params, mr_instance_result *res, char *err, size_t errlen)
{
    memset(res, 0, sizeof *res);
    mr_err e = mr_db_call_json(db, who, stmt, params, &res->reply, err, errlen);
    if (e != MR_OK)
        return e;
    const char *s = NULL;
    if (mr_json_str(res->reply, "outcome", &s) == MR_OK)
        snprintf(res->outcome, sizeof res->outcome, "%s", s);
    if (mr_json_str(res->reply, "mode", &s) == MR_OK)
        snprintf(res->mode, sizeof res->mode, "%s", s);
    return MR_OK;
}

mr_err mr_instance_provision(mr_db *db, const mr_identity *who, const char *subscription_id,
                             int rotate_token, mr_instance_result *res, char *err, size_t errlen)
{
    const char *p[] = {subscription_id};
    return request(db, who, rotate_token ? &provision_rotating_stmt : &provision_stmt, p, res, err,
                   errlen);
}

mr_err mr_instance_deprovision(mr_db *db, const mr_identity *who, const char *instance_id,
                               const char *subscription_id, const char *mode, int purge,
                               mr_instance_result *res, char *err, size_t errlen)
{
    const char *p[] = {instance_id, subscription_id, mode, purge ? "true" : "false"};
    return request(db, who, &deprovision_stmt, p, res, err, errlen);
}

/* Where an instance stands for someone waiting on it. */
typedef enum { ST_PENDING, ST_DONE, ST_FAILED } standing;

static standing stand(const cJSON *inst, double attempts_before)
{
    const char *owed = NULL, *status = "";
    mr_action a = MR_ACTION_NONE;
    mr_json_str(inst, "owed_action", &owed);
    mr_json_str(inst, "status", &status);
    if (mr_action_parse(owed, &a) != MR_OK)
        return ST_PENDING;
    int busy = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(inst, "busy"));
    /* A welcome email still owed never holds up a running instance; a destroyed
     * instance's storage, kept for the retention period, holds up only a purge. */
    if (a == MR_ACTION_NONE || (a == MR_ACTION_EMAIL && !strcmp(status, "running")) ||
        (a == MR_ACTION_DESTROY_STORAGE &&
         !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(inst, "purge_requested"))))
        return ST_DONE;
    const cJSON *at = cJSON_GetObjectItemCaseSensitive(inst, "attempts");
    if (!busy && cJSON_IsNumber(at) && at->valuedouble > attempts_before)
        return ST_FAILED;
    return ST_PENDING;
}

/* {"error": {"code", "message"}} for a failure of e. */
static cJSON *error_answer(mr_err e, const char *message, int *status)
{
    cJSON *out = cJSON_CreateObject();
    cJSON *o = cJSON_AddObjectToObject(out, "error");
    cJSON_AddStringToObject(o, "code", mr_err_name(e));
    cJSON_AddStringToObject(o, "message", message);
    *status = mr_err_status(e);
    return out;
}

cJSON *mr_instance_answer(mr_db *db, const mr_identity *who, const mr_instance_config *cfg,
                          const mr_instance_result *res, int wait, int64_t started_ms,
                          int *status)
{
    char err[256] = "";
    cJSON *inst = cJSON_Duplicate(mr_instance_of(res), 1);
    if (!inst)
        return error_answer(MR_EINTERNAL, "no instance in the answer", status);
    const cJSON *at = cJSON_GetObjectItemCaseSensitive(inst, "attempts");
    double before = cJSON_IsNumber(at) ? at->valuedouble : 0;
    standing st = stand(inst, before);
    int code = st == ST_DONE ? 200 : 202;

    if (wait) {
        const char *id = NULL;
        char iid[40] = "";
        if (mr_json_str(inst, "id", &id) == MR_OK)
            snprintf(iid, sizeof iid, "%s", id);
        int64_t deadline = started_ms + cfg->wait_ms;
        for (int64_t left; st == ST_PENDING && iid[0] && (left = deadline - mr_now_ms()) > 0;) {
            long ms = left < cfg->poll_ms ? (long)left : cfg->poll_ms; /* no poll after the wait */
            struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
            const char *p[] = {iid};
            cJSON *fresh = NULL;
            mr_err e = mr_db_call_json(db, who, &get_stmt, p, &fresh, err, sizeof err);
            if (e != MR_OK) {
                cJSON_Delete(inst);
                return error_answer(e, err, status);
            }
            cJSON_Delete(inst);
            inst = fresh;
            st = stand(inst, before);
        }
        code = st == ST_DONE ? 200 : st == ST_PENDING ? 202 : 503;
    }

    cJSON *out = cJSON_CreateObject();
    cJSON *err_obj = NULL;
    if (st == ST_FAILED) {
        const char *last = "the step failed";
        mr_json_str(inst, "last_error", &last);
        int rejected = strncmp(last, "rejected:", 9) == 0;
        code = rejected ? 502 : 503;
        err_obj = cJSON_CreateObject();
        cJSON_AddStringToObject(err_obj, "code", rejected ? "provisioner_rejected"
                                                          : "provisioner_unavailable");
        cJSON_AddStringToObject(err_obj, "message", last);
    }
    cJSON_AddItemToObject(out, "instance", inst);
    if (res->mode[0])
        cJSON_AddStringToObject(out, "mode", res->mode);
    if (err_obj)
        cJSON_AddItemToObject(out, "error", err_obj);
    *status = code;
    return out;
}
