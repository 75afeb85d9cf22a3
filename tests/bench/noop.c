/* noop: the smallest libmindroom function. Not deployed; `make bench` measures
 * the runtime's own cost with it, and the runtime's integration tests use it to
 * hold a request in flight.
 *
 * GET or POST, no auth. Answers {"ok":true,"pid":<worker pid>} at once, which
 * is what the benchmark measures. With ?sleep_ms=N (0..30000) it first runs
 * `SELECT pg_sleep(N/1000.0)` on the worker's own database connection, so a
 * request really sits in a worker and in PostgreSQL (visible in
 * pg_stat_activity) while a test signals or kills that worker. */
#include "mindroom.h"

#include <stdlib.h>
#include <unistd.h>

static void handle(mr_req *r)
{
    char ms[16];
    if (mr_http_query_param(r->query, "sleep_ms", ms, sizeof(ms)) == MR_OK) {
        char err[256], *end;
        long v = strtol(ms, &end, 10);
        if (end == ms || *end || v < 0 || v > 30000) {
            mr_reply_error(r, 400, "invalid", "sleep_ms must be an integer in 0..30000");
            return;
        }
        if (!r->db) {
            mr_reply_error(r, 503, "unavailable", "no DATABASE_URL");
            return;
        }
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
