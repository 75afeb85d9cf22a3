/* my-instance: a customer's own instance, as their dashboard shows it.
 *
 *   GET  /functions/v1/my-instance[?instance_id=<uuid>]
 *        status, URLs, plan and limits, today's usage and the last 30 days, the
 *        last health result, when the subscription ends (cancel_at), trial end
 *        (public.tenant_instance, run as the user: RLS decides what it reads)
 *   POST /functions/v1/my-instance/restart   body {} or {"instance_id": "<uuid>"}
 *        records a restart the lifecycle worker carries out: 202; 429 with
 *        Retry-After past 3 per account in 10 minutes; 409 when the instance is not
 *        running (billing owns whether it runs); audited with who and from where
 *        (public.tenant_instance_restart)
 *
 * A user's session JWT (role authenticated) only: a service key has no "my"
 * (403). A third-party app the user authorised (a token with client_id) may read
 * (GET), not restart (403 oauth_client_not_allowed). Without instance_id, the user's current instance; someone else's id, or
 * a user without an instance: 404 (with a notice when a first payment explains it:
 * public.tenant_no_instance_notice). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mindroom.h"

static const mr_db_stmt read_stmt = {
    "mr_mi_read", "SELECT public.tenant_instance($1::uuid)::text", 1};
static const mr_db_stmt restart_stmt = {
    "mr_mi_restart", "SELECT public.tenant_instance_restart($1::uuid)::text", 1};

/* Runs stmt as the caller; *out is the parsed JSON (NULL for SQL NULL). Replies
 * and returns -1 on a failure. */
static int call(mr_req *r, const mr_db_stmt *stmt, const char *id, cJSON **out)
{
    char *text = NULL, err[256] = "";
    const char *p[] = {id[0] ? id : NULL};
    *out = NULL;
    mr_err e = mr_db_call(r->db, &r->who, stmt, p, NULL, &text, err, sizeof err);
    if (e == MR_OK && text && !(*out = mr_json_parse(text, strlen(text))))
        e = mr_seterr(err, sizeof err, MR_EINTERNAL, "unexpected answer from the database");
    free(text);
    if (e != MR_OK) {
        mr_reply_err(r, e, err);
        return -1;
    }
    return 0;
}

static const mr_db_stmt no_instance_stmt = {
    "mr_mi_no_instance", "SELECT public.tenant_no_instance_notice()::text", 0};

/* A user without an instance may be waiting for one (a first payment still
 * processing) or not get one (it did not complete): the 404 keeps its status and
 * code, and says which with the notice (tenant_instance_notice's words), as
 * instance.notice would. An id that is not the user's says nothing about them. */
static void not_found(mr_req *r, const char *id)
{
    if (id[0]) {
        mr_reply_error(r, 404, "not_found", "no instance %s of yours", id);
        return;
    }
    cJSON *notice = NULL;
    if (call(r, &no_instance_stmt, "", &notice) != 0)
        return;
    const char *msg = NULL;
    if (!cJSON_IsObject(notice) || mr_json_str(notice, "message", &msg) != MR_OK) {
        cJSON_Delete(notice);
        mr_reply_error(r, 404, "not_found", "you have no instance");
        return;
    }
    char text[512];
    snprintf(text, sizeof text, "you have no instance. %s", msg);
    cJSON *j = cJSON_CreateObject();
    cJSON *e = cJSON_AddObjectToObject(j, "error");
    cJSON_AddStringToObject(e, "code", "not_found");
    cJSON_AddStringToObject(e, "message", text);
    cJSON_AddItemToObject(j, "notice", notice);
    mr_reply_json(r, 404, j);
}

static void read_instance(mr_req *r, const char *id)
{
    cJSON *out = NULL;
    if (call(r, &read_stmt, id, &out) != 0)
        return;
    if (!out)
        not_found(r, id);
    else
        mr_reply_json(r, 200, out);
}

