/* handle-stripe-webhook: Stripe -> database, verified, idempotent, order-safe.
 *
 * Per delivery:
 *   1. Stripe-Signature over the exact raw body (400 invalid_signature, nothing
 *      written). Nothing is parsed before this.
 *   2. Parse with the explicit length; check the envelope (id, type, created,
 *      data.object); 400 otherwise. An id this worker saw PostgreSQL settle for
 *      good (processed, ignored, stale, failed) in the last
 *      STRIPE_DUPLICATE_CACHE_SECONDS is answered "duplicate" here, without a
 *      round trip: that is what the database would answer (mr_idcache.h).
 *   3. One round trip: set the service_role identity and call
 *      public.process_stripe_event(id, payload) in one pipeline, which PostgreSQL runs
 *      as one implicit transaction committed at Sync. Dedupe, ordering, the
 *      subscription, the instance row and the event's status all happen in SQL
 *      (sql/migrations/010_stripe_webhook.sql).
 *   4. Answer: 200 (duplicate/ignored/stale/failed flagged), or 503 for an event
 *      that cannot be applied yet (unknown account) or a database failure, so that
 *      Stripe retries.
 *   5. After the answer has gone out (mr_defer), kick off the owed work with a
 *      short-deadline call to provision-instance / deprovision-instance. Any
 *      failure there is only logged: the instance row says what is owed and the
 *      health sweep finishes it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mindroom.h"
#include "event.h"

#define MAX_SECRETS 8
#define KICK_TIMEOUT_MS 2000
#define SEEN_SLOTS 1024 /* per worker: 72 KiB */

static struct {
    char *secret_storage;
    const char *secrets[MAX_SECRETS];
    size_t nsecrets;
    long tolerance_s;
    long seen_ttl_s;              /* 0: every delivery asks the database */
    const char *functions_url;    /* NULL: owed work is left to the sweep */
    const char *jwt_secret;
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
    cfg.functions_url = mr_config_str("FUNCTIONS_URL", "");
    if (!*cfg.functions_url) {
        cfg.functions_url = NULL;
    } else {
        /* Needed only to call the lifecycle functions. */
        cfg.jwt_secret = mr_config_secret("SUPABASE_JWT_SECRET", NULL, 32);
    }
}

/* Event ids this worker saw committed as final (worker-local, after fork). */
static mr_idcache *g_seen;

static void worker_init(void)
{
    g_seen = mr_idcache_new(SEEN_SLOTS, (int64_t)cfg.seen_ttl_s * 1000);
    if (!cfg.functions_url)
        mr_log(MR_LOG_WARN, "FUNCTIONS_URL unset: owed provisioning is left to the health sweep");
}

/* ---- the one round trip --------------------------------------------------- */

static const char identity_sql[] =
    "SELECT set_config('role', 'service_role', true),"
    " set_config('request.jwt.claims', '{\"role\":\"service_role\"}', true)";
/* The id travels on its own so that a duplicate is answered from one index
 * lookup; the payload goes as text and PostgreSQL parses it only to apply it. */
static const char process_sql[] = "SELECT public.process_stripe_event($1, $2)::text";

/* Both statements are prepared once per connection (parse and plan once, like
 * pgbench -M prepared for the ceiling). A new connection has a new backend pid:
 * that, not the PGconn pointer (which malloc may reuse), says "prepare again".
 * EXECUTE on the function is checked when it runs, after the role switch. */
static int prepared_pid;

static int ensure_prepared(PGconn *c)
{
    if (prepared_pid != 0 && prepared_pid == PQbackendPID(c))
        return 1;
    PGresult *a = PQprepare(c, "mr_wh_identity", identity_sql, 0, NULL);
    PGresult *b = PQresultStatus(a) == PGRES_COMMAND_OK
                      ? PQprepare(c, "mr_wh_process", process_sql, 2, NULL) : NULL;
    int ok = b != NULL && PQresultStatus(b) == PGRES_COMMAND_OK;
    if (!ok)
        mr_log(MR_LOG_WARN, "database prepare failed: %.200s", PQerrorMessage(c));
    PQclear(a);
    PQclear(b);
    prepared_pid = ok ? PQbackendPID(c) : 0;
    return ok;
}

/* Runs identity_sql and process_sql as one pipeline (one implicit transaction,
 * committed at Sync, rolled back entirely on any error). Returns MR_OK with
 * *out set to a malloc'd copy of the function's JSON result (caller frees), or
 * the error class with err filled. *maybe_committed is set when the connection
 * broke after the Sync was sent (outcome unknown). state receives the first
 * error's SQLSTATE, or "" when there was none. */
