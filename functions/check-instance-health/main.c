/* check-instance-health: probes running instances concurrently, records what it
 * saw, marks an instance failed after HEALTH_FAILURE_THRESHOLD consecutive
 * failures, and (service_role only) sweeps owed work to the functions that own it.
 *
 * GET or POST, ?instance_id=<uuid> or {"instance_id"} for one instance,
 * ?sweep=0 or {"sweep": false} to skip the sweep.
 *   service_role JWT: every running instance; the sweep runs by default.
 *   user JWT: only the caller's own instances, selected under RLS; no sweep.
 *
 * No transaction is open while probing or while calling other functions: one
 * short transaction selects, one records every result in a single round trip
 * (health_record, sql/migrations/030_health.sql). The sweep never does lifecycle
 * work itself: it asks provision-instance / deprovision-instance, whose lease on
 * the row makes the work exactly-once however many sweeps ask at the same time. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <curl/curl.h>

#include "mindroom.h"
#include "mr_instance.h"
#include "mr_probe.h"

static struct {
    mr_probe_opts probe;
    const char *path;            /* HEALTH_PATH */
    int threshold;               /* HEALTH_FAILURE_THRESHOLD */
    int sweep_batch;             /* SWEEP_BATCH */
    long sweep_call_timeout_ms;  /* SWEEP_CALL_TIMEOUT_MS */
    long sweep_budget_ms;        /* SWEEP_BUDGET_MS */
    const char *functions_url;   /* FUNCTIONS_URL */
    const char *jwt_secret;      /* SUPABASE_JWT_SECRET */
} cfg;

/* The transaction that records results always runs as service_role: the rows
 * were chosen under the caller's identity, and tenants have no UPDATE on them. */
static const mr_identity service_identity = {
    .role = "service_role", .sub = "", .claims_json = (char *)"{\"role\":\"service_role\"}"};

static void init(void)
{
    struct rlimit rl;
    const char *domain = mr_config_str("MINDROOM_BASE_DOMAIN", "");

    curl_global_init(CURL_GLOBAL_DEFAULT);
    cfg.probe.base_domain = domain;
    cfg.probe.allow_loopback = mr_config_bool("HEALTH_ALLOW_LOOPBACK", 0);
    cfg.probe.allow_private = mr_config_bool("HEALTH_ALLOW_PRIVATE", 0);
    cfg.probe.concurrency = (long)mr_config_int("HEALTH_CONCURRENCY", 256, 1, 10000);
    cfg.probe.timeout_ms = (long)mr_config_int("HEALTH_TIMEOUT_MS", 5000, 100, 120000);
    cfg.probe.max_body = (size_t)mr_config_int("HEALTH_MAX_BODY", 65536, 1, 16 << 20);
    cfg.path = mr_config_str("HEALTH_PATH", "/api/health");
    cfg.threshold = (int)mr_config_int("HEALTH_FAILURE_THRESHOLD", 3, 1, 1000);
    cfg.sweep_batch = (int)mr_config_int("SWEEP_BATCH", 50, 0, 10000);
    cfg.sweep_call_timeout_ms = (long)mr_config_int("SWEEP_CALL_TIMEOUT_MS", 3000, 100, 60000);
    cfg.sweep_budget_ms = (long)mr_config_int("SWEEP_BUDGET_MS", 15000, 100, 300000);
    cfg.functions_url = mr_config_str("FUNCTIONS_URL", "http://127.0.0.1:54321/functions/v1");
    cfg.jwt_secret = mr_config_secret("SUPABASE_JWT_SECRET", NULL, 32);

    if (cfg.path[0] != '/' || strpbrk(cfg.path, " \t\r\n?#")) {
        fprintf(stderr, "HEALTH_PATH must be an absolute path without query or spaces\n");
        exit(2);
    }
    if (!domain[0] && !cfg.probe.allow_loopback)
        mr_log(MR_LOG_WARN, "MINDROOM_BASE_DOMAIN is unset: every probe will be refused");

    /* Each probe in flight is a socket: make room for the cap, or lower the cap. */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rlim_t want = (rlim_t)cfg.probe.concurrency + 128;
        if (rl.rlim_cur < want) {
            rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? want : rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
        }
        if (rl.rlim_cur < want) {
            cfg.probe.concurrency = rl.rlim_cur > 256 ? (long)rl.rlim_cur - 128 : 64;
            mr_log(MR_LOG_WARN, "open-file limit %lu: HEALTH_CONCURRENCY lowered to %ld",
                   (unsigned long)rl.rlim_cur, cfg.probe.concurrency);
        }
    }
}

