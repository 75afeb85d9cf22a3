/* mr_probe.h: many concurrent HTTP health probes on libcurl's multi interface.
 *
 * A probe is one GET with its own deadline, no redirects, no proxy, a capped
 * body, and two guards against server-side request forgery:
 *   1. the URL: scheme http or https, host equal to the base domain or under
 *      it, or a loopback name/literal when allowed; a URL failing this is
 *      never contacted;
 *   2. the address actually connected to (checked in CURLOPT_OPENSOCKETFUNCTION,
 *      after DNS and before connect(), so a name that resolves to a metadata,
 *      private or loopback address is refused without a packet being sent and
 *      without a window between check and use).
 * Nothing here touches the database; the caller records the outcomes. */
#ifndef MR_PROBE_H
#define MR_PROBE_H

#include <stddef.h>
#include "mr_common.h"

typedef enum {
    MR_PROBE_HEALTHY,      /* a 2xx answer */
    MR_PROBE_UNHEALTHY,    /* an answer that is not 2xx, cut short or oversized, or refused by the rules */
    MR_PROBE_UNREACHABLE   /* no answer: refused connection, timeout, DNS, TLS... */
} mr_probe_outcome;

typedef struct {
    const char *base_domain;  /* e.g. "mindroom.chat"; NULL or "" allows no domain */
    int allow_loopback;       /* 127.0.0.0/8, ::1, "localhost" (local stack and tests) */
    int allow_private;        /* RFC 1918, 100.64/10, fc00::/7 addresses */
    long concurrency;         /* transfers in flight at once, >= 1 */
    long timeout_ms;          /* per probe, connect included, >= 1 */
    size_t max_body;          /* bytes of response body accepted, >= 1 */
} mr_probe_opts;

typedef struct {
    const char *url;          /* in: full URL to GET; caller-owned, outlives mr_probe_run */
    int follows;              /* in: 1 when it goes with the probe before it (another part
                                 of one target): it starts whenever that one did */
    mr_probe_outcome outcome; /* out */
    int ran;                  /* out: 1 when it was decided (started, or refused by the
                                 rules); 0 when its round's time ran out first (then
                                 it is unreachable, "not probed: ...", never healthy) */
    int contacted;            /* out: 1 when a connection was attempted */
    long http_status;         /* out: 0 when there was no answer */
    long latency_ms;          /* out: time the probe took (0 when never contacted) */
    char status[96];          /* out: "healthy", "unhealthy: HTTP 500",
                                 "unreachable: timeout after 2000 ms", "refused: ..." */
    char error[256];          /* out: more detail for error_message, "" when healthy */
} mr_probe;

/* Checks url against the rules of guard 1 above. Returns MR_OK when it may be
 * contacted, MR_EINVAL with why filled ("outside base domain", "scheme not
 * allowed", "malformed URL") otherwise. */
mr_err mr_probe_check_url(const char *url, const mr_probe_opts *o, char *why, size_t whylen);

/* Classifies an address for guard 2 (the rule of mr_addr.h with the options'
 * allow_loopback and allow_private). family is AF_INET or AF_INET6, addr points
 * to a struct in_addr or in6_addr. Returns 1 when a probe may connect to it. */
int mr_probe_addr_allowed(int family, const void *addr, const mr_probe_opts *o);

/* Runs the n probes in their order, at most o->concurrency at once, and fills
 * their outputs. within_ms (0: no bound): with targets of two probes at most (the
 * second marked follows), every probe has ended max(within_ms, 2 * o->timeout_ms)
 * after the call. No probe starts later than 2 * o->timeout_ms before within_ms
 * but the first wave (the first o->concurrency) and those that follow a probe
 * started (which may wait one probe's timeout for a slot, then run one more);
 * those left have ran 0. Returns MR_OK (each probe's own outcome says how it went)
 * or MR_EINTERNAL when the multi handle cannot be created (err filled); then no
 * probe ran. */
mr_err mr_probe_run(mr_probe *probes, size_t n, const mr_probe_opts *o, int64_t within_ms,
                    char *err, size_t errlen);

#endif
