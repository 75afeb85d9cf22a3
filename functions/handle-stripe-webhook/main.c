/* handle-stripe-webhook: Stripe -> database, verified, idempotent, order-safe.
 *
 * Per delivery:
 *   1. Stripe-Signature over the exact raw body (400 invalid_signature, nothing
 *      written). Nothing is parsed before this.
 *   2. Parse with the explicit length; check the envelope (id, type, created,
 *      data.object); 400 otherwise. With STRIPE_SECRET_KEY set, an event of the
 *      other mode (livemode true with a test key, false with a live key) is
 *      400 livemode_mismatch, nothing written. An id this worker saw
 *      PostgreSQL settle for good (processed, ignored, stale, failed, refused)
 *      in the last STRIPE_DUPLICATE_CACHE_SECONDS is answered "duplicate" here,
 *      without a round trip: that is what the database would answer
 *      (mr_idcache.h).
 *   3. One round trip (mr_db_call): the service_role identity and
 *      public.process_stripe_event(id, payload, true) in one pipeline, one
 *      implicit transaction committed at its Sync. Dedupe, ordering, the
 *      subscription, what the instance should become and the event's status all
 *      happen in SQL (public.process_stripe_event and the stripe_* functions it
 *      calls, first written in sql/migrations/010_stripe_webhook.sql; later
 *      migrations redefine them, docs/webhook.md describes them).
 *      When the commit made work due, the answer says "wake": the lifecycle
 *      worker is woken in a transaction of its own once the answer is sent
 *      (a notifying commit would hold PostgreSQL's notify lock through its WAL
 *      flush; 080_webhook_cost.sql).
 *      Deliveries that arrive together (a burst: the runtime hands a worker the
 *      ones already waiting, up to batch_max) share that round trip and its
 *      transaction: one commit flush for all, each event still applied,
 *      answered and logged as its own, with its own request context
 *      (handle_batch).
 *   4. Answer: 200 (duplicate/ignored/stale/failed/refused flagged), or 503 for
 *      an event that cannot be applied yet (unknown account) or a database
 *      failure, so that Stripe retries. A refused event (it claims an account its
 *      customer does not belong to: sql/migrations/051_account_linking.sql) is a
 *      security event, logged at error level.
 * The webhook calls nothing else: a delivery never waits on Dokku, Resend or
 * another function. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mindroom.h"
#include "mr_deadlines.h"
#include "mr_stripe_api.h"
#include "mr_metrics.h"
#include "event.h"

#define MAX_SECRETS 8
#define SEEN_SLOTS 1024 /* per worker: 72 KiB */

static struct {
    char *secret_storage;
    const char *secrets[MAX_SECRETS];
    size_t nsecrets;
    long tolerance_s;
    long seen_ttl_s;              /* 0: every delivery asks the database */
    int livemode;                 /* STRIPE_SECRET_KEY's mode: 1 live, 0 test, -1 no key */
} cfg;

static void init(void)
{
    char err[160];
    const char *list = mr_config_str("STRIPE_WEBHOOK_SECRET", NULL);
    if (mr_stripe_parse_secrets(list, &cfg.secret_storage, cfg.secrets, MAX_SECRETS,
                                &cfg.nsecrets, err, sizeof err) != MR_OK) {
        fprintf(stderr, "config: STRIPE_WEBHOOK_SECRET: %s\n", err);
        exit(2);
    }
    cfg.tolerance_s = (long)mr_config_int("STRIPE_WEBHOOK_TOLERANCE", 300, 1, 7 * 24 * 3600);
    cfg.seen_ttl_s = (long)mr_config_int("STRIPE_DUPLICATE_CACHE_SECONDS", 60, 0, 3600);
    /* The API key says which mode this deployment is in; events of the other mode
     * are refused. The key itself is not kept: it is wiped from the environment. */
    cfg.livemode = -1;
    const char *key = mr_config_getenv("STRIPE_SECRET_KEY");
    if (key && *key && mr_stripe_api_check_key(key, &cfg.livemode, err, sizeof err) != MR_OK) {
        fprintf(stderr, "config: %s\n", err);
        exit(2);
    }
    mr_config_forget("STRIPE_SECRET_KEY");
}

