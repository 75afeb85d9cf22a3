/* mr_db.c: one libpq connection per process, parameters only (see mr_db.h).
 *
 * Connection health: before a connection is used, a zero-timeout poll tells
 * whether the server has already closed it (a restart sends FATAL 57P01 and
 * closes); if so it is replaced before any statement is sent. That makes the
 * first request after a PostgreSQL restart succeed without ever re-sending a
 * statement whose outcome is unknown.
 *
 * No session state: the statement timeout, the role and the JWT claims are set
 * per transaction (set_config(..., true)), so a connection can be shared by a
 * transaction-mode pooler and nothing leaks from one request to the next. */
#include "mr_db.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "mr_config.h"
#include "mr_deadlines.h"
#include "mr_log.h"
#include "mr_metrics.h"

#define TX_MAX_RETRIES 5
#define MAX_PREPARED 16
/* Failed calls a connection serves before it is replaced: each may leave up to
 * MAX_PREPARED statements prepared under names never used again (forget_prepared). */
#define MAX_FORGETS 32

typedef enum { POOLER_NONE, POOLER_SESSION, POOLER_TRANSACTION } pooler_mode;

struct mr_db {
    char *conninfo;
    PGconn *conn;
    pooler_mode pooler;
    char statement_timeout[24];
    int64_t timeout_ms;   /* the statement timeout; 0: none (and no answer limit) */
    char last_state[6];   /* SQLSTATE of the last statement ("00000" on success) */
    unsigned int rng;
    unsigned generation;  /* bumped on every new connection */
    int in_tx;            /* inside mr_db_tx's transaction: a lost connection is not replaced */
    unsigned forgets;     /* forget_prepared calls since the connection was made */
    struct {
        const mr_db_stmt *stmt;
        unsigned generation; /* the connection it was prepared on; 0: not prepared */
        unsigned version;    /* suffix of its server-side name, see forget_prepared */
    } prepared[MAX_PREPARED];
};

/* BEGIN's companions: the request's identity, its context for audit rows and the
 * statement timeout, local to the transaction. And the time zone: the day a usage
 * report counts in, its limit's reset time (CURRENT_DATE in track_usage and
 * tenant_instance) and every timestamp an answer renders are UTC's, whatever zone
 * the database server (or a PGTZ) gives the session; set here, per transaction,
 * as a pooler in transaction mode takes no startup options. */
#define TX_TIME_ZONE "set_config('TimeZone', 'UTC', true)"
static const mr_db_stmt identity_stmt = {
    "mr_db_identity",
    "SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true),"
    " set_config('mindroom.request', $3, true), set_config('statement_timeout', $4, true), "
    TX_TIME_ZONE,
    4};
static const mr_db_stmt timeout_stmt = {
    "mr_db_timeout", "SELECT set_config('statement_timeout', $1, true), " TX_TIME_ZONE, 1};

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
                            MR_DL_DB_STATEMENT_MS, 0, 24 * 3600 * 1000, &t, NULL, 0) != MR_OK)
        t = MR_DL_DB_STATEMENT_MS;
    snprintf(db->statement_timeout, sizeof(db->statement_timeout), "%lld", (long long)t);
    db->timeout_ms = t;
    const char *pooler = getenv("DATABASE_POOLER");
    db->pooler = pooler && !strcmp(pooler, "transaction") ? POOLER_TRANSACTION
                 : pooler && !strcmp(pooler, "session") ? POOLER_SESSION : POOLER_NONE;
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

mr_err mr_db_state_class(const char *s)
{
    if (!strncmp(s, "08", 2) || !strncmp(s, "53", 2) || !strncmp(s, "57", 2) ||
        !strcmp(s, "40001") || !strcmp(s, "40P01") || !strcmp(s, "55P03") || !strcmp(s, "26000"))
        return MR_ETRANSIENT;
    if (!strcmp(s, "MR001") || !strcmp(s, "23505"))
        return MR_ECONFLICT;
    if (!strncmp(s, "22", 2) || !strncmp(s, "23", 2))
        return MR_EINVAL;
    if (!strcmp(s, "42501"))
        return MR_EFORBIDDEN;
    return MR_EINTERNAL;
}

