/* mr_httpc.c: outbound HTTP with deadlines on one reusable libcurl handle.
 *
 * The easy handle is reset (options only) before each call, so connections
 * and TLS sessions are reused across a worker's requests while no option of
 * one call leaks into the next. */
#include "mr_httpc.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include <curl/curl.h>

#define DEFAULT_CONNECT_MS 2000L
#define DEFAULT_TIMEOUT_MS 10000L
#define DEFAULT_MAX_BODY ((size_t)1 << 20)
#define MAX_HEADERS 16384

struct mr_httpc {
    CURL *easy;
};

typedef struct {
    char *buf;
    size_t len, cap, max;
    int too_big;
} sink;

mr_httpc *mr_httpc_open(void)
{
    /* Reference-counted by libcurl; the runtime already called it before fork. */
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return NULL;
    mr_httpc *c = calloc(1, sizeof(*c));
    if (!c) {
        curl_global_cleanup();
        return NULL;
    }
    c->easy = curl_easy_init();
    if (!c->easy) {
        free(c);
        curl_global_cleanup();
        return NULL;
    }
    return c;
}

void mr_httpc_close(mr_httpc *c)
{
    if (!c)
        return;
    curl_easy_cleanup(c->easy);
    free(c);
    curl_global_cleanup();
}

static size_t on_data(char *data, size_t size, size_t nmemb, void *userp)
{
    sink *s = userp;
    size_t n = size * nmemb;
    /* The cap is enforced on bytes received, whatever Content-Length claimed. */
    if (n > s->max - s->len) {
        s->too_big = 1;
        return 0;
    }
    if (s->len + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->len + n + 1)
            cap *= 2;
        char *b = realloc(s->buf, cap);
        if (!b)
            return 0;
        s->buf = b;
        s->cap = cap;
    }
    memcpy(s->buf + s->len, data, n);
    s->len += n;
    s->buf[s->len] = '\0';
    return n;
}

static int on_progress(void *p, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                       curl_off_t ulnow)
{
    (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
    const mr_httpc_req *req = p;
    return req->abort_cb(req->abort_arg) ? 1 : 0;
}

/* Keeps the header lines of the last answer only: a status line starts over
 * (an interim 1xx answer has its own headers). Lines past MAX_HEADERS are
 * dropped, never the transfer. */
static size_t on_header(char *data, size_t size, size_t nmemb, void *userp)
{
    sink *h = userp;
    size_t n = size * nmemb;
    if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        h->len = 0;
        if (h->buf)
            h->buf[0] = '\0';
        return n;
    }
    if (n > h->max - h->len)
        return n;
    if (!h->buf && !(h->buf = malloc(h->max + 1)))
        return 0;
    memcpy(h->buf + h->len, data, n);
    h->len += n;
    h->buf[h->len] = '\0';
    return n;
}

/* The address guard of one call (mr_httpc_req.addr_rule). */
typedef struct {
    const mr_addr_rule *rule;
    int opened;            /* a socket was opened to an allowed address */
    const char *refusal;   /* why the last refused address was refused */
    char refused[INET6_ADDRSTRLEN];
} guard;

/* libcurl calls this for each address it is about to connect to, after DNS: the
 * only place where what a name resolved to can be checked without a window before
 * connect(). A refused address is skipped; curl moves on to the next one. */
static curl_socket_t on_open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *a)
{
    guard *g = clientp;
    const void *ip = mr_addr_in(a->family, &a->addr);
    (void)purpose;
    const char *no = ip ? mr_addr_refusal(a->family, ip, g->rule) : "not an IP address";
    if (no) {
        g->refusal = no;
        if (!ip || !inet_ntop(a->family, ip, g->refused, sizeof g->refused))
            snprintf(g->refused, sizeof g->refused, "an address");
        return CURL_SOCKET_BAD;
    }
    g->opened = 1;
    return socket(a->family, a->socktype, a->protocol);
}

