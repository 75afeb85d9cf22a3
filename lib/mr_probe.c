/* mr_probe.c: concurrent health probes (see mr_probe.h). */
#include "mr_probe.h"

#include "mr_addr.h"

#include <arpa/inet.h>
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <curl/curl.h>

/* ---- guard 1: the URL ---- */

static int host_is_loopback_name(const char *host)
{
    struct in_addr a4;
    if (strcmp(host, "localhost") == 0 || strcmp(host, "[::1]") == 0 || strcmp(host, "::1") == 0)
        return 1;
    /* Only the dotted-quad form: curl's URL parser normalises "127.1" and
     * friends to it, and anything else fails the domain rule anyway. */
    if (inet_pton(AF_INET, host, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    return 0;
}

static int host_under_domain(const char *host, const char *domain)
{
    size_t hl = strlen(host), dl = strlen(domain);
    if (dl == 0)
        return 0;
    if (hl == dl)
        return strcmp(host, domain) == 0;
    return hl > dl + 1 && host[hl - dl - 1] == '.' && strcmp(host + hl - dl, domain) == 0;
}

mr_err mr_probe_check_url(const char *url, const mr_probe_opts *o, char *why, size_t whylen)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL;
    char domain[256], h[256];
    mr_err rc = MR_OK;

    if (!u)
        return mr_seterr(why, whylen, MR_EINTERNAL, "out of memory");
    /* Without CURLU_NON_SUPPORT_SCHEME only schemes this libcurl knows parse;
     * the explicit check below narrows that to http and https. */
    if (!url || curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
        rc = mr_seterr(why, whylen, MR_EINVAL, "malformed URL");
        goto out;
    }
    if (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0) {
        rc = mr_seterr(why, whylen, MR_EINVAL, "scheme not allowed");
        goto out;
    }
    /* A name longer than DNS allows cannot be judged by a copy cut short. */
    if (strlen(host) > 254) {
        rc = mr_seterr(why, whylen, MR_EINVAL, "outside base domain");
        goto out;
    }
    /* Compare lowercase and without one trailing dot ("a.example." is "a.example"). */
    snprintf(h, sizeof h, "%s", host);
    snprintf(domain, sizeof domain, "%s", o->base_domain ? o->base_domain : "");
    for (char *p = h; *p; p++) *p = (char)tolower((unsigned char)*p);
    for (char *p = domain; *p; p++) *p = (char)tolower((unsigned char)*p);
    if (h[0] && h[strlen(h) - 1] == '.') h[strlen(h) - 1] = '\0';
    if (domain[0] == '.') memmove(domain, domain + 1, strlen(domain));
    if (domain[0] && domain[strlen(domain) - 1] == '.') domain[strlen(domain) - 1] = '\0';

    if (o->allow_loopback && host_is_loopback_name(h))
        goto out;
    if (!host_under_domain(h, domain))
        rc = mr_seterr(why, whylen, MR_EINVAL, "outside base domain");
out:
    curl_free(scheme);
    curl_free(host);
    curl_url_cleanup(u);
    return rc;
}

/* ---- guard 2: the address connected to ---- */

int mr_probe_addr_allowed(int family, const void *addr, const mr_probe_opts *o)
{
    mr_addr_rule r = {.allow_loopback = o->allow_loopback, .allow_private = o->allow_private};
    return mr_addr_refusal(family, addr, &r) == NULL;
}

/* ---- the multi loop ---- */

typedef struct {
    mr_probe *p;
    const mr_probe_opts *o;
    CURL *easy;
    size_t body;
    int body_over;
    int addr_refused;
    char errbuf[CURL_ERROR_SIZE];
} slot;

static size_t on_body(char *data, size_t size, size_t nmemb, void *userp)
{
    slot *s = userp;
    size_t n = size * nmemb;
    (void)data;
    s->body += n;
    if (s->body > s->o->max_body) {
        s->body_over = 1;
        return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
    }
    return n;
}

static curl_socket_t on_open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *a)
{
    slot *s = clientp;
    const void *ip = mr_addr_in(a->family, &a->addr);
    (void)purpose;
    if (!ip || !mr_probe_addr_allowed(a->family, ip, s->o)) {
        s->addr_refused = 1;
        return CURL_SOCKET_BAD;
    }
    s->p->contacted = 1;
    return socket(a->family, a->socktype, a->protocol);
}