/* Records a failure's SQLSTATE and returns its class with a safe message.
 * res (may be NULL: no result at all) is only read. */
static mr_err fail(mr_db *db, const PGresult *res, char sqlstate[6], char *err, size_t errlen)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    /* libpq's own errors (the server died mid-pipeline) carry no SQLSTATE: a lost
     * connection is transient (503, callers retry), not a 500. */
    if (!state || strlen(state) != 5)
        state = (!db->conn || PQstatus(db->conn) != CONNECTION_OK) ? "08006" : "XX000";
    memcpy(db->last_state, state, 6);
    if (sqlstate)
        memcpy(sqlstate, state, 6);
    mr_metrics_db_error(state);
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (!primary && db->conn)
        primary = PQerrorMessage(db->conn);
    mr_err e = mr_db_state_class(state);
    mr_log(e == MR_ECONFLICT || e == MR_EINVAL ? MR_LOG_INFO : MR_LOG_WARN,
           "database error %s: %.300s", state, primary ? primary : "");
    /* Only the classes whose messages are about the caller's data are shown;
     * the rest may describe the schema or the server. */
    if ((e == MR_ECONFLICT || e == MR_EINVAL) && primary)
        return mr_seterr(err, errlen, e, "%s", primary);
    if (e == MR_ETRANSIENT)
        return mr_seterr(err, errlen, e, "database unavailable, retry later (%s)", state);
    if (e == MR_EFORBIDDEN)
        return mr_seterr(err, errlen, e, "permission denied");
    return mr_seterr(err, errlen, e, "database error (%s)", state);
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
    mr_err e = fail(db, res, sqlstate, err, errlen);
    PQclear(res);
    return e;
}

static int peer_closed(PGconn *c)
{
    /* Readable while idle means a notice, a notification or the server saying
     * goodbye. The goodbye is a FATAL message followed by EOF, and one
     * PQconsumeInput may stop after the message, so keep reading while there is
     * more. (Notifications read here stay queued for PQnotifies.) */
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
    /* The conninfo is expanded last, so its own settings win over these defaults.
     * A direct connection also gets the statement timeout as a session default
     * for statements outside a transaction; a pooler gets no startup options.
     * The application name is the process's own ("handle-stripe-webhook",
     * "mindroom-lifecycle"), so pg_stat_activity says whose session is whose. */
    char options[64];
    snprintf(options, sizeof options, "-c statement_timeout=%s", db->statement_timeout);
    const char *keys[] = {"connect_timeout", "fallback_application_name", "options", "dbname", NULL};
    const char *vals[] = {"5", mr_log_name(), options, db->conninfo, NULL};
    if (db->pooler != POOLER_NONE) {
        keys[2] = "dbname";
        vals[2] = db->conninfo;
        keys[3] = vals[3] = NULL;
    }
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    if (!c || PQstatus(c) != CONNECTION_OK) {
        const char *m = c ? PQerrorMessage(c) : "out of memory";
        mr_log(MR_LOG_WARN, "database connect failed: %.300s", m);
        PQfinish(c);
        memcpy(db->last_state, "08001", 6);
        mr_metrics_db_error("08001");
        return mr_seterr(err, errlen, MR_ETRANSIENT, "database unavailable, retry later");
    }
    PQsetNoticeProcessor(c, on_notice, NULL);
    db->conn = c;
    db->generation++;
    db->forgets = 0;
    return MR_OK;
}

