/* mr_instance.h: the instance edges shared by provision-instance and
 * deprovision-instance.
 *
 * An edge only records what an operator asks for (public.lifecycle_provision /
 * lifecycle_deprovision, sql/migrations/040_owed_work.sql: one round trip each)
 * and answers with the instance as it stands, including what is now owed
 * (owed_action, in the one vocabulary of mr_action.h). The lifecycle worker does
 * the work. With "wait": true the edge polls the instance until the owed work is
 * done, its step failed, or the wait ran out (MR_PROVISION_WAIT_MS, inside nginx's
 * read timeout for these functions: mr_deadlines.h). */
#ifndef MR_INSTANCE_H
#define MR_INSTANCE_H

#include <cjson/cJSON.h>
#include "mr_common.h"
#include "mr_db.h"

typedef struct {
    long wait_ms;       /* MR_PROVISION_WAIT_MS: the longest "wait": true */
    long poll_ms;       /* how often a waiting edge re-reads the instance */
} mr_instance_config;

/* Reads MR_PROVISION_WAIT_MS (a bad value, or one that with its last poll's answer
 * window, MR_DB_STATEMENT_TIMEOUT_MS + MR_DL_DB_ANSWER_SLACK_MS, does not end inside
 * nginx's read timeout, exits 2). */
void mr_instance_config_load(mr_instance_config *cfg);

/* The answer of a request's SQL function. */
typedef struct {
    char outcome[16];   /* ok, not_found, not_entitled, conflict, none */
    char mode[8];       /* deprovision: "stop" or "destroy" */
    cJSON *reply;       /* the whole JSON the SQL function returned; owned, free with
                           mr_instance_result_free. reply.instance is the instance. */
} mr_instance_result;

void mr_instance_result_free(mr_instance_result *res);

/* The instance object of a result, or NULL. Points into res->reply. */
const cJSON *mr_instance_of(const mr_instance_result *res);

/* Records that a subscription's instance should run (as who, normally
 * service_role); with rotate_token, also replaces its control-plane token in the
 * same transaction (the old one stops at once; the deploy owed delivers a new
 * one). On MR_OK res is filled (the caller frees it); otherwise err says why (a
 * transient database failure...). */
mr_err mr_instance_provision(mr_db *db, const mr_identity *who, const char *subscription_id,
                             int rotate_token, mr_instance_result *res, char *err, size_t errlen);

/* Records that an instance should stop or be destroyed. Exactly one of
 * instance_id and subscription_id is non-NULL; mode is "stop", "destroy" or NULL
 * (what the subscription's status asks for). purge (mode "destroy" only) destroys
 * the instance's storage with it instead of keeping it for the retention period;
 * on an instance already destroyed it ends the retention now. */
mr_err mr_instance_deprovision(mr_db *db, const mr_identity *who, const char *instance_id,
                               const char *subscription_id, const char *mode, int purge,
                               mr_instance_result *res, char *err, size_t errlen);

/* The answer to a request recorded with outcome "ok": {"instance": {...}, "mode"?,
 * "error"?} and its status in *status.
 *   without wait: 202 while work is owed, 200 when nothing is (a welcome email
 *                 still owed does not make a running instance pending);
 *   with wait:    polls until done (200), the step failed (503
 *                 provisioner_unavailable, or 502 provisioner_rejected for a
 *                 refusal, with the instance's last error), or cfg->wait_ms passed
 *                 since started_ms, the request's arrival (202, the instance as it
 *                 stands): the time the request itself took counts, so that the
 *                 answer comes inside nginx's timeout whatever the wait.
 * A database failure while waiting answers 503 {"error": {"code": "transient", ...}}.
 * Returns a new object the caller replies with (never NULL but out of memory). */
cJSON *mr_instance_answer(mr_db *db, const mr_identity *who, const mr_instance_config *cfg,
                          const mr_instance_result *res, int wait, int64_t started_ms,
                          int *status);

#endif
