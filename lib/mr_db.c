/* mr_db.c: one libpq connection per worker, parameters only.
 *
 * Connection health: before a connection is used, a zero-timeout poll tells
 * whether the server has already closed it (a restart sends FATAL 57P01 and
 * closes); if so it is replaced before any statement is sent. That makes the
 * first request after a PostgreSQL restart succeed without ever re-sending a
 * statement whose outcome is unknown. */
#include "mr_db.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "mr_config.h"
#include "mr_log.h"

#define TX_MAX_RETRIES 5

struct mr_db {
    char *conninfo;
    PGconn *conn;
    char statement_timeout[24];
    char last_state[6];   /* SQLSTATE of the last statement ("00000" on success) */
    unsigned int rng;
};

static const char set_identity_sql[] =
    "SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true)";

mr_db *mr_db_open(const char *conninfo)
{
    mr_db *db = calloc(1, sizeof(*db));
    if (!db)
        return NULL;
    db->conninfo = strdup(conninfo);
    if (!db->conninfo) {
        free(db);
        return NULL;
    }
    /* Validated by the runtime in the parent; a bad value here falls back. */
    int64_t t;
    if (mr_config_parse_int("MR_DB_STATEMENT_TIMEOUT_MS", getenv("MR_DB_STATEMENT_TIMEOUT_MS"),
                            5000, 0, 24 * 3600 * 1000, &t, NULL, 0) != MR_OK)
        t = 5000;
    snprintf(db->statement_timeout, sizeof(db->statement_timeout), "%lld", (long long)t);
    memcpy(db->last_state, "00000", 6);
    if (getrandom(&db->rng, sizeof(db->rng), 0) != (ssize_t)sizeof(db->rng))
        db->rng = (unsigned int)time(NULL) ^ (unsigned int)(uintptr_t)db;
    return db;
}

void mr_db_close(mr_db *db)
{
    if (!db)
        return;
    if (db->conn)
        PQfinish(db->conn);
    free(db->conninfo);
    free(db);
}

/* Maps a SQLSTATE to the runtime's error classes (see mr_db.h). */
static mr_err map_state(const char *s)
{
    if (!strcmp(s, "40001") || !strcmp(s, "40P01") || !strcmp(s, "57P01") ||
        !strcmp(s, "57P02") || !strcmp(s, "57P03") || !strcmp(s, "57014") ||
        !strcmp(s, "55P03") || !strncmp(s, "53", 2) || !strncmp(s, "08", 2))
        return MR_ETRANSIENT;
    if (!strcmp(s, "MR001") || !strcmp(s, "23505"))
        return MR_ECONFLICT;
    if (!strncmp(s, "22", 2) || !strncmp(s, "23", 2))
        return MR_EINVAL;
    if (!strcmp(s, "42501"))
        return MR_EFORBIDDEN;
    return MR_EINTERNAL;
}

/* Turns a result into an mr_err, recording the SQLSTATE. Takes res. */
static mr_err check_result(mr_db *db, PGresult *res, PGresult **out, char sqlstate[6],
                           char *err, size_t errlen)
{
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
        memcpy(db->last_state, "00000", 6);
        if (sqlstate)
            memcpy(sqlstate, "00000", 6);
        if (out)
            *out = res;
        else
            PQclear(res);
        return MR_OK;
    }
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (!state || strlen(state) != 5)
        state = (!db->conn || PQstatus(db->conn) != CONNECTION_OK) ? "08006" : "XX000";
    memcpy(db->last_state, state, 6);
    if (sqlstate)
        memcpy(sqlstate, state, 6);
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (!primary && db->conn)
        primary = PQerrorMessage(db->conn);
    mr_err e = map_state(state);
    mr_log(e == MR_ECONFLICT || e == MR_EINVAL ? MR_LOG_INFO : MR_LOG_WARN,
           "database error %s: %.300s", state, primary ? primary : "");
    /* Only the classes whose messages are about the caller's data are shown;
     * the rest may describe the schema or the server. */
    if ((e == MR_ECONFLICT || e == MR_EINVAL) && primary)
        mr_seterr(err, errlen, e, "%s", primary);
    else if (e == MR_ETRANSIENT)
        mr_seterr(err, errlen, e, "database unavailable, retry later (%s)", state);
    else if (e == MR_EFORBIDDEN)
        mr_seterr(err, errlen, e, "permission denied");
    else
        mr_seterr(err, errlen, e, "database error (%s)", state);
    PQclear(res);
    return e;
}