PGconn *mr_db_conn(mr_db *db, char *err, size_t errlen)
{
    if (!db) {
        mr_seterr(err, errlen, MR_EINTERNAL, "database not configured (DATABASE_URL unset)");
        return NULL;
    }
    if (db->conn && (PQstatus(db->conn) != CONNECTION_OK || peer_closed(db->conn))) {
        mr_log(MR_LOG_INFO, "database connection lost%s", db->in_tx ? " in a transaction" :
               "; reconnecting");
        PQfinish(db->conn);
        db->conn = NULL;
    }
    if (db->conn && !db->in_tx && db->forgets >= MAX_FORGETS) {
        mr_log(MR_LOG_INFO, "database connection replaced after %u failed calls (the statements "
               "they left prepared go with it)", db->forgets);
        PQfinish(db->conn);
        db->conn = NULL;
    }
    if (!db->conn && db->in_tx) {
        /* The transaction went with its connection: a new one would run the rest of it
         * outside any transaction and identity, and its COMMIT would commit nothing
         * yet answer COMMIT. mr_db_tx decides whether the whole may be tried again. */
        memcpy(db->last_state, "08006", 6);
        mr_seterr(err, errlen, MR_ETRANSIENT, "database connection lost in a transaction, "
                  "retry later");
        return NULL;
    }
    if (!db->conn && db_connect(db, err, errlen) != MR_OK)
        return NULL;
    return db->conn;
}

static int await_answer(mr_db *db, int64_t since, int statements);

int64_t mr_db_answer_window_ms(int64_t timeout_ms, int statements)
{
    return timeout_ms > 0 ? (statements > 1 ? statements : 1) * timeout_ms + MR_DL_DB_ANSWER_SLACK_MS
                          : 0;
}

void mr_db_release(mr_db *db)
{
    if (!db || !db->conn || PQstatus(db->conn) != CONNECTION_OK)
        return;
    PGconn *c = db->conn;
    if (PQtransactionStatus(c) == PQTRANS_IDLE)
        return;
    /* The ROLLBACK is answered within one statement's window, as every other wait
     * is: a server or pooler that stops answering must not hold the worker here.
     * A connection that cannot roll back, or does not say so in time, cannot be
     * trusted with the next request: it is dropped. */
    int64_t t0 = mr_now_ms();
    int ok = PQpipelineStatus(c) == PQ_PIPELINE_OFF &&
             PQsendQueryParams(c, "ROLLBACK", 0, NULL, NULL, NULL, NULL, 0);
    PGresult *res;
    while (ok && (ok = await_answer(db, t0, 1) == 0) && (res = PQgetResult(c)) != NULL) {
        ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        PQclear(res);
    }
    if (db->conn && (!ok || PQtransactionStatus(c) != PQTRANS_IDLE)) {
        PQfinish(c);
        db->conn = NULL;
    }
}

/* Waits until the next result can be read without blocking, at most the answer
 * window of `statements` statements from `since`: each statement's timeout, plus
 * 2 s. The statement timeout ends a statement the server is running; this ends a
 * wait for a server that is not answering at all (a pooler waiting for a
 * PostgreSQL that is down, a dead network path). A pipeline's statements are timed
 * one by one by the server, and its answers come together at the Sync, so a
 * pipeline of n calls gets n timeouts: one that is slow as a whole but whose
 * statements each fit is not given up on while the server goes on to commit it.
 * Returns 0 when ready; -1 when the connection broke or the time ran out, after
 * dropping it (its state is unknown). */
static int await_answer(mr_db *db, int64_t since, int statements)
{
    PGconn *c = db->conn;
    int64_t window = mr_db_answer_window_ms(db->timeout_ms, statements);
    while (PQisBusy(c)) {
        int timeout = -1;
        if (window > 0) {
            int64_t left = since + window - mr_now_ms();
            if (left <= 0) {
                mr_log(MR_LOG_WARN, "database did not answer within %lld ms; dropping the connection",
                       (long long)window);
                goto drop;
            }
            timeout = left > 1000 ? 1000 : (int)left;
        }
        struct pollfd p = {.fd = PQsocket(c), .events = POLLIN};
        if (p.fd < 0 || (poll(&p, 1, timeout) < 0 && errno != EINTR) || !PQconsumeInput(c))
            goto drop;
    }
    return 0;
drop:
    PQfinish(c);
    db->conn = NULL;
    return -1;
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
    /* PQexecParams without its unbounded wait: send, await the answer within the
     * deadline, keep the last result (as PQexec does). */
    int64_t t0 = mr_now_ms();
    PGresult *last = NULL;
    if (!PQsendQueryParams(c, sql, nparams, NULL, params, NULL, NULL, 0))
        return check_result(db, NULL, res, sqlstate, err, errlen);
    for (;;) {
        if (await_answer(db, t0, 1) != 0) {
            PQclear(last);
            return check_result(db, NULL, res, sqlstate, err, errlen);
        }
        PGresult *r = PQgetResult(c);
        if (!r)
            break;
        if (last && PQresultStatus(last) == PGRES_FATAL_ERROR) {
            PQclear(r); /* the first error is the one that counts */
            continue;
        }
        PQclear(last);
        last = r;
    }
    return check_result(db, last, res, sqlstate, err, errlen);
}

