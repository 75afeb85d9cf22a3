/* mr_httpc.h: outbound HTTP on libcurl, one reusable easy handle per worker.
 *
 * Every call has a connect deadline and a total deadline; responses larger than
 * max_body are cut off as an error; redirects are not followed; only http and
 * https; proxies from the environment (http_proxy...) are never used, so a
 * credential in a header cannot be sent to one. A 5xx is a successful transfer:
 * callers check status. */
#ifndef MR_HTTPC_H
#define MR_HTTPC_H

#include <stddef.h>
#include "mr_addr.h"
#include "mr_common.h"

typedef struct mr_httpc mr_httpc;

/* Whether the peer answered: the one place that tells a party that is down,
 * unreachable or hanging (no answer) from one that answers with an error. */
typedef enum {
    MR_HTTPC_UNSENT = 0,  /* never sent: a bad URL or scheme, out of memory */
    MR_HTTPC_ANSWERED,    /* a status line came: MR_OK, or the answer was cut off after it
                             (too large, its deadline passed, the connection dropped) */
    MR_HTTPC_NO_ANSWER,   /* no connection, or no status line before the deadlines */
    MR_HTTPC_ABORTED,     /* the caller's abort_cb stopped it: says nothing of the peer */
} mr_httpc_outcome;

typedef struct {
    mr_httpc_outcome outcome; /* set by every mr_httpc_do, whatever it returns */
    long status;        /* HTTP status, 0 if no response */
    char *body;         /* malloc'd, NUL-terminated; caller frees with mr_httpc_resp_free */
    size_t body_len;
    char *headers;      /* the final answer's header lines ("Name: value\r\n"...), malloc'd,
                           NUL-terminated, at most 16 KiB kept; freed by mr_httpc_resp_free */
} mr_httpc_resp;

typedef struct {
    const char *method;              /* "GET", "POST", "DELETE" */
    const char *url;
    const char *const *headers;      /* NULL-terminated "Name: value" list, or NULL */
    const char *body;                /* may be NULL */
    size_t body_len;
    long connect_timeout_ms;         /* 0 -> 2000 */
    long timeout_ms;                 /* 0 -> 10000 */
    size_t max_body;                 /* 0 -> 1 MiB */
    /* Optional: polled while the transfer runs (about every second, and on
     * progress); returning non-zero aborts it with MR_ETRANSIENT "aborted". */
    int (*abort_cb)(void *arg);
    void *abort_arg;
    /* Optional: the addresses the call may connect to (mr_addr.h), checked on each
     * address the host resolves to, before its socket is opened. NULL: any. When
     * every address is refused, nothing is sent, the outcome is MR_HTTPC_NO_ANSWER
     * (the peer is out of reach, as far as the caller can tell) and err says which
     * address was refused and why. */
    const mr_addr_rule *addr_rule;
} mr_httpc_req;

/* Returns a handle owned by the caller; free with mr_httpc_close. */
mr_httpc *mr_httpc_open(void);
void mr_httpc_close(mr_httpc *c);

/* Performs the request. Returns MR_OK with *resp filled (any HTTP status),
 * MR_ETRANSIENT on connect failure, timeout or oversized body, MR_EINVAL for a
 * bad URL or scheme. err says which, and resp->outcome whether the peer answered. */
mr_err mr_httpc_do(mr_httpc *c, const mr_httpc_req *req, mr_httpc_resp *resp,
                   char *err, size_t errlen);
void mr_httpc_resp_free(mr_httpc_resp *resp);

/* Copies the value of response header `name` (case-insensitive, surrounding
 * whitespace trimmed, cut to cap - 1 bytes) into out. Returns 1 when the header
 * is present, 0 otherwise (out is then ""). */
int mr_httpc_resp_header(const mr_httpc_resp *resp, const char *name, char *out, size_t cap);

#endif
