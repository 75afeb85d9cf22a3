/* mr_health.c: see mr_health.h. */
#include "mr_health.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "mr_config.h"
#include "mr_deadlines.h"
#include "mr_json.h"
#include "mr_log.h"
#include "mr_metrics.h"

void mr_health_config_load(mr_health_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    const char *domain = mr_config_str("MINDROOM_BASE_DOMAIN", "");
    cfg->probe.base_domain = domain;
    cfg->probe.allow_loopback = mr_config_bool("HEALTH_ALLOW_LOOPBACK", 0);
    cfg->probe.allow_private = mr_config_bool("HEALTH_ALLOW_PRIVATE", 0);
    cfg->probe.concurrency = (long)mr_config_int("HEALTH_CONCURRENCY", 256, 1, 10000);
    /* A round's probes run at once, so a round takes about one probe's deadline:
     * at most half of nginx's read timeout for check-instance-health. */
    cfg->probe.timeout_ms = (long)mr_config_int("HEALTH_TIMEOUT_MS", MR_DL_HEALTH_PROBE_MS, 100,
                                                MR_DL_NGINX_HEALTH_S * 1000 / 2);
    /* The probing of a round ends by then; what it did not reach waits for the next
     * round, which takes the instances checked longest ago first. Unset, it is never
     * shorter than one probe. */
    long round_def = MR_DL_HEALTH_ROUND_MS;
    if (round_def < cfg->probe.timeout_ms)
        round_def = cfg->probe.timeout_ms;
    cfg->round_ms = (long)mr_config_int("HEALTH_ROUND_MS", round_def, 100,
                                        MR_DL_NGINX_HEALTH_S * 1000 / 2);
    if (cfg->round_ms < cfg->probe.timeout_ms) {
        fprintf(stderr, "config: HEALTH_ROUND_MS (%ld) is shorter than HEALTH_TIMEOUT_MS (%ld): "
                "a round would have no time for one probe\n", cfg->round_ms, cfg->probe.timeout_ms);
        exit(2);
    }
    cfg->probe.max_body = (size_t)mr_config_int("HEALTH_MAX_BODY", 65536, 1, 16 << 20);
    /* backend_url is MindRoom's API base (the provisioner's default answers
     * <domain>/api), so "/health" reaches MindRoom's /api/health. */
    cfg->path = mr_config_str("HEALTH_PATH", "/health");
    cfg->matrix_path = mr_config_str("HEALTH_MATRIX_PATH", "/health");
    cfg->threshold = (int)mr_config_int("HEALTH_FAILURE_THRESHOLD", 3, 1, 1000);
    cfg->interval_s = (int)mr_config_int("HEALTH_INTERVAL_S", 60, 1, 86400);
    /* The worker's rounds also end inside their lease (one interval): their probing
     * takes at most half of it, never less than one probe. */
    long half = (long)cfg->interval_s * 1000 / 2;
    if (half < cfg->probe.timeout_ms)
        half = cfg->probe.timeout_ms;
    cfg->periodic_round_ms = half < cfg->round_ms ? half : cfg->round_ms;

    const char *const paths[][2] = {{"HEALTH_PATH", cfg->path},
                                    {"HEALTH_MATRIX_PATH", cfg->matrix_path}};
    for (size_t i = 0; i < MR_ARRAY_LEN(paths); i++) {
        if (paths[i][1][0] != '/' || strpbrk(paths[i][1], " \t\r\n?#")) {
            fprintf(stderr, "config: %s must be an absolute path without query or spaces\n",
                    paths[i][0]);
            exit(2);
        }
    }
    if (!domain[0] && !cfg->probe.allow_loopback)
        mr_log(MR_LOG_WARN, "MINDROOM_BASE_DOMAIN is unset: every probe will be refused");

    /* Each probe in flight is a socket: make room for the cap, or lower the cap. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rlim_t want = (rlim_t)cfg->probe.concurrency + 128;
        if (rl.rlim_cur < want) {
            rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? want : rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
        }
        if (rl.rlim_cur < want) {
            cfg->probe.concurrency = rl.rlim_cur > 256 ? (long)rl.rlim_cur - 128 : 64;
            mr_log(MR_LOG_WARN, "open-file limit %lu: HEALTH_CONCURRENCY lowered to %ld",
                   (unsigned long)rl.rlim_cur, cfg->probe.concurrency);
        }
    }
}

/* ---- selection (under the caller's identity: RLS decides what a user sees) ---- */

/* An instance's two components, probed separately; healthy only when both are. */
enum { PART_MINDROOM, PART_HOMESERVER, N_PARTS };
static const char *const part_names[N_PARTS] = {"mindroom", "homeserver"};

typedef struct {
    char id[40];
    char *url[N_PARTS];   /* base URL + path, malloc'd; NULL when the instance has none */
    size_t probe[N_PARTS];/* index into the round's probes, or NO_PROBE */
} target;

#define NO_PROBE ((size_t)-1)

typedef struct {
    const char *instance_id;  /* NULL = all running */
    const char *path[N_PARTS];
    target *t;
    size_t n;
    char skipped[128];        /* one-instance mode: why it is not probed, when it is not */
    int found;
} select_ctx;

static void targets_free(select_ctx *c)
{
    for (size_t i = 0; i < c->n; i++)
        for (int k = 0; k < N_PARTS; k++)
            free(c->t[i].url[k]);
    free(c->t);
    c->t = NULL;
    c->n = 0;
}

/* base (trailing slashes dropped) + path, malloc'd. */
static char *join_url(const char *base, const char *path)
{
    size_t bl = strlen(base);
    while (bl > 0 && base[bl - 1] == '/')
        bl--;
    size_t need = bl + strlen(path) + 1;
    char *u = malloc(need);
    if (u)
        snprintf(u, need, "%.*s%s", (int)bl, base, path);
    return u;
}

static mr_err select_tx(mr_db *db, void *arg, char *err, size_t errlen)
{
    select_ctx *c = arg;
    PGresult *res = NULL;
    const char *params[1] = {c->instance_id};

    targets_free(c);
    c->found = 0;
    c->skipped[0] = '\0';
    /* Named columns only: tenants have no SELECT on environment_vars. An instance a
     * dry-run provisioner "deployed" has nothing at its URLs: it is left out
     * (116_dry_run_not_probed.sql). Those checked longest ago (or never) first: they
     * are probed in this order, and a round whose time runs out leaves the last. */
    mr_err e = mr_db_exec(db,
                          "SELECT id::text, status::text, dry_run, backend_url, matrix_server_url"
                          "  FROM public.instances "
                          " WHERE ($1::uuid IS NULL AND status = 'running' AND NOT dry_run)"
                          "    OR id = $1::uuid "
                          " ORDER BY last_health_check NULLS FIRST, id",
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
        const char *status = PQgetvalue(res, i, 1);
        c->found = 1;
        if (strcmp(status, "running") != 0) {
            snprintf(c->skipped, sizeof c->skipped, "is %.32s: only running instances are probed",
                     status);
            continue;
        }
        if (strcmp(PQgetvalue(res, i, 2), "t") == 0) {
            snprintf(c->skipped, sizeof c->skipped, "was deployed by a provisioner in dry-run mode: "
                     "nothing serves it, so it is not probed");
            continue;
        }
        target *t = &c->t[c->n++];
        snprintf(t->id, sizeof t->id, "%s", PQgetvalue(res, i, 0));
        for (int k = 0; k < N_PARTS; k++) {
            t->probe[k] = NO_PROBE;
            if (PQgetisnull(res, i, 3 + k))
                continue;
            if (!(t->url[k] = join_url(PQgetvalue(res, i, 3 + k), c->path[k]))) {
                PQclear(res);
                return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
            }
        }
    }
    PQclear(res);
    return MR_OK;
}

static int by_id(const void *a, const void *b)
{
    return strcmp(((const target *)a)->id, ((const target *)b)->id);
}

/* Moves the targets whose every probe ran to the front, in id order (uuid order
 * is the order of their lowercase text, as health_record answers), and returns
 * how many they are; the others are left after them for targets_free. */
static size_t keep_probed(select_ctx *c, const mr_probe *probes)
{
    size_t kept = 0;
    for (size_t i = 0; i < c->n; i++) {
        int all = 1;
        for (int k = 0; k < N_PARTS; k++)
            if (c->t[i].probe[k] != NO_PROBE && !probes[c->t[i].probe[k]].ran)
                all = 0;
        if (!all)
            continue;
        target tmp = c->t[kept];
        c->t[kept++] = c->t[i];
        c->t[i] = tmp;
    }
    qsort(c->t, kept, sizeof *c->t, by_id);
    return kept;
}

/* ---- recording ---- */

/* Instances recorded per transaction (see mr_health_round). */
#define RECORD_BATCH 256

/* What health_record said of one target: recorded (still running), its failure
 * count, whether this round marked it failed. */
typedef struct {
    int recorded, failures, marked;
} recorded_row;

typedef struct {
    const char *results_json;
    char threshold[16], interval[16];
    const char *counted;
    const char *round_started;
    PGresult *res;            /* health_record's rows, owned by the caller after */
} record_ctx;

static mr_err record_tx(mr_db *db, void *arg, char *err, size_t errlen)
{
    record_ctx *c = arg;
    const char *params[5] = {c->results_json, c->threshold, c->counted, c->round_started,
                             c->interval};
    if (c->res) {
        PQclear(c->res);
        c->res = NULL;
    }
    return mr_db_exec(db,
                      "SELECT instance_id::text, consecutive_failures, marked_failed "
                      "  FROM public.health_record($1::jsonb, $2::integer, $3::boolean,"
                      "                            $4::timestamptz, $5::integer)"
                      " ORDER BY instance_id",
                      5, params, &c->res, NULL, err, errlen);
}

/* What one instance's round says, for the database and for the answer alike. A
 * failing homeserver is named ("homeserver: unhealthy: HTTP 502"); MindRoom
 * without a backend URL is unreachable without a probe; an instance without a
 * homeserver URL (made before it had one) is judged by MindRoom alone. */
typedef struct {
    int ok;
    mr_probe_outcome outcome;  /* the failing component's, or healthy */
    const char *failed;        /* the first component that failed, or NULL */
    char status[160];
    char error[320];
} verdict;

static void judge(const target *t, const mr_probe *probes, verdict *v)
{
    memset(v, 0, sizeof *v);
    v->ok = 1;
    v->outcome = MR_PROBE_HEALTHY;
    snprintf(v->status, sizeof v->status, "healthy");
    for (int k = 0; k < N_PARTS && v->ok; k++) {
        const mr_probe *pr = t->probe[k] == NO_PROBE ? NULL : &probes[t->probe[k]];
        if (!pr && k == PART_HOMESERVER)
            continue; /* no homeserver URL: nothing to probe */
        if (pr && pr->outcome == MR_PROBE_HEALTHY)
            continue;
        v->ok = 0;
        v->failed = part_names[k];
        v->outcome = pr ? pr->outcome : MR_PROBE_UNREACHABLE;
        /* MindRoom's own words as they always were; the homeserver's named. */
        const char *prefix = k == PART_HOMESERVER ? "homeserver: " : "";
        snprintf(v->status, sizeof v->status, "%s%s", prefix,
                 pr ? pr->status : "unreachable: no backend URL");
        snprintf(v->error, sizeof v->error, "%s%s", prefix,
                 !pr ? "the instance has no backend_url" : pr->error[0] ? pr->error : pr->status);
    }
}

/* {"url", "status", "http_status", "latency_ms"} of one component, or null. */
static cJSON *part_json(const target *t, const mr_probe *probes, int k)
{
    if (t->probe[k] == NO_PROBE)
        return cJSON_CreateNull();
    const mr_probe *pr = &probes[t->probe[k]];
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "status", pr->status);
    cJSON_AddNumberToObject(o, "http_status", (double)pr->http_status);
    cJSON_AddNumberToObject(o, "latency_ms", (double)pr->latency_ms);
    return o;
}

