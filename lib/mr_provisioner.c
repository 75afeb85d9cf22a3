/* mr_provisioner.c: see mr_provisioner.h. */
#include "mr_provisioner.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "mr_json.h"
#include "mr_metrics.h"

/* The provisioners' rule (mr_provisioner.h): one for every call and every check. */
static const mr_addr_rule provisioner_addrs = {.allow_loopback = 1, .allow_private = 1};

mr_err mr_provisioner_check_url(const char *url, char *why, size_t whylen)
{
    return mr_addr_check_url(url, &provisioner_addrs, why, whylen);
}

static void copy_str(const cJSON *obj, const char *key, char *dst, size_t cap)
{
    const char *s = NULL;
    dst[0] = '\0';
    if (obj && mr_json_str(obj, key, &s) == MR_OK)
        snprintf(dst, cap, "%s", s);
}

/* Keeps an upstream message printable and short: it ends up in the row and in answers. */
static void describe_failure(mr_provisioner_call *out, const char *what, const mr_httpc_resp *resp)
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
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            *c = ' ';
    snprintf(out->error, sizeof out->error, "provisioner %s answered %ld%s%s", what,
             resp->status, *msg ? ": " : "", msg);
}

/* Whether the answer is the provisioner's error `code` ({"error": {"code": ...}}). */
static int says(const mr_httpc_resp *resp, const char *code)
{
    cJSON *j = resp->body ? mr_json_parse(resp->body, resp->body_len) : NULL;
    const cJSON *eobj = j ? cJSON_GetObjectItemCaseSensitive(j, "error") : NULL;
    const char *got = NULL;
    int yes = cJSON_IsObject(eobj) && mr_json_str(eobj, "code", &got) == MR_OK &&
              strcmp(got, code) == 0;
    cJSON_Delete(j);
    return yes;
}

static void classify(mr_provisioner_call *out, const char *what, const mr_httpc_resp *resp,
                     int missing_ok)
{
    out->status = resp->status;
    if (resp->status >= 200 && resp->status < 300) {
        out->ok = 1;
        cJSON *j = resp->body ? mr_json_parse(resp->body, resp->body_len) : NULL;
        copy_str(j, "backend_url", out->backend_url, sizeof out->backend_url);
        copy_str(j, "frontend_url", out->frontend_url, sizeof out->frontend_url);
        copy_str(j, "matrix_server_url", out->matrix_server_url, sizeof out->matrix_server_url);
        copy_str(j, "matrix_server_name", out->matrix_server_name, sizeof out->matrix_server_name);
        out->purged = j && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "purged"));
        out->all_restarted = j && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "all_restarted"));
        const cJSON *dry = j ? cJSON_GetObjectItemCaseSensitive(j, "dry_run") : NULL;
        out->dry_run = cJSON_IsBool(dry) ? cJSON_IsTrue(dry) : -1;
        cJSON_Delete(j);
        return;
    }
    /* Only a 404 that says the app is missing, not one from a wrong route or base
     * path (the provisioner's "no_route", a proxy's own page), makes a stop or a
     * destroy done, lest a misconfigured URL record every instance stopped,
     * destroyed or purged while nothing happened. */
    if (resp->status == 404 && missing_ok && says(resp, "not_found")) {
        out->ok = 1;
        return;
    }
    describe_failure(out, what, resp);
    out->host_unreachable = resp->status == 503 && says(resp, "dokku_unreachable");
    /* 401/403 mean our token is wrong (configuration, fixed by an operator, then
     * retried); 408/429 are load. Any other 4xx refuses this input: retrying it
     * unchanged cannot succeed. */
    long st = resp->status;
    out->rejected = st >= 400 && st < 500 && st != 401 && st != 403 && st != 408 && st != 429;
}

