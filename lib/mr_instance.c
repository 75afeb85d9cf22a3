/* mr_instance.c: see mr_instance.h. The rules (what is owed, which transition a
 * step makes, backoff) live in SQL; this file moves results between PostgreSQL,
 * the provisioner and Resend, and never holds a transaction across those calls. */
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mr_config.h"
#include "mr_db.h"
#include "mr_httpc.h"
#include "mr_instance.h"
#include "mr_json.h"
#include "mr_log.h"
#include "mr_resend.h"

#define MAX_STEPS 8

void mr_instance_config_load(mr_instance_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->provisioner_url = mr_config_str("DOKKU_PROVISIONER_URL", "http://127.0.0.1:8002");
    cfg->provisioner_token = mr_config_secret("DOKKU_PROVISIONER_TOKEN", NULL, 16);
    /* A Dokku deploy pulls, builds and starts containers: minutes. The provisioner
     * gives one deploy command 15 min (DOKKU_DEPLOY_TIMEOUT_MS) and nginx's
     * provisioner listener reads for 20 min; wait a little longer than that, so the
     * provisioner's own answer (even a timeout) arrives before ours expires. */
    cfg->provisioner_timeout_ms = (long)mr_config_int("MR_PROVISION_TIMEOUT_MS", 1230000, 100, 7200000);
    cfg->connect_timeout_ms = (long)mr_config_int("MR_PROVISION_CONNECT_TIMEOUT_MS", 2000, 50, 60000);
    cfg->lease_s = (int)mr_config_int("MR_PROVISION_LEASE_S", 1300, 1, 86400);
    cfg->backoff_base_s = (int)mr_config_int("MR_PROVISION_BACKOFF_BASE_S", 30, 1, 86400);
    cfg->backoff_cap_s = (int)mr_config_int("MR_PROVISION_BACKOFF_CAP_S", 3600, 1, 7 * 86400);
    cfg->wait_ms = (long)mr_config_int("MR_PROVISION_WAIT_MS", cfg->provisioner_timeout_ms + 5000,
                                       100, 4 * 3600000);
    const char *key = mr_config_str("RESEND_API_KEY", "");
    if (*key) cfg->resend_api_key = mr_config_secret("RESEND_API_KEY", NULL, 1);
    cfg->resend_base_url = mr_config_str("RESEND_BASE_URL", "https://api.resend.com");
    cfg->resend_from = mr_config_str("RESEND_FROM", "MindRoom <hello@mindroom.chat>");
    cfg->resend_timeout_ms = (long)mr_config_int("MR_RESEND_TIMEOUT_MS", 10000, 100, 120000);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int workers = (int)mr_config_int("MR_WORKERS", ncpu > 0 ? ncpu : 1, 1, 1024);
    cfg->jobs = (int)mr_config_int("MR_PROVISION_JOBS", workers > 1 ? workers - 1 : 1, 1, 1024);
    cfg->drain = (int)mr_config_int("MR_PROVISION_DRAIN", 20, 0, 10000);

    /* The lease must outlive every step its holder can be inside; otherwise a slow
     * but healthy worker would lose it and a second one would repeat the call. */
    long longest = cfg->provisioner_timeout_ms + cfg->connect_timeout_ms;
    if (cfg->resend_timeout_ms + 2000 > longest) longest = cfg->resend_timeout_ms + 2000;
    if ((long)cfg->lease_s * 1000 <= longest) {
        fprintf(stderr, "config: MR_PROVISION_LEASE_S (%d s) must be longer than "
                "MR_PROVISION_TIMEOUT_MS + MR_PROVISION_CONNECT_TIMEOUT_MS (%ld ms)\n",
                cfg->lease_s, longest);
        exit(2);
    }
    if (cfg->backoff_cap_s < cfg->backoff_base_s) {
        fprintf(stderr, "config: MR_PROVISION_BACKOFF_CAP_S must be >= MR_PROVISION_BACKOFF_BASE_S\n");
        exit(2);
    }
    if (!cfg->resend_api_key)
        mr_log(MR_LOG_INFO, "RESEND_API_KEY is not set: welcome emails will be skipped");
}

void mr_instance_result_free(mr_instance_result *res)
{
    if (!res) return;
    cJSON_Delete(res->reply);
    res->reply = NULL;
}

