/* mindroom-admin: the host's operations endpoints, served by nginx on a
 * loopback-only listener (like the provisioner's, never on the public server),
 * as PostgREST's admin server serves its own:
 *
 *   GET /live     200 while this process answers (the process is up)
 *   GET /ready    200 when the functions can serve: the database answers, every
 *                 migration this build knows is applied (public.schema_versions(),
 *                 090), the configuration was valid (a process with a bad one exits
 *                 at start-up and leaves no segment), every function in
 *                 MR_READY_FUNCTIONS runs, and no function's segment was left by a
 *                 process that died; else 503 with what failed
 *   GET /metrics  the Prometheus text exposition: every running process's counters
 *                 from MR_METRICS_DIR (mr_metrics.h) and, read from the database at
 *                 scrape time (public.ops_metrics(), 090, 091, 191), the owed work by
 *                 action and age, instances by status, the Stripe events waiting and
 *                 each provisioner target's state, instances and room
 *
 * No authentication: what it says is not secret, and the listener is loopback only.
 * Settings: MR_METRICS_DIR (required), DATABASE_URL (required), MR_READY_FUNCTIONS
 * (optional, comma-separated function names). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mindroom.h"
#include "mr_metrics.h"
#include "mr_version.h"

#define MAX_READY 32

static struct {
    const char *metrics_dir;
    char *ready_storage;
    const char *ready[MAX_READY];
    size_t nready;
} cfg;

static int valid_function_name(const char *s)
{
    size_t n = strspn(s, "abcdefghijklmnopqrstuvwxyz0123456789-");
    return n > 0 && n < 64 && s[n] == '\0';
}

static void init(void)
{
    cfg.metrics_dir = mr_config_str("MR_METRICS_DIR", NULL);
    mr_config_str("DATABASE_URL", NULL);
    const char *list = mr_config_str("MR_READY_FUNCTIONS", "");
    cfg.ready_storage = strdup(list);
    if (!cfg.ready_storage) {
        fprintf(stderr, "config: out of memory\n");
        exit(2);
    }
    for (char *save = NULL, *t = strtok_r(cfg.ready_storage, ",", &save); t;
         t = strtok_r(NULL, ",", &save)) {
        if (!valid_function_name(t) || cfg.nready == MAX_READY) {
            fprintf(stderr, "config: MR_READY_FUNCTIONS must be up to %d comma-separated "
                    "function names\n", MAX_READY);
            exit(2);
        }
        cfg.ready[cfg.nready++] = t;
    }
}

static const mr_db_stmt versions_stmt = {
    "mr_admin_versions", "SELECT public.schema_versions()::text", 0};
static const mr_db_stmt ops_stmt = {"mr_admin_ops", "SELECT public.ops_metrics()::text", 0};

/* The expected versions this build knows that `applied` ("{000,001,...}", the text
 * of a text[]) lacks, as a JSON array of strings. */
static cJSON *missing_versions(const char *applied)
{
    cJSON *missing = cJSON_CreateArray();
    const char *want = mr_schema_versions();
    while (*want) {
        size_t n = strcspn(want, ",");
        int found = 0;
        for (const char *a = applied; *a && !found;) {
            a += strspn(a, "{,}");
            size_t m = strcspn(a, ",}");
            found = m == n && m > 0 && strncmp(a, want, n) == 0;
            a += m;
        }
        if (!found) {
            char v[32];
            snprintf(v, sizeof v, "%.*s", (int)(n < 31 ? n : 31), want);
            cJSON_AddItemToArray(missing, cJSON_CreateString(v));
        }
        want += n;
        want += *want == ',';
    }
    return missing;
}

/* The schema check: fills checks.database and checks.schema. Returns the missing
 * versions (a JSON array; every version this build knows when the database cannot
 * say which it applied) or NULL when the database could not be asked; sets *why to
 * the first failure's description (static or err). The caller frees the array. */
static cJSON *check_schema(mr_req *r, cJSON *checks, char *err, size_t errlen, const char **why)
{
    char *applied = NULL;
    mr_err e = mr_db_call(r->db, &mr_service_identity, &versions_stmt, NULL, NULL, &applied, err,
                          errlen);
    if (e == MR_ETRANSIENT) {
        cJSON_AddStringToObject(checks, "database", err);
        *why = "database unavailable";
        return NULL;
    }
    cJSON_AddStringToObject(checks, "database", "ok");
    cJSON *schema = cJSON_AddObjectToObject(checks, "schema");
    const char *versions = mr_schema_versions();
    const char *last = strrchr(versions, ',');
    cJSON_AddStringToObject(schema, "expected", last ? last + 1 : versions);
    if (e != MR_OK) {
        /* public.schema_versions() itself comes with migration 090. */
        cJSON_AddStringToObject(schema, "error", err);
        *why = "the schema is older than this build (public.schema_versions() failed)";
        free(applied);
        /* Not "none missing": /metrics' alert on missing > 0 must fire as /ready does. */
        return missing_versions("{}");
    }
    cJSON *missing = missing_versions(applied ? applied : "{}");
    cJSON_AddItemToObject(schema, "missing", cJSON_Duplicate(missing, 1));
    if (cJSON_GetArraySize(missing) > 0)
        *why = "migrations are missing";
    free(applied);
    return missing;
}

