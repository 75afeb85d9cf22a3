/* mr_http.c: the FastCGI worker runtime (start-up, worker loop, one
 * request's flow) and the reply functions.
 *
 * Process model: the parent binds the socket, forks N workers that each run
 * FCGX_Accept_r on it, and then only supervises them (mr_proc.h): respawns workers that die,
 * and on SIGTERM/SIGINT forwards the signal and waits for every worker to
 * finish its in-flight request (and deferred job) before exiting 0.
 *
 * Signals in a worker are blocked while a request is being served and only
 * unblocked around FCGX_Accept_r: a SIGTERM therefore never interrupts a
 * handler's read, write, libpq or libcurl call with EINTR, and it does break
 * accept (FCGI_FAIL_ACCEPT_ON_INTR, handler without SA_RESTART). The one race
 * left (the signal lands between the stop check and accept(2)) is closed by
 * the parent re-sending SIGTERM every second while it drains.
 *
 * Connections are accepted here, not by libfcgi: a worker first waits, for at
 * most MR_READ_TIMEOUT_MS, until the connection has delivered a whole FastCGI
 * responder request (BEGIN_REQUEST, the params, the body up to its end record),
 * looking with MSG_PEEK, and only then hands it to FCGX_Accept_r (through the
 * request's ipcFd, with keepConnection set so that libfcgi's own
 * end-of-previous-request step keeps it open). libfcgi would otherwise wait
 * without limit for the params of a connection that sent BEGIN_REQUEST and then
 * nothing, and two such local connections would hold both of a function's
 * workers. A connection that misses the deadline or sends anything else is
 * closed, logged and counted. FCGX_Accept_r is given no listening socket (-1), so
 * if it ever finds a request it cannot read it fails at once instead of accepting
 * on its own, without the deadline.
 *
 * A function with a batch handler (mr_app.handle_batch: the webhook) takes the
 * requests that arrived together: its socket is non-blocking, each worker waits
 * for it in an epoll of its own (EPOLLEXCLUSIVE, so a connection wakes one
 * worker; epoll_pwait unblocks the stop signals while it waits, as they are
 * around each accept), and a worker that has taken a request also takes the
 * connections already waiting whose requests have arrived whole, up to
 * batch_max. Under light load a batch is one request; under a burst the handler
 * gets several at once. */
#include "mr_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <fcgiapp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <netdb.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <libpq-fe.h>
#include <openssl/crypto.h>

#include "mr_auth.h"
#include "mr_config.h"
#include "mr_db.h"
#include "mr_deadlines.h"
#include "mr_httpc.h"
#include "mr_json.h"
#include "mr_log.h"
#include "mr_metrics.h"
#include "mr_proc.h"
#include "mr_sd.h"
#include "mr_version.h"

#define MAX_WORKERS MR_PROC_MAX
#define LISTEN_BACKLOG 1024

/* Process-wide settings, fixed in the parent before fork. */
static const mr_app *g_app;
static size_t g_max_body = MR_DEFAULT_MAX_BODY;
static int64_t g_read_timeout_ms = MR_DL_FCGI_READ_MS;
static mr_auth *g_auth; /* MR_AUTH_SERVICE/USER: settings and, per worker, the JWKS cache */
static char g_prefix[160]; /* "/functions/v1/<name>" */

/* Worker state. */
static volatile sig_atomic_t g_stop;
static mr_db *g_db;
static mr_httpc *g_http;
static unsigned char *g_peek; /* a worker's buffer for looking at a request before it is read */
static size_t g_peek_cap;

/* The runtime's private view of a request: the public mr_req comes first so
 * mr_defer can recover the rest from the handler's pointer. */
typedef struct {
    mr_req pub;
    char *strings; /* one allocation holding every copied CGI param */
    char *request_json; /* the request's context for audit rows (r->who.request_json) */
    void (*job)(mr_req *r, void *arg);
    void *job_arg;
    void (*job_free)(void *);
    struct timespec arrived;
} req_ctx;

/* ---- replies ---------------------------------------------------------- */

static const char *reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "";
    }
}

static void send_reply_ct(mr_req *r, int status, const char *content_type, const char *body,
                          size_t len, const char *const *extra)
{
    if (!r->fcgx) {
        mr_log(MR_LOG_ERROR, "reply after the request finished (request %s); dropped", r->request_id);
        return;
    }
    if (r->status != 0) {
        mr_log(MR_LOG_ERROR, "second reply to request %s (status %d after %d); dropped",
               r->request_id, status, r->status);
        return;
    }
    if (status < 100 || status > 599)
        status = 500;
    FCGX_Stream *out = r->fcgx->out;
    /* Answers are private and current by default; a handler whose answer may be
     * cached (a public catalogue) says so with its own Cache-Control. */
    const char *cache = "Cache-Control: no-store\r\n";
    for (size_t i = 0; extra && extra[i]; i++)
        if (strncasecmp(extra[i], "Cache-Control:", 14) == 0)
            cache = "";
    char head[512];
    int n = snprintf(head, sizeof(head),
                     "Status: %d %s\r\nContent-Type: %s\r\n"
                     "%sX-Request-Id: %s\r\nContent-Length: %zu\r\n",
                     status, reason(status), content_type, cache, r->request_id, len);
    FCGX_PutStr(head, n, out);
    for (size_t i = 0; extra && extra[i]; i++) {
        /* A CR or LF would let a value smuggle in a header or split the response. */
        if (strpbrk(extra[i], "\r\n")) {
            mr_log(MR_LOG_ERROR, "header with CR/LF dropped (request %s)", r->request_id);
            continue;
        }
        FCGX_PutS(extra[i], out);
        FCGX_PutStr("\r\n", 2, out);
    }
    FCGX_PutStr("\r\n", 2, out);
    FCGX_PutStr(body, (int)len, out);
    r->status = status;
}

