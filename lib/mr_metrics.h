/* mr_metrics.h: counters shared by a process and its pre-forked workers, and
 * their Prometheus text exposition.
 *
 * Each process group (a function and its workers, the lifecycle worker and its
 * processes) keeps one fixed-size segment of counters, mapped MAP_SHARED by the
 * parent before it forks, so every worker adds to the same counters with relaxed
 * atomic increments: no lock and no system call on the request path. With
 * MR_METRICS_DIR set the segment is a file there, <name>.metrics (created under a
 * temporary name and renamed into place, O_NOFOLLOW, mode 0640, in a directory
 * that others cannot write), so that mindroom-admin can read every segment on the
 * host and answer GET /metrics; without it the segment is anonymous memory (the
 * counters still work, nobody exports them). A restarted process starts a new
 * segment from zero, which Prometheus reads as a counter reset.
 *
 * The families (docs/install.md lists them with their labels):
 *   mindroom_build_info, mindroom_process_start_time_seconds
 *   mindroom_http_requests_total{code="2xx"...}, mindroom_http_request_duration_seconds
 *   mindroom_fastcgi_dropped_connections_total
 *   mindroom_db_errors_total{class=<SQLSTATE class>}
 *   mindroom_stripe_events_total{type,outcome}
 *   mindroom_provisioner_calls_total{route,outcome}, mindroom_provisioner_call_duration_seconds
 *   mindroom_health_probes_total{result}, mindroom_health_marked_failed_total,
 *   mindroom_health_rounds_total
 *   mindroom_lifecycle_claims_total{outcome}
 * Every family but the Stripe and provisioner ones carries function="<name>". */
#ifndef MR_METRICS_H
#define MR_METRICS_H

#include <stdint.h>
#include <stdio.h>
#include "mr_common.h"

typedef enum {
    MR_METRICS_FUNCTION, /* serves requests: the request families are exported */
    MR_METRICS_DAEMON    /* serves none (the lifecycle worker) */
} mr_metrics_kind;

typedef enum {
    MR_PROV_APPLY, /* POST /apps */
    MR_PROV_START,
    MR_PROV_STOP,
    MR_PROV_DESTROY,
    MR_PROV_DESTROY_STORAGE, /* DELETE /apps/{app}/storage */
    MR_PROV_RESTART,
    MR_PROV_ROUTES
} mr_metrics_prov_route;

typedef enum {
    MR_PROV_OK,
    MR_PROV_REJECTED, /* a 4xx retrying cannot fix */
    MR_PROV_FAILED,   /* anything else: retried with backoff */
    MR_PROV_ABORTED,  /* the caller stopped it (a stopping worker) */
    MR_PROV_OUTCOMES
} mr_metrics_prov_outcome;

/* ---- the writing side (the parent, once, before it forks) ---- */

/* Creates this process group's segment for `name` ([a-z0-9-], at most 63
 * characters), in MR_METRICS_DIR when that is set. Returns MR_OK, or MR_EINVAL
 * with err filled (the directory is missing, a symlink or writable by others;
 * the name is bad). */
mr_err mr_metrics_open(const char *name, mr_metrics_kind kind, char *err, size_t errlen);

/* The parent, at exit: removes the segment file if it is still this process's
 * (a newer instance may have replaced it, as with the socket). */
void mr_metrics_close(void);

/* ---- counting: from any process of the group; no-ops before mr_metrics_open ---- */

/* One answered request: its HTTP status and how long it took. */
void mr_metrics_request(int status, int64_t duration_us);
/* A connection dropped before it sent a complete request (the read deadline). */
void mr_metrics_dropped_connection(void);
/* A failed statement or connection, by SQLSTATE (its first two characters count). */
void mr_metrics_db_error(const char *sqlstate);
/* A webhook delivery: the event's type (unlisted types count as "other", an
 * unparsed one as "unknown") and its outcome (processed, duplicate, ignored,
 * stale, failed, deferred, invalid, error; anything else counts as "error"). */
void mr_metrics_stripe_event(const char *type, const char *outcome);
/* One provisioner call and how long it took. */
void mr_metrics_provisioner_call(mr_metrics_prov_route route, mr_metrics_prov_outcome outcome,
                                 int64_t duration_us);
/* One health round's results. */
void mr_metrics_health_round(int healthy, int unhealthy, int unreachable, int marked_failed);
/* One claim of the lifecycle worker's (public.lifecycle_claim), by what it
 * answered. */
typedef enum {
    MR_CLAIM_CLAIMED, /* a step was taken */
    MR_CLAIM_NONE,    /* nothing due (or what is due is held, or waits for its target) */
    MR_CLAIM_FULL,    /* work is due, but max_in_flight steps are under way */
    MR_CLAIM_OUTCOMES
} mr_metrics_claim_outcome;
void mr_metrics_lifecycle_claim(mr_metrics_claim_outcome outcome);

/* ---- the reading side (mindroom-admin) ---- */

typedef struct mr_metrics_view mr_metrics_view;

/* Maps every segment file in dir read-only (regular files only, never through a
 * symlink; files of another layout or size are skipped). Returns MR_OK with *out
 * (free with mr_metrics_view_close), or MR_EINVAL when dir cannot be read. */
mr_err mr_metrics_view_open(const char *dir, mr_metrics_view **out, char *err, size_t errlen);
void mr_metrics_view_close(mr_metrics_view *v);

/* The segments found, in name order: the name (owned by v) and whether the process
 * that made it is still running (a segment left by a killed process is not). */
size_t mr_metrics_view_count(const mr_metrics_view *v);
const char *mr_metrics_view_name(const mr_metrics_view *v, size_t i);
int mr_metrics_view_alive(const mr_metrics_view *v, size_t i);

/* Writes every family above, from the running processes' segments, in the
 * Prometheus text exposition format (version 0.0.4). */
void mr_metrics_write(FILE *out, const mr_metrics_view *v);

/* Writes s as a label value (backslash, double quote and newline escaped). */
void mr_metrics_label(FILE *out, const char *s);

#endif
