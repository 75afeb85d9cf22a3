/* mr_db.h: one PostgreSQL connection per process, parameters only.
 *
 * The connection is opened lazily and reset when found broken, so a restarted
 * database costs the next request nothing but a reconnect. Statements run only
 * with parameters (PQexecParams, PQsendQueryParams, PQsendQueryPrepared): SQL
 * text is never built from input.
 *
 * One SQLSTATE table and one retry rule serve every caller:
 *   MR_ETRANSIENT  08xxx (connection), 53xxx (resources), 57xxx (operator
 *                  intervention, statement timeout), 40001, 40P01, 55P03,
 *                  26000 (a prepared statement the server no longer has)
 *   MR_ECONFLICT   MR001 (illegal state change), 23505 (unique violation)
 *   MR_EINVAL      other 22xxx / 23xxx (data the caller sent)
 *   MR_EFORBIDDEN  42501
 *   MR_EINTERNAL   anything else
 * A transaction that hit 40001/40P01 is retried whole (bounded, jittered); one
 * that found its connection broken before anything could have been committed is
 * retried once on a new connection; 26000 prepares again. After a COMMIT (or a
 * pipeline's Sync) was sent and no answer came back the outcome is unknown: that
 * is reported as MR_ETRANSIENT, never retried here.
 *
 * Settings (read when the handle is opened; the runtime validates them at start-up):
 *   MR_DB_STATEMENT_TIMEOUT_MS  every statement's timeout (default 5000), applied
 *                               per transaction with set_config(..., true)
 *   DATABASE_POOLER             none (default) | session | transaction. Behind a
 *                               transaction-mode pooler (Supavisor on 6543, PgBouncer
 *                               pool_mode=transaction) a connection carries no
 *                               session state and no named prepared statements:
 *                               statements go unnamed, still pipelined. */
#ifndef MR_DB_H
#define MR_DB_H

#include <libpq-fe.h>
#include "mr_common.h"
#include "mr_json.h"

typedef struct mr_db mr_db;

/* A statement callers define once (static storage) and mr_db_call runs prepared:
 * parsed and planned once per connection, re-prepared on a new one. */
typedef struct {
    const char *name;   /* unique per process, e.g. "mr_wh_process" */
    const char *sql;    /* one statement, $1..$n parameters, returning one value */
    int nparams;
} mr_db_stmt;

/* Returns a handle (not yet connected) owned by the caller; free with mr_db_close.
 * NULL when out of memory. */
mr_db *mr_db_open(const char *conninfo);
void mr_db_close(mr_db *db);

/* Rolls back a transaction a request left open (so its locks and identity die
 * with the request), waiting for the answer at most one statement's window (the
 * statement timeout + 2 s); a connection that does not roll back in time is
 * dropped. The runtime calls it after every request, mr_db_tx after a failed
 * attempt; db may be NULL. */
void mr_db_release(mr_db *db);

/* How long the answer to `statements` statements is waited for under a statement
 * timeout of timeout_ms before the connection is dropped: each one's timeout plus
 * MR_DL_DB_ANSWER_SLACK_MS (0: no timeout, no limit). */
int64_t mr_db_answer_window_ms(int64_t timeout_ms, int statements);

/* The connection, connecting or resetting first if needed. NULL with err on failure
 * (MR_ETRANSIENT). The PGconn stays owned by db. */
PGconn *mr_db_conn(mr_db *db, char *err, size_t errlen);

/* Maps a SQLSTATE (5 characters) to its error class (the table above). */
mr_err mr_db_state_class(const char *sqlstate);

/* Runs one parameterized statement (text params, NULL = SQL NULL).
 * Returns MR_OK with *res set (caller PQclear()s it) for PGRES_COMMAND_OK /
 * PGRES_TUPLES_OK, or the class of the failure with err filled (a safe message,
 * no SQL text). sqlstate (6 bytes, may be NULL) receives the SQLSTATE. */
mr_err mr_db_exec(mr_db *db, const char *sql, int nparams, const char *const *params,
                  PGresult **res, char sqlstate[6], char *err, size_t errlen);

/* Runs fn inside BEGIN ... COMMIT with the caller's identity applied by
 * set_config('role', who->role, true), set_config('request.jwt.claims',
 * who->claims_json, true) and set_config('mindroom.request', who->request_json,
 * true) (skipped when who is NULL or role is ""; then the transaction runs as the
 * connecting role). fn returns MR_OK to commit, anything
 * else to roll back. Retries as described above. Returns fn's result or the
 * failure's class. */
mr_err mr_db_tx(mr_db *db, const mr_identity *who,
                mr_err (*fn)(mr_db *db, void *arg, char *err, size_t errlen), void *arg,
                char *err, size_t errlen);

/* One statement as who, in one round trip: the identity and the statement go as
 * one pipeline that PostgreSQL runs as one implicit transaction, committed at its
 * Sync. lengths may be NULL (every param a NUL-terminated string). On MR_OK *out is
 * a malloc'd copy of the first column of the first row (the caller frees it), or
 * NULL when the statement returned no row or SQL NULL. Retries as described above. */
mr_err mr_db_call(mr_db *db, const mr_identity *who, const mr_db_stmt *stmt,
                  const char *const *params, const int *lengths, char **out,
                  char *err, size_t errlen);

/* mr_db_call for n statements at once: stmt n times as who, in one round trip and
 * one implicit transaction (one commit for all): the identity, then for each i the
 * request context contexts[i] when contexts is not NULL
 * (set_config('mindroom.request', ..., true), for the audit rows that statement
 * writes) and stmt with params[i * nparams ...] (lengths likewise, or NULL). On
 * MR_OK outs[i] is what mr_db_call's *out would be for statement i. All or
 * nothing: on an error result nothing was committed and every outs[i] is NULL
 * (after a Sync with no answer the outcome is unknown, as for mr_db_call).
 * Retries as described above. */
mr_err mr_db_call_each(mr_db *db, const mr_identity *who, const mr_db_stmt *stmt, size_t n,
                       const char *const *params, const int *lengths,
                       const char *const *contexts, char **outs, char *err, size_t errlen);

/* mr_db_call for a statement that answers one jsonb object: *out is that object,
 * parsed (the caller cJSON_Delete()s it). No row, SQL NULL or anything but an
 * object is MR_EINTERNAL ("unexpected answer from the database"). */
mr_err mr_db_call_json(mr_db *db, const mr_identity *who, const mr_db_stmt *stmt,
                       const char *const *params, cJSON **out, char *err, size_t errlen);

/* Notifications. mr_db_listen connects if needed and runs LISTEN channel (a
 * constant identifier: [a-z_]+). mr_db_socket is the socket to wait on (-1 when
 * not connected). mr_db_notifications reads what has arrived and returns how many
 * notifications it consumed, or -1 when the connection is broken (listen again:
 * notifications may have been missed meanwhile). */
mr_err mr_db_listen(mr_db *db, const char *channel, char *err, size_t errlen);
int mr_db_socket(mr_db *db);
int mr_db_notifications(mr_db *db);

#endif