static void send_reply(mr_req *r, int status, const char *body, size_t len,
                       const char *const *extra)
{
    send_reply_ct(r, status, "application/json", body, len, extra);
}

void mr_reply_text(mr_req *r, int status, const char *content_type, const char *body, size_t len)
{
    /* The type goes into a header line: a CR or LF in it would split the answer. */
    if (!content_type || strpbrk(content_type, "\r\n") || strlen(content_type) > 200) {
        mr_reply_error(r, 500, "internal", "bad content type");
        return;
    }
    send_reply_ct(r, status, content_type, body, len, NULL);
}

void mr_reply_json_h(mr_req *r, int status, cJSON *body, const char *const *extra_headers)
{
    char *text = body ? mr_json_print(body) : NULL;
    cJSON_Delete(body);
    if (!text) {
        static const char oom[] =
            "{\"error\":{\"code\":\"internal\",\"message\":\"could not build the response\"}}";
        send_reply(r, 500, oom, sizeof(oom) - 1, NULL);
        return;
    }
    send_reply(r, status, text, strlen(text), extra_headers);
    free(text);
}

void mr_note(mr_req *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->note, sizeof(r->note), fmt, ap);
    va_end(ap);
}

void mr_reply_json(mr_req *r, int status, cJSON *body)
{
    mr_reply_json_h(r, status, body, NULL);
}

static void reply_error_h(mr_req *r, int status, const char *code, const char *message,
                          const char *const *extra)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *e = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(e, "code", code);
    cJSON_AddStringToObject(e, "message", message);
    mr_reply_json_h(r, status, root, extra);
}

void mr_reply_error(mr_req *r, int status, const char *code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    reply_error_h(r, status, code, msg, NULL);
}

void mr_reply_err(mr_req *r, mr_err e, const char *message)
{
    reply_error_h(r, mr_err_status(e), mr_err_name(e), message ? message : mr_err_name(e), NULL);
}

void mr_defer(mr_req *r, void (*fn)(mr_req *r, void *arg), void *arg, void (*free_arg)(void *))
{
    req_ctx *ctx = (req_ctx *)r;
    if (ctx->job) {
        mr_log(MR_LOG_ERROR, "second deferred job for request %s ignored", r->request_id);
        if (free_arg)
            free_arg(arg);
        return;
    }
    ctx->job = fn;
    ctx->job_arg = arg;
    ctx->job_free = free_arg;
}

/* ---- one request -------------------------------------------------------- */

static const char *param(FCGX_Request *rq, const char *name)
{
    const char *v = FCGX_GetParam(name, rq->envp);
    return v ? v : "";
}