/* Event ids this worker saw committed as final (worker-local, after fork). */
static mr_idcache *g_seen;

static void worker_init(void)
{
    g_seen = mr_idcache_new(SEEN_SLOTS, (int64_t)cfg.seen_ttl_s * 1000);
}

/* ---- the one round trip --------------------------------------------------- */

/* The id travels on its own so that a duplicate is answered from one index
 * lookup; the payload goes as text and PostgreSQL parses it only to apply it.
 * Prepared once per connection. */
static const mr_db_stmt process_stmt = {
    "mr_wh_process", "SELECT public.process_stripe_event($1, $2, true)::text", 2};
static const mr_db_stmt wake_stmt = {"mr_wh_wake", "SELECT public.lifecycle_wake()::text", 0};

/* After the answer: wakes the lifecycle worker for the work the event's commit
 * made due. A failure costs only latency: the worker's poll finds the work. */
static void wake_worker(mr_req *r, void *arg)
{
    char err[200], *out = NULL;
    (void)arg;
    if (mr_db_call(r->db, &mr_service_identity, &wake_stmt, NULL, NULL, &out, err, sizeof err)
        != MR_OK)
        mr_log(MR_LOG_WARN, "waking the lifecycle worker: %s (its poll will find the work)", err);
    free(out);
}

/* ---- the request ----------------------------------------------------------- */

/* The answer for process_stripe_event's result (evt_err: its error, or NULL;
 * code: a deferred event's reason, or NULL). */
static void answer(mr_req *r, const char *result, const char *evt_err, const char *code)
{
    if (!strcmp(result, "deferred")) {
        /* Recorded with its error; Stripe retries (the account may be linked by then,
         * the instance's names free). The reason's code is the database's
         * (stripe_handle_event), which names each. */
        mr_reply_error(r, 503, code ? code : "account_not_found", "%s",
                       evt_err ? evt_err : "not applicable yet");
        return;
    }
    /* The answers without a message are constants: most deliveries get one. */
    static const struct {
        const char *result, *body;
    } fixed[] = {
        {"duplicate", "{\"received\":true,\"duplicate\":true}"},
        {"ignored", "{\"received\":true,\"ignored\":true}"},
        {"stale", "{\"received\":true,\"stale\":true}"},
        {"processed", "{\"received\":true}"},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(fixed); i++)
        if (!strcmp(result, fixed[i].result)) {
            mr_reply_text(r, 200, "application/json", fixed[i].body, strlen(fixed[i].body));
            return;
        }
    cJSON *body = cJSON_CreateObject();
    cJSON_AddBoolToObject(body, "received", 1);
    if (!strcmp(result, "failed"))
        cJSON_AddStringToObject(body, "failed", evt_err ? evt_err : "error");
    else if (!strcmp(result, "refused"))
        cJSON_AddStringToObject(body, "refused", evt_err ? evt_err : "account link refused");
    mr_reply_json(r, 200, body);
}

/* Steps 1 and 2, and the memory of settled events: 1 with *evt filled when the
 * event is the database's to apply, 0 when it was answered here. */
