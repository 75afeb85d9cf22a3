/* mr_resend.c: see mr_resend.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mr_httpc.h"
#include "mr_json.h"
#include "mr_resend.h"

mr_err mr_resend_send(mr_httpc *http, const mr_resend_config *cfg, const char *idempotency_key,
                      const char *to, const char *subject, const char *text,
                      mr_httpc_outcome *outcome, char *err, size_t errlen)
{
    if (outcome) *outcome = MR_HTTPC_UNSENT;
    if (!cfg->api_key || !*cfg->api_key)
        return mr_seterr(err, errlen, MR_EINVAL, "RESEND_API_KEY is not set");
    if (!to || !*to)
        return mr_seterr(err, errlen, MR_EINVAL, "no recipient address");

    char url[1024];
    size_t blen = strlen(cfg->base_url);
    while (blen > 0 && cfg->base_url[blen - 1] == '/') blen--;
    if ((size_t)snprintf(url, sizeof url, "%.*s/emails", (int)blen, cfg->base_url) >= sizeof url)
        return mr_seterr(err, errlen, MR_EINVAL, "RESEND_BASE_URL is too long");

    cJSON *msg = cJSON_CreateObject();
    cJSON_AddStringToObject(msg, "from", cfg->from);
    cJSON *rcpt = cJSON_AddArrayToObject(msg, "to");
    cJSON_AddItemToArray(rcpt, cJSON_CreateString(to));
    cJSON_AddStringToObject(msg, "subject", subject);
    cJSON_AddStringToObject(msg, "text", text);
    char *body = mr_json_print(msg);
    cJSON_Delete(msg);
    if (!body) return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");

    /* The key lives only in this stack buffer and the header list. */
    char auth[512], idem[256];
    if ((size_t)snprintf(auth, sizeof auth, "Authorization: Bearer %s", cfg->api_key) >= sizeof auth) {
        free(body);
        return mr_seterr(err, errlen, MR_EINVAL, "RESEND_API_KEY is too long");
    }
    snprintf(idem, sizeof idem, "Idempotency-Key: %s", idempotency_key);
    const char *headers[] = {auth, idem, "Content-Type: application/json",
                             "Accept: application/json", NULL};
    mr_httpc_req req = {
        .method = "POST", .url = url, .headers = headers,
        .body = body, .body_len = strlen(body),
        .connect_timeout_ms = 2000,
        .timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 10000,
        .max_body = 65536,
    };
    mr_httpc_resp resp = {0};
    char herr[256] = "";
    mr_err e = mr_httpc_do(http, &req, &resp, herr, sizeof herr);
    memset(auth, 0, sizeof auth);
    free(body);
    if (outcome) *outcome = resp.outcome;
    if (e != MR_OK) {
        mr_httpc_resp_free(&resp);
        return mr_seterr(err, errlen, e == MR_EINVAL ? MR_EINVAL : MR_ETRANSIENT,
                         "resend: %s", herr);
    }
    long st = resp.status;
    mr_httpc_resp_free(&resp);
    if (st >= 200 && st < 300) return MR_OK;
    if (st == 429 || st >= 500)
        return mr_seterr(err, errlen, MR_ETRANSIENT, "resend answered %ld", st);
    return mr_seterr(err, errlen, MR_EINVAL, "resend refused the email (%ld)", st);
}

char *mr_resend_welcome_text(const char *frontend_url)
{
    const char *url = frontend_url && *frontend_url ? frontend_url : "(your MindRoom URL)";
#define WELCOME_FMT \
        "Welcome to MindRoom!\n\n" \
        "Your MindRoom instance is up and running at:\n\n  %s\n\n" \
        "Sign in there to set up your agents and connect your chat apps.\n\n" \
        "-- The MindRoom team\n"
    int n = snprintf(NULL, 0, WELCOME_FMT, url);
    if (n < 0) return NULL;
    char *out = malloc((size_t)n + 1);
    if (out) snprintf(out, (size_t)n + 1, WELCOME_FMT, url);
#undef WELCOME_FMT
    return out;
}