static int valid_request_id(const char *s)
{
    size_t n = 0;
    for (; s[n]; n++) {
        char c = s[n];
        if (n >= 64 || !((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                         (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return n > 0;
}

static void new_request_id(char out[65])
{
    unsigned char rnd[16];
    if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
        /* Uniqueness, not secrecy, is what a request id needs. */
        uint64_t a = (uint64_t)mr_now_ms() ^ ((uint64_t)getpid() << 32), b = (uint64_t)time(NULL);
        memcpy(rnd, &a, 8);
        memcpy(rnd + 8, &b, 8);
    }
    mr_hex(rnd, sizeof rnd, out);
}

/* Copies the CGI params a handler (or its deferred job, which runs after
 * FCGX_Finish_r has freed them) may read into one allocation. */
static int copy_params(req_ctx *ctx, FCGX_Request *rq)
{
    mr_req *r = &ctx->pub;
    const char *uri = param(rq, "DOCUMENT_URI");
    if (!*uri)
        uri = param(rq, "SCRIPT_NAME");
    size_t plen = strlen(g_prefix);
    const char *path = uri;
    if (strncmp(uri, g_prefix, plen) == 0 && (uri[plen] == '/' || uri[plen] == '\0'))
        path = uri + plen;

    const char *src[] = {
        param(rq, "REQUEST_METHOD"), path, param(rq, "QUERY_STRING"),
        param(rq, "CONTENT_TYPE"), param(rq, "HTTP_AUTHORIZATION"),
        param(rq, "HTTP_STRIPE_SIGNATURE"), param(rq, "REMOTE_ADDR"),
        param(rq, "HTTP_USER_AGENT"),
    };
    const char **dst[] = {
        &r->method, &r->path, &r->query, &r->content_type, &r->authorization,
        &r->stripe_signature, &r->remote_addr, &r->user_agent,
    };
    size_t total = 0;
    for (size_t i = 0; i < MR_ARRAY_LEN(src); i++)
        total += strlen(src[i]) + 1;
    char *p = malloc(total);
    if (!p)
        return -1;
    ctx->strings = p;
    for (size_t i = 0; i < MR_ARRAY_LEN(src); i++) {
        size_t n = strlen(src[i]) + 1;
        memcpy(p, src[i], n);
        *dst[i] = p;
        p += n;
    }
    return 0;
}

/* The request's context as audit rows record it (mindroom.request):
 * {"ip": nginx's $remote_addr after real_ip, only when it is an IP address,
 *  "user_agent": at most 256 characters of printable ASCII (anything else becomes
 *  '?', so the text is valid in any database encoding), "request_id"}.
 * Returns a malloc'd string, or NULL when out of memory. */
static char *request_context(const mr_req *r)
{
    unsigned char addr[sizeof(struct in6_addr)];
    char ua[257];
    size_t n = 0;
    for (const char *p = r->user_agent; *p && n < sizeof ua - 1; p++)
        ua[n++] = (*p >= 0x20 && *p < 0x7f) ? *p : '?';
    ua[n] = '\0';
    cJSON *j = cJSON_CreateObject();
    if (!j)
        return NULL;
    if (inet_pton(AF_INET, r->remote_addr, addr) == 1 || inet_pton(AF_INET6, r->remote_addr, addr) == 1)
        cJSON_AddStringToObject(j, "ip", r->remote_addr);
    if (n)
        cJSON_AddStringToObject(j, "user_agent", ua);
    cJSON_AddStringToObject(j, "request_id", r->request_id);
    char *out = mr_json_print(j);
    cJSON_Delete(j);
    return out;
}

mr_identity mr_req_service(const mr_req *r)
{
    mr_identity who = mr_service_identity;
    who.request_json = r->who.request_json;
    return who;
}

const char *mr_req_header(const mr_req *r, const char *cgi_name)
{
    return r->fcgx ? FCGX_GetParam(cgi_name, r->fcgx->envp) : NULL;
}

int mr_req_instance_id(mr_req *r, char id[40])
{
    static const char *const members[] = {"instance_id", NULL};
    char v[64], err[200];
    id[0] = '\0';
    mr_err e = mr_http_query_param(r->query, "instance_id", v, sizeof v);
    int in_query = e != MR_ENOTFOUND;
    if (in_query && (e != MR_OK || !mr_is_uuid(v))) {
        mr_reply_error(r, 400, "invalid_instance_id", "instance_id must be a UUID, given once");
        return -1;
    }
    if (in_query)
        memcpy(id, v, strlen(v) + 1);
    if (r->body_len == 0)
        return 0;
    cJSON *body = mr_json_parse(r->body, r->body_len);
    const char *s = NULL;
    if (mr_json_members(body, members, err, sizeof err) != MR_OK) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_body", "body must be empty or {\"instance_id\": uuid}: %s",
                       err);
        return -1;
    }
    /* null is not "none given": that would be the current instance, or every one. */
    e = cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(body, "instance_id"))
            ? MR_EINVAL
            : mr_json_str(body, "instance_id", &s);
    int ok = e == MR_ENOTFOUND || (e == MR_OK && mr_is_uuid(s));
    if (ok && e == MR_OK && in_query) {
        cJSON_Delete(body);
        mr_reply_error(r, 400, "invalid_body", "instance_id is given in the query and the body: "
                                               "give it once");
        return -1;
    }
    if (ok && e == MR_OK)
        memcpy(id, s, strlen(s) + 1);
    cJSON_Delete(body);
    if (!ok) {
        mr_reply_error(r, 400, "invalid_instance_id", "instance_id must be a UUID, given once");
        return -1;
    }
    return 0;
}

/* 1 when method is one of the comma-separated list (NULL: none). */
static int method_listed(const char *list, const char *method)
{
    const char *m = list ? list : "";
    size_t n = strlen(method);
    while (*m) {
        const char *comma = strchr(m, ',');
        size_t len = comma ? (size_t)(comma - m) : strlen(m);
        if (len == n && n > 0 && strncmp(m, method, n) == 0)
            return 1;
        m += len;
        if (*m == ',')
            m++;
    }
    return 0;
}

static int method_allowed(const char *method)
{
    return method_listed(g_app->methods, method);
}

/* Identifies the caller (mr_auth.h) and checks the role. Replies 401/403 (or
 * 503 when the signing keys cannot be had) itself and returns -1 on refusal;
 * fills r->who on success. */
static int authenticate(mr_req *r, FCGX_Request *rq)
{
    char why[256];
    mr_err e = mr_auth_identify(g_auth, r->http, r->authorization, param(rq, "HTTP_APIKEY"),
                                r->user_agent, time(NULL), &r->who, why, sizeof(why));
    if (e != MR_OK) {
        if (e == MR_EAUTH)
            mr_reply_error(r, 401, "unauthorized", "%s", why);
        else
            mr_reply_err(r, e, why);
        return -1;
    }
    int ok = strcmp(r->who.role, "service_role") == 0 ||
             (g_app->auth == MR_AUTH_USER && strcmp(r->who.role, "authenticated") == 0 &&
              r->who.sub[0]);
    if (!ok) {
        /* r->who stays for the access log (and is freed with the request). */
        mr_reply_error(r, 403, "forbidden", "role %s may not call %s",
                       r->who.role[0] ? r->who.role : "(none)", g_app->name);
        return -1;
    }
    /* An app the user authorised acts with the user's role and sub, but not with
     * everything the user may do: what it may call is the function's to say, and
     * nothing unless it says so (Supabase's guidance for OAuth clients: least
     * privilege, read-only unless granted). */
    if (r->who.oauth_client && !method_listed(g_app->oauth_client_methods, r->method)) {
        mr_reply_error(r, 403, "oauth_client_not_allowed",
                       "%.16s %s takes the user's own session, not a token issued to a "
                       "third-party app (client_id)", r->method, g_app->name);
        return -1;
    }
    return 0;
}

static int fcgx_reader(void *ctx, char *buf, int n)
{
    return FCGX_GetStr(buf, n, (FCGX_Stream *)ctx);
}

static int read_body(mr_req *r, FCGX_Request *rq)
{
    size_t len;
    mr_err e = mr_http_content_length(param(rq, "CONTENT_LENGTH"), g_max_body, &len);
    if (e == MR_ETOOBIG) {
        mr_reply_error(r, 413, "too_big", "request body exceeds %zu bytes", g_max_body);
        return -1;
    }
    if (e != MR_OK) {
        mr_reply_error(r, 400, "invalid", "malformed Content-Length");
        return -1;
    }
    r->body = mr_http_read_exact(fcgx_reader, rq->in, len, &e);
    if (!r->body) {
        if (e == MR_EINVAL)
            mr_reply_error(r, 400, "invalid", "request body shorter than Content-Length");
        else
            mr_reply_err(r, e, "could not read the request body");
        return -1;
    }
    r->body_len = len;
    return 0;
}

/* The first half of a request: its params, method, authentication and body.
 * Returns 1 when it is the handler's to answer, 0 when it was answered here. */
static int serve_begin(req_ctx *ctx, FCGX_Request *rq)
{
    clock_gettime(CLOCK_MONOTONIC, &ctx->arrived);
    mr_req *r = &ctx->pub;
    r->fcgx = rq;
    r->started_ms = mr_now_ms();
    r->db = g_db;
    r->http = g_http;

    const char *xrid = param(rq, "HTTP_X_REQUEST_ID");
    if (valid_request_id(xrid))
        memcpy(r->request_id, xrid, strlen(xrid) + 1);
    else
        new_request_id(r->request_id);

    int copied = copy_params(ctx, rq) == 0;
    if (copied)
        ctx->request_json = request_context(r);
    if (!copied || !ctx->request_json) {
        static const char *const empty = "";
        if (!copied) {
            r->method = r->path = r->query = r->content_type = r->authorization = empty;
            r->stripe_signature = r->remote_addr = r->user_agent = empty;
        }
        mr_reply_error(r, 500, "internal", "out of memory");
    } else if (!method_allowed(r->method)) {
        /* RFC 9110 10.2.1: Allow = #method, "GET, POST" (methods is "GET,POST"). */
        char allow[160] = "Allow: ";
        size_t len = strlen(allow);
        for (const char *m = g_app->methods ? g_app->methods : ""; *m && len + 3 < sizeof allow; m++) {
            allow[len++] = *m;
            if (*m == ',')
                allow[len++] = ' ';
        }
        allow[len] = '\0';
        const char *const hdrs[] = {allow, NULL};
        char msg[128];
        snprintf(msg, sizeof(msg), "method %.16s not allowed", r->method);
        reply_error_h(r, 405, "method_not_allowed", msg, hdrs);
    } else if ((g_app->auth == MR_AUTH_SERVICE || g_app->auth == MR_AUTH_USER) &&
               authenticate(r, rq) != 0) {
        /* replied */
    } else if (read_body(r, rq) != 0) {
        /* replied */
    } else {
        /* Set after authentication, which fills r->who afresh. */
        r->who.request_json = ctx->request_json;
        return 1;
    }
    return 0;
}

/* The second half: the log line, the metrics, the end of the connection (then
 * serve_after). */
static void serve_end(req_ctx *ctx)
{
    mr_req *r = &ctx->pub;
    FCGX_Request *rq = r->fcgx;
    if (r->status == 0) {
        mr_log(MR_LOG_ERROR, "handler sent no reply (request %s)", r->request_id);
        mr_reply_error(r, 500, "internal", "the function did not answer");
    }
    /* The request's one log line, before the caller has the answer: whoever
     * reads the log after an answer finds its line (tests, an operator's
     * tail -f); a write of one short line costs microseconds. A batching
     * worker holds it instead (mr_log_hold) and writes it after the answer,
     * with the lines of the requests served beside it (mr_log.c says when). */
    mr_log_request(r->request_id, r->method, r->status, mr_now_ms() - r->started_ms, r->who.role,
                   r->note);
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    mr_metrics_request(r->status, (int64_t)(t1.tv_sec - ctx->arrived.tv_sec) * 1000000 +
                                      (t1.tv_nsec - ctx->arrived.tv_nsec) / 1000);

    /* The caller has the whole answer once the request is finished; whatever
     * the handler deferred runs after that, off the caller's clock.
     * How the connection ends: libfcgi's close half-closes and then waits for
     * nginx to close its side (poll + read), one more sleep and wake-up per
     * request for both processes, the largest single cost of a small request on
     * two cores. When stdin has been read to its end record nothing is left
     * unread on our side, so a plain close loses nothing (the answer is already
     * in nginx's socket buffer): FCGX_Detach makes FCGX_Finish_r do just that.
     * A request answered before its body was read keeps libfcgi's draining close. */
    if (FCGX_GetChar(rq->in) == EOF && !FCGX_GetError(rq->in))
        FCGX_Detach(rq);
    /* One request per connection (nginx's fastcgi_keep_conn off): the next one
     * comes through accept and its deadline. */
    rq->keepConnection = 0;
    FCGX_Finish_r(rq);
    r->fcgx = NULL;
}

/* After the answer: the deferred job, then what the request held. */
static void serve_after(req_ctx *ctx)
{
    mr_req *r = &ctx->pub;
    if (ctx->job) {
        int64_t t0 = mr_now_ms();
        ctx->job(r, ctx->job_arg);
        mr_log(MR_LOG_DEBUG, "deferred job of %s took %lld ms", r->request_id,
               (long long)(mr_now_ms() - t0));
    }
    if (ctx->job_free)
        ctx->job_free(ctx->job_arg);
    mr_db_release(g_db);
    free(r->who.claims_json);
    /* A body may hold secrets (the provisioner's is an instance's environment and keys). */
    if (r->body)
        OPENSSL_cleanse(r->body, r->body_len);
    free(r->body);
    /* So does the Authorization header (a bearer token, an API key), kept in strings. */
    if (ctx->strings)
        OPENSSL_cleanse((char *)r->authorization, strlen(r->authorization));
    free(ctx->strings);
    free(ctx->request_json);
}

static void serve(FCGX_Request *rq)
{
    req_ctx ctx;
    memset(&ctx, 0, sizeof(ctx));
    if (serve_begin(&ctx, rq))
        g_app->handle(&ctx.pub);
    serve_end(&ctx);
    serve_after(&ctx);
}

/* Requests taken together (mr_app.handle_batch): each begun, the ones left to
 * the handler handled at once, each ended; the deferred jobs only once every
 * caller has its answer. */
static void serve_batch(FCGX_Request *rqs, size_t n)
{
    req_ctx ctx[MR_BATCH_MAX];
    mr_req *ready[MR_BATCH_MAX];
    size_t k = 0;
    memset(ctx, 0, sizeof(ctx[0]) * n);
    for (size_t i = 0; i < n; i++)
        if (serve_begin(&ctx[i], &rqs[i]))
            ready[k++] = &ctx[i].pub;
    if (k == 1)
        g_app->handle(ready[0]);
    else if (k > 1)
        g_app->handle_batch(ready, k);
    for (size_t i = 0; i < n; i++)
        serve_end(&ctx[i]);
    for (size_t i = 0; i < n; i++)
        serve_after(&ctx[i]);
}

/* ---- worker ------------------------------------------------------------ */

static void on_stop(int sig)
{
    (void)sig;
    g_stop = 1;
    FCGX_ShutdownPending();
}

/* FastCGI records (the FastCGI specification, section 3.3). */
#define FCGI_HEADER_LEN 8
#define FCGI_BEGIN 1
#define FCGI_PARAMS_T 4
#define FCGI_STDIN_T 5
#define FCGI_RESPONDER_ROLE 1

/* Looks at the first len bytes a connection sent. Returns 1 when they hold a
 * whole responder request (BEGIN_REQUEST, PARAMS records up to the empty one,
 * STDIN records up to the empty one), 0 when more is to come, -1 when they are
 * not such a request. *params_done says whether the params have all arrived. */
static int request_state(const unsigned char *b, size_t len, int *params_done)
{
    size_t off = 0;
    unsigned id = 0;
    *params_done = 0;
    while (off + FCGI_HEADER_LEN <= len) {
        const unsigned char *h = b + off;
        unsigned type = h[1], rid = (unsigned)h[2] << 8 | h[3];
        size_t clen = (size_t)h[4] << 8 | h[5], plen = h[6];
        if (h[0] != 1)
            return -1;
        if (off == 0) {
            if (type != FCGI_BEGIN || clen != 8 || rid == 0)
                return -1;
            if (len < FCGI_HEADER_LEN + 8)
                return 0;
            if (((unsigned)h[8] << 8 | h[9]) != FCGI_RESPONDER_ROLE)
                return -1;
            id = rid;
        } else if (rid != id) {
            return -1;
        } else if (!*params_done) {
            if (type != FCGI_PARAMS_T)
                return -1;
            *params_done = clen == 0;
        } else {
            if (type != FCGI_STDIN_T)
                return -1;
            if (clen == 0)
                return 1;
        }
        off += FCGI_HEADER_LEN + clen + plen;
    }
    return 0;
}

/* A body's worth of bytes that a sender stopped at is the socket's queue being
 * full (nginx writes a request at once), not a slow peer: FastCGI's largest record. */
#define PEEK_FULL_MIN 65536

/* One look, without waiting, at what connection fd has sent (*n: the bytes seen,
 * or recv's answer; had: what the look before saw). Returns 1 when it is a whole
 * request, or when its params are complete and its body is more than can be seen
 * at once: larger than the look-ahead buffer, or stopped by the socket's queue
 * (at least PEEK_FULL_MIN bytes, no more since the last look; a unix socket queues
 * about 200 KB). Its reads then have the deadline each. 0 when more is to come or
 * nothing came, -1 when it is not a responder request. */
static int look(int fd, ssize_t *n, ssize_t had)
{
    *n = recv(fd, g_peek, g_peek_cap, MSG_PEEK | MSG_DONTWAIT);
    if (*n <= 0)
        return 0;
    int params_done;
    int st = request_state(g_peek, (size_t)*n, &params_done);
    OPENSSL_cleanse(g_peek, (size_t)*n); /* a request's bytes: its body may hold secrets */
    if (st > 0 || (st == 0 && params_done &&
                   ((size_t)*n == g_peek_cap || (*n >= PEEK_FULL_MIN && *n == had))))
        return 1;
    return st < 0 || (size_t)*n == g_peek_cap ? -1 : 0;
}

/* Waits until connection fd has delivered a whole request (look), or the read
 * deadline. Returns 0 when it has, else -1 with why filled and *quiet set when the
 * peer went away without sending a byte (a connect-only probe of the socket: not
 * an incident). */
static int await_request(int fd, char *why, size_t whylen, int *quiet)
{
    int64_t deadline = mr_now_ms() + g_read_timeout_ms;
    int seen = 0;
    ssize_t had = 0; /* bytes the last look saw */
    *quiet = 0;
    for (;;) {
        ssize_t n;
        int st = look(fd, &n, had);
        if (n > 0) {
            seen = 1;
            if (st > 0)
                return 0;
            if (st < 0) {
                snprintf(why, whylen, "not a FastCGI responder request");
                return -1;
            }
        } else if (n == 0) {
            *quiet = !seen;
            snprintf(why, whylen, "closed before sending a whole request");
            return -1;
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            *quiet = !seen;
            snprintf(why, whylen, "%s", strerror(errno));
            return -1;
        }
        int64_t left = deadline - mr_now_ms();
        if (left <= 0) {
            snprintf(why, whylen, "no whole request within %lld ms (MR_READ_TIMEOUT_MS)",
                     (long long)g_read_timeout_ms);
            return -1;
        }
        /* Bytes only peeked stay readable, so poll returns at once until more
         * arrive: while a look finds nothing new, the next one is a millisecond
         * later (a peer that stops mid-request must not make its worker spin). */
        struct pollfd p = {.fd = fd, .events = POLLIN};
        mr_log_flush(); /* the lines held must not wait for a slow peer */
        if (n > 0 && n == had)
            (void)poll(NULL, 0, 1);
        else
            (void)poll(&p, 1, (int)(left > INT32_MAX ? INT32_MAX : left));
        if (n > 0)
            had = n;
    }
}

/* Hands an accepted connection to libfcgi once its request has arrived (whole:
 * the caller's look saw it arrive). Returns 0 with rq holding the request, -1 when the
 * connection was dropped (closed, logged, counted). */
static int take_request(FCGX_Request *rq, int fd, int whole)
{
    char why[160];
    int quiet;
    if (!whole && await_request(fd, why, sizeof why, &quiet) != 0) {
        if (quiet) {
            mr_log(MR_LOG_DEBUG, "a connection closed without sending anything");
        } else {
            mr_log(MR_LOG_WARN, "dropped a connection: %s", why);
            mr_metrics_dropped_connection();
        }
        close(fd);
        return -1;
    }
    /* Whatever is still read or written on it (a body larger than the look-ahead,
     * the answer to a peer that stops reading) has the same deadline per call. */
    struct timeval tv = {.tv_sec = g_read_timeout_ms / 1000,
                         .tv_usec = (g_read_timeout_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    rq->ipcFd = fd;
    rq->keepConnection = 1;
    int rc = FCGX_Accept_r(rq);
    if (rc < 0) {
        /* libfcgi found the request unreadable and closed the connection. */
        mr_log(MR_LOG_WARN, "dropped a connection: its FastCGI request could not be read (%d)", rc);
        mr_metrics_dropped_connection();
        return -1;
    }
    return 0;
}

/* How many requests a worker of app takes at once (1: no batching). */
static size_t batch_size(const mr_app *app)
{
    if (!app->handle_batch || app->batch_max <= 1)
        return 1;
    return app->batch_max < MR_BATCH_MAX ? (size_t)app->batch_max : MR_BATCH_MAX;
}

static int worker_main(int listen_fd)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: accept must return */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    sigset_t stopset;
    sigemptyset(&stopset);
    sigaddset(&stopset, SIGTERM);
    sigaddset(&stopset, SIGINT);
    /* Everything else the parent blocked goes back to normal; the stop
     * signals stay blocked except around accept. */
    sigprocmask(SIG_SETMASK, &stopset, NULL);

    /* A function that needs no database must start without one. */
    const char *dburl = mr_config_getenv("DATABASE_URL");
    if (dburl && *dburl)
        g_db = mr_db_open(dburl);
    g_http = mr_httpc_open();
    /* Room for a whole ordinary request: the params and a body at the cap. */
    g_peek_cap = g_max_body + 65536 < 262144 ? g_max_body + 65536 : 262144;
    g_peek = malloc(g_peek_cap);
    if ((dburl && *dburl && !g_db) || !g_http || !g_peek) {
        mr_log(MR_LOG_ERROR, "worker could not allocate its database or HTTP handle");
        return 1;
    }
    if (g_app->worker_init)
        g_app->worker_init();

    size_t batch = batch_size(g_app);
    FCGX_Request rqs[MR_BATCH_MAX];
    for (size_t i = 0; i < batch; i++)
        if (FCGX_InitRequest(&rqs[i], -1, FCGI_FAIL_ACCEPT_ON_INTR) != 0) {
            mr_log(MR_LOG_ERROR, "FCGX_InitRequest failed");
            return 1;
        }
    FCGX_Request *rq = &rqs[0];
    /* A batching worker waits in an epoll of its own (the header says why). */
    int ep = -1;
    if (batch > 1) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE};
        ep = epoll_create1(EPOLL_CLOEXEC);
        if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, listen_fd, &ev) != 0) {
            mr_log(MR_LOG_ERROR, "epoll: %s", strerror(errno));
            return 1;
        }
    }
    sigset_t waitset; /* while waiting in epoll: nothing blocked */
    sigemptyset(&waitset);
    /* A batching worker writes its request lines when it is about to wait, or
     * several at a time while connections keep coming (mr_log.c). */
    if (ep >= 0)
        mr_log_hold(1);
    int status = 0;
    for (;;) {
        /* A stop that arrived while a request was served is taken here, before
         * the next connection: even when connections keep coming. */
        sigprocmask(SIG_UNBLOCK, &stopset, NULL);
        int fd = g_stop ? -1 : accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        int aerr = errno;
        sigprocmask(SIG_BLOCK, &stopset, NULL);
        if (fd < 0 && ep >= 0 && !g_stop && aerr == EAGAIN) {
            /* Nothing waiting: sleep until a connection (or a stop) comes. */
            struct epoll_event ev;
            mr_log_flush();
            (void)epoll_pwait(ep, &ev, 1, -1, &waitset);
            continue;
        }
        if (fd < 0) {
            if (g_stop)
                break;
            if (aerr == EINTR || aerr == ECONNABORTED || aerr == EPROTO || aerr == EAGAIN)
                continue;
            if (aerr == EMFILE || aerr == ENFILE || aerr == ENOBUFS || aerr == ENOMEM) {
                mr_log(MR_LOG_WARN, "accept: %s; retrying in 100 ms", strerror(aerr));
                struct timespec ts = {0, 100 * 1000000L};
                nanosleep(&ts, NULL);
                continue;
            }
            mr_log(MR_LOG_ERROR, "accept failed: %s; worker exits", strerror(aerr));
            status = 1;
            break;
        }
        if (take_request(rq, fd, 0) != 0)
            continue;
        /* Batching: the connections already waiting whose requests have arrived
         * whole join this one; one still arriving is served after the batch, with
         * its own deadline, so that a slow peer delays no one else. */
        size_t n = 1, nlate = 0;
        int late[MR_BATCH_MAX];
        while (n + nlate < batch) {
            int more = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
            if (more < 0)
                break;
            ssize_t seen;
            if (look(more, &seen, -1) <= 0)
                late[nlate++] = more;
            else if (take_request(&rqs[n], more, 1) == 0)
                n++;
        }
        if (n == 1)
            serve(rq); /* a stop that arrived meanwhile waits for this to finish */
        else
            serve_batch(rqs, n);
        for (size_t i = 0; i < nlate; i++)
            if (take_request(rq, late[i], 0) == 0)
                serve(rq);
        if (g_stop)
            break;
    }
    mr_log_hold(0);
    if (ep >= 0)
        close(ep);
    for (size_t i = 1; i < batch; i++)
        FCGX_Free(&rqs[i], 1);
    FCGX_Free(rq, 1);
    free(g_peek);
    g_peek = NULL;
    mr_db_close(g_db);
    mr_httpc_close(g_http);
    g_db = NULL;
    g_http = NULL;
    return status;
}