static int admit(mr_req *r, wh_event *evt)
{
    char err[200];
    const char *code;
    mr_err e;

    /* 1. The signature, over exactly the bytes received. */
    if (!*r->stripe_signature) {
        mr_metrics_stripe_event(NULL, "invalid");
        mr_reply_error(r, 400, "invalid_signature", "missing Stripe-Signature header");
        return 0;
    }
    e = mr_stripe_verify(r->stripe_signature, r->body, r->body_len, cfg.secrets, cfg.nsecrets,
                         time(NULL), cfg.tolerance_s, err, sizeof err);
    if (e != MR_OK) {
        mr_log(MR_LOG_INFO, "request %s: signature rejected: %s", r->request_id, err);
        mr_metrics_stripe_event(NULL, "invalid");
        mr_reply_error(r, 400, "invalid_signature", "%s", err);
        return 0;
    }

    /* 2. The envelope (event.c). */
    if (wh_event_parse(r->body, r->body_len, evt, &code, err, sizeof err) != MR_OK) {
        mr_metrics_stripe_event(NULL, "invalid");
        mr_reply_error(r, 400, code, "%s", err);
        return 0;
    }
    if (cfg.livemode >= 0 && evt->livemode != cfg.livemode) {
        mr_log(MR_LOG_WARN, "event %s (%s): livemode %s refused: STRIPE_SECRET_KEY is a %s key",
               evt->id, evt->type, evt->livemode ? "true" : "false",
               cfg.livemode ? "live" : "test");
        mr_reply_error(r, 400, "livemode_mismatch",
                       "a %s-mode event, but this server uses a %s-mode Stripe key",
                       evt->livemode ? "live" : "test", cfg.livemode ? "live" : "test");
        wh_event_free(evt);
        return 0;
    }
    if (mr_idcache_has(g_seen, evt->id, mr_now_ms())) {
        mr_note(r, "event %.100s (%.60s): duplicate (settled, remembered)", evt->id, evt->type);
        mr_metrics_stripe_event(evt->type, "duplicate");
        answer(r, "duplicate", NULL, NULL);
        wh_event_free(evt);
        return 0;
    }
    return 1;
}

/* Step 3's outcome (e, and out: process_stripe_event's answer, taken) and step 4;
 * others: how many other deliveries its transaction committed. Returns 1 when the
 * commit made work due (the lifecycle worker is to be woken). */
static int settle(mr_req *r, wh_event *evt, mr_err e, char *out, const char *err, size_t others)
{
    const char *id = evt->id, *type = evt->type, *result = NULL, *owed = NULL, *evt_err = NULL,
               *code = NULL;
    int wake = 0;
    if (e == MR_OK && out == NULL) {
        e = MR_EINTERNAL;
        err = "database returned no result";
    }
    if (e != MR_OK) {
        mr_log(MR_LOG_WARN, "event %s (%s): %s", id, type, err);
        mr_metrics_stripe_event(type, "error");
        if (e == MR_ETRANSIENT)
            mr_reply_error(r, 503, "database_unavailable", "database unavailable, retry later");
        else if (e == MR_EINVAL)
            mr_reply_error(r, 400, "invalid_event", "the event could not be stored: %s", err);
        else
            mr_reply_error(r, 500, "internal", "%s", err);
        wh_event_free(evt);
        return 0;
    }
    cJSON *res = mr_json_parse(out, strlen(out));
    free(out);
    if (res == NULL || mr_json_str(res, "result", &result) != MR_OK) {
        mr_metrics_stripe_event(type, "error");
        cJSON_Delete(res);
        wh_event_free(evt);
        mr_reply_error(r, 500, "internal", "unexpected result from the database");
        return 0;
    }
    (void)mr_json_str(res, "owed", &owed);
    (void)mr_json_str(res, "error", &evt_err);
    (void)mr_json_str(res, "code", &code);
    wake = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(res, "wake"));
    if (!strcmp(result, "refused")) {
        /* Someone made Stripe name an account that is not this customer's: an
         * attempt to take over another account's billing, or a bug of ours. */
        const char *cust = NULL, *claimed = NULL;
        (void)mr_json_str(res, "customer", &cust);
        (void)mr_json_str(res, "claimed_account", &claimed);
        mr_log(MR_LOG_ERROR,
               "security: event %s (%s) refused: customer %.64s, claimed account %.64s: %s", id,
               type, cust ? cust : "-", claimed ? claimed : "-", evt_err ? evt_err : "");
    } else {
        char with[48] = "";
        if (others)
            snprintf(with, sizeof with, " (one commit with %zu more)", others);
        mr_note(r, "event %.100s (%.60s): %s, owed %s%s", id, type, result, owed ? owed : "none",
                with);
    }
    mr_metrics_stripe_event(type, result);
    /* Committed as final: PostgreSQL answers every later delivery "duplicate". */
    if (!strcmp(result, "processed") || !strcmp(result, "duplicate") || !strcmp(result, "ignored")
        || !strcmp(result, "stale") || !strcmp(result, "failed") || !strcmp(result, "refused"))
        mr_idcache_put(g_seen, id, mr_now_ms());

    /* 4. The answer. */
    answer(r, result, evt_err, code);

    cJSON_Delete(res);
    wh_event_free(evt);
    return wake;
}

