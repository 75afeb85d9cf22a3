/* jobs.c: the periodic jobs, each run once per interval across every worker on
 * every host: whoever moves the job's lease row forward (public.scheduled_job_take)
 * runs it, and nobody else can until the interval has passed.
 *
 *   health        the health round (lib/mr_health.c): probe every running
 *                 instance, record, count failures (once per interval), mark
 *                 failed at the threshold; the redeploy that makes owed is
 *                 claimed like any other owed work
 *   stripe-sweep  Stripe events stored as deferred: give up on those older than
 *                 STRIPE_DEFER_MAX_HOURS (marked failed, logged at error, counted),
 *                 then re-apply the due ones, each in its own transaction
 *   teardown      instances whose rows were deleted (an account erased) while
 *                 they still had apps or data (public.instance_teardowns): destroy
 *                 both apps and both storage entries on the instance's own
 *                 provisioner target, with backoff on failure
 *   stripe-cancel  Stripe subscriptions of deleted accounts (public.stripe_cancellations,
 *                 recorded by the delete): cancel each at once at Stripe
 *                 (DELETE /v1/subscriptions/{id}), with backoff on failure; without
 *                 STRIPE_SECRET_KEY they stay owed and the round says so */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker.h"

/* How often a worker asks whether a job's turn has come: a quarter of its interval,
 * between 1 s and 15 s, so a round starts at most that late. */
static int64_t ask_every_ms(int interval_s)
{
    int64_t ms = (int64_t)interval_s * 250;
    return ms < 1000 ? 1000 : ms > 15000 ? 15000 : ms;
}

static const mr_db_stmt take_stmt = {
    "mr_job_take", "SELECT public.scheduled_job_take($1, $2, $3::int)::text", 3};
static const mr_db_stmt done_stmt = {
    "mr_job_done", "SELECT public.scheduled_job_done($1, $2, $3)::text", 3};
static const mr_db_stmt reprocess_stmt = {
    "mr_job_reprocess", "SELECT public.reprocess_stripe_event($1) ->> 'result'", 1};
static const mr_db_stmt teardown_begin_stmt = {
    "mr_job_teardown_begin", "SELECT public.instance_teardown_begin($1::uuid, $2::int, $3)", 3};
static const mr_db_stmt teardown_done_stmt = {
    "mr_job_teardown_done",
    "SELECT public.instance_teardown_finish($1::uuid, $2::boolean, $3, $4::int, $5::int, $6)::text",
    6};

static const mr_db_stmt cancel_done_stmt = {
    "mr_job_cancel_done",
    "SELECT public.stripe_cancellation_finish($1, $2, $3, $4::int, $5::int)::text", 5};

#define TEARDOWN_BATCH 20
#define CANCEL_BATCH 20

/* The lease start (timestamptz text, malloc'd) when this worker runs the job now. */
static char *take(worker *w, const char *name, int interval_s)
{
    char iv[16], err[200] = "", *started = NULL;
    snprintf(iv, sizeof iv, "%d", interval_s);
    const char *p[] = {name, w->owner, iv};
    if (mr_db_call(w->db, &mr_service_identity, &take_stmt, p, NULL, &started, err, sizeof err) != MR_OK)
        mr_log(MR_LOG_WARN, "job %s: cannot take its lease: %s", name, err);
    return started;
}

static void done(worker *w, const char *name, const char *error)
{
    char err[200] = "", *out = NULL;
    const char *p[] = {name, w->owner, error};
    if (mr_db_call(w->db, &mr_service_identity, &done_stmt, p, NULL, &out, err, sizeof err) != MR_OK)
        mr_log(MR_LOG_WARN, "job %s: cannot record its end: %s", name, err);
    free(out);
}

