/* mr_instance.h: the instance lifecycle shared by provision-instance and
 * deprovision-instance (and usable by anything else that must drive it).
 *
 * The state lives in PostgreSQL (sql/migrations/020_lifecycle.sql): a request
 * takes an expiring lease on the instance row in one short transaction
 * (lifecycle_provision / lifecycle_deprovision), and whoever holds the lease
 * carries out the owed steps with no transaction open, recording each outcome
 * with lifecycle_finish, which hands back the next step under the same lease.
 * Steps: create, start, update (POST /apps or /apps/{app}/start on the
 * provisioner), stop, destroy, email (Resend). */
#ifndef MR_INSTANCE_H
#define MR_INSTANCE_H

#include <cjson/cJSON.h>
#include "mr_common.h"
#include "mr_http.h"

typedef struct {
    const char *provisioner_url;     /* DOKKU_PROVISIONER_URL, no trailing slash */
    const char *provisioner_token;   /* DOKKU_PROVISIONER_TOKEN */
    long provisioner_timeout_ms;     /* MR_PROVISION_TIMEOUT_MS: one provisioner call */
    long connect_timeout_ms;         /* MR_PROVISION_CONNECT_TIMEOUT_MS */
    int lease_s;                     /* MR_PROVISION_LEASE_S: > one step's deadline */
    int backoff_base_s;              /* MR_PROVISION_BACKOFF_BASE_S */
    int backoff_cap_s;               /* MR_PROVISION_BACKOFF_CAP_S */
    long wait_ms;                    /* MR_PROVISION_WAIT_MS: cap on "wait": true */
    const char *resend_api_key;      /* RESEND_API_KEY, NULL when unset: emails skipped */
    const char *resend_base_url;     /* RESEND_BASE_URL */
    const char *resend_from;         /* RESEND_FROM */
    long resend_timeout_ms;          /* MR_RESEND_TIMEOUT_MS */
    int jobs;                        /* MR_PROVISION_JOBS: workers busy with steps at once */
    int drain;                       /* MR_PROVISION_DRAIN: owed items a worker takes on
                                        after its own steps, before accepting again */
    const char *function;            /* "provision-instance" or "deprovision-instance":
                                        set by the function after loading */
} mr_instance_config;

/* Reads the configuration from the environment (mr_config_*: a bad value exits 2
 * naming the variable). Also exits when the lease is not longer than the longest
 * step it must cover. The strings are the environment's own. */
void mr_instance_config_load(mr_instance_config *cfg);

/* Job slots. A worker inside a provisioner call cannot accept requests, so if every
 * worker were busy with steps, callers (the webhook's short-deadline kick, the
 * sweep) would queue behind a slow or hanging provisioner. At most cfg->jobs
 * workers (default: MR_WORKERS - 1) do steps at once; a request that finds no free
 * slot leaves the work owed and unclaimed (outcome "queued", 202) for the sweep.
 * The slots live in memory shared by the pre-forked workers: mr_instance_slots_init
 * must run in the app's init (the parent, before fork). A slot held by a worker
 * that died is taken back (its pid is gone). */
void mr_instance_slots_init(int n);
/* Returns a slot index, or -1 when all are taken. */
int mr_instance_slot_acquire(void);
void mr_instance_slot_release(int slot);

/* Result of a request or of a step. */
typedef struct {
    char outcome[16];   /* not_found, not_entitled, conflict, none, done, busy, claimed,
                           failed, lost (see the SQL functions) */
    char mode[8];       /* deprovision: "stop" or "destroy" */
    char failed_action[16]; /* mr_instance_run: the step that failed, "" if none */
    cJSON *reply;       /* the whole JSON the SQL function returned; owned, free with
                           mr_instance_result_free. reply.instance is the instance. */
} mr_instance_result;

void mr_instance_result_free(mr_instance_result *res);

/* The instance object of a result, or NULL. Points into res->reply. */
const cJSON *mr_instance_of(const mr_instance_result *res);

/* provision-instance's transaction (as who, normally service_role). On MR_OK res is
 * filled (caller frees it); otherwise err says why (transient database failure...).
 * owner names the worker taking the lease; NULL when it holds no job slot (then
 * owed work is reported "queued", never claimed). */
