/* noop: the smallest libmindroom function. Not deployed; `make bench` measures
 * the runtime's own cost with it, and the runtime's integration tests use it to
 * hold a request in flight.
 *
 * GET or POST, no auth. Answers {"ok":true,"pid":<worker pid>} at once, which
 * is what the benchmark measures. With ?sleep_ms=N (0..30000) it first runs
 * `SELECT pg_sleep(N/1000.0)` on the worker's own database connection, so a
 * request really sits in a worker and in PostgreSQL (visible in
 * pg_stat_activity) while a test signals or kills that worker. With
 * ?tx_pause_ms=N (0..30000) it runs a transaction as service_role (mr_db_tx) that
 * pauses N ms between two statements, idle in transaction, and answers the second
 * one's current_user as "tx_user": a test ends the backend during the pause. With
 * &tx_refuse=1 as well, the transaction is refused after the pause instead (503,
 * its second statement never sent), so that it is rolled back. With
 * ?failed_calls=N (0..10000) it makes N calls of a prepared statement that fails
 * (mr_db_call), then answers how many statements its connection has prepared. Each
 * parameter is read by db_param. */
#include "mindroom.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    long pause_ms;
    int refuse;
    char user[64];
} pause_arg;

static mr_err pause_tx(mr_db *db, void *arg, char *err, size_t errlen)
{
    pause_arg *a = arg;
    PGresult *res = NULL;
    mr_err e = mr_db_exec(db, "SELECT pg_backend_pid()", 0, NULL, &res, NULL, err, errlen);
    PQclear(res);
    if (e != MR_OK)
        return e;
    struct timespec ts = {.tv_sec = a->pause_ms / 1000, .tv_nsec = (a->pause_ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
    if (a->refuse)
        return mr_seterr(err, errlen, MR_ETRANSIENT, "refused after the pause (tx_refuse)");
    res = NULL;
    e = mr_db_exec(db, "SELECT current_user::text", 0, NULL, &res, NULL, err, errlen);
    if (e == MR_OK)
        snprintf(a->user, sizeof a->user, "%s", PQntuples(res) ? PQgetvalue(res, 0, 0) : "");
    PQclear(res);
    return e;
}

static const mr_db_stmt failing_stmt = {"noop_failing", "SELECT (1 / $1::int)::text", 1};
static const mr_db_stmt prepared_stmt = {
    "noop_prepared", "SELECT count(*)::text FROM pg_prepared_statements", 0};

static void failed_calls(mr_req *r, long n)
{
    char err[256], *out = NULL;
    const char *zero[] = {"0"};
    for (long i = 0; i < n; i++) {
        if (mr_db_call(r->db, &mr_service_identity, &failing_stmt, zero, NULL, &out, err,
                       sizeof err) == MR_OK) {
            free(out);
            mr_reply_error(r, 500, "internal", "1 / 0 did not fail");
            return;
        }
    }
    mr_err e = mr_db_call(r->db, &mr_service_identity, &prepared_stmt, NULL, NULL, &out, err,
                          sizeof err);
    if (e != MR_OK) {
        mr_reply_err(r, e, err);
        return;
    }
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "prepared", out ? atof(out) : -1);
    free(out);
    mr_reply_json(r, 200, j);
}

/* Query parameter `name`, an integer in 0..max that needs the database: 1 with *v
 * set; 0 when absent; -1 when answered (400 for a bad value, 503 without a database). */
static int db_param(mr_req *r, const char *name, long max, long *v)
{
    char s[16], *end;
    if (mr_http_query_param(r->query, name, s, sizeof(s)) != MR_OK)
        return 0;
    *v = strtol(s, &end, 10);
    if (end == s || *end || *v < 0 || *v > max) {
        mr_reply_error(r, 400, "invalid", "%s must be an integer in 0..%ld", name, max);
        return -1;
    }
    if (!r->db) {
        mr_reply_error(r, 503, "unavailable", "no DATABASE_URL");
        return -1;
    }
    return 1;
}

static void handle(mr_req *r)
{
    char err[256];
    long v;
    int got;
    if ((got = db_param(r, "failed_calls", 10000, &v)) != 0) {
        if (got > 0)
            failed_calls(r, v);
        return;
    }
    if ((got = db_param(r, "tx_pause_ms", 30000, &v)) != 0) {
        if (got < 0)
            return;
        pause_arg a = {.pause_ms = v};
        if ((got = db_param(r, "tx_refuse", 1, &v)) < 0)
            return;
        a.refuse = got && v;
        mr_err e = mr_db_tx(r->db, &mr_service_identity, pause_tx, &a, err, sizeof err);
        if (e != MR_OK) {
            mr_reply_err(r, e, err);
            return;
        }
        cJSON *out = cJSON_CreateObject();
        cJSON_AddStringToObject(out, "tx_user", a.user);
        mr_reply_json(r, 200, out);
        return;
    }
    if ((got = db_param(r, "sleep_ms", 30000, &v)) < 0)
        return;
    if (got) {
        char ms[24];
        snprintf(ms, sizeof ms, "%ld", v);
        const char *params[] = {ms};
        PGresult *res = NULL;
        mr_err e = mr_db_exec(r->db, "SELECT pg_sleep($1::float8 / 1000)", 1, params, &res,
                              NULL, err, sizeof(err));
        PQclear(res);
        if (e != MR_OK) {
            mr_reply_err(r, e, err);
            return;
        }
    }
    cJSON *out = cJSON_CreateObject();
    cJSON_AddBoolToObject(out, "ok", 1);
    cJSON_AddNumberToObject(out, "pid", (double)getpid());
    mr_reply_json(r, 200, out);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "noop", .methods = "GET,POST", .auth = MR_AUTH_NONE, .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