static void call(mr_httpc *http, const mr_provisioner *p, const char *method, const char *path,
                 const char *body, const char *what, int missing_ok, mr_metrics_prov_route route,
                 mr_provisioner_call *out)
{
    memset(out, 0, sizeof *out);
    out->dry_run = -1;
    int64_t t0 = mr_now_ms();
    char url[1024], auth[1024];
    size_t blen = strlen(p->url);
    while (blen > 0 && p->url[blen - 1] == '/')
        blen--;
    if ((size_t)snprintf(url, sizeof url, "%.*s%s", (int)blen, p->url, path) >= sizeof url ||
        (size_t)snprintf(auth, sizeof auth, "Authorization: Bearer %s", p->token) >= sizeof auth) {
        snprintf(out->error, sizeof out->error, "provisioner URL or token too long");
        return;
    }
    const char *headers[] = {auth, "Content-Type: application/json", "Accept: application/json", NULL};
    mr_httpc_req req = {
        .method = method, .url = url, .headers = headers,
        .body = body, .body_len = body ? strlen(body) : 0,
        .connect_timeout_ms = p->connect_timeout_ms, .timeout_ms = p->timeout_ms,
        .max_body = 65536, .abort_cb = p->abort_cb, .abort_arg = p->abort_arg,
        .addr_rule = &provisioner_addrs,
    };
    mr_httpc_resp resp = {0};
    char herr[200] = "";
    mr_err e = mr_httpc_do(http, &req, &resp, herr, sizeof herr);
    memset(auth, 0, sizeof auth);
    out->outcome = resp.outcome;
    if (e != MR_OK) {
        snprintf(out->error, sizeof out->error, "provisioner %s: %s", what, herr);
    }
    else
        classify(out, what, &resp, missing_ok);
    mr_httpc_resp_free(&resp);
    mr_metrics_provisioner_call(route, out->ok                              ? MR_PROV_OK
                                       : out->outcome == MR_HTTPC_ABORTED ? MR_PROV_ABORTED
                                       : out->rejected                    ? MR_PROV_REJECTED
                                                                          : MR_PROV_FAILED,
                                (mr_now_ms() - t0) * 1000);
}

void mr_provisioner_apply(mr_httpc *http, const mr_provisioner *p, const cJSON *payload,
                          mr_provisioner_call *out)
{
    char *body = payload ? mr_json_print_wiped(payload) : NULL;
    if (!body) {
        memset(out, 0, sizeof *out);
        out->rejected = payload != NULL ? 0 : 1;
        snprintf(out->error, sizeof out->error, payload ? "out of memory" : "no payload");
        return;
    }
    call(http, p, "POST", "/apps", body, "POST /apps", 0, MR_PROV_APPLY, out);
    OPENSSL_cleanse(body, strlen(body)); /* it held the instance's secrets */
    free(body);
}

void mr_provisioner_app(mr_httpc *http, const mr_provisioner *p, const char *app,
                        mr_action action, int purge, mr_provisioner_call *out)
{
    char path[256];
    int valid = app && *app && strlen(app) < 200;
    for (const char *c = app; valid && *c; c++)
        valid = islower((unsigned char)*c) || isdigit((unsigned char)*c) || *c == '-';
    if (!valid || (action != MR_ACTION_START && action != MR_ACTION_STOP &&
                   action != MR_ACTION_RESTART && action != MR_ACTION_DESTROY &&
                   action != MR_ACTION_DESTROY_STORAGE)) {
        memset(out, 0, sizeof *out);
        out->rejected = 1;
        snprintf(out->error, sizeof out->error, valid ? "no provisioner route for %s"
                                                      : "invalid app name", mr_action_name(action));
        return;
    }
    switch (action) {
    case MR_ACTION_DESTROY:
        snprintf(path, sizeof path, "/apps/%s%s", app, purge ? "?purge=true" : "");
        call(http, p, "DELETE", path, NULL, "DELETE /apps/{app}", 1, MR_PROV_DESTROY, out);
        if (out->ok && out->status == 404)
            out->purged = purge; /* nothing was there to keep */
        break;
    case MR_ACTION_DESTROY_STORAGE:
        snprintf(path, sizeof path, "/apps/%s/storage", app);
        call(http, p, "DELETE", path, NULL, "DELETE /apps/{app}/storage", 1,
             MR_PROV_DESTROY_STORAGE, out);
        break;
    default: {
        const char *what = action == MR_ACTION_STOP      ? "POST /apps/{app}/stop"
                           : action == MR_ACTION_RESTART ? "POST /apps/{app}/restart"
                                                         : "POST /apps/{app}/start";
        snprintf(path, sizeof path, "/apps/%s/%s", app, mr_action_name(action));
        /* A missing app is stopped; starting or restarting one is not (the caller
         * falls back to create). */
        call(http, p, "POST", path, "{}", what, action == MR_ACTION_STOP,
             action == MR_ACTION_STOP      ? MR_PROV_STOP
             : action == MR_ACTION_RESTART ? MR_PROV_RESTART
                                           : MR_PROV_START,
             out);
    }
    }
}