static void handle_ready(mr_req *r)
{
    char err[256] = "";
    const char *why = NULL;
    cJSON *out = cJSON_CreateObject();
    cJSON *checks = cJSON_AddObjectToObject(out, "checks");
    cJSON_Delete(check_schema(r, checks, err, sizeof err, &why));
    cJSON_AddStringToObject(checks, "configuration", "ok");

    /* The functions on this host, as their segments show them. */
    mr_metrics_view *v = NULL;
    char verr[256];
    cJSON *fn = cJSON_AddObjectToObject(checks, "functions");
    if (mr_metrics_view_open(cfg.metrics_dir, &v, verr, sizeof verr) != MR_OK) {
        cJSON_AddStringToObject(fn, "error", verr);
        why = why ? why : "cannot read MR_METRICS_DIR";
    }
    for (size_t i = 0; i < mr_metrics_view_count(v); i++) {
        int alive = mr_metrics_view_alive(v, i);
        cJSON_AddStringToObject(fn, mr_metrics_view_name(v, i), alive ? "running" : "dead");
        if (!alive && !why)
            why = "a function's process died (its segment is left)";
    }
    for (size_t k = 0; k < cfg.nready; k++) {
        if (!cJSON_GetObjectItemCaseSensitive(fn, cfg.ready[k])) {
            cJSON_AddStringToObject(fn, cfg.ready[k], "not running");
            why = why ? why : "a function in MR_READY_FUNCTIONS is not running";
        }
    }
    mr_metrics_view_close(v);

    if (!why) {
        cJSON_AddStringToObject(out, "status", "ready");
        mr_reply_json(r, 200, out);
        return;
    }
    cJSON *e = cJSON_AddObjectToObject(out, "error");
    cJSON_AddStringToObject(e, "code", "not_ready");
    cJSON_AddStringToObject(e, "message", why);
    mr_reply_json(r, 503, out);
}

static double num(const cJSON *o, const char *key)
{
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(n) ? n->valuedouble : 0;
}

static void gauge_header(FILE *f, const char *name, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s gauge\n", name, help, name);
}

/* A gauge of counts by one label: {"<label value>": count, ...}. */
static void counts_gauge(FILE *f, const char *name, const char *help, const char *label,
                         const cJSON *counts)
{
    gauge_header(f, name, help);
    const cJSON *c;
    cJSON_ArrayForEach(c, counts)
    {
        if (!cJSON_IsNumber(c))
            continue;
        fprintf(f, "%s{%s=\"", name, label);
        mr_metrics_label(f, c->string);
        fprintf(f, "\"} %.0f\n", c->valuedouble);
    }
}