static void restart(mr_req *r, const char *id)
{
    cJSON *res = NULL;
    if (call(r, &restart_stmt, id, &res) != 0)
        return;
    const char *outcome = "";
    mr_json_str(res, "outcome", &outcome);
    if (!strcmp(outcome, "ok") || !strcmp(outcome, "pending")) {
        cJSON *mine = cJSON_DetachItemFromObjectCaseSensitive(res, "my_instance");
        cJSON *out = cJSON_IsObject(mine) ? mine : cJSON_CreateObject();
        if (out != mine)
            cJSON_Delete(mine);
        cJSON_AddBoolToObject(out, "restart_requested", !strcmp(outcome, "ok"));
        mr_reply_json(r, 202, out);
    } else if (!strcmp(outcome, "not_found")) {
        not_found(r, id);
    } else if (!strcmp(outcome, "not_running")) {
        /* Still running but on its way out: say where it is going, not "running".
         * The notice says why and what the customer can do (tenant_instance_notice). */
        const char *st = "not running", *want = "running", *notice = NULL;
        mr_json_str(res, "status", &st);
        mr_json_str(res, "desired_status", &want);
        mr_json_str(res, "notice", &notice);
        if (!strcmp(st, "running") && strcmp(want, "running") != 0)
            st = !strcmp(want, "stopped") ? "being stopped" : "being destroyed";
        else if (!strcmp(st, "provisioning"))
            st = "being set up";
        else if (!strcmp(st, "deprovisioning"))
            st = "being destroyed";
        else if (!strcmp(st, "deprovisioned"))
            st = "destroyed";
        else if (!strcmp(st, "failed"))
            st = "not running"; /* a step failed, or the health checks: the notice says */
        mr_reply_error(r, 409, "not_running", "the instance is %s: only a running instance is "
                       "restarted%s%s", st, notice ? ". " : "", notice ? notice : "");
    } else if (!strcmp(outcome, "rate_limited")) {
        int64_t retry = 60;
        mr_json_i64(res, "retry_after_s", 1, 3600, &retry);
        char after[48], msg[160];
        snprintf(after, sizeof after, "Retry-After: %lld", (long long)retry);
        snprintf(msg, sizeof msg, "at most 3 restarts per account in 10 minutes; retry in %lld s",
                 (long long)retry);
        const char *const hdr[] = {after, NULL};
        cJSON *j = cJSON_CreateObject();
        cJSON *e = cJSON_AddObjectToObject(j, "error");
        cJSON_AddStringToObject(e, "code", "rate_limited");
        cJSON_AddStringToObject(e, "message", msg);
        mr_reply_json_h(r, 429, j, hdr);
    } else {
        mr_reply_error(r, 500, "internal", "unexpected answer from the database");
    }
    cJSON_Delete(res);
}

static void handle(mr_req *r)
{
    if (strcmp(r->who.role, "authenticated") != 0) {
        mr_reply_error(r, 403, "forbidden", "my-instance takes a user's session, not a service key");
        return;
    }
    char id[40];
    int is_restart = strcmp(r->path, "/restart") == 0;
    if (r->path[0] && !is_restart) {
        mr_reply_error(r, 404, "not_found", "no such route: GET my-instance or POST my-instance/restart");
        return;
    }
    if (strcmp(r->method, is_restart ? "POST" : "GET") != 0) {
        const char *const hdr[] = {is_restart ? "Allow: POST" : "Allow: GET", NULL};
        cJSON *j = cJSON_CreateObject();
        cJSON *e = cJSON_AddObjectToObject(j, "error");
        cJSON_AddStringToObject(e, "code", "method_not_allowed");
        cJSON_AddStringToObject(e, "message", is_restart ? "POST my-instance/restart"
                                                         : "GET my-instance");
        mr_reply_json_h(r, 405, j, hdr);
        return;
    }
    /* The instance asked for, "" for the current one (an empty id is an error,
     * never the current one). */
    if (mr_req_instance_id(r, id) != 0)
        return;
    if (is_restart)
        restart(r, id);
    else
        read_instance(r, id);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "my-instance",
        .methods = "GET,POST",
        .auth = MR_AUTH_USER,
        .oauth_client_methods = "GET",
        .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