static void health_job(worker *w, const char *started)
{
    cJSON *out = NULL;
    char err[256] = "";
    mr_err e = mr_health_round(w->db, &mr_service_identity, &wcfg.health, NULL, 1, started,
                               wcfg.health.periodic_round_ms, &out, err, sizeof err);
    if (e != MR_OK) {
        mr_log(MR_LOG_WARN, "health round: %s", err);
        done(w, "health", err);
        return;
    }
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(out, "checked");
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(out, "healthy");
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(out, "marked_failed");
    const cJSON *left = cJSON_GetObjectItemCaseSensitive(out, "not_probed");
    mr_log(MR_LOG_INFO, "health round: %d checked, %d healthy, %d marked failed, %d not probed",
           cJSON_IsNumber(n) ? (int)n->valuedouble : 0, cJSON_IsNumber(h) ? (int)h->valuedouble : 0,
           cJSON_IsNumber(m) ? (int)m->valuedouble : 0,
           cJSON_IsNumber(left) ? (int)left->valuedouble : 0);
    cJSON_Delete(out);
    done(w, "health", NULL);
}

/* A query returning event ids, run in its own transaction as service_role. */
typedef struct {
    const char *sql;
    const char *arg;
    PGresult *res;
} ids_ctx;

static mr_err ids_tx(mr_db *db, void *arg, char *err, size_t errlen)
{
    ids_ctx *c = arg;
    const char *p[] = {c->arg};
    PQclear(c->res);
    c->res = NULL;
    return mr_db_exec(db, c->sql, 1, p, &c->res, NULL, err, errlen);
}

static void sweep_job(worker *w)
{
    char err[256] = "", arg[16];
    int retried = 0, failed = 0, n;

    snprintf(arg, sizeof arg, "%d", wcfg.defer_max_hours);
    ids_ctx expired = {"SELECT id FROM public.stripe_expire_deferred($1::int)", arg, NULL};
    if (mr_db_tx(w->db, &mr_service_identity, ids_tx, &expired, err, sizeof err) != MR_OK) {
        mr_log(MR_LOG_WARN, "stripe sweep: %s", err);
        done(w, "stripe-sweep", err);
        return;
    }
    int given_up = PQntuples(expired.res);
    for (int i = 0; i < given_up; i++)
        mr_log(MR_LOG_ERROR, "stripe event %.255s: deferred for more than %d h; marked failed",
               PQgetvalue(expired.res, i, 0), wcfg.defer_max_hours);
    PQclear(expired.res);

    snprintf(arg, sizeof arg, "%d", wcfg.sweep_batch);
    ids_ctx due = {"SELECT id FROM public.stripe_events_due($1::int)", arg, NULL};
    if (mr_db_tx(w->db, &mr_service_identity, ids_tx, &due, err, sizeof err) != MR_OK) {
        mr_log(MR_LOG_WARN, "stripe sweep: %s", err);
        done(w, "stripe-sweep", err);
        return;
    }
    n = PQntuples(due.res);
    for (int i = 0; i < n && !worker_stopping(); i++) {
        const char *id = PQgetvalue(due.res, i, 0);
        const char *p[] = {id};
        char *result = NULL;
        if (mr_db_call(w->db, &mr_service_identity, &reprocess_stmt, p, NULL, &result, err,
                       sizeof err) == MR_OK) {
            retried++;
            /* A deferred claim on an account turned out not to be backed by its
             * customer: the same security event the webhook logs. */
            if (result && !strcmp(result, "refused"))
                mr_log(MR_LOG_ERROR, "security: stripe event %.255s: retried: refused (it names an "
                       "account its customer does not belong to; mindroomctl refused-links)", id);
            else
                mr_log(MR_LOG_INFO, "stripe event %.255s: retried: %s", id, result ? result : "?");
        } else {
            failed++;
            mr_log(MR_LOG_WARN, "stripe event %.255s: retry failed: %s", id, err);
        }
        free(result);
    }
    PQclear(due.res);
    if (given_up || retried || failed)
        mr_log(MR_LOG_INFO, "stripe sweep: %d retried, %d failed, %d given up", retried, failed, given_up);
    done(w, "stripe-sweep", failed ? "some events could not be retried" : NULL);
}

/* A teardown's or a cancellation's call ends at once when the worker stops: both
 * are repeated (a teardown once its lease runs out: the provisioner may still be
 * carrying it out), and repeating them is harmless. */
static int stop_abort(void *arg)
{
    (void)arg;
    return worker_stopping();
}