/* ---- pipelines --------------------------------------------------------- */

/* Queues stmt in the pipeline: prepared once per connection, or unnamed behind a
 * transaction-mode pooler. Returns 0 when libpq refused to queue it. */
static int send_stmt(mr_db *db, const mr_db_stmt *stmt, const char *const *params,
                     const int *lengths)
{
    PGconn *c = db->conn;
    if (db->pooler == POOLER_TRANSACTION)
        return PQsendQueryParams(c, stmt->sql, stmt->nparams, NULL, params, lengths, NULL, 0);
    int slot = -1;
    for (int i = 0; i < MAX_PREPARED && slot < 0; i++)
        if (db->prepared[i].stmt == stmt)
            slot = i;
    for (int i = 0; i < MAX_PREPARED && slot < 0; i++)
        if (!db->prepared[i].stmt)
            slot = i;
    if (slot < 0) /* more statements than slots: a programming error; run it unnamed */
        return PQsendQueryParams(c, stmt->sql, stmt->nparams, NULL, params, lengths, NULL, 0);
    char name[96];
    snprintf(name, sizeof name, "%s_%u", stmt->name, db->prepared[slot].version);
    if (db->prepared[slot].stmt != stmt || db->prepared[slot].generation != db->generation) {
        /* Queued in the same pipeline: a failed prepare fails what follows too. */
        if (!PQsendPrepare(c, name, stmt->sql, stmt->nparams, NULL))
            return 0;
        db->prepared[slot].stmt = stmt;
        db->prepared[slot].generation = db->generation;
    }
    return PQsendQueryPrepared(c, name, stmt->nparams, params, lengths, NULL, 0);
}

/* Forgets what was prepared on this connection (after 26000, or any error in a
 * pipeline, which may have skipped a queued prepare). The next use prepares again
 * under a new name, so a statement that did get prepared meanwhile is never
 * prepared twice under one name (42P05). The old names stay prepared on the server
 * until the connection ends: after MAX_FORGETS, mr_db_conn replaces it. */
static void forget_prepared(mr_db *db)
{
    int any = 0;
    for (int i = 0; i < MAX_PREPARED; i++) {
        if (db->prepared[i].generation) {
            db->prepared[i].generation = 0;
            db->prepared[i].version++;
            any = 1;
        }
    }
    db->forgets += any;
}

/* Queues the identity (or only the timeout) of a transaction. */
static int send_identity(mr_db *db, const mr_identity *who)
{
    if (who && who->role[0]) {
        const char *p[4] = {who->role, who->claims_json,
                            who->request_json ? who->request_json : "", db->statement_timeout};
        return send_stmt(db, &identity_stmt, p, NULL);
    }
    const char *p[1] = {db->statement_timeout};
    return send_stmt(db, &timeout_stmt, p, NULL);
}

/* Reads a pipeline's results up to its Sync. values (may be NULL) gets copies of
 * the first column of the first row of tuple results number first, first + step,
 * ... (1-based, counting tuple results only; count of them; NULL for no row or SQL
 * NULL). Returns MR_OK, or the first error's class. *synced is set when the Sync
 * came back. */