const cJSON *mr_instance_of(const mr_instance_result *res)
{
    const cJSON *i = res->reply ? cJSON_GetObjectItemCaseSensitive(res->reply, "instance") : NULL;
    return cJSON_IsObject(i) ? i : NULL;
}

int mr_instance_is_uuid(const char *s)
{
    if (!s || strlen(s) != 36) return 0;
    for (int k = 0; k < 36; k++) {
        if (k == 8 || k == 13 || k == 18 || k == 23) {
            if (s[k] != '-') return 0;
        } else if (!isxdigit((unsigned char)s[k])) {
            return 0;
        }
    }
    return 1;
}

/* --- job slots --- */

static pid_t *g_slots;   /* shared mapping: the pid of the worker in each slot, or 0 */
static int g_nslots;

void mr_instance_slots_init(int n)
{
    assert(n > 0);
    void *m = mmap(NULL, sizeof(pid_t) * (size_t)n, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        fprintf(stderr, "mr_instance: cannot map %d job slots\n", n);
        exit(2);
    }
    g_slots = m;
    g_nslots = n;
}

int mr_instance_slot_acquire(void)
{
    if (!g_slots) return -1;
    pid_t me = getpid();
    for (int i = 0; i < g_nslots; i++) {
        pid_t cur = __atomic_load_n(&g_slots[i], __ATOMIC_ACQUIRE);
        /* Free, or left by a worker that died (a worker holds at most one slot, so
         * its own pid in a slot is a dead predecessor's that had the same pid). */
        int free_slot = cur == 0 || cur == me || (kill(cur, 0) != 0 && errno == ESRCH);
        if (free_slot && __atomic_compare_exchange_n(&g_slots[i], &cur, me, 0,
                                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return i;
    }
    return -1;
}

void mr_instance_slot_release(int slot)
{
    if (g_slots && slot >= 0 && slot < g_nslots)
        __atomic_store_n(&g_slots[slot], 0, __ATOMIC_RELEASE);
}

/* --- database round trips --- */

typedef struct {
    const char *sql;
    int nparams;
    const char *const *params;
    char *text;          /* the single text value returned; malloc'd */
} q_ctx;

static mr_err q_tx(mr_db *db, void *arg, char *err, size_t errlen)
{
    q_ctx *q = arg;
    PGresult *res = NULL;
    mr_err e = mr_db_exec(db, q->sql, q->nparams, q->params, &res, NULL, err, errlen);
    if (e != MR_OK) return e;
    free(q->text); /* a retried transaction replaces the earlier answer */
    q->text = NULL;
    if (PQntuples(res) == 1 && PQnfields(res) == 1 && !PQgetisnull(res, 0, 0))
        q->text = strdup(PQgetvalue(res, 0, 0));
    PQclear(res);
    if (!q->text) return mr_seterr(err, errlen, MR_EINTERNAL, "lifecycle query returned nothing");
    return MR_OK;
}

/* Runs one statement returning one jsonb in a transaction as who; parses it. */
static mr_err q_json(mr_db *db, const mr_identity *who, const char *sql, int nparams,
                     const char *const *params, cJSON **out, char *err, size_t errlen)
{
    q_ctx q = {.sql = sql, .nparams = nparams, .params = params};
    *out = NULL;
    mr_err e = mr_db_tx(db, who, q_tx, &q, err, errlen);
    if (e == MR_OK) {
        *out = mr_json_parse(q.text, strlen(q.text));
        if (!*out) e = mr_seterr(err, errlen, MR_EINTERNAL, "lifecycle query returned bad JSON");
    }
    free(q.text);
    return e;
}

static void fill_result(mr_instance_result *res, cJSON *reply)
{
    const char *s = NULL;
    cJSON_Delete(res->reply);
    res->reply = reply;
    res->outcome[0] = '\0';
    if (mr_json_str(reply, "outcome", &s) == MR_OK)
        snprintf(res->outcome, sizeof res->outcome, "%s", s);
    if (mr_json_str(reply, "mode", &s) == MR_OK)
        snprintf(res->mode, sizeof res->mode, "%s", s);
}

mr_err mr_instance_provision(mr_db *db, const mr_identity *who, const mr_instance_config *cfg,
                             const char *subscription_id, const char *owner,
                             mr_instance_result *res, char *err, size_t errlen)
{
    char lease[16];
    snprintf(lease, sizeof lease, "%d", cfg->lease_s);
    const char *p[] = {subscription_id, owner, lease, cfg->resend_api_key ? "true" : "false"};
    memset(res, 0, sizeof *res);
    cJSON *reply = NULL;
    mr_err e = q_json(db, who,
                      "SELECT public.lifecycle_provision($1::uuid, $2, $3::int, $4::boolean)::text",
                      4, p, &reply, err, errlen);
    if (e == MR_OK) fill_result(res, reply);
    return e;
}

mr_err mr_instance_deprovision(mr_db *db, const mr_identity *who, const mr_instance_config *cfg,
                               const char *instance_id, const char *subscription_id,
                               const char *mode, const char *owner,
                               mr_instance_result *res, char *err, size_t errlen)
{
    char lease[16];
    snprintf(lease, sizeof lease, "%d", cfg->lease_s);
    const char *p[] = {instance_id, subscription_id, mode, owner, lease,
                       cfg->resend_api_key ? "true" : "false"};
    memset(res, 0, sizeof *res);
    cJSON *reply = NULL;
    mr_err e = q_json(db, who,
                      "SELECT public.lifecycle_deprovision($1::uuid, $2::uuid, $3, $4, $5::int,"
                      " $6::boolean)::text",
                      6, p, &reply, err, errlen);
    if (e == MR_OK) fill_result(res, reply);
    return e;
}

mr_err mr_instance_claim_next(mr_db *db, const mr_identity *who, const mr_instance_config *cfg,
                              const char *owner, mr_instance_result *res, char *err, size_t errlen)
{
    char lease[16];
    snprintf(lease, sizeof lease, "%d", cfg->lease_s);
    const char *p[] = {cfg->function, owner, lease, cfg->resend_api_key ? "true" : "false"};
    memset(res, 0, sizeof *res);
    cJSON *reply = NULL;
    mr_err e = q_json(db, who,
                      "SELECT public.lifecycle_claim_next($1, $2, $3::int, $4::boolean)::text",
                      4, p, &reply, err, errlen);
    if (e == MR_OK) fill_result(res, reply);
    return e;
}

/* --- the provisioner client --- */

static void copy_str(const cJSON *obj, const char *key, char *dst, size_t cap)
{
    const char *s = NULL;
    dst[0] = '\0';
    if (obj && mr_json_str(obj, key, &s) == MR_OK) snprintf(dst, cap, "%s", s);
}

/* Keeps an upstream message printable and short: it ends up in the row and in answers. */
static void describe_failure(mr_instance_call *out, const char *what, const mr_httpc_resp *resp)
{
    char msg[160] = "";
    cJSON *j = resp->body ? mr_json_parse(resp->body, resp->body_len) : NULL;
    const cJSON *eobj = j ? cJSON_GetObjectItemCaseSensitive(j, "error") : NULL;
    const char *s = NULL;
    if (cJSON_IsObject(eobj) && mr_json_str(eobj, "message", &s) == MR_OK)
        snprintf(msg, sizeof msg, "%s", s);
    else if (j && mr_json_str(j, "error", &s) == MR_OK)
        snprintf(msg, sizeof msg, "%s", s);
    cJSON_Delete(j);
    for (char *c = msg; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = ' ';
    snprintf(out->error, sizeof out->error, "provisioner %s answered %ld%s%s", what,
             resp->status, *msg ? ": " : "", msg);
}

static void classify(mr_instance_call *out, const char *what, const mr_httpc_resp *resp,
                     int missing_ok)
{
    out->status = resp->status;
    if (resp->status >= 200 && resp->status < 300) {
        out->ok = 1;
        cJSON *j = resp->body ? mr_json_parse(resp->body, resp->body_len) : NULL;
        copy_str(j, "backend_url", out->backend_url, sizeof out->backend_url);
        copy_str(j, "frontend_url", out->frontend_url, sizeof out->frontend_url);
        copy_str(j, "matrix_server_url", out->matrix_server_url, sizeof out->matrix_server_url);
        cJSON_Delete(j);
        return;
    }
    if (resp->status == 404 && missing_ok) {
        out->ok = 1;
        return;
    }
    describe_failure(out, what, resp);
    /* 401/403 mean our token is wrong (configuration, fixed by an operator, then
     * retried); 408/429 are load. Any other 4xx refuses this input: retrying it
     * unchanged cannot succeed. */
    long st = resp->status;
    out->rejected = st >= 400 && st < 500 && st != 401 && st != 403 && st != 408 && st != 429;
}

static void provisioner_call(mr_httpc *http, const mr_instance_config *cfg, const char *method,
                             const char *path, const char *body, const char *what,
                             int missing_ok, mr_instance_call *out)
{
    memset(out, 0, sizeof *out);
    char url[1024], auth[1024];
    size_t blen = strlen(cfg->provisioner_url);
    while (blen > 0 && cfg->provisioner_url[blen - 1] == '/') blen--;
    if ((size_t)snprintf(url, sizeof url, "%.*s%s", (int)blen, cfg->provisioner_url, path) >= sizeof url ||
        (size_t)snprintf(auth, sizeof auth, "Authorization: Bearer %s", cfg->provisioner_token) >= sizeof auth) {
        snprintf(out->error, sizeof out->error, "provisioner URL or token too long");
        return;
    }
    const char *headers[] = {auth, "Content-Type: application/json", "Accept: application/json", NULL};
    mr_httpc_req req = {
        .method = method, .url = url, .headers = headers,
        .body = body, .body_len = body ? strlen(body) : 0,
        .connect_timeout_ms = cfg->connect_timeout_ms,
        .timeout_ms = cfg->provisioner_timeout_ms,
        .max_body = 65536,
    };
    mr_httpc_resp resp = {0};
    char herr[200] = "";
    mr_err e = mr_httpc_do(http, &req, &resp, herr, sizeof herr);
    memset(auth, 0, sizeof auth);
    if (e != MR_OK) {
        snprintf(out->error, sizeof out->error, "provisioner %s: %s", what, herr);
        mr_httpc_resp_free(&resp);
        return;
    }
    classify(out, what, &resp, missing_ok);
    mr_httpc_resp_free(&resp);
}

void mr_instance_provisioner_create(mr_httpc *http, const mr_instance_config *cfg,
                                    const cJSON *payload, mr_instance_call *out)
{
    char *body = mr_json_print(payload);
    if (!body) {
        memset(out, 0, sizeof *out);
        snprintf(out->error, sizeof out->error, "out of memory");
        return;
    }
    provisioner_call(http, cfg, "POST", "/apps", body, "create", 0, out);
    free(body);
}

void mr_instance_provisioner_app(mr_httpc *http, const mr_instance_config *cfg,
                                 const char *app, const char *verb, mr_instance_call *out)
{
    char path[256];
    /* App names come from instance_names(): [a-z0-9-] only, nothing to escape. */
    for (const char *c = app; *c; c++) {
        if (!(islower((unsigned char)*c) || isdigit((unsigned char)*c) || *c == '-')) {
            memset(out, 0, sizeof *out);
            out->rejected = 1;
            snprintf(out->error, sizeof out->error, "invalid app name");
            return;
        }
    }
    if (strcmp(verb, "delete") == 0) {
        snprintf(path, sizeof path, "/apps/%s", app);
        provisioner_call(http, cfg, "DELETE", path, NULL, "delete", 1, out);
    } else {
        snprintf(path, sizeof path, "/apps/%s/%s", app, verb);
        /* A missing app is stopped; starting one is not (the caller falls back to create). */
        provisioner_call(http, cfg, "POST", path, "{}", verb, strcmp(verb, "stop") == 0, out);
    }
}

/* --- carrying out the steps --- */

static void do_email(mr_httpc *http, const mr_instance_config *cfg, const char *instance_id,
                     const cJSON *step, cJSON *result)
{
    const cJSON *email = cJSON_GetObjectItemCaseSensitive(step, "email");
    const char *to = NULL, *url = NULL;
    mr_json_str(email, "to", &to);
    mr_json_str(email, "frontend_url", &url);
    char idem[80], err[256] = "";
    snprintf(idem, sizeof idem, "welcome-%s", instance_id);
    char *text = mr_resend_welcome_text(url);
    mr_resend_config rc = {.base_url = cfg->resend_base_url, .api_key = cfg->resend_api_key,
                           .from = cfg->resend_from, .timeout_ms = cfg->resend_timeout_ms};
    long st = 0;
    mr_err e = text ? mr_resend_send(http, &rc, idem, to, MR_RESEND_WELCOME_SUBJECT, text,
                                     &st, err, sizeof err)
                    : mr_seterr(err, sizeof err, MR_EINTERNAL, "out of memory");
    free(text);
    cJSON_AddBoolToObject(result, "ok", e == MR_OK);
    if (e != MR_OK) {
        cJSON_AddBoolToObject(result, "rejected", e == MR_EINVAL);
        cJSON_AddStringToObject(result, "error", err);
        mr_log(MR_LOG_WARN, "welcome email for instance %s not sent: %s", instance_id, err);
    } else {
        mr_log(MR_LOG_INFO, "welcome email for instance %s sent", instance_id);
    }
}

/* Runs one step; fills result ({"ok", "rejected", "error", urls, "config_hash"}). */
static void do_step(mr_httpc *http, const mr_instance_config *cfg, const cJSON *step,
                    const char *action, const char *instance_id, cJSON *result)
{
    const char *app = "", *hash = NULL;
    mr_json_str(step, "app", &app);
    mr_json_str(step, "config_hash", &hash);
    const cJSON *payload = cJSON_GetObjectItemCaseSensitive(step, "payload");

    if (strcmp(action, "email") == 0) {
        do_email(http, cfg, instance_id, step, result);
        return;
    }
    mr_instance_call call;
    if (strcmp(action, "create") == 0 || strcmp(action, "update") == 0) {
        mr_instance_provisioner_create(http, cfg, payload, &call);
    } else if (strcmp(action, "start") == 0) {
        mr_instance_provisioner_app(http, cfg, app, "start", &call);
        /* The stopped app is gone (removed by hand, or never made): create it again
         * under the same name, so it resumes with the same identity. */
        if (!call.ok && call.status == 404)
            mr_instance_provisioner_create(http, cfg, payload, &call);
    } else if (strcmp(action, "stop") == 0) {
        mr_instance_provisioner_app(http, cfg, app, "stop", &call);
    } else if (strcmp(action, "destroy") == 0) {
        mr_instance_provisioner_app(http, cfg, app, "delete", &call);
    } else {
        memset(&call, 0, sizeof call);
        call.rejected = 1;
        snprintf(call.error, sizeof call.error, "unknown action");
    }
    cJSON_AddBoolToObject(result, "ok", call.ok);
    if (call.ok) {
        if (hash) cJSON_AddStringToObject(result, "config_hash", hash);
        if (call.backend_url[0]) cJSON_AddStringToObject(result, "backend_url", call.backend_url);
        if (call.frontend_url[0]) cJSON_AddStringToObject(result, "frontend_url", call.frontend_url);
        if (call.matrix_server_url[0])
            cJSON_AddStringToObject(result, "matrix_server_url", call.matrix_server_url);
    } else {
        cJSON_AddBoolToObject(result, "rejected", call.rejected);
        cJSON_AddStringToObject(result, "error", call.error);
    }
}

static mr_err finish(mr_db *db, const mr_identity *who, const mr_instance_config *cfg,
                     const char *instance_id, const char *token, const cJSON *result,
                     cJSON **reply, char *err, size_t errlen)
{
    char lease[16], base[16], cap[16];
    snprintf(lease, sizeof lease, "%d", cfg->lease_s);
    snprintf(base, sizeof base, "%d", cfg->backoff_base_s);
    snprintf(cap, sizeof cap, "%d", cfg->backoff_cap_s);
    char *rtext = mr_json_print(result);
    if (!rtext) return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    const char *p[] = {instance_id, token, rtext, lease, base, cap,
                       cfg->resend_api_key ? "true" : "false"};
    mr_err e = MR_ETRANSIENT;
    /* The outcome of a call that may have taken minutes is worth a few retries; if
     * the database stays away the lease expires and the step is done again. */
    for (int attempt = 0; attempt < 4; attempt++) {
        if (attempt) usleep(250000u << attempt);
        e = q_json(db, who,
                   "SELECT public.lifecycle_finish($1::uuid, $2, $3::jsonb, $4::int, $5::int,"
                   " $6::int, $7::boolean)::text", 7, p, reply, err, errlen);
        if (e != MR_ETRANSIENT) break;
    }
    free(rtext);
    return e;
}

mr_err mr_instance_run(mr_db *db, mr_httpc *http, const mr_identity *who,
                       const mr_instance_config *cfg, mr_instance_result *res,
                       char *err, size_t errlen)
{
    res->failed_action[0] = '\0';
    for (int n = 0; n < MAX_STEPS && strcmp(res->outcome, "claimed") == 0; n++) {
        const cJSON *step = cJSON_GetObjectItemCaseSensitive(res->reply, "step");
        const char *action = NULL, *token = NULL, *iid = NULL;
        if (mr_json_str(step, "action", &action) != MR_OK ||
            mr_json_str(step, "token", &token) != MR_OK ||
            mr_json_str(step, "instance_id", &iid) != MR_OK)
            return mr_seterr(err, errlen, MR_EINTERNAL, "claimed step without action/token");
        char act[16], instance_id[40];
        snprintf(act, sizeof act, "%s", action);
        snprintf(instance_id, sizeof instance_id, "%s", iid);

        int64_t t0 = mr_now_ms();
        cJSON *result = cJSON_CreateObject();
        do_step(http, cfg, step, act, instance_id, result);
        int ok = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(result, "ok"));
        const char *why = NULL;
        mr_json_str(result, "error", &why);
        mr_log(ok ? MR_LOG_INFO : MR_LOG_WARN, "instance %s: %s %s in %lld ms%s%s", instance_id,
               act, ok ? "succeeded" : "failed", (long long)(mr_now_ms() - t0),
               why ? ": " : "", why ? why : "");

        cJSON *reply = NULL;
        mr_err e = finish(db, who, cfg, instance_id, token, result, &reply, err, errlen);
        cJSON_Delete(result);
        if (e != MR_OK) {
            mr_log(MR_LOG_ERROR, "instance %s: could not record %s: %s", instance_id, act, err);
            return e;
        }
        fill_result(res, reply);
        if (strcmp(res->outcome, "failed") == 0)
            snprintf(res->failed_action, sizeof res->failed_action, "%s", act);
        if (strcmp(res->outcome, "lost") == 0)
            mr_log(MR_LOG_WARN, "instance %s: lease taken over before %s was recorded",
                   instance_id, act);
    }
    return MR_OK;
}

mr_err mr_instance_await(mr_db *db, const mr_identity *who, mr_instance_result *res,
                         long max_ms, char *err, size_t errlen)
{
    const cJSON *inst = mr_instance_of(res);
    const char *id = NULL;
    if (!inst || mr_json_str(inst, "id", &id) != MR_OK) return MR_OK;
    char iid[40];
    snprintf(iid, sizeof iid, "%s", id);
    int64_t deadline = mr_now_ms() + max_ms;
    while (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(mr_instance_of(res), "busy")) &&
           mr_now_ms() < deadline) {
        usleep(200000);
        const char *p[] = {iid};
        cJSON *fresh = NULL;
        mr_err e = q_json(db, who, "SELECT public.lifecycle_get($1::uuid)::text", 1, p, &fresh,
                          err, errlen);
        if (e != MR_OK) return e;
        cJSON_ReplaceItemInObjectCaseSensitive(res->reply, "instance", fresh);
    }
    return MR_OK;
}

cJSON *mr_instance_response(const mr_instance_result *res, int waited, int *status)
{
    const cJSON *inst = mr_instance_of(res);
    cJSON *out = cJSON_CreateObject();
    cJSON_AddItemToObject(out, "instance", inst ? cJSON_Duplicate(inst, 1) : cJSON_CreateNull());
    if (res->mode[0]) cJSON_AddStringToObject(out, "mode", res->mode);

    int busy = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(inst, "busy"));
    if (!waited) {
        /* A running instance that only owes its welcome email is answered as it is
         * (200): the email goes out after the answer and never changes the instance. */
        const char *action = "";
        mr_json_str(cJSON_GetObjectItemCaseSensitive(res->reply, "step"), "action", &action);
        int only_email = strcmp(res->outcome, "claimed") == 0 && strcmp(action, "email") == 0;
        int pending = strcmp(res->outcome, "claimed") == 0 || strcmp(res->outcome, "queued") == 0;
        *status = !only_email && (pending || busy) ? 202 : 200;
        return out;
    }
    const char *st = "", *last = NULL;
    mr_json_str(inst, "status", &st);
    mr_json_str(inst, "last_error", &last);
    /* Still someone else's, past our wait, or left mid-way by a worker that died
     * (its lease ran out while we waited): answer as it stands, not as done. */
    if (busy || strcmp(res->outcome, "claimed") == 0 || strcmp(res->outcome, "lost") == 0 ||
        strcmp(st, "provisioning") == 0 || strcmp(st, "deprovisioning") == 0) {
        *status = 202;
        return out;
    }
    /* A failed welcome email never fails provisioning. */
    int failed = strcmp(st, "failed") == 0 ||
                 (res->failed_action[0] && strcmp(res->failed_action, "email") != 0);
    if (failed && last) {
        int rejected = strncmp(last, "rejected:", 9) == 0;
        *status = rejected ? 502 : 503;
        cJSON *e = cJSON_AddObjectToObject(out, "error");
        cJSON_AddStringToObject(e, "code", rejected ? "provisioner_rejected" : "provisioner_unavailable");
        cJSON_AddStringToObject(e, "message", last);
        return out;
    }
    *status = 200;
    return out;
}