/* ---- input ---- */

typedef struct {
    char instance_id[40];   /* "" = all */
    int sweep;
} call_params;

static int parse_params(mr_req *r, call_params *p)
{
    char v[64];
    mr_err e;

    p->instance_id[0] = '\0';
    p->sweep = 1;

    e = mr_http_query_param(r->query, "instance_id", v, sizeof v);
    if (e == MR_OK && strlen(v) < sizeof p->instance_id) {
        memcpy(p->instance_id, v, strlen(v) + 1);
    } else if (e != MR_ENOTFOUND) {
        mr_reply_error(r, 400, "invalid_instance_id", "instance_id must be a UUID");
        return -1;
    }
    e = mr_http_query_param(r->query, "sweep", v, sizeof v);
    if (e == MR_OK) {
        if (strcmp(v, "0") == 0 || strcmp(v, "false") == 0) p->sweep = 0;
        else if (strcmp(v, "1") == 0 || strcmp(v, "true") == 0) p->sweep = 1;
        else e = MR_EINVAL;
    }
    if (e != MR_OK && e != MR_ENOTFOUND) {
        mr_reply_error(r, 400, "invalid_sweep", "sweep must be 0 or 1");
        return -1;
    }

    if (r->body_len > 0) {
        cJSON *body = mr_json_parse(r->body, r->body_len);
        const char *id = NULL;
        int sw = 1;
        if (!cJSON_IsObject(body)) {
            cJSON_Delete(body);
            mr_reply_error(r, 400, "invalid_body", "body must be empty or a JSON object");
            return -1;
        }
        e = mr_json_str(body, "instance_id", &id);
        if (e == MR_OK)
            snprintf(p->instance_id, sizeof p->instance_id, "%.39s", id);
        if (e == MR_EINVAL || (e == MR_OK && strlen(id) >= sizeof p->instance_id)) {
            cJSON_Delete(body);
            mr_reply_error(r, 400, "invalid_instance_id", "instance_id must be a UUID");
            return -1;
        }
        e = mr_json_bool(body, "sweep", &sw);
        if (e == MR_EINVAL) {
            cJSON_Delete(body);
            mr_reply_error(r, 400, "invalid_sweep", "sweep must be a boolean");
            return -1;
        }
        if (e == MR_OK)
            p->sweep = sw;
        cJSON_Delete(body);
    }
    if (p->instance_id[0] && !mr_instance_is_uuid(p->instance_id)) {
        mr_reply_error(r, 400, "invalid_instance_id", "instance_id must be a UUID");
        return -1;
    }
    return 0;
}

/* ---- selection (under the caller's identity: RLS decides what a user sees) ---- */

typedef struct {
    char id[40];
    char *url;          /* backend_url + HEALTH_PATH, malloc'd; NULL when no backend_url */
} target;

typedef struct {
    const char *instance_id;  /* NULL = all running */
    target *t;
    size_t n;
    char not_running[32];     /* one-instance mode: its status when not running */
    int found;
} select_ctx;

static void targets_free(select_ctx *c)
{
    for (size_t i = 0; i < c->n; i++)
        free(c->t[i].url);
    free(c->t);
    c->t = NULL;
    c->n = 0;
}

