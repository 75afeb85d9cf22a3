/* mr_db.h: one PostgreSQL connection per worker, parameters only.
 *
 * The connection is opened lazily (DATABASE_URL) and reset when found broken,
 * so a restarted database costs the next request nothing but a reconnect.
 * Statements run only through PQexecParams: SQL text is never built from input. */
#ifndef MR_DB_H
#define MR_DB_H

#include <libpq-fe.h>
#include "mr_common.h"
#include "mr_http.h"

/* Returns a handle (not yet connected) owned by the caller; free with mr_db_close. */
mr_db *mr_db_open(const char *conninfo);
void mr_db_close(mr_db *db);

/* Rolls back a transaction a request left open (so its locks and identity die
 * with the request). The runtime calls it after every request; db may be NULL. */
void mr_db_release(mr_db *db);

/* The connection, connecting or resetting first if needed. NULL with err on failure
 * (MR_ETRANSIENT). The PGconn stays owned by db. */
PGconn *mr_db_conn(mr_db *db, char *err, size_t errlen);

/* Runs one parameterized statement (text params, NULL = SQL NULL).
 * Returns MR_OK with *res set (caller PQclear()s it) for PGRES_COMMAND_OK /
 * PGRES_TUPLES_OK. On failure: MR_ETRANSIENT for connection loss, 40001,
 * 40P01, 57P01..57P03, 53xxx, 08xxx; MR_ECONFLICT for SQLSTATE MR001 (illegal
 * state change) and 23505 (unique violation); MR_EINVAL for 22xxx/23xxx
 * data errors; MR_EFORBIDDEN for 42501; MR_EINTERNAL otherwise. sqlstate (6 bytes,
 * may be NULL) receives the SQLSTATE. err gets a safe message, no SQL text. */
mr_err mr_db_exec(mr_db *db, const char *sql, int nparams, const char *const *params,
                  PGresult **res, char sqlstate[6], char *err, size_t errlen);

/* Runs fn inside BEGIN ... COMMIT with the caller's identity applied by
 * set_config('role', who->role, true) and set_config('request.jwt.claims',
 * who->claims_json, true) (skipped when who is NULL or role is ""; then the
 * transaction runs as the connecting role). fn returns MR_OK to commit, anything
 * else to roll back. Serialization failures (40001) and deadlocks (40P01) retry
 * the whole transaction up to 5 times with jittered backoff; a broken connection
 * is reset and retried once. Returns fn's result or the failure mapped as in mr_db_exec. */
mr_err mr_db_tx(mr_db *db, const mr_identity *who,
                mr_err (*fn)(mr_db *db, void *arg, char *err, size_t errlen), void *arg,
                char *err, size_t errlen);

#endif