static mr_err run_pipeline(mr_db *db, const char *id, const char *event, size_t event_len,
                           char **out, int *maybe_committed, char state[6], char *err,
                           size_t errlen)
{
    PGconn *c = mr_db_conn(db, err, errlen);
    const char *params[2] = {id, event};
    int lengths[2] = {(int)strlen(id), (int)event_len};
    int formats[2] = {0, 0};
    mr_err rc = MR_OK;
    int ntuples = 0;

    *out = NULL;
    *maybe_committed = 0;
    state[0] = '\0';
    if (c == NULL)
        return MR_ETRANSIENT;
    if (!ensure_prepared(c))
        return mr_seterr(err, errlen, MR_ETRANSIENT, "database unavailable, retry later");
    if (!PQenterPipelineMode(c)
        || !PQsendQueryPrepared(c, "mr_wh_identity", 0, NULL, NULL, NULL, 0)
        || !PQsendQueryPrepared(c, "mr_wh_process", 2, params, lengths, formats, 0)
        || !PQpipelineSync(c)) {
        mr_log(MR_LOG_WARN, "database send failed: %.200s", PQerrorMessage(c));
        PQexitPipelineMode(c);
        return mr_seterr(err, errlen, MR_ETRANSIENT, "database unavailable, retry later");
    }
    *maybe_committed = 1;

    /* Results: identity, NULL, process, NULL, SYNC. Bounded so that a broken
     * connection cannot spin. */
    for (int i = 0; i < 16; i++) {
        PGresult *res = PQgetResult(c);
        if (res == NULL) {
            if (PQstatus(c) != CONNECTION_OK)
                break;
            continue;
        }
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_PIPELINE_SYNC) {
            PQclear(res);
            *maybe_committed = 0;
            break;
        }
        if (st == PGRES_FATAL_ERROR && !state[0]) {
            const char *s = PQresultErrorField(res, PG_DIAG_SQLSTATE);
            /* libpq's own errors (the server died mid-pipeline) carry no SQLSTATE:
             * a lost connection is transient (503, Stripe retries), not a 500. */
            if (!(s && strlen(s) == 5))
                s = PQstatus(c) != CONNECTION_OK ? "08006" : "XX000";
            snprintf(state, 6, "%s", s);
            const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
            mr_log(MR_LOG_WARN, "database error %s: %.300s", state, m ? m : "");
        } else if (st == PGRES_TUPLES_OK && ++ntuples == 2 && PQntuples(res) == 1
                   && !PQgetisnull(res, 0, 0)) {
            /* The second tuple result is the function's. */
            *out = strdup(PQgetvalue(res, 0, 0));
        }
        PQclear(res);
    }
    if (!PQexitPipelineMode(c)) {
        /* Still busy: the connection is in an unknown state; drop it. */
        mr_log(MR_LOG_WARN, "database pipeline left busy; resetting");
        PQreset(c);
    }

    if (state[0]) {
        free(*out);
        *out = NULL;
        *maybe_committed = 0;  /* an error aborts the implicit transaction */
        if (!strncmp(state, "08", 2) || !strncmp(state, "53", 2) || !strncmp(state, "57", 2)
            || !strcmp(state, "40001") || !strcmp(state, "40P01") || !strcmp(state, "55P03")
            || !strcmp(state, "26000"))
            rc = mr_seterr(err, errlen, MR_ETRANSIENT, "database unavailable, retry later (%s)", state);
        else if (!strncmp(state, "22", 2))
            rc = mr_seterr(err, errlen, MR_EINVAL, "the event could not be stored (%s)", state);
        else
            rc = mr_seterr(err, errlen, MR_EINTERNAL, "database error (%s)", state);
        return rc;
    }
    if (*maybe_committed) {
        /* The function answered but the Sync (the commit) never came back: the
         * outcome is unknown, so no 200 (Stripe redelivers; a committed event
         * then reads as a duplicate). */
        free(*out);
        *out = NULL;
        return mr_seterr(err, errlen, MR_ETRANSIENT, "database unavailable, retry later");
    }
    if (*out == NULL) {
        if (PQstatus(c) != CONNECTION_OK)
            return mr_seterr(err, errlen, MR_ETRANSIENT, "database unavailable, retry later");
        return mr_seterr(err, errlen, MR_EINTERNAL, "database returned no result");
    }
    return MR_OK;
}

/* Retries what is safe to retry: a serialization failure or deadlock (nothing was
 * committed), and one reconnect when the connection broke before anything could
 * have been committed. */