static mr_err select_tx(mr_db *db, void *arg, char *err, size_t errlen)
{
    select_ctx *c = arg;
    PGresult *res = NULL;
    const char *params[1] = {c->instance_id};
    mr_err e;

    targets_free(c);
    c->found = 0;
    c->not_running[0] = '\0';
    /* Named columns only: tenants have no SELECT on environment_vars. */
    e = mr_db_exec(db,
                   "SELECT id::text, backend_url, status::text FROM public.instances "
                   " WHERE ($1::uuid IS NULL AND status = 'running') OR id = $1::uuid "
                   " ORDER BY id",
                   1, params, &res, NULL, err, errlen);
    if (e != MR_OK)
        return e;
    int rows = PQntuples(res);
    c->t = calloc(rows > 0 ? (size_t)rows : 1, sizeof *c->t);
    if (!c->t) {
        PQclear(res);
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    }
    for (int i = 0; i < rows; i++) {
        const char *status = PQgetvalue(res, i, 2);
        c->found = 1;
        if (strcmp(status, "running") != 0) {
            snprintf(c->not_running, sizeof c->not_running, "%s", status);
            continue;
        }
        target *t = &c->t[c->n++];
        snprintf(t->id, sizeof t->id, "%s", PQgetvalue(res, i, 0));
        if (!PQgetisnull(res, i, 1)) {
            const char *b = PQgetvalue(res, i, 1);
            size_t bl = strlen(b);
            while (bl > 0 && b[bl - 1] == '/')
                bl--;
            size_t need = bl + strlen(cfg.path) + 1;
            t->url = malloc(need);
            if (!t->url) {
                PQclear(res);
                return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
            }
            snprintf(t->url, need, "%.*s%s", (int)bl, b, cfg.path);
        }
    }
    PQclear(res);
    return MR_OK;
}

/* ---- recording ---- */

typedef struct {
    const char *results_json;
    char threshold[16];
    PGresult *res;            /* health_record's rows, owned by the caller after */
} record_ctx;

static mr_err record_tx(mr_db *db, void *arg, char *err, size_t errlen)
{
    record_ctx *c = arg;
    const char *params[2] = {c->results_json, c->threshold};
    if (c->res) {
        PQclear(c->res);
        c->res = NULL;
    }
    return mr_db_exec(db,
                      "SELECT instance_id::text, consecutive_failures, marked_failed "
                      "  FROM public.health_record($1::jsonb, $2::integer) ORDER BY instance_id",
                      2, params, &c->res, NULL, err, errlen);
}

/* ---- the sweep ---- */

typedef struct {
    int limit;
    PGresult *res;
} owed_ctx;

static mr_err owed_tx(mr_db *db, void *arg, char *err, size_t errlen)
{
    owed_ctx *c = arg;
    char lim[16];
    const char *params[1] = {lim};
    snprintf(lim, sizeof lim, "%d", c->limit);
    if (c->res) {
        PQclear(c->res);
        c->res = NULL;
    }
    return mr_db_exec(db,
                      "SELECT instance_id::text, action, function_name, body::text "
                      "  FROM public.lifecycle_owed($1::integer)",
                      1, params, &c->res, NULL, err, errlen);
}

static mr_err events_tx(mr_db *db, void *arg, char *err, size_t errlen)
{
    owed_ctx *c = arg;
    char lim[16];
    const char *params[1] = {lim};
    snprintf(lim, sizeof lim, "%d", c->limit);
    if (c->res) {
        PQclear(c->res);
        c->res = NULL;
    }
    return mr_db_exec(db, "SELECT id FROM public.health_owed_stripe_events($1::integer)",
                      1, params, &c->res, NULL, err, errlen);
}

typedef struct {
    const char *event_id;
    char outcome[64];
} reprocess_ctx;

static mr_err reprocess_tx(mr_db *db, void *arg, char *err, size_t errlen)
{
    reprocess_ctx *c = arg;
    PGresult *res = NULL;
    const char *params[1] = {c->event_id};
    mr_err e = mr_db_exec(db, "SELECT public.reprocess_stripe_event($1)::text", 1, params, &res,
                          NULL, err, errlen);
    if (e == MR_OK) {
        snprintf(c->outcome, sizeof c->outcome, "%s",
                 PQntuples(res) > 0 && !PQgetisnull(res, 0, 0) ? PQgetvalue(res, 0, 0) : "done");
        PQclear(res);
    }
    return e;
}

/* A service_role token for our own calls, valid one minute, never logged. */
static char *mint_service_jwt(void)
{
    char payload[160];
    time_t now = time(NULL);
    snprintf(payload, sizeof payload,
             "{\"role\":\"service_role\",\"iss\":\"check-instance-health\",\"iat\":%lld,\"exp\":%lld}",
             (long long)now, (long long)now + 60);
    return mr_jwt_sign(payload, (const unsigned char *)cfg.jwt_secret, strlen(cfg.jwt_secret));
}