static mr_err read_results(mr_db *db, char **values, int first, int step, int count, int *synced,
                           char sqlstate[6], char *err, size_t errlen)
{
    PGconn *c = db->conn;
    mr_err rc = MR_OK;
    int ntuples = 0;
    int64_t t0 = mr_now_ms();
    *synced = 0;
    /* Bounded so that a broken connection cannot spin. */
    for (int i = 0; i < 32 + 2 * (first + step * count); i++) {
        if (await_answer(db, t0, count) != 0) {
            c = NULL;
            break;
        }
        PGresult *res = PQgetResult(c);
        if (!res) {
            if (PQstatus(c) != CONNECTION_OK)
                break;
            continue;
        }
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_PIPELINE_SYNC) {
            PQclear(res);
            *synced = 1;
            break;
        }
        if (st == PGRES_FATAL_ERROR && rc == MR_OK) {
            rc = fail(db, res, sqlstate, err, errlen);
        } else if (st == PGRES_TUPLES_OK && values) {
            int k = ++ntuples - first;
            if (k >= 0 && k % step == 0 && k / step < count && PQntuples(res) > 0 &&
                !PQgetisnull(res, 0, 0)) {
                values[k / step] = strdup(PQgetvalue(res, 0, 0));
                if (!values[k / step] && rc == MR_OK)
                    rc = mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
            }
        }
        PQclear(res);
    }
    if (c && !PQexitPipelineMode(c)) {
        /* Still busy: the connection is in an unknown state; drop it. */
        mr_log(MR_LOG_WARN, "database pipeline left busy; reconnecting");
        PQfinish(c);
        db->conn = NULL;
        *synced = 0;
    }
    if (rc == MR_OK && !*synced)
        rc = fail(db, NULL, sqlstate, err, errlen);
    if (rc != MR_OK)
        forget_prepared(db);
    return rc;
}

static mr_err read_pipeline(mr_db *db, int want, char **value, int *synced, char sqlstate[6],
                            char *err, size_t errlen)
{
    return read_results(db, value, want, 1, value ? 1 : 0, synced, sqlstate, err, errlen);
}

/* BEGIN and the caller's identity in one pipeline: one round trip, and the
 * identity is transaction-local, so it cannot leak into the next request. */
static mr_err begin_tx(mr_db *db, const mr_identity *who, char *err, size_t errlen)
{
    PGconn *c = mr_db_conn(db, err, errlen);
    if (!c)
        return MR_ETRANSIENT;
    int synced;
    if (!PQenterPipelineMode(c) || !PQsendQueryParams(c, "BEGIN", 0, NULL, NULL, NULL, NULL, 0) ||
        !send_identity(db, who) || !PQpipelineSync(c)) {
        mr_err e = fail(db, NULL, NULL, err, errlen);
        read_pipeline(db, 0, NULL, &synced, NULL, NULL, 0);
        return e;
    }
    return read_pipeline(db, 0, NULL, &synced, NULL, err, errlen);
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

/* The retry rule shared by mr_db_tx and mr_db_call: 1 to try again. */
static int retry(mr_db *db, int attempt, int outcome_unknown, int *reconnected)
{
    const char *st = db->last_state;
    if ((!strcmp(st, "40001") || !strcmp(st, "40P01")) && attempt < TX_MAX_RETRIES) {
        mr_log(MR_LOG_INFO, "transaction retry %d after %s", attempt + 1, st);
        backoff(db, attempt);
        return 1;
    }
    if (!strcmp(st, "26000") && attempt < TX_MAX_RETRIES) {
        forget_prepared(db);
        return 1;
    }
    /* A connection that broke before the commit was sent committed nothing, so
     * one more try on a fresh connection is safe. After it was sent the outcome
     * is unknown: report it (the caller's retry is idempotent). */
    if (is_broken(db) && !outcome_unknown && !*reconnected) {
        *reconnected = 1;
        mr_log(MR_LOG_INFO, "transaction retry on a new connection");
        return 1;
    }
    return 0;
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
            db->in_tx = 1;
            memcpy(db->last_state, "00000", 6);
            rc = fn(db, arg, err, errlen);
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
            db->in_tx = 0;
        }
        if (rc == MR_OK)
            return MR_OK;
        mr_db_release(db);
        if (!retry(db, attempt, commit_sent, &reconnected))
            return rc;
    }
}

static const mr_db_stmt context_stmt = {
    "mr_db_context", "SELECT set_config('mindroom.request', $1, true)", 1};