static void teardown_job(worker *w)
{
    char err[256] = "", arg[16], lease[16];
    snprintf(arg, sizeof arg, "%d", TEARDOWN_BATCH);
    snprintf(lease, sizeof lease, "%d", wcfg.lease_s);
    ids_ctx due = {"SELECT instance_id::text, dokku_app_name, target::text "
                   "FROM public.instance_teardowns_due($1::int)", arg, NULL};
    if (mr_db_tx(w->db, &mr_service_identity, ids_tx, &due, err, sizeof err) != MR_OK) {
        mr_log(MR_LOG_WARN, "teardown: %s", err);
        done(w, "teardown", err);
        return;
    }
    int n = PQntuples(due.res), torn = 0, failed = 0, nsilent = 0;
    /* Targets that left one of this round's calls unanswered (targets_answers):
     * their other teardowns wait for the next round, so a target that stops
     * answering holds the job for one call's deadline a round, not for one per
     * teardown while the other targets' teardowns wait behind it. */
    char silent[TEARDOWN_BATCH][sizeof ((worker_target *)0)->name];
    for (int i = 0; i < n && !worker_stopping(); i++) {
        const char *iid = PQgetvalue(due.res, i, 0), *app = PQgetvalue(due.res, i, 1);
        mr_provisioner p = wcfg.provisioner;
        p.abort_cb = stop_abort;
        mr_provisioner_call call;
        worker_target target;
        mr_err te = targets_use_text(PQgetisnull(due.res, i, 2) ? NULL : PQgetvalue(due.res, i, 2),
                                     &p, &target, err, sizeof err);
        if (te == MR_ETRANSIENT) {
            /* Disabled since the query: not due while it stays so, nothing counted. */
            targets_forget(&target);
            mr_log(MR_LOG_INFO, "teardown: instance %s (%s) waits: %s", iid, app, err);
            continue;
        }
        const char *tname = target.chosen ? target.name : "";
        int quiet = 0;
        for (int k = 0; k < nsilent && !quiet; k++)
            quiet = strcmp(silent[k], tname) == 0;
        if (quiet) {
            /* Not due this round, nothing counted: the next round asks again. */
            targets_forget(&target);
            mr_log(MR_LOG_INFO, "teardown: instance %s (%s) waits: %s did not answer this "
                   "round's call", iid, app, *tname ? tname : "DOKKU_PROVISIONER_URL");
            continue;
        }
        /* Its lease first: a run taken over from this one (presumed dead while a
         * call hangs) never calls the same teardown while this call is in flight,
         * and it counts against its target's max_in_flight (refused at the limit).
         * Its token (NULL: not taken) makes the outcome this lease's: once the lease
         * ran out and another worker took it, this one's failure is not recorded. */
        const char *bp[] = {iid, lease, w->owner};
        char *token = NULL;
        mr_err be = mr_db_call(w->db, &mr_service_identity, &teardown_begin_stmt, bp, NULL, &token,
                               err, sizeof err);
        if (be != MR_OK || !token) {
            targets_forget(&target);
            if (be == MR_OK)
                mr_log(MR_LOG_INFO, "teardown: instance %s (%s) waits: in flight, its target "
                       "at its limit or disabled, or no longer due", iid, app);
            else
                mr_log(MR_LOG_WARN, "teardown: instance %s (%s): cannot take its lease: %s", iid,
                       app, err);
            continue;
        }
        if (te != MR_OK) {
            memset(&call, 0, sizeof call);
            snprintf(call.error, sizeof call.error, "%s", err);
        } else {
            /* Both apps and both storage entries: the account is being erased. */
            mr_provisioner_app(w->http, &p, app, MR_ACTION_DESTROY, 1, &call);
        }
        targets_forget(&target);
        if (call.outcome == MR_HTTPC_ABORTED) {
            free(token);
            break; /* not recorded: done again after its lease (it is idempotent) */
        }
        if (te == MR_OK) {
            targets_note_answer(w, &target, &call);
            if (targets_answers(&call) == 0 && nsilent < TEARDOWN_BATCH)
                snprintf(silent[nsilent++], sizeof silent[0], "%s", tname);
        }
        const char *params[] = {iid, call.ok ? "true" : "false", call.ok ? NULL : call.error,
                                wcfg.backoff_base_arg, wcfg.backoff_cap_arg, token};
        char *out = NULL;
        mr_err fe = mr_db_call(w->db, &mr_service_identity, &teardown_done_stmt, params, NULL, &out,
                               err, sizeof err);
        int recorded = fe == MR_OK && out && strcmp(out, "true") == 0;
        free(out);
        free(token);
        if (fe != MR_OK)
            mr_log(MR_LOG_WARN, "teardown of %s: cannot record it: %s", app, err);
        if (call.ok) {
            torn++;
            mr_log(MR_LOG_INFO, "teardown: instance %s (%s): apps and storage destroyed on %s", iid,
                   app, target.chosen ? target.name : "DOKKU_PROVISIONER_URL");
        } else {
            failed++;
            mr_log(MR_LOG_WARN, "teardown: instance %s (%s): %s; %s", iid, app, call.error,
                   recorded || fe != MR_OK ? "retried with backoff"
                                           : "not recorded: its lease ran out and another worker "
                                             "took the teardown over");
        }
    }
    PQclear(due.res);
    if (torn || failed)
        mr_log(MR_LOG_INFO, "teardown: %d done, %d failed", torn, failed);
    done(w, "teardown", failed ? "some teardowns failed; retried with backoff" : NULL);
}