static cJSON *run_sweep(mr_req *r)
{
    cJSON *out = cJSON_CreateObject();
    cJSON *items = cJSON_CreateArray();
    owed_ctx oc = {.limit = cfg.sweep_batch, .res = NULL};
    char err[256] = "";
    int accepted = 0, failed = 0, skipped = 0;
    int64_t deadline = mr_now_ms() + cfg.sweep_budget_ms;
    mr_err e;

    /* First the Stripe events stored as deferred (a transient reason): the
     * webhook's own SQL redoes each in its own transaction, and whatever instance
     * work that makes owed is picked up just below, in this same run. */
    cJSON *ev = cJSON_CreateObject();
    owed_ctx ec = {.limit = cfg.sweep_batch, .res = NULL};
    int reprocessed = 0, ev_failed = 0;
    mr_err ee = mr_db_tx(r->db, &r->who, events_tx, &ec, err, sizeof err);
    if (ee != MR_OK) {
        cJSON_AddStringToObject(ev, "error", err);
    } else {
        int n = PQntuples(ec.res);
        cJSON_AddNumberToObject(ev, "owed", n);
        for (int i = 0; i < n && mr_now_ms() < deadline; i++) {
            reprocess_ctx rc = {.event_id = PQgetvalue(ec.res, i, 0)};
            char rerr[256] = "";
            if (mr_db_tx(r->db, &r->who, reprocess_tx, &rc, rerr, sizeof rerr) == MR_OK) {
                reprocessed++;
            } else {
                mr_log(MR_LOG_WARN, "sweep: reprocessing stripe event %s: %s", rc.event_id, rerr);
                ev_failed++;
            }
        }
        PQclear(ec.res);
    }
    cJSON_AddNumberToObject(ev, "reprocessed", reprocessed);
    cJSON_AddNumberToObject(ev, "failed", ev_failed);
    cJSON_AddItemToObject(out, "stripe_events", ev);

    e = mr_db_tx(r->db, &r->who, owed_tx, &oc, err, sizeof err);
    if (e != MR_OK) {
        cJSON_AddStringToObject(out, "error", err);
        cJSON_Delete(items);
        return out;
    }
    char *jwt = mint_service_jwt();
    char auth[MR_JWT_MAX_TOKEN + 32], rid[96];
    snprintf(auth, sizeof auth, "Authorization: Bearer %s", jwt ? jwt : "");
    snprintf(rid, sizeof rid, "X-Request-Id: %s", r->request_id);
    const char *headers[] = {auth, "Content-Type: application/json", rid, NULL};
    int rows = PQntuples(oc.res);

    for (int i = 0; i < rows; i++) {
        const char *fn = PQgetvalue(oc.res, i, 2), *body = PQgetvalue(oc.res, i, 3);
        char url[1024], cerr[256] = "";
        cJSON *item = cJSON_CreateObject();
        cJSON_AddStringToObject(item, "instance_id", PQgetvalue(oc.res, i, 0));
        cJSON_AddStringToObject(item, "action", PQgetvalue(oc.res, i, 1));
        cJSON_AddStringToObject(item, "function", fn);
        cJSON_AddItemToArray(items, item);
        /* Past the budget, the rest waits for the next run: it stays owed in the rows. */
        if (!jwt || mr_now_ms() >= deadline) {
            cJSON_AddStringToObject(item, "outcome", jwt ? "deferred: sweep budget spent" : "error: cannot mint token");
            skipped++;
            continue;
        }
        snprintf(url, sizeof url, "%s/%s", cfg.functions_url, fn);
        mr_httpc_req hq = {
            .method = "POST", .url = url, .headers = headers, .body = body,
            .body_len = strlen(body), .connect_timeout_ms = cfg.sweep_call_timeout_ms,
            .timeout_ms = cfg.sweep_call_timeout_ms, .max_body = 256 * 1024};
        mr_httpc_resp resp = {0};
        e = mr_httpc_do(r->http, &hq, &resp, cerr, sizeof cerr);
        cJSON_AddNumberToObject(item, "http_status", (double)resp.status);
        if (e == MR_OK && (resp.status == 200 || resp.status == 202)) {
            /* 202: being worked on (claimed by this call, or another's live lease);
             * 200: nothing (left) to do. Either way the owner of the lease does it. */
            cJSON_AddStringToObject(item, "outcome", resp.status == 202 ? "in progress" : "done");
            accepted++;
        } else {
            char why[300];
            if (e == MR_OK)
                snprintf(why, sizeof why, "error: HTTP %ld", resp.status);
            else
                snprintf(why, sizeof why, "error: %s", cerr);
            cJSON_AddStringToObject(item, "outcome", why);
            mr_log(MR_LOG_WARN, "sweep: %s for instance %s: %s", fn, PQgetvalue(oc.res, i, 0), why);
            failed++;
        }
        mr_httpc_resp_free(&resp);
    }
    if (jwt) {
        memset(jwt, 0, strlen(jwt));
        free(jwt);
    }
    memset(auth, 0, sizeof auth);
    PQclear(oc.res);
    cJSON_AddNumberToObject(out, "owed", rows);
    cJSON_AddNumberToObject(out, "accepted", accepted);
    cJSON_AddNumberToObject(out, "failed", failed);
    cJSON_AddNumberToObject(out, "deferred", skipped);
    cJSON_AddItemToObject(out, "items", items);

    return out;
}