static void set_result(mr_probe *p, mr_probe_outcome oc, const char *error, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void set_result(mr_probe *p, mr_probe_outcome oc, const char *error, const char *fmt, ...)
{
    va_list ap;
    p->outcome = oc;
    va_start(ap, fmt);
    vsnprintf(p->status, sizeof p->status, fmt, ap);
    va_end(ap);
    snprintf(p->error, sizeof p->error, "%s", error ? error : "");
}

static int slot_start(slot *s, CURLM *m)
{
    CURL *e = curl_easy_init();
    if (!e)
        return -1;
    s->easy = e;
    s->errbuf[0] = '\0';
    curl_easy_setopt(e, CURLOPT_URL, s->p->url);
    curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_PROXY, "");          /* a proxy would bypass guard 2 */
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, s->o->timeout_ms);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, s->o->timeout_ms);
    curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)s->o->max_body);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, on_open_socket);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, s);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, s->errbuf);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "mindroom-health/1");
    curl_easy_setopt(e, CURLOPT_PRIVATE, s);
    if (curl_multi_add_handle(m, e) != CURLM_OK) {
        curl_easy_cleanup(e);
        s->easy = NULL;
        return -1;
    }
    return 0;
}

static void slot_finish(slot *s, CURLcode rc)
{
    mr_probe *p = s->p;
    curl_off_t us = 0;
    long status = 0, oserr = 0;
    const char *detail = s->errbuf[0] ? s->errbuf : curl_easy_strerror(rc);

    curl_easy_getinfo(s->easy, CURLINFO_TOTAL_TIME_T, &us);
    curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(s->easy, CURLINFO_OS_ERRNO, &oserr);
    p->latency_ms = (long)(us / 1000);
    p->http_status = status;

    /* Refused only when no allowed address was tried: curl moves on from a refused
     * candidate (a name with several addresses), and then the answer is the verdict. */
    if (s->addr_refused && !p->contacted) {
        p->http_status = 0;
        set_result(p, MR_PROBE_UNHEALTHY, "resolved address is not allowed for health probes",
                   "refused: address not allowed");
    } else if (s->body_over || rc == CURLE_FILESIZE_EXCEEDED) {
        set_result(p, MR_PROBE_UNHEALTHY, "response body over the cap",
                   "unhealthy: response over %zu bytes", s->o->max_body);
    } else if (rc == CURLE_OK && status >= 200 && status <= 299) {
        set_result(p, MR_PROBE_HEALTHY, NULL, "healthy");
    } else if (rc == CURLE_OK) {
        char e[64];
        snprintf(e, sizeof e, "health endpoint answered HTTP %ld", status);
        set_result(p, MR_PROBE_UNHEALTHY, e, "unhealthy: HTTP %ld", status);
    } else if (status != 0) {
        /* A status line came, then the answer was cut short (stalled, dropped): the
         * instance answered, badly, as mr_httpc counts an answer (mr_httpc.h). */
        char e[64];
        snprintf(e, sizeof e, "health endpoint's HTTP %ld answer cut short", status);
        set_result(p, MR_PROBE_UNHEALTHY, e, "unhealthy: HTTP %ld cut short: %s", status,
                   rc == CURLE_OPERATION_TIMEDOUT ? "timeout" : curl_easy_strerror(rc));
    } else if (rc == CURLE_OPERATION_TIMEDOUT) {
        set_result(p, MR_PROBE_UNREACHABLE, detail, "unreachable: timeout after %ld ms",
                   s->o->timeout_ms);
    } else if (rc == CURLE_COULDNT_CONNECT && oserr == ECONNREFUSED) {
        set_result(p, MR_PROBE_UNREACHABLE, detail, "unreachable: connection refused");
    } else if (rc == CURLE_COULDNT_RESOLVE_HOST) {
        set_result(p, MR_PROBE_UNREACHABLE, detail, "unreachable: cannot resolve host");
    } else {
        set_result(p, MR_PROBE_UNREACHABLE, detail, "unreachable: %s", curl_easy_strerror(rc));
    }
}

