/* steps.c: one claimed instance, step by step.
 *
 * The claim (public.lifecycle_claim) hands over a step: the action, the lease
 * token and everything the step needs. No transaction is open while the step
 * runs; its outcome is recorded by public.lifecycle_finish, which applies only
 * while the lease is still ours and hands back the next step with a lease of its own
 * (a retried finish whose first call committed gets that answer again, and is never
 * recorded as the next step's outcome).
 * A worker asked to stop lets its step run for the stop grace, then aborts the
 * call and gives the lease back (public.lifecycle_release) so another worker takes
 * the work at once instead of waiting for the lease to run out; a storage
 * destruction's lease alone is left to expire (steps_run). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mr_deadlines.h"
#include "mr_metrics.h"
#include "mr_resend.h"
#include "worker.h"

#define MAX_CHAIN 8 /* steps one claim runs in a row (create, restart, email...; work owed anew
                      * during each step, an update or a restart, chains again): the next
                      * one is given back, due at once for whichever worker claims next */

static const mr_db_stmt claim_stmt = {
    "mr_lc_claim", "SELECT public.lifecycle_claim($1, $2::int)::text", 2};
static const mr_db_stmt finish_stmt = {
    "mr_lc_finish",
    "SELECT public.lifecycle_finish($1::uuid, $2, $3::jsonb, $4::int, $5::int, $6::int)::text", 6};
static const mr_db_stmt release_stmt = {
    "mr_lc_release", "SELECT public.lifecycle_release($1::uuid, $2)::text", 2};

/* When a stop was first seen; the step in flight may run stop_grace_ms past it. */
static int64_t stop_seen_ms;

static int abort_step(void *arg)
{
    (void)arg;
    if (!worker_stopping())
        return 0;
    if (!stop_seen_ms)
        stop_seen_ms = mr_now_ms();
    return mr_now_ms() - stop_seen_ms >= wcfg.stop_grace_ms;
}

/* What the welcome email's step gives without a Resend key: it waits an hour and
 * asks again (a key may have been configured since): owed, not failed. */
static void email_unsendable(cJSON *result)
{
    cJSON_AddBoolToObject(result, "ok", 0);
    cJSON_AddStringToObject(result, "error", "skipped: RESEND_API_KEY is not set");
    cJSON_AddNumberToObject(result, "retry_in_s", 3600);
}

/* Until when this process leaves Resend alone: one of its calls
 * got no answer (its deadline passed, or no connection). Each email would hold a
 * worker for the whole deadline while Resend hangs, and the instances behind it
 * with it; the emails due meanwhile wait for the window's end instead, and the
 * first call after it asks Resend again. */
static int64_t resend_quiet_until; /* mr_now_ms */

/* The welcome email (a returning customer's says its data is back). */
static void do_email(worker *w, const char *instance_id, const cJSON *step, cJSON *result)
{
    if (!wcfg.resend_api_key) {
        email_unsendable(result);
        return;
    }
    int64_t now = mr_now_ms();
    if (now < resend_quiet_until) {
        long wait_s = (long)((resend_quiet_until - now + 999) / 1000);
        char why[160];
        snprintf(why, sizeof why, "not sent: Resend did not answer this worker's last call; "
                 "asked again in %ld s", wait_s);
        cJSON_AddBoolToObject(result, "ok", 0);
        cJSON_AddStringToObject(result, "error", why);
        cJSON_AddNumberToObject(result, "retry_in_s", (double)wait_s);
        return;
    }
    const cJSON *email = cJSON_GetObjectItemCaseSensitive(step, "welcome");
    const char *to = NULL, *url = NULL;
    mr_json_str(email, "to", &to);
    mr_json_str(email, "frontend_url", &url);
    /* A customer who subscribed again: the instance took over its kept data. */
    int returning = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(email, "returning"));
    char idem[80], err[256] = "";
    snprintf(idem, sizeof idem, "welcome-%s", instance_id);
    char *text = mr_resend_welcome_text(url, returning);
    mr_resend_config rc = {.base_url = wcfg.resend_base_url, .api_key = wcfg.resend_api_key,
                           .from = wcfg.resend_from, .timeout_ms = wcfg.resend_timeout_ms};
    mr_httpc_outcome said = MR_HTTPC_UNSENT;
    long retry_after_s = 0;
    mr_err e = text ? mr_resend_send(w->http, &rc, idem, to, mr_resend_welcome_subject(returning),
                                     text, &said, &retry_after_s, err, sizeof err)
                    : mr_seterr(err, sizeof err, MR_EINTERNAL, "out of memory");
    free(text);
    if (said == MR_HTTPC_NO_ANSWER) {
        long quiet_ms = MR_DL_RESEND_QUIET_FACTOR * wcfg.resend_timeout_ms;
        resend_quiet_until = mr_now_ms() + quiet_ms;
        mr_log(MR_LOG_WARN, "Resend did not answer (%s): this worker sends no email for %ld s",
               err, quiet_ms / 1000);
    }
    cJSON_AddBoolToObject(result, "ok", e == MR_OK);
    if (e != MR_OK) {
        cJSON_AddBoolToObject(result, "rejected", e == MR_EINVAL);
        cJSON_AddStringToObject(result, "error", err);
        if (retry_after_s > 0) /* Resend's own wait (a 429's retry-after) over our backoff */
            cJSON_AddNumberToObject(result, "retry_in_s", (double)retry_after_s);
    }
}