static int peer_closed(PGconn *c)
{
    /* Readable while idle means a notice or the server saying goodbye. The
     * goodbye is a FATAL message followed by EOF, and one PQconsumeInput may
     * stop after the message, so keep reading while there is more. */
    for (int i = 0; i < 4; i++) {
        struct pollfd p = {.fd = PQsocket(c), .events = POLLIN};
        if (p.fd < 0)
            return 1;
        if (poll(&p, 1, 0) <= 0)
            return 0;
        if (!PQconsumeInput(c) || PQstatus(c) != CONNECTION_OK)
            return 1;
    }
    return 0;
}

static void on_notice(void *arg, const char *message)
{
    (void)arg;
    mr_log(MR_LOG_DEBUG, "database notice: %.300s", message);
}

static mr_err db_connect(mr_db *db, char *err, size_t errlen)
{
    /* The conninfo is expanded last, so its own settings win over these defaults. */
    const char *const keys[] = {"connect_timeout", "fallback_application_name", "dbname", NULL};
    const char *const vals[] = {"5", "mindroom", db->conninfo, NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    if (!c || PQstatus(c) != CONNECTION_OK) {
        const char *m = c ? PQerrorMessage(c) : "out of memory";
        mr_log(MR_LOG_WARN, "database connect failed: %.300s", m);
        PQfinish(c);
        memcpy(db->last_state, "08001", 6);
        return mr_seterr(err, errlen, MR_ETRANSIENT, "database unavailable, retry later");
    }
    PQsetNoticeProcessor(c, on_notice, NULL);
    const char *p[1] = {db->statement_timeout};
    PGresult *res = PQexecParams(c, "SELECT set_config('statement_timeout', $1, false)", 1, NULL,
                                 p, NULL, NULL, 0);
    db->conn = c;
    mr_err e = check_result(db, res, NULL, NULL, err, errlen);
    if (e != MR_OK) {
        PQfinish(c);
        db->conn = NULL;
    }
    return e;
}

PGconn *mr_db_conn(mr_db *db, char *err, size_t errlen)
{
    if (!db) {
        mr_seterr(err, errlen, MR_EINTERNAL, "database not configured (DATABASE_URL unset)");
        return NULL;
    }
    if (db->conn && (PQstatus(db->conn) != CONNECTION_OK || peer_closed(db->conn))) {
        mr_log(MR_LOG_INFO, "database connection lost; reconnecting");
        PQfinish(db->conn);
        db->conn = NULL;
    }
    if (!db->conn && db_connect(db, err, errlen) != MR_OK)
        return NULL;
    return db->conn;
}

void mr_db_release(mr_db *db)
{
    if (!db || !db->conn || PQstatus(db->conn) != CONNECTION_OK)
        return;
    if (PQtransactionStatus(db->conn) == PQTRANS_IDLE)
        return;
    PGresult *res = PQexecParams(db->conn, "ROLLBACK", 0, NULL, NULL, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        /* A connection that cannot roll back cannot be trusted with the next request. */
        PQfinish(db->conn);
        db->conn = NULL;
    }
    PQclear(res);
}

mr_err mr_db_exec(mr_db *db, const char *sql, int nparams, const char *const *params,
                  PGresult **res, char sqlstate[6], char *err, size_t errlen)
{
    if (res)
        *res = NULL;
    PGconn *c = mr_db_conn(db, err, errlen);
    if (!c) {
        if (sqlstate)
            memcpy(sqlstate, db ? db->last_state : "08003", 6);
        return db ? MR_ETRANSIENT : MR_EINTERNAL;
    }
    PGresult *r = PQexecParams(c, sql, nparams, NULL, params, NULL, NULL, 0);
    return check_result(db, r, res, sqlstate, err, errlen);
}

/* BEGIN and the caller's identity in one pipeline: one round trip, and the
 * identity is transaction-local (is_local = true), so it cannot leak into the
 * next request on this connection. */
static mr_err begin_tx(mr_db *db, const mr_identity *who, char *err, size_t errlen)
{
    if (!who || !who->role[0])
        return mr_db_exec(db, "BEGIN", 0, NULL, NULL, NULL, err, errlen);
    PGconn *c = mr_db_conn(db, err, errlen);
    if (!c)
        return MR_ETRANSIENT;
    const char *p[2] = {who->role, who->claims_json};
    if (!PQenterPipelineMode(c) || !PQsendQueryParams(c, "BEGIN", 0, NULL, NULL, NULL, NULL, 0) ||
        !PQsendQueryParams(c, set_identity_sql, 2, NULL, p, NULL, NULL, 0) || !PQpipelineSync(c)) {
        PQexitPipelineMode(c);
        return check_result(db, NULL, NULL, NULL, err, errlen);
    }
    mr_err rc = MR_OK;
    /* Expected: BEGIN, NULL, SELECT, NULL, SYNC. The bound keeps a broken
     * connection from looping forever. */
    for (int i = 0; i < 16; i++) {
        PGresult *res = PQgetResult(c);
        if (!res) {
            if (PQstatus(c) != CONNECTION_OK) {
                if (rc == MR_OK)
                    rc = check_result(db, NULL, NULL, NULL, err, errlen);
                break;
            }
            continue;
        }
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_PIPELINE_SYNC) {
            PQclear(res);
            break;
        }
        if (st == PGRES_FATAL_ERROR && rc == MR_OK)
            rc = check_result(db, res, NULL, NULL, err, errlen);
        else
            PQclear(res);
    }
    if (!PQexitPipelineMode(c) && rc == MR_OK)
        rc = mr_seterr(err, errlen, MR_EINTERNAL, "database pipeline left busy");
    return rc;
}