/* ---- parent ------------------------------------------------------------ */

static void usage(const char *name)
{
    fprintf(stderr,
            "usage: %s [--socket PATH] [--workers N] | --version\n"
            "  --socket PATH  unix socket to listen on (MR_SOCKET; default ./%s.sock),\n"
            "                 unless systemd passes one (LISTEN_FDS)\n"
            "  --workers N    pre-forked workers (MR_WORKERS; default: online cores, times\n"
            "                 the function's own factor)\n"
            "  --version      print the version and exit\n",
            name, name);
}

/* The worker processes' entry point for mr_proc_supervise. */
static int worker_child(void *arg)
{
    return worker_main(*(const int *)arg);
}

/* A listening socket on a unix path or "host:port" (":port": every address).
 * libfcgi's FCGX_OpenSocket would exit() the process on a failed bind; this
 * returns -1 with errno set instead, so the caller can say what went wrong. */
static int open_listener(const char *where)
{
    const char *colon = strrchr(where, ':');
    int fd;
    if (!colon) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(where) >= sizeof sa.sun_path) {
            errno = ENAMETOOLONG;
            return -1;
        }
        memcpy(sa.sun_path, where, strlen(where) + 1);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 ||
                        listen(fd, LISTEN_BACKLOG) != 0)) {
            int saved = errno;
            close(fd);
            errno = saved;
            return -1;
        }
        return fd;
    }
    char host[256];
    size_t hlen = (size_t)(colon - where);
    if (hlen >= sizeof host) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(host, where, hlen);
    host[hlen] = '\0';
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV}, *ai = NULL;
    if (getaddrinfo(hlen ? host : NULL, colon + 1, &hints, &ai) != 0 || !ai) {
        errno = EINVAL;
        return -1;
    }
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    int one = 1;
    if (fd >= 0 && (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
                    bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, LISTEN_BACKLOG) != 0)) {
        int saved = errno;
        close(fd);
        fd = -1;
        errno = saved;
    }
    freeaddrinfo(ai);
    return fd;
}