/* POST /apps with the step's payload, its secrets opened for this call only.
 * Returns 1 when the call was sent. */
static int apply(worker *w, const mr_provisioner *p, const cJSON *step, mr_provisioner_call *call)
{
    cJSON *payload = NULL;
    char err[256] = "";
    if (payload_build(w, step, &payload, err, sizeof err) != MR_OK) {
        /* A database hiccup or a key that cannot open a secret: an operator's
         * fix (or time) makes the same step work, so it is retried, not refused. */
        memset(call, 0, sizeof *call);
        snprintf(call->error, sizeof call->error, "%s", err);
        return 0;
    }
    mr_provisioner_apply(w->http, p, payload, call);
    payload_free(payload);
    return 1;
}

/* Carries out one step; fills result ({"ok", "rejected", "error", urls,
 * "config_version" (when the configuration was applied: POST /apps),
 * "restart_version", "matrix_server_name", "retention_s", "purged", "dry_run"}). Returns 1
 * when the call was aborted for a stop. */
static int do_step(worker *w, mr_action action, const cJSON *step, const char *instance_id,
                   cJSON *result)
{
    if (action == MR_ACTION_EMAIL) {
        do_email(w, instance_id, step, result);
        return 0;
    }
    const char *app = "";
    mr_json_str(step, "app", &app);
    int purge = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(step, "purge"));
    mr_provisioner p = wcfg.provisioner;
    p.abort_cb = abort_step;
    mr_provisioner_call call;
    worker_target target;
    char terr[256];
    /* The step carries its target, read in the claim's transaction (null: none). */
    if (targets_use(cJSON_GetObjectItemCaseSensitive(step, "target"), &p, &target, terr,
                    sizeof terr) != MR_OK) {
        targets_forget(&target);
        cJSON_AddBoolToObject(result, "ok", 0);
        cJSON_AddStringToObject(result, "error", terr);
        return 0;
    }
    int applied = 0, sent = 1;
    switch (action) {
    case MR_ACTION_CREATE:
    case MR_ACTION_UPDATE:
        sent = apply(w, &p, step, &call);
        applied = 1;
        break;
    case MR_ACTION_START:
    case MR_ACTION_RESTART:
        /* A start whose configuration changed while the app was stopped (a new
         * control-plane token, a plan change) is a POST /apps: it starts the apps
         * with the new configuration in one restart. */
        if (action == MR_ACTION_START && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(step, "apply"))) {
            sent = apply(w, &p, step, &call);
            applied = 1;
            break;
        }
        mr_provisioner_app(w->http, &p, app, action, 0, &call);
        /* The app is gone (removed by hand, or never made): create it again under
         * the same name, on the same storage, so it resumes as it was. */
        if (!call.ok && call.status == 404) {
            sent = apply(w, &p, step, &call);
            applied = 1;
        }
        break;
    case MR_ACTION_STOP:
    case MR_ACTION_DESTROY:
    case MR_ACTION_DESTROY_STORAGE:
        mr_provisioner_app(w->http, &p, app, action, purge, &call);
        break;
    default:
        memset(&call, 0, sizeof call);
        call.rejected = 1;
        sent = 0;
        snprintf(call.error, sizeof call.error, "no step for action %s", mr_action_name(action));
    }
    targets_forget(&target);
    if (sent)
        targets_note_answer(w, &target, &call);
    if (call.outcome == MR_HTTPC_ABORTED)
        return 1;
    cJSON_AddBoolToObject(result, "ok", call.ok);
    if (call.ok) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(step, "config_version");
        if (applied && cJSON_IsNumber(v))
            cJSON_AddNumberToObject(result, "config_version", v->valuedouble);
        /* A restart owed is done by a start or restart of both apps, or by a POST
         * /apps that gave every app new processes; one that left an app running as
         * it was (nothing of it changed) did not restart it, and the restart
         * follows as its own step. */
        v = cJSON_GetObjectItemCaseSensitive(step, "restart_version");
        if (cJSON_IsNumber(v) && (!applied || call.all_restarted))
            cJSON_AddNumberToObject(result, "restart_version", v->valuedouble);
        if (call.backend_url[0])
            cJSON_AddStringToObject(result, "backend_url", call.backend_url);
        if (call.frontend_url[0])
            cJSON_AddStringToObject(result, "frontend_url", call.frontend_url);
        if (call.matrix_server_url[0])
            cJSON_AddStringToObject(result, "matrix_server_url", call.matrix_server_url);
        if (call.matrix_server_name[0])
            cJSON_AddStringToObject(result, "matrix_server_name", call.matrix_server_name);
        /* Whether anything was deployed at all: a dry-run deploy is not probed. */
        if (call.dry_run >= 0)
            cJSON_AddBoolToObject(result, "dry_run", call.dry_run);
        if (action == MR_ACTION_DESTROY) {
            /* The storage outlives the apps for the retention period, unless it went
             * with them (a purge). */
            cJSON_AddBoolToObject(result, "purged", call.purged);
            cJSON_AddNumberToObject(result, "retention_s", (double)wcfg.retention_days * 86400.0);
        }
    } else {
        cJSON_AddBoolToObject(result, "rejected", call.rejected);
        cJSON_AddStringToObject(result, "error", call.error);
    }
    return 0;
}

