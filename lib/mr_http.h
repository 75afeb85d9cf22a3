/* mr_http.h: the FastCGI worker runtime and one request's view of HTTP.
 *
 * A function binary is an mr_app handed to mr_app_main(). The runtime serves the
 * socket systemd passes (LISTEN_FDS, a socket unit) or binds its own unix socket
 * (--socket PATH or MR_SOCKET, mode MR_SOCKET_MODE), pre-forks --workers N
 * (MR_WORKERS, default: online cores) workers, respawns a worker that dies, and
 * on SIGTERM stops accepting, lets in-flight requests (and their deferred work)
 * finish, and exits. Each worker opens its own mr_db and mr_httpc after fork.
 * A connection has MR_READ_TIMEOUT_MS (default 5000) to deliver its whole request
 * and, after that, for each read or write; one that misses it is dropped and
 * logged. Every answered request is counted (mr_metrics.h); --version prints
 * the build's version.
 *
 * Per request the runtime: copies the CGI params it needs, generates or takes
 * X-Request-Id, checks the method against app->methods (405), applies
 * app->auth (401/403), reads the body with CONTENT_LENGTH range-checked and
 * capped at MR_MAX_BODY bytes (default 65536; 413; a short read is 400), calls
 * app->handle, sends a 500 if the handler sent nothing, logs one access line,
 * finishes the FastCGI request (the client has its answer), and only then runs
 * the deferred job, if the handler registered one.
 *
 * Handlers and deferred jobs run with SIGTERM and SIGINT blocked (so a drain
 * never interrupts their system calls) and SIGPIPE ignored. A child process
 * inherits both: start programs with posix_spawn using POSIX_SPAWN_SETSIGMASK
 * (empty set) and POSIX_SPAWN_SETSIGDEF (SIGPIPE, SIGTERM, SIGINT).
 *
 * Environment read at start-up (bad values stop the function, exit 2):
 * MR_SOCKET, MR_WORKERS, MR_MAX_BODY, MR_SOCKET_MODE (octal, default 0660),
 * MR_READ_TIMEOUT_MS, MR_METRICS_DIR (mr_metrics.h), MR_LOG_LEVEL, the auth settings of mr_auth.h for MR_AUTH_SERVICE/USER,
 * DATABASE_URL (optional: without it r->db is NULL), MR_DB_STATEMENT_TIMEOUT_MS
 * (default 5000).
 *
 * Auth (MR_AUTH_SERVICE/USER): the caller is identified from Authorization and
 * apikey as mr_auth.h describes (JWTs by SUPABASE_AUTH_MODE, sb_ API keys;
 * Authorization wins). Missing/invalid -> 401 "unauthorized", wrong role (anon
 * everywhere, authenticated on MR_AUTH_SERVICE) -> 403 "forbidden", a token
 * issued to a third-party app on a method the app does not open to it
 * (mr_app.oauth_client_methods) -> 403 "oauth_client_not_allowed", signing
 * keys unavailable -> 503. */
#ifndef MR_HTTP_H
#define MR_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <cjson/cJSON.h>
#include "mr_common.h"
#include "mr_db.h"
#include "mr_httpc.h"

struct FCGX_Request;

#define MR_DEFAULT_MAX_BODY 65536

typedef enum {
    MR_AUTH_NONE,      /* no JWT (the webhook checks Stripe-Signature itself) */
    MR_AUTH_SERVICE,   /* JWT with role service_role, else 401/403 */
    MR_AUTH_USER,      /* JWT with role service_role or authenticated (with a sub) */
    MR_AUTH_CUSTOM     /* the handler authenticates (e.g. provisioner bearer token) */
} mr_auth_mode;

#define MR_BATCH_MAX 16

typedef struct mr_req {
    struct FCGX_Request *fcgx;
    /* Copies owned by the runtime, valid until the request (and its deferred job) ends. */
    const char *method;          /* "GET", "POST", ... */
    const char *path;            /* the part after /functions/v1/<name>, or the
                                    full DOCUMENT_URI for the provisioner ("" if none) */
    const char *query;           /* QUERY_STRING, "" if none */
    const char *content_type;    /* "" if none */
    const char *authorization;   /* raw Authorization header, "" if none */
    const char *stripe_signature;/* "" if none */
    const char *remote_addr;
    const char *user_agent;
    char request_id[65];         /* 1..64 chars of [A-Za-z0-9._-] */
    /* Body: exactly body_len bytes as received, plus a NUL for convenience. */
    char *body;
    size_t body_len;
    mr_identity who;             /* filled by the runtime for MR_AUTH_SERVICE/USER;
                                    who.request_json for every request */
    mr_db *db;                   /* this worker's connection (lazily connected);
                                    NULL when DATABASE_URL is unset */
    mr_httpc *http;              /* this worker's libcurl handle */
    int status;                  /* 0 until a reply has been sent */
    int64_t started_ms;
    char note[200];              /* what the handler did, for the request's log line
                                    (mr_note); "" if nothing */
} mr_req;