/* 3. One round trip: the event applied as service_role, with the delivery's
 * address and user agent for the audit rows it writes (Stripe's, since nginx
 * trusts no forwarded header from anyone but the configured proxies). */
static int apply_one(mr_req *r, wh_event *evt)
{
    char err[200], *out = NULL;
    const char *params[2] = {evt->id, r->body};
    const int lengths[2] = {(int)strlen(evt->id), (int)r->body_len};
    mr_identity who = mr_req_service(r);
    mr_err e = mr_db_call(r->db, &who, &process_stmt, params, lengths, &out, err, sizeof err);
    return settle(r, evt, e, out, err, 0);
}

static void handle(mr_req *r)
{
    wh_event evt;
    if (admit(r, &evt) && apply_one(r, &evt))
        mr_defer(r, wake_worker, NULL, NULL);
}

/* Deliveries that arrived together: the ones the database must apply go in one
 * round trip and one transaction (one commit, one flush for all), each with its
 * own request context for its audit rows. Should that transaction fail, nothing of
 * it was committed: on a transient failure (the database away, a timeout) each is
 * answered 503 as it would be alone, and Stripe delivers it again; on any other
 * error each is applied alone, so that the error is answered to its own delivery
 * and the others are recorded. */
static void handle_batch(mr_req **reqs, size_t n)
{
    wh_event evts[MR_BATCH_MAX];
    mr_req *todo[MR_BATCH_MAX];
    size_t k = 0;
    int wake = 0;
    for (size_t i = 0; i < n; i++)
        if (admit(reqs[i], &evts[k]))
            todo[k++] = reqs[i];
    if (k == 1) {
        wake = apply_one(todo[0], &evts[0]);
    } else if (k > 1) {
        const char *params[2 * MR_BATCH_MAX], *contexts[MR_BATCH_MAX];
        int lengths[2 * MR_BATCH_MAX];
        char *outs[MR_BATCH_MAX], err[200];
        for (size_t i = 0; i < k; i++) {
            params[2 * i] = evts[i].id;
            params[2 * i + 1] = todo[i]->body;
            lengths[2 * i] = (int)strlen(evts[i].id);
            lengths[2 * i + 1] = (int)todo[i]->body_len;
            contexts[i] = todo[i]->who.request_json;
        }
        mr_identity who = mr_req_service(todo[0]);
        mr_err e = mr_db_call_each(todo[0]->db, &who, &process_stmt, k, params, lengths, contexts,
                                   outs, err, sizeof err);
        for (size_t i = 0; i < k; i++)
            wake |= e == MR_OK || e == MR_ETRANSIENT
                        ? settle(todo[i], &evts[i], e, outs[i], err, e == MR_OK ? k - 1 : 0)
                        : apply_one(todo[i], &evts[i]);
    }
    /* Once, after the last answer of the batch. */
    if (wake)
        mr_defer(reqs[n - 1], wake_worker, NULL, NULL);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "handle-stripe-webhook",
        .methods = "POST",
        .auth = MR_AUTH_NONE,
        /* A delivery is one short transaction, then a wait for its commit to reach
         * the disk: with several in flight PostgreSQL flushes them together. */
        .workers_per_core = 4,
        .init = init,
        .worker_init = worker_init,
        .handle = handle,
        /* Under a burst, deliveries that arrive together share one transaction
         * (how many: the deadline table, mr_deadlines.h). */
        .handle_batch = handle_batch,
        .batch_max = MR_DL_WEBHOOK_BATCH,
    };
    return mr_app_main(&app, argc, argv);
}