/* Records a step's outcome. A call that may have taken minutes is worth a few
 * retries; if the database stays away the lease expires and the step is done again
 * (every step is idempotent). */
static mr_err finish(worker *w, const char *instance_id, const char *token, const cJSON *result,
                     cJSON **reply, char *err, size_t errlen)
{
    char lease[16];
    snprintf(lease, sizeof lease, "%d", wcfg.lease_s);
    char *rtext = mr_json_print(result);
    if (!rtext)
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    const char *p[] = {instance_id, token, rtext, lease, wcfg.backoff_base_arg, wcfg.backoff_cap_arg};
    mr_err e = MR_ETRANSIENT;
    for (int attempt = 0; attempt < 4; attempt++) {
        if (attempt) {
            struct timespec ts = {0, (250L << attempt) * 1000000L};
            nanosleep(&ts, NULL);
        }
        e = mr_db_call_json(w->db, &mr_service_identity, &finish_stmt, p, reply, err, errlen);
        if (e != MR_ETRANSIENT)
            break;
    }
    free(rtext);
    return e;
}

static void release(worker *w, const char *instance_id, const char *token, const char *why)
{
    const char *p[] = {instance_id, token};
    char *text = NULL, err[200] = "";
    if (mr_db_call(w->db, &mr_service_identity, &release_stmt, p, NULL, &text, err, sizeof err) != MR_OK)
        mr_log(MR_LOG_WARN, "instance %s: could not give the lease back (%s); it expires", instance_id, err);
    else
        mr_log(MR_LOG_INFO, "instance %s: %s; lease given back", instance_id, why);
    free(text);
}