/* ---- the request ---- */

/* What one target's round says, for the database and for the answer alike: a
 * target without a backend URL is unreachable without a probe. */
static void target_view(const mr_probe *pr, int *ok, const char **status, const char **error)
{
    if (!pr) {
        *ok = 0;
        *status = "unreachable: no backend URL";
        *error = "the instance has no backend_url";
        return;
    }
    *ok = pr->outcome == MR_PROBE_HEALTHY;
    *status = pr->status;
    *error = *ok ? NULL : (pr->error[0] ? pr->error : pr->status);
}

static void handle(mr_req *r)
{
    call_params p;
    select_ctx sc = {0};
    mr_probe *probes = NULL;
    size_t *map = NULL;
    char err[256] = "";
    int is_service = strcmp(r->who.role, "service_role") == 0;
    mr_err e;

    if (parse_params(r, &p) != 0)
        return;
    sc.instance_id = p.instance_id[0] ? p.instance_id : NULL;

    e = mr_db_tx(r->db, &r->who, select_tx, &sc, err, sizeof err);
    if (e != MR_OK) {
        mr_reply_err(r, e, err);
        goto done;
    }
    if (sc.instance_id && !sc.found) {
        mr_reply_error(r, 404, "not_found", "no instance %s", p.instance_id);
        goto done;
    }
    if (sc.instance_id && sc.n == 0) {
        mr_reply_error(r, 409, "not_running", "instance %s is %s: only running instances are probed",
                       p.instance_id, sc.not_running);
        goto done;
    }

    /* Probe every target with a backend URL; a row without one is unreachable. */
    probes = calloc(sc.n ? sc.n : 1, sizeof *probes);
    map = calloc(sc.n ? sc.n : 1, sizeof *map);
    size_t np = 0;
    if (!probes || !map) {
        mr_reply_error(r, 500, "internal", "out of memory");
        goto done;
    }
    for (size_t i = 0; i < sc.n; i++) {
        if (sc.t[i].url) {
            probes[np].url = sc.t[i].url;
            map[i] = np++;
        } else {
            map[i] = (size_t)-1;
        }
    }
    int64_t t0 = mr_now_ms();
    e = mr_probe_run(probes, np, &cfg.probe, err, sizeof err);
    int64_t probe_ms = mr_now_ms() - t0;
    if (e != MR_OK) {
        mr_reply_err(r, e, err);
        goto done;
    }

    /* Record everything in one round trip. */
    cJSON *rec = cJSON_CreateArray();
    for (size_t i = 0; i < sc.n; i++) {
        cJSON *o = cJSON_CreateObject();
        int ok;
        const char *status, *error;
        target_view(map[i] == (size_t)-1 ? NULL : &probes[map[i]], &ok, &status, &error);
        cJSON_AddStringToObject(o, "instance_id", sc.t[i].id);
        cJSON_AddBoolToObject(o, "ok", ok);
        cJSON_AddStringToObject(o, "health_status", status);
        if (error) cJSON_AddStringToObject(o, "error", error);
        else cJSON_AddNullToObject(o, "error");
        cJSON_AddItemToArray(rec, o);
    }
    char *rec_json = mr_json_print(rec);
    cJSON_Delete(rec);
    record_ctx rc = {.results_json = rec_json, .res = NULL};
    snprintf(rc.threshold, sizeof rc.threshold, "%d", cfg.threshold);
    e = rec_json ? mr_db_tx(r->db, &service_identity, record_tx, &rc, err, sizeof err)
                 : mr_seterr(err, sizeof err, MR_EINTERNAL, "out of memory");
    free(rec_json);
    if (e != MR_OK) {
        /* The probes ran but nothing was recorded: a transient answer, so the
         * caller (the timer) simply tries again next minute. */
        mr_reply_err(r, e, err);
        goto done;
    }

    /* The answer. Counts are per probe outcome; marked_failed says which ones the
     * threshold moved to failed just now. */
    cJSON *out = cJSON_CreateObject();
    cJSON *results = cJSON_CreateArray();
    int healthy = 0, unhealthy = 0, unreachable = 0, marked = 0;
    int recorded = PQntuples(rc.res), k = 0;
    for (size_t i = 0; i < sc.n; i++) {
        const mr_probe *pr = map[i] == (size_t)-1 ? NULL : &probes[map[i]];
        cJSON *o = cJSON_CreateObject();
        int ok;
        const char *status, *error;
        target_view(pr, &ok, &status, &error);
        if (ok) healthy++;
        else if (pr && pr->outcome == MR_PROBE_UNHEALTHY) unhealthy++;
        else unreachable++;
        cJSON_AddStringToObject(o, "instance_id", sc.t[i].id);
        cJSON_AddStringToObject(o, "status", status);
        cJSON_AddNumberToObject(o, "http_status", pr ? (double)pr->http_status : 0);
        cJSON_AddNumberToObject(o, "latency_ms", pr ? (double)pr->latency_ms : 0);
        if (error) cJSON_AddStringToObject(o, "error", error);
        else cJSON_AddNullToObject(o, "error");
        /* Targets and recorded rows are both in uuid order (uuid order is the
         * order of their lowercase text), so one merge pass matches them; a
         * target with no row was no longer running when recorded. */
        while (k < recorded && strcmp(PQgetvalue(rc.res, k, 0), sc.t[i].id) < 0)
            k++;
        if (k < recorded && strcmp(PQgetvalue(rc.res, k, 0), sc.t[i].id) == 0) {
            int mf = strcmp(PQgetvalue(rc.res, k, 2), "t") == 0;
            cJSON_AddNumberToObject(o, "consecutive_failures", atoi(PQgetvalue(rc.res, k, 1)));
            cJSON_AddBoolToObject(o, "marked_failed", mf);
            marked += mf;
        }
        cJSON_AddItemToArray(results, o);
    }
    PQclear(rc.res);
    cJSON_AddNumberToObject(out, "checked", (double)sc.n);
    cJSON_AddNumberToObject(out, "healthy", healthy);
    cJSON_AddNumberToObject(out, "unhealthy", unhealthy);
    cJSON_AddNumberToObject(out, "unreachable", unreachable);
    cJSON_AddNumberToObject(out, "marked_failed", marked);
    cJSON_AddNumberToObject(out, "probe_ms", (double)probe_ms);
    cJSON_AddItemToObject(out, "results", results);
    if (is_service && p.sweep)
        cJSON_AddItemToObject(out, "sweep", run_sweep(r));
    else
        cJSON_AddNullToObject(out, "sweep");
    mr_reply_json(r, 200, out);

done: /* every way out: free what was taken */
    free(probes);
    free(map);
    targets_free(&sc);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "check-instance-health",
        .methods = "GET,POST",
        .auth = MR_AUTH_USER,
        .init = init,
        .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
