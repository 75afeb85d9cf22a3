/* mr_health.h: one health round: select running instances (not those whose last
 * deploy was a dry run: nothing serves them), probe both of each
 * one's components concurrently (mr_probe: MindRoom at backend_url + HEALTH_PATH,
 * its homeserver at matrix_server_url + HEALTH_MATRIX_PATH), record what was seen
 * (public.health_record, 042). An instance is healthy only when both are.
 *
 * check-instance-health runs a round on request; the lifecycle worker runs the
 * periodic one, once per interval across every host (a scheduled_jobs lease).
 * No transaction is open while probing: one short transaction selects (under the
 * caller's identity, so RLS decides what a tenant sees), then the results are
 * recorded as service_role, 256 instances per transaction. */
#ifndef MR_HEALTH_H
#define MR_HEALTH_H

#include <cjson/cJSON.h>
#include "mr_common.h"
#include "mr_db.h"
#include "mr_probe.h"

typedef struct {
    mr_probe_opts probe;   /* HEALTH_* and MINDROOM_BASE_DOMAIN */
    const char *path;      /* HEALTH_PATH, appended to each backend_url (MindRoom) */
    const char *matrix_path; /* HEALTH_MATRIX_PATH, appended to each matrix_server_url */
    long round_ms;         /* HEALTH_ROUND_MS: a requested round's probing ends within it */
    long periodic_round_ms;/* the worker's: round_ms, at most half of the interval (its
                              lease), at least one probe's timeout */
    int threshold;         /* HEALTH_FAILURE_THRESHOLD: counted failures in a row -> failed */
    int interval_s;        /* HEALTH_INTERVAL_S: the periodic round's interval; a failure
                              counts at most once per interval */
} mr_health_config;

/* Reads HEALTH_PATH, HEALTH_MATRIX_PATH, HEALTH_FAILURE_THRESHOLD, HEALTH_INTERVAL_S, HEALTH_CONCURRENCY,
 * HEALTH_TIMEOUT_MS, HEALTH_ROUND_MS (not below HEALTH_TIMEOUT_MS), HEALTH_MAX_BODY,
 * HEALTH_ALLOW_LOOPBACK, HEALTH_ALLOW_PRIVATE and MINDROOM_BASE_DOMAIN (a bad value
 * exits 2), and raises the open-file limit to fit the concurrency (or lowers the
 * concurrency to fit the limit). */
void mr_health_config_load(mr_health_config *cfg);

/* Runs one round. instance_id NULL: every running instance `who` can see; else that
 * one. counted: whether failures count toward a redeploy (never for a tenant's own
 * probe). round_started: the round's start as a timestamptz text (the periodic
 * job's lease start), or NULL for now().
 * Instances are probed checked-longest-ago first, and the probing ends within
 * round_ms (cfg->round_ms or cfg->periodic_round_ms; one instance's probes are never
 * cut): those it did not reach are not recorded nor answered, only counted
 * (not_probed), and are the next round's first.
 * Returns MR_OK with *out a new answer object (the caller owns it):
 *   {"checked", "not_probed", "healthy", "unhealthy", "unreachable", "marked_failed", "probe_ms",
 *    "results": [{"instance_id", "status", "http_status", "latency_ms", "error",
 *                 "failed_component" ("mindroom", "homeserver" or null),
 *                 "components": {"mindroom": {"status", "http_status", "latency_ms"} | null,
 *                                "homeserver": {...} | null},
 *                 "consecutive_failures", "marked_failed"}]}
 * (http_status and latency_ms at the top are MindRoom's.)
 * For one instance: MR_ENOTFOUND when `who` cannot see it, MR_ECONFLICT when it is
 * not running (err names its status) or a dry run deployed it. Database failures as mr_db_tx. */
mr_err mr_health_round(mr_db *db, const mr_identity *who, const mr_health_config *cfg,
                       const char *instance_id, int counted, const char *round_started,
                       long round_ms, cJSON **out, char *err, size_t errlen);

#endif