mr_err mr_instance_provision(mr_db *db, const mr_identity *who, const mr_instance_config *cfg,
                             const char *subscription_id, const char *owner,
                             mr_instance_result *res, char *err, size_t errlen);

/* deprovision-instance's transaction. Exactly one of instance_id and subscription_id
 * is non-NULL; mode is "stop", "destroy" or NULL (decided from the subscription). */
mr_err mr_instance_deprovision(mr_db *db, const mr_identity *who, const mr_instance_config *cfg,
                               const char *instance_id, const char *subscription_id,
                               const char *mode, const char *owner,
                               mr_instance_result *res, char *err, size_t errlen);

/* Claims the oldest instance owing work of cfg->function (lifecycle_claim_next):
 * res->outcome "claimed" (run it with mr_instance_run) or "none". */
mr_err mr_instance_claim_next(mr_db *db, const mr_identity *who, const mr_instance_config *cfg,
                              const char *owner, mr_instance_result *res, char *err, size_t errlen);

/* Carries out the claimed steps of res (outcome "claimed") until nothing more is
 * owed, a step fails, or the lease is lost; then replaces res with the final
 * outcome and instance. Never holds a transaction across an outbound call.
 * Returns MR_OK when the record is consistent (even when a step failed: the
 * failure is recorded in the row), MR_ETRANSIENT when the database could not take
 * the outcome (the lease then expires and the work is redone). */
mr_err mr_instance_run(mr_db *db, mr_httpc *http, const mr_identity *who,
                       const mr_instance_config *cfg, mr_instance_result *res,
                       char *err, size_t errlen);

/* Polls the instance until no live lease is left on it or max_ms elapse; replaces
 * res->reply's instance with the latest. For "wait": true when another worker
 * holds the lease. */
mr_err mr_instance_await(mr_db *db, const mr_identity *who, mr_instance_result *res,
                         long max_ms, char *err, size_t errlen);

/* Answers the request for a result of mr_instance_provision/deprovision and takes
 * over res (its contents; res itself may be on the caller's stack): "claimed"
 * -> 202 now and the steps run after the answer (mr_defer), or with wait the
 * steps run first and the answer is final; "busy" with wait -> polls first.
 * Outcomes not_found/not_entitled/conflict are the caller's to answer before.
 * slot (from mr_instance_slot_acquire, or -1) is released once the work is done;
 * owner (copied) names the worker for the leases it takes draining owed work. */
void mr_instance_reply(mr_req *r, const mr_instance_config *cfg, mr_instance_result *res, int wait,
                       int slot, const char *owner);

/* Builds the HTTP answer for a result: {"instance": {...}} plus, for a failed
 * waited-for step, an "error" object. Sets *status. Returns a new object the
 * caller hands to mr_reply_json. `waited`: the caller waited for the outcome. */
cJSON *mr_instance_response(const mr_instance_result *res, int waited, int *status);

/* Whether s is a canonical textual UUID (8-4-4-4-12 hex digits). */
int mr_instance_is_uuid(const char *s);

/* --- the provisioner client (DOKKU_PROVISIONER_URL) --- */

typedef struct {
    int ok;             /* 2xx (or a missing app where that means done) */
    int rejected;       /* 4xx: the provisioner refused the input; not retried blindly */
    long status;        /* HTTP status, 0 when no answer */
    char error[256];    /* why, when !ok: safe to store and show */
    char backend_url[512], frontend_url[512], matrix_server_url[512];
} mr_instance_call;

/* POST /apps with payload (the step's payload object). */
void mr_instance_provisioner_create(mr_httpc *http, const mr_instance_config *cfg,
                                    const cJSON *payload, mr_instance_call *out);
/* POST /apps/{app}/start or /stop (verb "start"/"stop"), DELETE /apps/{app}
 * (verb "delete"). A 404 for stop or delete is success (the app is gone). */
void mr_instance_provisioner_app(mr_httpc *http, const mr_instance_config *cfg,
                                 const char *app, const char *verb, mr_instance_call *out);

#endif