mr_err mr_db_call_each(mr_db *db, const mr_identity *who, const mr_db_stmt *stmt, size_t n,
                       const char *const *params, const int *lengths,
                       const char *const *contexts, char **outs, char *err, size_t errlen)
{
    int np = stmt->nparams;
    for (size_t i = 0; i < n; i++)
        outs[i] = NULL;
    if (!db)
        return mr_seterr(err, errlen, MR_EINTERNAL, "database not configured (DATABASE_URL unset)");
    int reconnected = 0;
    for (int attempt = 0;; attempt++) {
        memcpy(db->last_state, "00000", 6);
        PGconn *c = mr_db_conn(db, err, errlen);
        if (!c)
            return MR_ETRANSIENT;
        int synced = 0, sent = 0, ok = PQenterPipelineMode(c) && send_identity(db, who);
        for (size_t i = 0; ok && i < n; i++) {
            const char *ctx[1] = {contexts && contexts[i] ? contexts[i] : ""};
            ok = (!contexts || send_stmt(db, &context_stmt, ctx, NULL)) &&
                 send_stmt(db, stmt, params + i * np, lengths ? lengths + i * np : NULL);
        }
        mr_err rc;
        if (!ok || !PQpipelineSync(c)) {
            rc = fail(db, NULL, NULL, err, errlen);
            read_pipeline(db, 0, NULL, &synced, NULL, NULL, 0);
        } else {
            /* From here the implicit transaction may commit at the Sync. */
            sent = 1;
            rc = read_results(db, outs, contexts ? 3 : 2, contexts ? 2 : 1, (int)n, &synced, NULL,
                              err, errlen);
        }
        if (rc == MR_OK)
            return MR_OK;
        for (size_t i = 0; i < n; i++) {
            free(outs[i]);
            outs[i] = NULL;
        }
        /* An error result means the implicit transaction rolled back; only a
         * connection lost after the Sync was sent leaves the outcome unknown. */
        int unknown = sent && !synced && is_broken(db);
        if (!retry(db, attempt, unknown, &reconnected))
            return rc;
    }
}

mr_err mr_db_call(mr_db *db, const mr_identity *who, const mr_db_stmt *stmt,
                  const char *const *params, const int *lengths, char **out,
                  char *err, size_t errlen)
{
    return mr_db_call_each(db, who, stmt, 1, params, lengths, NULL, out, err, errlen);
}

mr_err mr_db_call_json(mr_db *db, const mr_identity *who, const mr_db_stmt *stmt,
                       const char *const *params, cJSON **out, char *err, size_t errlen)
{
    char *text = NULL;
    *out = NULL;
    mr_err e = mr_db_call(db, who, stmt, params, NULL, &text, err, errlen);
    if (e != MR_OK)
        return e;
    *out = text ? mr_json_parse(text, strlen(text)) : NULL;
    free(text);
    if (!cJSON_IsObject(*out)) {
        cJSON_Delete(*out);
        *out = NULL;
        return mr_seterr(err, errlen, MR_EINTERNAL, "unexpected answer from the database");
    }
    return MR_OK;
}

/* ---- notifications ------------------------------------------------------ */

mr_err mr_db_listen(mr_db *db, const char *channel, char *err, size_t errlen)
{
    for (const char *p = channel; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || *p == '_'))
            return mr_seterr(err, errlen, MR_EINTERNAL, "bad channel name");
    char sql[96];
    /* The channel is a constant identifier checked above, not input: LISTEN takes
     * no parameters. */
    snprintf(sql, sizeof sql, "LISTEN %s", channel);
    PGresult *res = NULL;
    mr_err e = mr_db_exec(db, sql, 0, NULL, &res, NULL, err, errlen);
    PQclear(res);
    return e;
}

int mr_db_socket(mr_db *db)
{
    return db && db->conn ? PQsocket(db->conn) : -1;
}

int mr_db_notifications(mr_db *db)
{
    if (!db || !db->conn)
        return -1;
    if (!PQconsumeInput(db->conn) || PQstatus(db->conn) != CONNECTION_OK) {
        PQfinish(db->conn);
        db->conn = NULL;
        return -1;
    }
    int n = 0;
    PGnotify *nt;
    while ((nt = PQnotifies(db->conn)) != NULL) {
        n++;
        PQfreemem(nt);
    }
    return n;
}