typedef struct {
    const char *name;            /* "provision-instance": logs and the socket's default name */
    const char *methods;         /* "POST" or "GET,POST" */
    mr_auth_mode auth;
    /* MR_AUTH_USER: the methods a token issued to a third-party app (a user's
     * token with client_id, from Supabase Auth's OAuth 2.1 server) may call,
     * "GET" or "GET,POST"; NULL: none (403 oauth_client_not_allowed). Only what
     * reads: whatever spends money, manages billing or acts on an instance takes
     * the user's own session. */
    const char *oauth_client_methods;
    /* Workers per online core when MR_WORKERS is unset (0: one). More than one
     * for a function whose requests mostly wait on PostgreSQL's commit: more
     * commits in flight are flushed together. */
    int workers_per_core;
    /* Parent, once, before fork: read and validate config (may exit(2)). May be NULL. */
    void (*init)(void);
    /* Worker, once after fork, after db/http are opened. May be NULL. */
    void (*worker_init)(void);
    /* Must reply exactly once with mr_reply_json or mr_reply_error. */
    void (*handle)(mr_req *r);
    /* Optional: requests that arrived together. A worker that takes a request also
     * takes those already waiting on the socket, up to batch_max (at most
     * MR_BATCH_MAX), and passes the ones that passed the method, authentication and
     * body checks here at once (one alone goes to handle). Must reply to each
     * exactly once. */
    void (*handle_batch)(mr_req **reqs, size_t n);
    int batch_max;
} mr_app;

/* Runs the app; returns the process exit status (0 after a clean SIGTERM drain). */
int mr_app_main(const mr_app *app, int argc, char **argv);

/* Sets what the request's one log line says the handler did ("event evt_x
 * (type): processed"), formatted and cut to fit: the runtime writes it with the
 * status and duration when the handler returns, so the request costs one log
 * line. A later call replaces an earlier note. */
void mr_note(mr_req *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Sends status + JSON body (Content-Type: application/json, X-Request-Id,
 * Cache-Control: no-store). Takes ownership of body and deletes it. Extra
 * headers may be NULL or a NULL-terminated list of "Name: value" strings; a
 * Cache-Control among them replaces the default no-store. */
void mr_reply_json(mr_req *r, int status, cJSON *body);
void mr_reply_json_h(mr_req *r, int status, cJSON *body, const char *const *extra_headers);

/* Sends status + body as is, with the given Content-Type (no CR/LF; else a 500),
 * X-Request-Id and Cache-Control: no-store. The caller keeps body. */
void mr_reply_text(mr_req *r, int status, const char *content_type, const char *body, size_t len);

/* Sends {"error":{"code":code,"message":<formatted>}}. Never put secrets or SQL in it. */
void mr_reply_error(mr_req *r, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Maps an mr_err to its status and code name and replies with message. */
void mr_reply_err(mr_req *r, mr_err e, const char *message);

/* The service_role identity (mr_service_identity) carrying this request's context,
 * for a function that writes as the control plane on a caller's behalf (the
 * webhook, an instance's report): its audit rows still say from where. The
 * strings stay owned by the runtime (valid until the request ends). */
mr_identity mr_req_service(const mr_req *r);

/* A request header nginx passed, by its CGI name ("HTTP_IDEMPOTENCY_KEY" for
 * Idempotency-Key), or NULL when the request has none. Valid until it ends. */
const char *mr_req_header(const mr_req *r, const char *cgi_name);

/* The one instance a request names: ?instance_id=<uuid> or a JSON body
 * {"instance_id": <uuid>} (a body may also be empty or {}); "" in id when neither
 * names one. An instance_id given must be a UUID, once: an empty one (a script's
 * unset variable), a null, one repeated or one in both the query and the body is
 * refused, never taken for "none". Replies 400 itself and returns -1 on bad input. */
int mr_req_instance_id(mr_req *r, char id[40]);

/* Registers work to run after the response has been sent and the FastCGI request
 * finished (the caller already has the answer). At most one job per request.
 * arg is passed to fn and then to free_arg (may be NULL). */
void mr_defer(mr_req *r, void (*fn)(mr_req *r, void *arg), void *arg, void (*free_arg)(void *));

/* Parsing helpers usable from handlers and tests. */
/* Extracts the token from "Bearer <token>" (case-insensitive scheme). NULL if absent. */
const char *mr_http_bearer(const char *authorization);
/* Validates a CONTENT_LENGTH value against max. Returns MR_OK with *len set,
 * MR_EINVAL for malformed/negative, MR_ETOOBIG when over max. NULL/"" is 0. */
mr_err mr_http_content_length(const char *value, size_t max, size_t *len);
/* Reads exactly len bytes via reader(ctx, buf, n) (returns bytes read, 0 at EOF).
 * Returns a malloc'd NUL-terminated buffer, or NULL with *e = MR_EINVAL (short read). */
char *mr_http_read_exact(int (*reader)(void *ctx, char *buf, int n), void *ctx,
                         size_t len, mr_err *e);
/* Looks up key in an application/x-www-form-urlencoded query; copies the decoded
 * value into out. Returns MR_OK, MR_ENOTFOUND, or MR_EINVAL (too long, a bad
 * escape, or the key given more than once). */
mr_err mr_http_query_param(const char *query, const char *key, char *out, size_t cap);

#endif