mr_err mr_httpc_do(mr_httpc *c, const mr_httpc_req *req, mr_httpc_resp *resp,
                   char *err, size_t errlen)
{
    memset(resp, 0, sizeof(*resp));
    if (!c || !req->url || !req->method)
        return mr_seterr(err, errlen, MR_EINVAL, "missing url or method");
    CURL *e = c->easy;
    curl_easy_reset(e);

    sink s = {.max = req->max_body ? req->max_body : DEFAULT_MAX_BODY};
    sink h = {.max = MAX_HEADERS};
    struct curl_slist *hdrs = NULL, *tmp;
    for (size_t i = 0; req->headers && req->headers[i]; i++) {
        if (!(tmp = curl_slist_append(hdrs, req->headers[i])))
            goto oom;
        hdrs = tmp;
    }
    /* Without this, curl waits up to a second for "100 Continue" on larger bodies. */
    if (!(tmp = curl_slist_append(hdrs, "Expect:")))
        goto oom;
    hdrs = tmp;

    curl_easy_setopt(e, CURLOPT_URL, req->url);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                     req->connect_timeout_ms > 0 ? req->connect_timeout_ms : DEFAULT_CONNECT_MS);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, req->timeout_ms > 0 ? req->timeout_ms : DEFAULT_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)s.max);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &s);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, &h);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "mindroom-control-plane");
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    guard g = {.rule = req->addr_rule};
    if (req->addr_rule) {
        curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, on_open_socket);
        curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, &g);
    }
    if (req->abort_cb) {
        curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, on_progress);
        curl_easy_setopt(e, CURLOPT_XFERINFODATA, (void *)req);
    }
    if (strcmp(req->method, "GET") == 0) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else {
        if (strcmp(req->method, "POST") != 0)
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, req->method);
        if (req->body || strcmp(req->method, "POST") == 0) {
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req->body_len);
            curl_easy_setopt(e, CURLOPT_POSTFIELDS, req->body ? req->body : "");
        }
    }

    CURLcode rc = curl_easy_perform(e);
    curl_slist_free_all(hdrs);
    hdrs = NULL;
    if (rc != CURLE_OK) {
        free(s.buf);
        free(h.buf);
        long got = 0; /* the status line's code, 0 before one came */
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &got);
        resp->outcome = rc == CURLE_ABORTED_BY_CALLBACK ? MR_HTTPC_ABORTED
                        : rc == CURLE_URL_MALFORMAT || rc == CURLE_UNSUPPORTED_PROTOCOL
                            ? MR_HTTPC_UNSENT
                        : got ? MR_HTTPC_ANSWERED : MR_HTTPC_NO_ANSWER;
        if (s.too_big || rc == CURLE_FILESIZE_EXCEEDED)
            return mr_seterr(err, errlen, MR_ETRANSIENT, "response larger than %zu bytes", s.max);
        if (rc == CURLE_ABORTED_BY_CALLBACK)
            return mr_seterr(err, errlen, MR_ETRANSIENT, "aborted");
        if (rc == CURLE_URL_MALFORMAT || rc == CURLE_UNSUPPORTED_PROTOCOL)
            return mr_seterr(err, errlen, MR_EINVAL, "bad URL: %s", curl_easy_strerror(rc));
        /* Refused only when no allowed address was tried: otherwise the failure is
         * that address's, and curl's message says it. */
        if (g.refusal && !g.opened)
            return mr_seterr(err, errlen, MR_ETRANSIENT, "not connected to %s: it is %s",
                             g.refused, g.refusal);
        return mr_seterr(err, errlen, MR_ETRANSIENT, "%s", curl_easy_strerror(rc));
    }
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &resp->status);
    resp->outcome = MR_HTTPC_ANSWERED;
    if (!s.buf && !(s.buf = calloc(1, 1))) {
        free(h.buf);
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    }
    resp->body = s.buf;
    resp->body_len = s.len;
    resp->headers = h.buf;
    return MR_OK;

oom:
    curl_slist_free_all(hdrs);
    return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
}

void mr_httpc_resp_free(mr_httpc_resp *resp)
{
    if (!resp)
        return;
    free(resp->body);
    free(resp->headers);
    resp->body = NULL;
    resp->headers = NULL;
    resp->body_len = 0;
}

int mr_httpc_resp_header(const mr_httpc_resp *resp, const char *name, char *out, size_t cap)
{
    if (cap)
        out[0] = '\0';
    size_t nlen = strlen(name);
    for (const char *line = resp ? resp->headers : NULL; line && *line;) {
        const char *eol = strchr(line, '\n');
        const char *end = eol ? eol : line + strlen(line);
        if ((size_t)(end - line) > nlen && line[nlen] == ':' && strncasecmp(line, name, nlen) == 0) {
            const char *v = line + nlen + 1;
            while (v < end && (*v == ' ' || *v == '\t'))
                v++;
            while (end > v && (end[-1] == '\r' || end[-1] == ' ' || end[-1] == '\t'))
                end--;
            size_t n = (size_t)(end - v);
            if (cap) {
                if (n >= cap)
                    n = cap - 1;
                memcpy(out, v, n);
                out[n] = '\0';
            }
            return 1;
        }
        line = eol ? eol + 1 : end;
    }
    return 0;
}