mr_err mr_health_round(mr_db *db, const mr_identity *who, const mr_health_config *cfg,
                       const char *instance_id, int counted, const char *round_started,
                       long round_ms, cJSON **out, char *err, size_t errlen)
{
    select_ctx sc = {.instance_id = instance_id, .path = {cfg->path, cfg->matrix_path}};
    mr_probe *probes = NULL;
    verdict *verdicts = NULL;
    size_t np = 0, n = 0;
    record_ctx rc = {.counted = counted ? "true" : "false", .round_started = round_started};
    char *rec_json = NULL;
    recorded_row *rows = NULL;
    *out = NULL;

    mr_err e = mr_db_tx(db, who, select_tx, &sc, err, errlen);
    if (e != MR_OK)
        goto done;
    if (instance_id && !sc.found) {
        e = mr_seterr(err, errlen, MR_ENOTFOUND, "no instance %s", instance_id);
        goto done;
    }
    if (instance_id && sc.n == 0) {
        e = mr_seterr(err, errlen, MR_ECONFLICT, "instance %s %s", instance_id, sc.skipped);
        goto done;
    }

    /* Probe every component with a URL, all at once. */
    probes = calloc(sc.n ? sc.n * N_PARTS : 1, sizeof *probes);
    verdicts = calloc(sc.n ? sc.n : 1, sizeof *verdicts);
    if (!probes || !verdicts) {
        e = mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < sc.n; i++)
        for (int k = 0; k < N_PARTS; k++)
            if (sc.t[i].url[k]) {
                probes[np].url = sc.t[i].url[k];
                /* An instance's parts are probed together or not at all. */
                probes[np].follows = k > 0 && sc.t[i].probe[PART_MINDROOM] != NO_PROBE;
                sc.t[i].probe[k] = np++;
            }
    /* The probing ends within round_ms, so that nginx's timeout (or the worker's
     * lease) leaves the recording its time whatever hangs. */
    int64_t t0 = mr_now_ms();
    e = mr_probe_run(probes, np, &cfg->probe, round_ms, err, errlen);
    int64_t probe_ms = mr_now_ms() - t0;
    if (e != MR_OK)
        goto done;
    /* From here on only the instances probed whole: the others are neither recorded
     * nor answered, and are the next round's first. */
    n = keep_probed(&sc, probes);
    if (n < sc.n)
        mr_log(MR_LOG_WARN, "%zu of %zu instances not probed in this health round: its %ld ms "
               "(HEALTH_ROUND_MS, for the worker at most half of HEALTH_INTERVAL_S) ran out; "
               "the next round probes them first", sc.n - n, sc.n, round_ms);
    for (size_t i = 0; i < n; i++)
        judge(&sc.t[i], probes, &verdicts[i]);

    /* Record as service_role (the rows were chosen under the caller's identity, and
     * tenants have no UPDATE on them), RECORD_BATCH instances per transaction: a
     * round over thousands of instances then never holds their rows locked, nor
     * writes megabytes of WAL into one commit that every other commit waits
     * behind, for longer than one batch takes. A batch that fails ends the round:
     * what was recorded stays, the next round records again. */
    snprintf(rc.threshold, sizeof rc.threshold, "%d", cfg->threshold);
    snprintf(rc.interval, sizeof rc.interval, "%d", cfg->interval_s);
    mr_identity recorder = mr_service_identity;
    recorder.request_json = who ? who->request_json : NULL; /* audit rows: from where */
    rows = calloc(n ? n : 1, sizeof *rows);
    if (!rows) {
        e = mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
        goto done;
    }
    for (size_t b = 0; b < n; b += RECORD_BATCH) {
        size_t end = n - b > RECORD_BATCH ? b + RECORD_BATCH : n;
        cJSON *rec = cJSON_CreateArray();
        for (size_t i = b; i < end; i++) {
            const verdict *v = &verdicts[i];
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "instance_id", sc.t[i].id);
            cJSON_AddBoolToObject(o, "ok", v->ok);
            cJSON_AddStringToObject(o, "health_status", v->status);
            if (v->ok)
                cJSON_AddNullToObject(o, "error");
            else
                cJSON_AddStringToObject(o, "error", v->error);
            cJSON_AddItemToArray(rec, o);
        }
        free(rec_json);
        rec_json = mr_json_print(rec);
        cJSON_Delete(rec);
        rc.results_json = rec_json;
        e = rec_json ? mr_db_tx(db, &recorder, record_tx, &rc, err, errlen)
                     : mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
        if (e != MR_OK)
            goto done; /* probed but not all recorded: transient; the next round records */
        /* Targets and recorded rows are both in uuid order (uuid order is the order
         * of their lowercase text), so one merge pass matches them; a target with
         * no row was no longer running when recorded. */
        int recorded = PQntuples(rc.res), k = 0;
        for (size_t i = b; i < end; i++) {
            while (k < recorded && strcmp(PQgetvalue(rc.res, k, 0), sc.t[i].id) < 0)
                k++;
            if (k < recorded && strcmp(PQgetvalue(rc.res, k, 0), sc.t[i].id) == 0) {
                rows[i].recorded = 1;
                rows[i].failures = atoi(PQgetvalue(rc.res, k, 1));
                rows[i].marked = strcmp(PQgetvalue(rc.res, k, 2), "t") == 0;
            }
        }
    }

    /* The answer. Counts are per instance outcome; marked_failed says which ones
     * the threshold moved to failed just now. */
    cJSON *o_all = cJSON_CreateObject();
    cJSON *results = cJSON_CreateArray();
    int healthy = 0, unhealthy = 0, unreachable = 0, marked = 0;
    for (size_t i = 0; i < n; i++) {
        const verdict *v = &verdicts[i];
        const mr_probe *mp = sc.t[i].probe[PART_MINDROOM] == NO_PROBE
                                 ? NULL : &probes[sc.t[i].probe[PART_MINDROOM]];
        cJSON *o = cJSON_CreateObject();
        if (v->ok)
            healthy++;
        else if (v->outcome == MR_PROBE_UNHEALTHY)
            unhealthy++;
        else
            unreachable++;
        cJSON_AddStringToObject(o, "instance_id", sc.t[i].id);
        cJSON_AddStringToObject(o, "status", v->status);
        /* MindRoom's answer at the top level, both components below. */
        cJSON_AddNumberToObject(o, "http_status", mp ? (double)mp->http_status : 0);
        cJSON_AddNumberToObject(o, "latency_ms", mp ? (double)mp->latency_ms : 0);
        if (v->ok)
            cJSON_AddNullToObject(o, "error");
        else
            cJSON_AddStringToObject(o, "error", v->error);
        if (v->failed)
            cJSON_AddStringToObject(o, "failed_component", v->failed);
        else
            cJSON_AddNullToObject(o, "failed_component");
        cJSON *parts = cJSON_AddObjectToObject(o, "components");
        for (int p = 0; p < N_PARTS; p++)
            cJSON_AddItemToObject(parts, part_names[p], part_json(&sc.t[i], probes, p));
        if (rows[i].recorded) {
            cJSON_AddNumberToObject(o, "consecutive_failures", rows[i].failures);
            cJSON_AddBoolToObject(o, "marked_failed", rows[i].marked);
            marked += rows[i].marked;
        }
        cJSON_AddItemToArray(results, o);
    }
    mr_metrics_health_round(healthy, unhealthy, unreachable, marked);
    cJSON_AddNumberToObject(o_all, "checked", (double)n);
    cJSON_AddNumberToObject(o_all, "not_probed", (double)(sc.n - n));
    cJSON_AddNumberToObject(o_all, "healthy", healthy);
    cJSON_AddNumberToObject(o_all, "unhealthy", unhealthy);
    cJSON_AddNumberToObject(o_all, "unreachable", unreachable);
    cJSON_AddNumberToObject(o_all, "marked_failed", marked);
    cJSON_AddNumberToObject(o_all, "probe_ms", (double)probe_ms);
    cJSON_AddBoolToObject(o_all, "counted", counted);
    cJSON_AddItemToObject(o_all, "results", results);
    *out = o_all;

done: /* every way out: free what was taken */
    PQclear(rc.res);
    free(rec_json);
    free(rows);
    free(probes);
    free(verdicts);
    targets_free(&sc);
    return e;
}