/* Binds the unix (or host:port) socket at path with the given mode. A unix socket
 * is bound under a temporary name and renamed over the path: a rolling restart
 * (new binary first, old one drained after) never leaves nginx a moment with no
 * socket at the path (the restart drill's 502s). Returns the listening fd, or -1
 * (logged). */
static int bind_socket(const char *socket_path, mode_t mode)
{
    struct stat st;
    int is_unix = !strchr(socket_path, ':');
    char bind_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    const char *listen_path = socket_path;
    if (is_unix && lstat(socket_path, &st) == 0 && !S_ISSOCK(st.st_mode)) {
        mr_log(MR_LOG_ERROR, "%s exists and is not a socket", socket_path);
        return -1;
    }
    if (is_unix && snprintf(bind_path, sizeof bind_path, "%s.%ld.new", socket_path,
                            (long)getpid()) < (int)sizeof bind_path) {
        unlink(bind_path);
        listen_path = bind_path;
    } else if (is_unix && lstat(socket_path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        unlink(socket_path); /* path too long for the temporary name: replace in place */
    }
    /* No moment with a wider mode than asked for: the umask covers the bind. */
    mode_t old = is_unix ? umask((mode_t)(~mode & 0777)) : 0;
    int fd = open_listener(listen_path);
    int saved = errno;
    if (is_unix)
        umask(old);
    if (fd < 0) {
        mr_log(MR_LOG_ERROR, "cannot listen on %s: %s", socket_path, strerror(saved));
        return -1;
    }
    if (is_unix && chmod(listen_path, mode) != 0) {
        mr_log(MR_LOG_ERROR, "chmod %s: %s", socket_path, strerror(errno));
        unlink(listen_path);
        close(fd);
        return -1;
    }
    if (listen_path != socket_path && rename(listen_path, socket_path) != 0) {
        mr_log(MR_LOG_ERROR, "cannot move the socket to %s: %s", socket_path, strerror(errno));
        unlink(listen_path);
        close(fd);
        return -1;
    }
    return fd;
}

int mr_app_main(const mr_app *app, int argc, char **argv)
{
    g_app = app;
    if (mr_version_arg(app->name, argc, argv))
        return 0;
    const char *socket_path = NULL;
    const char *workers_arg = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--socket") == 0 && i + 1 < argc) {
            socket_path = argv[++i];
        } else if (strcmp(argv[i], "--workers") == 0 && i + 1 < argc) {
            workers_arg = argv[++i];
        } else {
            usage(app->name);
            return strcmp(argv[i], "--help") == 0 ? 0 : 2;
        }
    }

    mr_log_init_env(app->name);
    snprintf(g_prefix, sizeof(g_prefix), "/functions/v1/%s", app->name);

    /* Every setting is checked here, before fork, so a bad one stops the
     * function at start-up instead of crash-looping its workers. */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int64_t nworkers;
    char msg[256];
    if (workers_arg) {
        if (mr_config_parse_int("--workers", workers_arg, 0, 1, MAX_WORKERS, &nworkers, msg,
                                sizeof(msg)) != MR_OK) {
            fprintf(stderr, "config: %s\n", msg);
            return 2;
        }
    } else {
        long per_core = app->workers_per_core > 0 ? app->workers_per_core : 1;
        long dflt = (ncpu > 0 ? ncpu : 1) * per_core;
        nworkers = mr_config_int("MR_WORKERS", dflt < MAX_WORKERS ? dflt : MAX_WORKERS, 1,
                                 MAX_WORKERS);
    }
    g_max_body = (size_t)mr_config_int("MR_MAX_BODY", MR_DEFAULT_MAX_BODY, 1, 64 << 20);
    g_read_timeout_ms = mr_config_int("MR_READ_TIMEOUT_MS", MR_DL_FCGI_READ_MS, 100, 600000);
    long mode;
    /* Owner and group only: nginx reaches the socket as its owner (the local
     * stack) or through the group (a socket unit's SocketGroup). */
    const char *mode_s = mr_config_str("MR_SOCKET_MODE", "0660");
    char *end;
    mode = strtol(mode_s, &end, 8);
    if (*end || mode < 0 || mode > 0777) {
        fprintf(stderr, "config: MR_SOCKET_MODE must be an octal mode like 0660\n");
        return 2;
    }
    if (mode & 0007)
        mr_log(MR_LOG_WARN, "MR_SOCKET_MODE %04lo lets every local user reach the function, "
               "bypassing nginx's limits", mode);
    if (!socket_path)
        socket_path = mr_config_str("MR_SOCKET", "");
    char default_path[200];
    if (!*socket_path) {
        snprintf(default_path, sizeof(default_path), "%s.sock", app->name);
        socket_path = default_path;
    }
    if (app->auth == MR_AUTH_SERVICE || app->auth == MR_AUTH_USER) {
        /* The workers inherit it; each then keeps its own JWKS cache. */
        if (mr_auth_from_env(&g_auth, msg, sizeof(msg)) != MR_OK) {
            fprintf(stderr, "config: %s\n", msg);
            return 2;
        }
    }
    const char *dburl = mr_config_getenv("DATABASE_URL");
    if (dburl && *dburl) {
        char *perr = NULL;
        PQconninfoOption *opts = PQconninfoParse(dburl, &perr);
        if (!opts) {
            /* libpq's message can quote the string, password included: not shown. */
            fprintf(stderr, "config: DATABASE_URL is not a valid libpq connection string\n");
            PQfreemem(perr);
            return 2;
        }
        PQconninfoFree(opts);
    }
    mr_config_int("MR_DB_STATEMENT_TIMEOUT_MS", MR_DL_DB_STATEMENT_MS, 0, 24 * 3600 * 1000);
    int fd = mr_sd_listen_fd(msg, sizeof msg);
    if (fd == -2) {
        fprintf(stderr, "config: %s\n", msg);
        return 2;
    }
    if (app->init)
        app->init();
    mr_config_seal(0); /* every setting is read: the secrets this function did not read go */
    /* From here on the process owns a metrics segment, then the socket: a stop
     * waits for the supervisor, which cleans both up (mr_proc.h says why). */
    mr_proc_hold_signals();
    if (mr_metrics_open(app->name, MR_METRICS_FUNCTION, msg, sizeof msg) != MR_OK) {
        fprintf(stderr, "config: %s\n", msg);
        return 2;
    }

    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (FCGX_Init() != 0) {
        mr_log(MR_LOG_ERROR, "FCGX_Init failed");
        mr_metrics_close();
        return 1;
    }
    struct stat bound;
    int is_path = 0;
    if (fd >= 0) {
        /* systemd's socket (mindroom-function@.socket): its path, owner and mode
         * are the socket unit's, and it outlives this process. Workers block in
         * accept on it, so it must not be in non-blocking mode (unless the
         * function batches: below). */
        int fl = fcntl(fd, F_GETFL);
        if (fl >= 0 && (fl & O_NONBLOCK))
            fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
        struct sockaddr_un addr;
        socklen_t alen = sizeof addr;
        memset(&addr, 0, sizeof addr);
        if (getsockname(fd, (struct sockaddr *)&addr, &alen) == 0 && addr.sun_family == AF_UNIX &&
            addr.sun_path[0])
            snprintf(default_path, sizeof default_path, "%s (from systemd)", addr.sun_path);
        else
            snprintf(default_path, sizeof default_path, "the socket systemd passed");
        socket_path = default_path;
    } else {
        fd = bind_socket(socket_path, (mode_t)mode);
        if (fd < 0) {
            mr_metrics_close();
            return 1;
        }
        is_path = !strchr(socket_path, ':') && stat(socket_path, &bound) == 0;
    }

    /* A batching function's workers wait in epoll and accept without blocking. */
    if (batch_size(app) > 1) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
            mr_log(MR_LOG_ERROR, "fcntl: %s", strerror(errno));
            mr_metrics_close();
            return 1;
        }
    }

    /* A write to a closed nginx connection must be an EPIPE error in workers,
     * not death. (The supervisor takes its own signals synchronously.) */
    signal(SIGPIPE, SIG_IGN);

    mr_log(MR_LOG_INFO, "listening on %s with %d workers (version %s)", socket_path, (int)nworkers,
           mr_version());
    int rc = mr_proc_supervise((int)nworkers, worker_child, &fd);
    close(fd);
    /* Remove the socket only if it is still ours: a newer instance may have
     * replaced it while this one drained. */
    struct stat st;
    if (is_path && stat(socket_path, &st) == 0 && st.st_ino == bound.st_ino &&
        st.st_dev == bound.st_dev)
        unlink(socket_path);
    mr_metrics_close();
    curl_global_cleanup();
    return rc;
}