mr_err mr_probe_run(mr_probe *probes, size_t n, const mr_probe_opts *o, int64_t within_ms,
                    char *err, size_t errlen)
{
    CURLM *m;
    slot *slots;
    size_t next = 0, active = 0, last = n; /* probes [next, last) are still to start */
    char why[64];

    assert(o->concurrency >= 1 && o->timeout_ms >= 1 && o->max_body >= 1);
    if (n == 0)
        return MR_OK;
    slots = calloc(n, sizeof *slots);
    m = curl_multi_init();
    if (!slots || !m) {
        free(slots);
        if (m) curl_multi_cleanup(m);
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    }
    for (size_t i = 0; i < n; i++) {
        slots[i].p = &probes[i];
        slots[i].o = o;
        probes[i].ran = 0;
        probes[i].contacted = 0;
        probes[i].http_status = 0;
        probes[i].latency_ms = 0;
        probes[i].status[0] = probes[i].error[0] = '\0';
    }
    /* A probe started by then ends one timeout later; one that follows it may wait
     * one more for a slot. */
    const int64_t start_by = mr_now_ms() + within_ms - 2 * o->timeout_ms;

    /* Keep up to `concurrency` transfers in flight; a finished one makes room
     * for the next, so a few hanging probes delay nobody but themselves. */
    for (int first_wave = 1;; first_wave = 0) {
        int running = 0, q, finished = 0;
        CURLMsg *msg;
        while (active < (size_t)o->concurrency && next < last) {
            /* Past start_by the rest are left (ran 0): a probe started later could end
             * after the caller's deadline. The first wave, and a probe that follows
             * one started, start whenever they can. */
            if (!first_wave && within_ms > 0 && !probes[next].follows &&
                mr_now_ms() > start_by) {
                last = next;
                break;
            }
            slot *s = &slots[next++];
            s->p->ran = 1;
            if (mr_probe_check_url(s->p->url, o, why, sizeof why) != MR_OK) {
                set_result(s->p, MR_PROBE_UNHEALTHY, "backend URL not allowed for health probes: never contacted",
                           "refused: %s", why);
                continue;
            }
            if (slot_start(s, m) != 0) {
                set_result(s->p, MR_PROBE_UNREACHABLE, "could not start the probe", "unreachable: internal error");
                continue;
            }
            active++;
        }
        if (active == 0)
            break;
        curl_multi_perform(m, &running);
        while ((msg = curl_multi_info_read(m, &q)) != NULL) {
            slot *s = NULL;
            if (msg->msg != CURLMSG_DONE)
                continue;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&s);
            slot_finish(s, msg->data.result);
            curl_multi_remove_handle(m, s->easy);
            curl_easy_cleanup(s->easy);
            s->easy = NULL;
            active--;
            finished++;
        }
        /* Wait only when no room was made: otherwise start the next ones first. */
        if (active > 0 && (finished == 0 || next >= last))
            curl_multi_poll(m, NULL, 0, 200, NULL);
    }
    /* What a probe never started says, should a caller not look at ran. */
    for (size_t i = last; i < n; i++)
        set_result(&probes[i], MR_PROBE_UNREACHABLE, NULL, "not probed: the round's time ran out");
    curl_multi_cleanup(m);
    free(slots);
    return MR_OK;
}