static void backoff(mr_db *db, int attempt)
{
    /* Jitter spreads out the retries of transactions that collided. */
    long max_us = 5000L << attempt;
    long us = 1000 + (long)(rand_r(&db->rng) % max_us);
    struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static int is_broken(mr_db *db)
{
    return !db->conn || PQstatus(db->conn) != CONNECTION_OK;
}

mr_err mr_db_tx(mr_db *db, const mr_identity *who,
                mr_err (*fn)(mr_db *db, void *arg, char *err, size_t errlen), void *arg,
                char *err, size_t errlen)
{
    if (!db)
        return mr_seterr(err, errlen, MR_EINTERNAL, "database not configured (DATABASE_URL unset)");
    int reconnected = 0;
    for (int attempt = 0;; attempt++) {
        int commit_sent = 0;
        memcpy(db->last_state, "00000", 6);
        mr_err rc = begin_tx(db, who, err, errlen);
        if (rc == MR_OK) {
            memcpy(db->last_state, "00000", 6);
            rc = fn(db, arg, err, errlen);
        }
        if (rc == MR_OK) {
            PGresult *res = NULL;
            commit_sent = 1;
            rc = mr_db_exec(db, "COMMIT", 0, NULL, &res, NULL, err, errlen);
            /* COMMIT of a transaction that already failed answers ROLLBACK
             * without an error: a handler that swallowed an error lands here. */
            if (rc == MR_OK && strcmp(PQcmdStatus(res), "COMMIT") != 0)
                rc = mr_seterr(err, errlen, MR_EINTERNAL, "transaction was rolled back");
            PQclear(res);
        }
        if (rc == MR_OK)
            return MR_OK;
        mr_db_release(db);

        const char *st = db->last_state;
        if ((!strcmp(st, "40001") || !strcmp(st, "40P01")) && attempt < TX_MAX_RETRIES) {
            mr_log(MR_LOG_INFO, "transaction retry %d after %s", attempt + 1, st);
            backoff(db, attempt);
            continue;
        }
        /* A connection that broke before COMMIT was sent committed nothing, so
         * one more try on a fresh connection is safe. After COMMIT was sent the
         * outcome is unknown: report it (the caller's retry is idempotent). */
        if (is_broken(db) && !commit_sent && !reconnected) {
            reconnected = 1;
            mr_log(MR_LOG_INFO, "transaction retry on a new connection");
            continue;
        }
        return rc;
    }
}