mr_err steps_run(worker *w, cJSON *reply, char *err, size_t errlen)
{
    for (int n = 0; n < MAX_CHAIN; n++) {
        const char *outcome = "";
        mr_json_str(reply, "outcome", &outcome);
        if (strcmp(outcome, "claimed") != 0) {
            if (!strcmp(outcome, "lost"))
                mr_log(MR_LOG_WARN, "lease taken over before the outcome was recorded");
            break;
        }
        const cJSON *step = cJSON_GetObjectItemCaseSensitive(reply, "step");
        const char *act = NULL, *token = NULL, *iid = NULL;
        mr_action action;
        if (mr_json_str(step, "action", &act) != MR_OK || mr_json_str(step, "token", &token) != MR_OK ||
            mr_json_str(step, "instance_id", &iid) != MR_OK || mr_action_parse(act, &action) != MR_OK) {
            cJSON_Delete(reply);
            return mr_seterr(err, errlen, MR_EINTERNAL, "claimed step without action/token");
        }
        char tok[200], instance_id[40];
        snprintf(tok, sizeof tok, "%s", token);
        snprintf(instance_id, sizeof instance_id, "%s", iid);

        int64_t t0 = mr_now_ms();
        cJSON *result = cJSON_CreateObject();
        if (do_step(w, action, step, instance_id, result)) {
            cJSON_Delete(result);
            cJSON_Delete(reply);
            /* The aborted call may still run at the provisioner. Any other step
             * taken again there waits for the app's lock; but a storage
             * destruction's lease is what keeps an instance made again under the
             * same names from taking over the entries it removes
             * (instances_take_kept_storage): it is left to expire, by which time
             * the provisioner's request has ended (the deadline table). */
            if (action == MR_ACTION_DESTROY_STORAGE)
                mr_log(MR_LOG_INFO, "instance %s: stopping during destroy_storage; lease left to "
                       "expire (the provisioner may still be removing the storage)", instance_id);
            else
                release(w, instance_id, tok, "stopping");
            return MR_OK;
        }
        int ok = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(result, "ok"));
        const char *why = NULL;
        mr_json_str(result, "error", &why);
        /* A step that waits for configuration (no Resend key) is not a failure worth a warning. */
        int waits = why && strncmp(why, "skipped: ", 9) == 0;
        mr_log(ok || waits ? MR_LOG_INFO : MR_LOG_WARN, "instance %s: %s %s in %lld ms%s%s", instance_id,
               mr_action_name(action), ok ? "succeeded" : waits ? "waits" : "failed",
               (long long)(mr_now_ms() - t0), why ? ": " : "", why ? why : "");

        /* Without a Resend key, the email that may come next is answered here:
         * lifecycle_finish records it instead of chaining a step that could only
         * say so (112_email_in_finish.sql). */
        if (action != MR_ACTION_EMAIL && !wcfg.resend_api_key)
            email_unsendable(cJSON_AddObjectToObject(result, "welcome_email"));
        cJSON *next = NULL;
        mr_err e = finish(w, instance_id, tok, result, &next, err, errlen);
        cJSON_Delete(result);
        cJSON_Delete(reply);
        if (e != MR_OK) {
            mr_log(MR_LOG_ERROR, "instance %s: could not record %s: %s", instance_id,
                   mr_action_name(action), err);
            return e;
        }
        reply = next;
        if (worker_stopping() || n == MAX_CHAIN - 1) {
            /* Between steps, stopping, or at the chain's limit: give back whatever was
             * chained rather than start it (due at once for the next claim). */
            const char *o = "";
            mr_json_str(reply, "outcome", &o);
            const char *t2 = NULL;
            if (!strcmp(o, "claimed") &&
                mr_json_str(cJSON_GetObjectItemCaseSensitive(reply, "step"), "token", &t2) == MR_OK) {
                snprintf(tok, sizeof tok, "%s", t2);
                release(w, instance_id, tok, worker_stopping() ? "stopping" : "chain limit reached");
            }
            break;
        }
    }
    cJSON_Delete(reply);
    return MR_OK;
}

mr_err steps_claim(worker *w, cJSON **claimed, claim_outcome *outcome, int64_t *next_due_ms,
                   int *more, char *err, size_t errlen)
{
    char lease[16];
    snprintf(lease, sizeof lease, "%d", wcfg.lease_s);
    const char *p[] = {w->owner, lease};
    cJSON *reply = NULL;
    *claimed = NULL;
    *outcome = CLAIM_NONE;
    *next_due_ms = -1;
    *more = 1;
    mr_err e = mr_db_call_json(w->db, &mr_service_identity, &claim_stmt, p, &reply, err, errlen);
    if (e != MR_OK)
        return e;
    const char *o = "";
    mr_json_str(reply, "outcome", &o);
    if (strcmp(o, "claimed") != 0) {
        const cJSON *due = cJSON_GetObjectItemCaseSensitive(reply, "next_due_in_ms");
        if (cJSON_IsNumber(due))
            *next_due_ms = (int64_t)due->valuedouble;
        *outcome = strcmp(o, "full") == 0 ? CLAIM_FULL : CLAIM_NONE;
        mr_metrics_lifecycle_claim(*outcome == CLAIM_FULL ? MR_CLAIM_FULL : MR_CLAIM_NONE);
        cJSON_Delete(reply);
        return MR_OK;
    }
    /* Absent (a step a purge chained): more may be due. */
    *more = !cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(reply, "more"));
    *outcome = CLAIM_DONE;
    *claimed = reply;
    mr_metrics_lifecycle_claim(MR_CLAIM_CLAIMED);
    return MR_OK;
}