/* The gauges read from the database at scrape time. */
static void write_sql_gauges(FILE *f, mr_req *r)
{
    char err[256];
    char *text = NULL;
    cJSON *ops = NULL, *missing = NULL;
    const char *why = NULL;
    cJSON *scratch = cJSON_CreateObject();
    missing = check_schema(r, scratch, err, sizeof err, &why);
    cJSON_Delete(scratch);
    if (missing && mr_db_call(r->db, &mr_service_identity, &ops_stmt, NULL, NULL, &text, err,
                              sizeof err) == MR_OK && text)
        ops = mr_json_parse(text, strlen(text));
    free(text);

    gauge_header(f, "mindroom_database_up", "Whether the database answered this scrape.");
    fprintf(f, "mindroom_database_up %d\n", missing ? 1 : 0);
    gauge_header(f, "mindroom_schema_migrations_missing",
                 "Migrations this build knows that the database has not applied.");
    if (missing)
        fprintf(f, "mindroom_schema_migrations_missing %d\n", cJSON_GetArraySize(missing));
    cJSON_Delete(missing);

    const cJSON *owed = cJSON_GetObjectItemCaseSensitive(ops, "owed");
    static const char *const owed_fields[][3] = {
        {"mindroom_owed_work", "count", "Instances owed work, by action."},
        {"mindroom_owed_work_held", "held", "Owed work held for an operator, by action."},
        {"mindroom_owed_work_in_flight", "in_flight", "Owed work a worker holds the lease of now, by action."},
        {"mindroom_owed_work_oldest_seconds", "oldest_s", "How long the oldest owed work of each action has been owed."},
        {"mindroom_owed_work_scheduled", "scheduled",
         "Work owed but not due by design (data kept for its retention period), by action."},
    };
    for (size_t k = 0; k < MR_ARRAY_LEN(owed_fields); k++) {
        gauge_header(f, owed_fields[k][0], owed_fields[k][2]);
        const cJSON *o;
        cJSON_ArrayForEach(o, owed)
        {
            const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, "action");
            if (!cJSON_IsString(a))
                continue;
            fprintf(f, "%s{action=\"", owed_fields[k][0]);
            mr_metrics_label(f, a->valuestring);
            fprintf(f, "\"} %.3f\n", num(o, owed_fields[k][1]));
        }
    }

    counts_gauge(f, "mindroom_instances", "Instances by status.", "status",
                 cJSON_GetObjectItemCaseSensitive(ops, "instances"));
    /* failing: its last check failed; unchecked: not checked since it was started. */
    counts_gauge(f, "mindroom_instances_running",
                 "Running instances by their last health check: healthy, failing, "
                 "unchecked (not checked since it was started).",
                 "health", cJSON_GetObjectItemCaseSensitive(ops, "health"));

    const cJSON *st;
    const cJSON *stripe = cJSON_GetObjectItemCaseSensitive(ops, "stripe");
    gauge_header(f, "mindroom_stripe_events_stored",
                 "Stored Stripe events not settled (deferred, received) or given up (failed).");
    cJSON_ArrayForEach(st, stripe)
    {
        fputs("mindroom_stripe_events_stored{status=\"", f);
        mr_metrics_label(f, st->string);
        fprintf(f, "\"} %.0f\n", num(st, "count"));
    }
    gauge_header(f, "mindroom_stripe_events_oldest_seconds",
                 "Age of the oldest stored Stripe event of each of those statuses.");
    cJSON_ArrayForEach(st, stripe)
    {
        fputs("mindroom_stripe_events_oldest_seconds{status=\"", f);
        mr_metrics_label(f, st->string);
        fprintf(f, "\"} %.3f\n", num(st, "oldest_s"));
    }

    /* The provisioner targets (public.target_summary(), as `mindroomctl target list`):
     * memory in bytes, Prometheus' base unit, from the MiB that plans and capacities
     * are counted in (Docker's "m", k3s' "Mi"). */
    const cJSON *targets = cJSON_GetObjectItemCaseSensitive(ops, "targets");
    enum { AS_IS, MIB, BELOW_ZERO };
    static const struct {
        const char *name, *key;
        int kind;
        const char *help;
    } target_gauges[] = {
        {"mindroom_target_answering", "answering", AS_IS,
         "Whether the lifecycle worker's last call to the provisioner target was answered "
         "(0 from an unanswered one until one is answered)."},
        {"mindroom_target_instances", "instances", AS_IS,
         "Instances placed on the target and not deprovisioned."},
        {"mindroom_target_memory_capacity_bytes", "capacity_mb", MIB,
         "Memory the target's instances may reserve in all (its capacity_mb)."},
        {"mindroom_target_memory_free_bytes", "free_mb", MIB,
         "The target's capacity less what its instances reserve, as placement counts it "
         "(negative when overfilled)."},
        {"mindroom_target_overfilled", "free_mb", BELOW_ZERO,
         "1 when the target's instances reserve more than its capacity."},
    };
    for (size_t k = 0; k < MR_ARRAY_LEN(target_gauges); k++) {
        gauge_header(f, target_gauges[k].name, target_gauges[k].help);
        const cJSON *t;
        cJSON_ArrayForEach(t, targets)
        {
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(t, "target");
            if (!cJSON_IsString(name))
                continue;
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(t, target_gauges[k].key);
            double x = cJSON_IsBool(v) ? cJSON_IsTrue(v) : cJSON_IsNumber(v) ? v->valuedouble : 0;
            if (target_gauges[k].kind == MIB)
                x *= 1048576.0;
            else if (target_gauges[k].kind == BELOW_ZERO)
                x = x < 0;
            fprintf(f, "%s{target=\"", target_gauges[k].name);
            mr_metrics_label(f, name->valuestring);
            fprintf(f, "\"} %.0f\n", x);
        }
    }
    cJSON_Delete(ops);
}

static void handle_metrics(mr_req *r)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) {
        mr_reply_error(r, 500, "internal", "out of memory");
        return;
    }
    mr_metrics_view *v = NULL;
    char err[256];
    if (mr_metrics_view_open(cfg.metrics_dir, &v, err, sizeof err) != MR_OK)
        mr_log(MR_LOG_WARN, "metrics: %s", err);
    mr_metrics_write(f, v);
    mr_metrics_view_close(v);
    write_sql_gauges(f, r);
    if (fclose(f) != 0 || !buf) {
        free(buf);
        mr_reply_error(r, 500, "internal", "out of memory");
        return;
    }
    mr_reply_text(r, 200, "text/plain; version=0.0.4; charset=utf-8", buf, len);
    free(buf);
}

static void handle(mr_req *r)
{
    if (strcmp(r->path, "/live") == 0) {
        cJSON *out = cJSON_CreateObject();
        cJSON_AddStringToObject(out, "status", "live");
        cJSON_AddStringToObject(out, "version", mr_version());
        mr_reply_json(r, 200, out);
    } else if (strcmp(r->path, "/ready") == 0) {
        handle_ready(r);
    } else if (strcmp(r->path, "/metrics") == 0) {
        handle_metrics(r);
    } else {
        mr_reply_error(r, 404, "not_found", "GET /live, /ready or /metrics");
    }
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "mindroom-admin",
        .methods = "GET",
        .auth = MR_AUTH_NONE,
        .init = init,
        .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