/* A Stripe subscription id as Stripe makes them: it becomes part of a URL path. */
static int stripe_sub_id_ok(const char *id)
{
    size_t n = strlen(id);
    if (n < 5 || n > 200 || strncmp(id, "sub_", 4) != 0)
        return 0;
    for (size_t i = 4; i < n; i++)
        if (!isalnum((unsigned char)id[i]) && id[i] != '_')
            return 0;
    return 1;
}

static void cancel_job(worker *w)
{
    char err[256] = "", arg[16];
    snprintf(arg, sizeof arg, "%d", CANCEL_BATCH);
    ids_ctx due = {"SELECT stripe_subscription_id FROM public.stripe_cancellations_due($1::int)",
                   arg, NULL};
    if (mr_db_tx(w->db, &mr_service_identity, ids_tx, &due, err, sizeof err) != MR_OK) {
        mr_log(MR_LOG_WARN, "stripe cancellations: %s", err);
        done(w, "stripe-cancel", err);
        return;
    }
    int n = PQntuples(due.res), cancelled = 0, failed = 0;
    if (n > 0 && !wcfg.stripe.secret_key) {
        /* Nothing is counted against them: they are done once a key is set. */
        mr_log(MR_LOG_WARN, "stripe cancellations: %d%s owed (subscriptions of deleted accounts) "
               "but STRIPE_SECRET_KEY is not set: Stripe keeps charging them until it is",
               n, n == CANCEL_BATCH ? " or more" : "");
        PQclear(due.res);
        done(w, "stripe-cancel", "STRIPE_SECRET_KEY is not set");
        return;
    }
    mr_stripe_api_config stripe = wcfg.stripe;
    stripe.abort_cb = stop_abort;
    /* Once a call gets no answer (Stripe's deadline passed, or no connection), the
     * round ends: the others wait for the next round (nothing counted), so an outage
     * holds the job for one deadline a round, not one per cancellation. */
    int silent = 0;
    for (int i = 0; i < n && !silent && !worker_stopping(); i++) {
        const char *sub = PQgetvalue(due.res, i, 0), *outcome = NULL;
        mr_err e = MR_EINTERNAL;
        if (!stripe_sub_id_ok(sub)) {
            snprintf(err, sizeof err, "not a Stripe subscription id");
        } else {
            /* Immediately, not at the period's end: nobody is left to serve. The key
             * is the subscription's own, so every attempt is the same request. */
            char path[256], key[256];
            snprintf(path, sizeof path, "/v1/subscriptions/%s", sub);
            snprintf(key, sizeof key, "mindroom-cancel-%s", sub);
            mr_stripe_api_result res;
            e = mr_stripe_api_delete(w->http, &stripe, path, key, mr_now_ms() + stripe.deadline_ms,
                                     &res, err, sizeof err);
            if (e == MR_OK)
                outcome = "cancelled";
            else if (res.other_mode) { /* 404 too, but Stripe has it and keeps charging it */
                const char *mine = stripe.livemode ? "live" : "test",
                           *its = stripe.livemode ? "test" : "live";
                snprintf(err, sizeof err, "Stripe has it in %s mode but STRIPE_SECRET_KEY is a %s "
                         "key (request %s): cancel it with a %s key", its, mine, res.request_id, its);
            }
            else if (res.status == 404 && strcmp(res.error_code, "resource_missing") == 0)
                outcome = "not_found"; /* cancelled before (Stripe's answer then), or unknown */
            silent = res.outcome == MR_HTTPC_NO_ANSWER;
            mr_stripe_api_result_free(&res);
            if (!outcome && worker_stopping())
                break; /* not recorded: the next run asks again */
        }
        const char *params[] = {sub, outcome, outcome ? NULL : err, wcfg.backoff_base_arg,
                                wcfg.backoff_cap_arg};
        char *out = NULL, derr[256] = "";
        if (mr_db_call(w->db, &mr_service_identity, &cancel_done_stmt, params, NULL, &out, derr,
                       sizeof derr) != MR_OK)
            mr_log(MR_LOG_WARN, "stripe cancellation of %.200s: cannot record it: %s", sub, derr);
        free(out);
        if (outcome) {
            cancelled++;
            mr_log(MR_LOG_INFO, "stripe cancellation: subscription %.200s of a deleted account: %s",
                   sub, strcmp(outcome, "cancelled") == 0 ? "cancelled at Stripe"
                                                          : "Stripe has no live subscription of that id");
        } else {
            failed++;
            /* A refusal (a 4xx: our key or request) will not go away by itself. */
            mr_log(e == MR_ETRANSIENT ? MR_LOG_WARN : MR_LOG_ERROR,
                   "stripe cancellation: subscription %.200s of a deleted account: %s; retried "
                   "with backoff", sub, err);
        }
    }
    if (silent && cancelled + failed < n)
        mr_log(MR_LOG_INFO, "stripe cancellations: %d more wait for the next round: Stripe did "
               "not answer", n - cancelled - failed);
    PQclear(due.res);
    if (cancelled || failed)
        mr_log(MR_LOG_INFO, "stripe cancellations: %d done, %d failed", cancelled, failed);
    done(w, "stripe-cancel", failed ? "some cancellations failed; retried with backoff" : NULL);
}