static mr_err process_event(mr_db *db, const char *id, const char *event, size_t len,
                            char **out, char *err, size_t errlen)
{
    int reconnected = 0;
    for (int attempt = 0;; attempt++) {
        int maybe_committed = 0;
        char state[6];
        mr_err rc = run_pipeline(db, id, event, len, out, &maybe_committed, state, err, errlen);
        if (rc == MR_OK || rc != MR_ETRANSIENT || attempt >= 4)
            return rc;
        if (!strcmp(state, "26000")) {
            prepared_pid = 0;
            continue;
        }
        if (!strcmp(state, "40001") || !strcmp(state, "40P01")) {
            struct timespec ts = {0, (long)(2 + attempt * 5) * 1000000L};
            nanosleep(&ts, NULL);
            continue;
        }
        /* Connection trouble: after a possible commit the outcome is unknown, so
         * answer 503; Stripe's redelivery is then a duplicate or a fresh apply. */
        if (maybe_committed || reconnected)
            return rc;
        reconnected = 1;
    }
}

/* ---- after the answer: kick off the owed work ----------------------------- */

typedef struct {
    char action[16];
    char subscription_id[40];
    char event_id[80];
} kick;

static void kick_free(void *p)
{
    free(p);
}

static void kick_run(mr_req *r, void *arg)
{
    const kick *k = arg;
    const char *fn, *mode = NULL;
    char url[1024], auth[1200], payload[256], claims[160], err[160];
    mr_httpc_resp resp = {0};

    if (!strcmp(k->action, "provision") || !strcmp(k->action, "resume")) {
        fn = "provision-instance";
    } else if (!strcmp(k->action, "stop")) {
        fn = "deprovision-instance";
        mode = "stop";
    } else if (!strcmp(k->action, "destroy")) {
        fn = "deprovision-instance";
        mode = "destroy";
    } else {
        return;
    }
    if (!cfg.functions_url) {
        mr_log(MR_LOG_INFO, "event %s: %s owed for subscription %s; FUNCTIONS_URL unset, left to the sweep",
               k->event_id, k->action, k->subscription_id);
        return;
    }
    snprintf(url, sizeof url, "%s/%s", cfg.functions_url, fn);
    if (mode)
        snprintf(payload, sizeof payload, "{\"subscription_id\":\"%s\",\"mode\":\"%s\"}",
                 k->subscription_id, mode);
    else
        snprintf(payload, sizeof payload, "{\"subscription_id\":\"%s\"}", k->subscription_id);

    long long now = (long long)time(NULL);
    snprintf(claims, sizeof claims,
             "{\"role\":\"service_role\",\"iss\":\"handle-stripe-webhook\",\"iat\":%lld,\"exp\":%lld}",
             now, now + 60);
    char *token = mr_jwt_sign(claims, (const unsigned char *)cfg.jwt_secret, strlen(cfg.jwt_secret));
    if (token == NULL) {
        mr_log(MR_LOG_ERROR, "event %s: cannot mint a token; %s left to the sweep", k->event_id, fn);
        return;
    }
    snprintf(auth, sizeof auth, "Authorization: Bearer %s", token);
    free(token);
    char rid[96];
    snprintf(rid, sizeof rid, "X-Request-Id: %s", r->request_id);
    const char *const headers[] = {auth, "Content-Type: application/json", rid, NULL};
    mr_httpc_req req = {
        .method = "POST", .url = url, .headers = headers,
        .body = payload, .body_len = strlen(payload),
        .connect_timeout_ms = KICK_TIMEOUT_MS, .timeout_ms = KICK_TIMEOUT_MS, .max_body = 65536,
    };
    mr_err e = mr_httpc_do(r->http, &req, &resp, err, sizeof err);
    if (e != MR_OK)
        mr_log(MR_LOG_WARN, "event %s: %s call failed (%s); left to the sweep", k->event_id, fn, err);
    else if (resp.status < 200 || resp.status > 299)
        mr_log(MR_LOG_WARN, "event %s: %s answered %ld; left to the sweep", k->event_id, fn, resp.status);
    else
        mr_log(MR_LOG_INFO, "event %s: %s answered %ld for subscription %s", k->event_id, fn,
               resp.status, k->subscription_id);
    memset(auth, 0, sizeof auth);
    mr_httpc_resp_free(&resp);
}

/* ---- the request ----------------------------------------------------------- */

