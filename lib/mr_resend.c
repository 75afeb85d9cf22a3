/* mr_resend.c: see mr_resend.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mr_httpc.h"
#include "mr_json.h"
#include "mr_resend.h"

mr_err mr_resend_send(mr_httpc *http, const mr_resend_config *cfg, const char *idempotency_key,
                      const char *to, const char *subject, const char *text,
                      mr_httpc_outcome *outcome, long *retry_after_s, char *err, size_t errlen)
{
    if (outcome) *outcome = MR_HTTPC_UNSENT;
    if (retry_after_s) *retry_after_s = 0;
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
    if (st >= 200 && st < 300) {
        mr_httpc_resp_free(&resp);
        return MR_OK;
    }
    /* Resend's error: {"statusCode", "name", "message"}; the name tells a refusal of
     * this email from a failure of ours (the key) or of the moment. */
    char name[64] = "", why[256] = "";
    cJSON *eb = resp.body ? mr_json_parse(resp.body, resp.body_len) : NULL;
    const char *s = NULL;
    if (mr_json_str(eb, "name", &s) == MR_OK) snprintf(name, sizeof name, "%s", s);
    if (mr_json_str(eb, "message", &s) == MR_OK) snprintf(why, sizeof why, "%s", s);
    cJSON_Delete(eb);
    char after[32] = "";
    if (retry_after_s && mr_httpc_resp_header(&resp, "retry-after", after, sizeof after)) {
        char *end = NULL;
        long v = strtol(after, &end, 10);
        if (end != after && *end == '\0' && v > 0 && v <= 86400) *retry_after_s = v;
    }
    mr_httpc_resp_free(&resp);
    /* Transient: a rate limit or quota (429, its retry-after), Resend's failure (5xx),
     * the same Idempotency-Key still in progress (409), and the key refused (401, 403
     * invalid_api_key...: the operator's to fix, every email alike). Anything else
     * (validation_error: the address, an unverified domain; the same key with another
     * payload) refuses this email whenever it is sent again. */
    int transient = st == 429 || st >= 500 || st == 401
                    || (st == 409 && !strcmp(name, "concurrent_idempotent_requests"))
                    || (st == 403 && strcmp(name, "validation_error") != 0);
    return mr_seterr(err, errlen, transient ? MR_ETRANSIENT : MR_EINVAL,
                     "resend %s the email (%ld%s%s%s%s)", transient ? "did not take" : "refused",
                     st, *name ? " " : "", name, *why ? ": " : "", why);
}

const char *mr_resend_welcome_subject(int returning)
{
    return returning ? "Your MindRoom is back" : "Your MindRoom is ready";
}

char *mr_resend_welcome_text(const char *frontend_url, int returning)
{
    const char *url = frontend_url && *frontend_url ? frontend_url : "(your MindRoom URL)";
#define WELCOME_FMT \
        "Welcome to MindRoom!\n\n" \
        "Your MindRoom instance is up and running at:\n\n  %s\n\n" \
        "Sign in there to set up your agents and connect your chat apps.\n\n" \
        "-- The MindRoom team\n"
#define BACK_FMT \
        "Welcome back to MindRoom!\n\n" \
        "Your MindRoom is running again at:\n\n  %s\n\n" \
        "with the rooms, agents and settings it had before. Sign in there and carry on " \
        "where you left off.\n\n" \
        "-- The MindRoom team\n"
    int n = snprintf(NULL, 0, returning ? BACK_FMT : WELCOME_FMT, url);
    if (n < 0) return NULL;
    char *out = malloc((size_t)n + 1);
    if (out) snprintf(out, (size_t)n + 1, returning ? BACK_FMT : WELCOME_FMT, url);
#undef WELCOME_FMT
#undef BACK_FMT
    return out;
}