/* --- the shared request tail of both functions --- */

typedef struct {
    const mr_instance_config *cfg;
    mr_instance_result res;
    int slot;
    char owner[160];
} job;

static void job_run(mr_req *r, void *arg)
{
    job *j = arg;
    char err[256] = "";
    if (mr_instance_run(r->db, r->http, &r->who, j->cfg, &j->res, err, sizeof err) != MR_OK) {
        mr_log(MR_LOG_ERROR, "deferred lifecycle work stopped: %s", err);
        return;
    }
    /* Work left owed while this worker was busy ("queued" answers) is taken on now,
     * under the same job slot, instead of waiting for the next sweep. */
    for (int n = 0; n < j->cfg->drain && j->cfg->function; n++) {
        mr_instance_result next;
        if (mr_instance_claim_next(r->db, &r->who, j->cfg, j->owner, &next, err, sizeof err) != MR_OK) {
            mr_log(MR_LOG_WARN, "draining owed work stopped: %s", err);
            return;
        }
        int claimed = strcmp(next.outcome, "claimed") == 0;
        mr_err e = claimed ? mr_instance_run(r->db, r->http, &r->who, j->cfg, &next, err, sizeof err)
                           : MR_OK;
        mr_instance_result_free(&next);
        if (!claimed) return;
        if (e != MR_OK) {
            mr_log(MR_LOG_ERROR, "deferred lifecycle work stopped: %s", err);
            return;
        }
    }
}