/* The answer for process_stripe_event's result (evt_err: its error, or NULL). */
static void answer(mr_req *r, const char *result, const char *evt_err)
{
    if (!strcmp(result, "deferred")) {
        /* Recorded with its error; Stripe retries (the account may be linked by then). */
        mr_reply_error(r, 503, "account_not_found", "%s", evt_err ? evt_err : "not applicable yet");
        return;
    }
    cJSON *body = cJSON_CreateObject();
    cJSON_AddBoolToObject(body, "received", 1);
    if (!strcmp(result, "duplicate"))
        cJSON_AddBoolToObject(body, "duplicate", 1);
    else if (!strcmp(result, "ignored"))
        cJSON_AddBoolToObject(body, "ignored", 1);
    else if (!strcmp(result, "stale"))
        cJSON_AddBoolToObject(body, "stale", 1);
    else if (!strcmp(result, "failed"))
        cJSON_AddStringToObject(body, "failed", evt_err ? evt_err : "error");
    mr_reply_json(r, 200, body);
}

static void handle(mr_req *r)
{
    char err[200];
    const char *id, *type, *result = NULL, *action = NULL, *sub = NULL, *evt_err = NULL;
    mr_err e;

    /* 1. The signature, over exactly the bytes received. */
    if (!*r->stripe_signature) {
        mr_reply_error(r, 400, "invalid_signature", "missing Stripe-Signature header");
        return;
    }
    e = mr_stripe_verify(r->stripe_signature, r->body, r->body_len, cfg.secrets, cfg.nsecrets,
                         time(NULL), cfg.tolerance_s, err, sizeof err);
    if (e != MR_OK) {
        mr_log(MR_LOG_INFO, "request %s: signature rejected: %s", r->request_id, err);
        mr_reply_error(r, 400, "invalid_signature", "%s", err);
        return;
    }

    /* 2. The envelope (event.c). */
    wh_event evt;
    const char *code;
    if (wh_event_parse(r->body, r->body_len, &evt, &code, err, sizeof err) != MR_OK) {
        mr_reply_error(r, 400, code, "%s", err);
        return;
    }
    cJSON *ev = evt.root;
    id = evt.id;
    type = evt.type;

    if (mr_idcache_has(g_seen, id, mr_now_ms())) {
        mr_log(MR_LOG_INFO, "event %s (%s): duplicate (settled, remembered)", id, type);
        answer(r, "duplicate", NULL);
        cJSON_Delete(ev);
        return;
    }

    /* 3. One round trip. */
    char *out = NULL;
    e = process_event(r->db, id, r->body, r->body_len, &out, err, sizeof err);
    if (e != MR_OK) {
        mr_log(MR_LOG_WARN, "event %s (%s): %s", id, type, err);
        cJSON_Delete(ev);
        if (e == MR_ETRANSIENT)
            mr_reply_error(r, 503, "database_unavailable", "database unavailable, retry later");
        else if (e == MR_EINVAL)
            mr_reply_error(r, 400, "invalid_event", "%s", err);
        else
            mr_reply_error(r, 500, "internal", "%s", err);
        return;
    }
    cJSON *res = mr_json_parse(out, strlen(out));
    free(out);
    if (res == NULL || mr_json_str(res, "result", &result) != MR_OK
        || mr_json_str(res, "action", &action) != MR_OK) {
        cJSON_Delete(res);
        cJSON_Delete(ev);
        mr_reply_error(r, 500, "internal", "unexpected result from the database");
        return;
    }
    (void)mr_json_str(res, "subscription_id", &sub);
    (void)mr_json_str(res, "error", &evt_err);
    mr_log(MR_LOG_INFO, "event %s (%s): %s, owed %s", id, type, result, action);
    /* Committed as final: PostgreSQL answers every later delivery "duplicate". */
    if (!strcmp(result, "processed") || !strcmp(result, "duplicate") || !strcmp(result, "ignored")
        || !strcmp(result, "stale") || !strcmp(result, "failed"))
        mr_idcache_put(g_seen, id, mr_now_ms());

    /* 4. The answer. */
    answer(r, result, evt_err);

    /* 5. The owed work, after the answer. */
    if (strcmp(action, "none") != 0 && sub != NULL) {
        kick *k = calloc(1, sizeof *k);
        if (k != NULL) {
            snprintf(k->action, sizeof k->action, "%s", action);
            snprintf(k->subscription_id, sizeof k->subscription_id, "%s", sub);
            snprintf(k->event_id, sizeof k->event_id, "%.79s", id);
            mr_defer(r, kick_run, k, kick_free);
        }
    }
    cJSON_Delete(res);
    cJSON_Delete(ev);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "handle-stripe-webhook",
        .methods = "POST",
        .auth = MR_AUTH_NONE,
        .init = init,
        .worker_init = worker_init,
        .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