int64_t jobs_run_due(worker *w)
{
    static int64_t next_health, next_sweep, next_teardown, next_cancel;
    int64_t now = mr_now_ms();
    if (now >= next_health) {
        next_health = now + ask_every_ms(wcfg.health.interval_s);
        char *started = take(w, "health", wcfg.health.interval_s);
        if (started) {
            health_job(w, started);
            /* A round over thousands of instances can leave many MiB of freed
             * probe buffers in the heap: given back when the worker goes idle. */
            w->untrimmed = 1;
        }
        free(started);
    }
    if (!worker_stopping() && now >= next_sweep) {
        next_sweep = now + ask_every_ms(wcfg.sweep_interval_s);
        char *started = take(w, "stripe-sweep", wcfg.sweep_interval_s);
        if (started)
            sweep_job(w);
        free(started);
    }
    if (!worker_stopping() && now >= next_teardown) {
        next_teardown = now + ask_every_ms(wcfg.sweep_interval_s);
        char *started = take(w, "teardown", wcfg.sweep_interval_s);
        if (started)
            teardown_job(w);
        free(started);
    }
    if (!worker_stopping() && now >= next_cancel) {
        next_cancel = now + ask_every_ms(wcfg.sweep_interval_s);
        char *started = take(w, "stripe-cancel", wcfg.sweep_interval_s);
        if (started)
            cancel_job(w);
        free(started);
    }
    now = mr_now_ms();
    int64_t next = next_health < next_sweep ? next_health : next_sweep;
    if (next_teardown < next)
        next = next_teardown;
    if (next_cancel < next)
        next = next_cancel;
    int64_t wait = next - now;
    return wait > 0 ? wait : 0;
}