static void job_free(void *arg)
{
    job *j = arg;
    mr_instance_result_free(&j->res);
    mr_instance_slot_release(j->slot);
    free(j);
}

void mr_instance_reply(mr_req *r, const mr_instance_config *cfg, mr_instance_result *res, int wait,
                       int slot, const char *owner)
{
    char err[256] = "";
    int status = 200;
    int claimed = strcmp(res->outcome, "claimed") == 0;
    int busy = strcmp(res->outcome, "busy") == 0;

    if (claimed && !wait) {
        /* Answer now (the caller, e.g. the webhook, never waits on Dokku); the same
         * worker carries out the steps once the answer has gone out. */
        cJSON *body = mr_instance_response(res, 0, &status);
        job *j = calloc(1, sizeof *j);
        if (!j) {
            cJSON_Delete(body);
            mr_instance_result_free(res);
            mr_instance_slot_release(slot);
            mr_reply_error(r, 500, "internal", "out of memory");
            return;
        }
        j->cfg = cfg;
        j->slot = slot;
        snprintf(j->owner, sizeof j->owner, "%s", owner ? owner : "");
        j->res = *res;
        memset(res, 0, sizeof *res);
        mr_reply_json(r, status, body);
        mr_defer(r, job_run, j, job_free);
        return;
    }
    if (wait && strcmp(res->outcome, "queued") == 0) {
        mr_instance_result_free(res);
        mr_reply_error(r, 503, "busy", "every worker of this function is busy with other "
                       "instances; the work is recorded as owed, retry later");
        return;
    }
    mr_err e = MR_OK;
    if (claimed)
        e = mr_instance_run(r->db, r->http, &r->who, cfg, res, err, sizeof err);
    else if (busy && wait)
        e = mr_instance_await(r->db, &r->who, res, cfg->wait_ms, err, sizeof err);
    mr_instance_slot_release(slot);
    if (e != MR_OK) {
        mr_instance_result_free(res);
        mr_reply_err(r, e, err);
        return;
    }
    cJSON *body = mr_instance_response(res, wait, &status);
    mr_instance_result_free(res);
    mr_reply_json(r, status, body);
}
