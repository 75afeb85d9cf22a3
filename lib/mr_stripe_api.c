/* mr_stripe_api.c: see mr_stripe_api.h. */
#include "mr_stripe_api.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <curl/curl.h>

#include "mr_config.h"
#include "mr_httpc.h"
#include "mr_json.h"
#include "mr_log.h"

#define FORM_MAX_DEPTH 8
#define MIN_DELAY_MS 500L         /* stripe-node: INITIAL_NETWORK_RETRY_DELAY_SEC */
#define MAX_DELAY_MS 5000L        /* stripe-node: MAX_NETWORK_RETRY_DELAY_SEC */
#define MIN_ATTEMPT_MS 250        /* an attempt with less time left is not started */
#define MAX_ANSWER ((size_t)1 << 20)

/* ---- configuration -------------------------------------------------------- */

static void die(const char *msg)
{
    fprintf(stderr, "config: %s\n", msg);
    exit(2);
}

mr_err mr_stripe_api_check_key(const char *key, int *livemode, char *err, size_t errlen)
{
    static const struct {
        const char *prefix;
        int live;
    } kinds[] = {{"sk_test_", 0}, {"sk_live_", 1}, {"rk_test_", 0}, {"rk_live_", 1}};
    mr_err e = mr_config_check_secret("STRIPE_SECRET_KEY", key, 24, err, errlen);
    if (e != MR_OK)
        return e;
    if (strncmp(key, "pk_", 3) == 0)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "STRIPE_SECRET_KEY holds a publishable key (pk_...): use the secret key");
    if (strncmp(key, "whsec_", 6) == 0)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "STRIPE_SECRET_KEY holds a webhook signing secret (whsec_...): use the "
                         "API secret key");
    for (size_t i = 0; i < MR_ARRAY_LEN(kinds); i++) {
        size_t plen = strlen(kinds[i].prefix);
        if (strncmp(key, kinds[i].prefix, plen) != 0)
            continue;
        size_t n = 0;
        for (const char *p = key + plen; *p; p++, n++)
            if (!isalnum((unsigned char)*p))
                return mr_seterr(err, errlen, MR_EINVAL,
                                 "STRIPE_SECRET_KEY has characters a Stripe key never has");
        if (n < 16)
            break;
        if (livemode)
            *livemode = kinds[i].live;
        return MR_OK;
    }
    return mr_seterr(err, errlen, MR_EINVAL,
                     "STRIPE_SECRET_KEY must be a secret key (sk_test_..., sk_live_...) or a "
                     "restricted key (rk_test_..., rk_live_...)");
}

void mr_stripe_api_config_load(mr_stripe_api_config *cfg, const char *without_key)
{
    memset(cfg, 0, sizeof(*cfg));
    const char *key = mr_config_getenv("STRIPE_SECRET_KEY");
    if (key && *key) {
        char msg[256];
        if (mr_stripe_api_check_key(key, &cfg->livemode, msg, sizeof msg) != MR_OK)
            die(msg);
        cfg->secret_key = key;
    }
    cfg->base_url = mr_config_url("STRIPE_API_BASE", MR_STRIPE_API_DEFAULT_BASE);
    /* nginx's fastcgi_read_timeout for these functions is 60 s: the Stripe
     * calls of one request, plus a few short transactions, stay below it. */
    cfg->deadline_ms = (long)mr_config_int("STRIPE_DEADLINE_MS", 20000, 1000, 45000);
    cfg->connect_timeout_ms = (long)mr_config_int("STRIPE_CONNECT_TIMEOUT_MS", 3000, 100, 30000);
    cfg->max_retries = (int)mr_config_int("STRIPE_MAX_RETRIES", 2, 0, 5);
    if (cfg->secret_key)
        mr_log(MR_LOG_INFO, "Stripe API at %s in %s mode, version " MR_STRIPE_API_VERSION,
               cfg->base_url, cfg->livemode ? "live" : "test");
    else
        mr_log(MR_LOG_WARN, "STRIPE_SECRET_KEY unset: %s", without_key);
}

/* ---- form encoding -------------------------------------------------------- */

typedef struct {
    char *buf;
    size_t len, cap;
    int failed;
} strbuf;

static void put(strbuf *b, const char *s, size_t n)
{
    if (b->failed)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->buf, cap);
        if (!p) {
            b->failed = 1;
            return;
        }
        b->buf = p;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, s, n);
    b->len += n;
    b->buf[b->len] = '\0';
}

/* RFC 3986 percent-encoding (libcurl's: everything but A-Z a-z 0-9 - . _ ~). */
static void put_escaped(strbuf *b, const char *s)
{
    char *e = curl_easy_escape(NULL, s, (int)strlen(s));
    if (!e) {
        b->failed = 1;
        return;
    }
    put(b, e, strlen(e));
    curl_free(e);
}

/* Appends the pairs of `item` under `key` (already encoded; "" at the top). */
static void put_pairs(strbuf *b, const cJSON *item, const char *key, int depth)
{
    if (b->failed)
        return;
    if (depth > FORM_MAX_DEPTH) {
        b->failed = 1;
        return;
    }
    if (cJSON_IsObject(item) || cJSON_IsArray(item)) {
        int i = 0;
        for (const cJSON *c = item->child; c && !b->failed; c = c->next, i++) {
            strbuf k = {0};
            if (*key) {
                put(&k, key, strlen(key));
                put(&k, "[", 1);
            }
            if (cJSON_IsArray(item)) {
                char idx[16];
                put(&k, idx, (size_t)snprintf(idx, sizeof idx, "%d", i));
            } else {
                put_escaped(&k, c->string ? c->string : "");
            }
            if (*key)
                put(&k, "]", 1);
            if (k.failed || !k.buf)
                b->failed = 1;
            else
                put_pairs(b, c, k.buf, depth + 1);
            free(k.buf);
        }
        return;
    }
    if (!*key) { /* a bare value has no name */
        b->failed = 1;
        return;
    }
    if (b->len)
        put(b, "&", 1);
    put(b, key, strlen(key));
    put(b, "=", 1);
    if (cJSON_IsString(item)) {
        put_escaped(b, item->valuestring ? item->valuestring : "");
    } else if (cJSON_IsBool(item)) {
        const char *v = cJSON_IsTrue(item) ? "true" : "false";
        put(b, v, strlen(v));
    } else if (cJSON_IsNumber(item)) {
        double d = item->valuedouble;
        if (!isfinite(d) || d != trunc(d) || fabs(d) > 9007199254740991.0) {
            b->failed = 1;
            return;
        }
        char num[32];
        put(b, num, (size_t)snprintf(num, sizeof num, "%lld", (long long)d));
    } else if (!cJSON_IsNull(item)) {
        b->failed = 1; /* cJSON_Raw and the like */
    }
}

char *mr_stripe_api_form(const cJSON *params)
{
    if (!cJSON_IsObject(params))
        return NULL;
    strbuf b = {0};
    put(&b, "", 0); /* an empty object encodes as "" */
    put_pairs(&b, params, "", 0);
    if (b.failed) {
        free(b.buf);
        return NULL;
    }
    return b.buf;
}

/* ---- retries -------------------------------------------------------------- */

int mr_stripe_api_retryable(long status, const char *should_retry)
{
    if (status == 0)
        return 1;
    /* Stripe knows best: "false" after a 500 means the request was applied (or
     * will be) and a retry would only replay it; "true" marks lock timeouts. */
    if (should_retry && strcmp(should_retry, "false") == 0)
        return 0;
    if (should_retry && strcmp(should_retry, "true") == 0)
        return 1;
    return status == 409 || status == 429 || status >= 500;
}

long mr_stripe_api_backoff_ms(int retry, double random01)
{
    if (retry < 1)
        retry = 1;
    double d = (double)MIN_DELAY_MS * pow(2.0, retry - 1);
    if (d > (double)MAX_DELAY_MS)
        d = (double)MAX_DELAY_MS;
    if (random01 < 0.0 || !(random01 < 1.0))
        random01 = 0.0;
    d *= 0.5 * (1.0 + random01);
    return d < (double)MIN_DELAY_MS ? MIN_DELAY_MS : (long)d;
}

static double random01(void)
{
    uint32_t u;
    if (getrandom(&u, sizeof u, 0) != (ssize_t)sizeof u)
        u = (uint32_t)mr_now_ms() * 2654435761u;
    return u / 4294967296.0;
}

/* ---- one call ------------------------------------------------------------- */

static void copy(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

int mr_stripe_api_parse_error(const char *body, size_t len, mr_stripe_api_result *res,
                              char *msg, size_t msglen)
{
    if (msglen)
        msg[0] = '\0';
    cJSON *root = mr_json_parse(body, len);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(root, "error");
    int ok = cJSON_IsObject(e);
    if (ok) {
        const char *s = NULL;
        if (mr_json_str(e, "type", &s) == MR_OK)
            copy(res->error_type, sizeof res->error_type, s);
        if (mr_json_str(e, "code", &s) == MR_OK)
            copy(res->error_code, sizeof res->error_code, s);
        if (mr_json_str(e, "message", &s) == MR_OK) {
            /* Stripe says so in the message only. */
            res->other_mode = strstr(s, "a similar object exists in live mode") != NULL ||
                              strstr(s, "a similar object exists in test mode") != NULL;
            if (msglen)
                copy(msg, msglen, s);
        }
    }
    cJSON_Delete(root);
    return ok;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* One POST (form: its body), DELETE or GET (form NULL: no body), as described in the
 * header. */
static mr_err request(mr_httpc *http, const mr_stripe_api_config *cfg, const char *method,
                      const char *target, const char *form, const char *idempotency_key,
                      int64_t deadline_ms, mr_stripe_api_result *res, char *err, size_t errlen)
{
    memset(res, 0, sizeof(*res));
    /* Errors and log lines name the path, never its query (a GET's may hold an email). */
    char path[256];
    snprintf(path, sizeof path, "%.*s", (int)strcspn(target, "?"), target);
    if (!cfg->secret_key)
        return mr_seterr(err, errlen, MR_EINTERNAL, "STRIPE_SECRET_KEY is not set");
    char url[1024], auth[512], idem[320];
    size_t blen = strlen(cfg->base_url);
    while (blen > 0 && cfg->base_url[blen - 1] == '/')
        blen--;
    if ((size_t)snprintf(url, sizeof url, "%.*s%s", (int)blen, cfg->base_url, target) >= sizeof url ||
        (idempotency_key &&
         (size_t)snprintf(idem, sizeof idem, "Idempotency-Key: %s", idempotency_key) >= sizeof idem))
        return mr_seterr(err, errlen, MR_EINTERNAL, "Stripe URL or idempotency key too long");
    if ((size_t)snprintf(auth, sizeof auth, "Authorization: Bearer %s", cfg->secret_key) >= sizeof auth)
        return mr_seterr(err, errlen, MR_EINTERNAL, "STRIPE_SECRET_KEY is too long");
    /* A GET carries no key (Stripe ignores one there) and no body. */
    const char *headers[] = {auth, "Stripe-Version: " MR_STRIPE_API_VERSION, "Accept: application/json",
                             form ? "Content-Type: application/x-www-form-urlencoded" : NULL,
                             NULL, NULL};
    if (idempotency_key)
        headers[form ? 4 : 3] = idem;
    mr_err rc;
    for (int retry = 0;; retry++) {
        int64_t left = deadline_ms - mr_now_ms();
        if (left < MIN_ATTEMPT_MS) {
            rc = mr_seterr(err, errlen, MR_ETRANSIENT, "Stripe %s: deadline reached after %d "
                           "attempt(s)", path, res->attempts);
            break;
        }
        mr_httpc_req req = {
            .method = method, .url = url, .headers = headers,
            .body = form, .body_len = form ? strlen(form) : 0,
            .connect_timeout_ms = cfg->connect_timeout_ms < left ? cfg->connect_timeout_ms : (long)left,
            .timeout_ms = (long)left,
            .max_body = MAX_ANSWER,
            .abort_cb = cfg->abort_cb,
        };
        mr_httpc_resp resp = {0};
        char herr[200] = "", should[16] = "", replayed[16] = "", msg[300] = "";
        mr_err he = mr_httpc_do(http, &req, &resp, herr, sizeof herr);
        res->attempts++;
        res->status = he == MR_OK ? resp.status : 0;
        res->outcome = resp.outcome;
        res->request_id[0] = res->error_type[0] = res->error_code[0] = '\0';
        res->other_mode = res->replayed = 0;
        if (he == MR_EINVAL || he == MR_EINTERNAL) {
            mr_httpc_resp_free(&resp);
            rc = mr_seterr(err, errlen, MR_EINTERNAL, "Stripe %s: %s", path, herr);
            break;
        }
        if (resp.outcome == MR_HTTPC_ABORTED) {
            /* Stopping: whether Stripe applied it is unknown, as after a timeout. */
            rc = mr_seterr(err, errlen, MR_ETRANSIENT, "Stripe %s: aborted (stopping)", path);
            break;
        }
        if (he == MR_OK) {
            mr_httpc_resp_header(&resp, "Request-Id", res->request_id, sizeof res->request_id);
            mr_httpc_resp_header(&resp, "Stripe-Should-Retry", should, sizeof should);
            mr_httpc_resp_header(&resp, "Idempotent-Replayed", replayed, sizeof replayed);
            res->replayed = strcmp(replayed, "true") == 0;
            if (resp.status >= 200 && resp.status < 300) {
                cJSON *obj = mr_json_parse(resp.body, resp.body_len);
                mr_httpc_resp_free(&resp);
                if (cJSON_IsObject(obj)) {
                    res->object = obj;
                    mr_log(MR_LOG_INFO, "Stripe %s: %ld (request %s, attempt %d%s)", path,
                           res->status, res->request_id, res->attempts,
                           res->replayed ? ", replayed" : "");
                    return MR_OK;
                }
                cJSON_Delete(obj);
                /* Applied or not, nobody can tell: the next try with the same
                 * key gets Stripe's stored answer. */
                rc = mr_seterr(err, errlen, MR_ETRANSIENT, "Stripe %s: %ld with an unreadable "
                               "body (request %s)", path, res->status, res->request_id);
                break;
            }
            mr_stripe_api_parse_error(resp.body, resp.body_len, res, msg, sizeof msg);
        }
        mr_httpc_resp_free(&resp);
        /* A replayed answer is the key's for good (a 5xx too): a retry gets it again. */
        int again = !res->replayed && mr_stripe_api_retryable(res->status, *should ? should : NULL);
        /* A DELETE of what Stripe does not have is an answer the caller expects;
         * one of the other mode's object is not (the object is there). */
        int gone = res->status == 404 && !res->other_mode && strcmp(method, "DELETE") == 0;
        if (he == MR_OK)
            mr_log(again ? MR_LOG_WARN : gone ? MR_LOG_INFO : MR_LOG_ERROR,
                   "Stripe %s: %ld %s/%s (request %s, attempt %d): %.200s", path, res->status,
                   res->error_type, res->error_code, res->request_id, res->attempts, msg);
        else
            mr_log(MR_LOG_WARN, "Stripe %s: no answer (attempt %d): %s", path, res->attempts, herr);
        if (!again) {
            /* Not worth retrying now, but a 5xx (even with Stripe-Should-Retry: false,
             * "applied, or will be") leaves the outcome unknown: only a 4xx refuses. */
            rc = mr_seterr(err, errlen, res->status >= 500 ? MR_ETRANSIENT : MR_EINTERNAL,
                           "Stripe %s: %ld %s/%s (request %s)", path, res->status,
                           res->error_type, res->error_code, res->request_id);
            break;
        }
        if (retry >= cfg->max_retries) {
            if (he == MR_OK)
                rc = mr_seterr(err, errlen, MR_ETRANSIENT, "Stripe %s: %ld after %d attempts "
                               "(request %s)", path, res->status, res->attempts, res->request_id);
            else
                rc = mr_seterr(err, errlen, MR_ETRANSIENT, "Stripe %s: no answer after %d "
                               "attempts: %s", path, res->attempts, herr);
            break;
        }
        long delay = mr_stripe_api_backoff_ms(retry + 1, random01());
        if (mr_now_ms() + delay + MIN_ATTEMPT_MS > deadline_ms) {
            rc = mr_seterr(err, errlen, MR_ETRANSIENT, "Stripe %s: no time left to retry after "
                           "%d attempt(s)", path, res->attempts);
            break;
        }
        if (cfg->abort_cb && cfg->abort_cb(NULL)) {
            rc = mr_seterr(err, errlen, MR_ETRANSIENT, "Stripe %s: aborted (stopping) after %d "
                           "attempt(s)", path, res->attempts);
            break;
        }
        sleep_ms(delay);
    }
    memset(auth, 0, sizeof auth);
    return rc;
}

mr_err mr_stripe_api_post(mr_httpc *http, const mr_stripe_api_config *cfg, const char *path,
                          const char *form, const char *idempotency_key, int64_t deadline_ms,
                          mr_stripe_api_result *res, char *err, size_t errlen)
{
    return request(http, cfg, "POST", path, form ? form : "", idempotency_key, deadline_ms, res,
                   err, errlen);
}

mr_err mr_stripe_api_get(mr_httpc *http, const mr_stripe_api_config *cfg, const char *path,
                         int64_t deadline_ms, mr_stripe_api_result *res, char *err, size_t errlen)
{
    return request(http, cfg, "GET", path, NULL, NULL, deadline_ms, res, err, errlen);
}

mr_err mr_stripe_api_list(mr_httpc *http, const mr_stripe_api_config *cfg, const char *path,
                          const cJSON *params, int64_t deadline_ms,
                          void (*each)(const cJSON *object, void *arg), void *arg,
                          mr_stripe_api_result *res, char *err, size_t errlen)
{
    memset(res, 0, sizeof(*res));
    char after[256] = ""; /* the last object read: the next page starts after it */
    for (int page = 1;; page++) {
        cJSON *q = params ? cJSON_Duplicate(params, 1) : cJSON_CreateObject();
        if (q) {
            cJSON_DeleteItemFromObjectCaseSensitive(q, "limit");
            cJSON_AddStringToObject(q, "limit", "100");
            if (after[0])
                cJSON_AddStringToObject(q, "starting_after", after);
        }
        char *query = q ? mr_stripe_api_form(q) : NULL, target[1024];
        cJSON_Delete(q);
        if (!query || (size_t)snprintf(target, sizeof target, "%s?%s", path, query) >= sizeof target) {
            free(query);
            return mr_seterr(err, errlen, MR_EINTERNAL, "Stripe %s: cannot build the list's "
                             "request (page %d)", path, page);
        }
        free(query);
        mr_stripe_api_result_free(res);
        mr_err e = mr_stripe_api_get(http, cfg, target, deadline_ms, res, err, errlen);
        if (e != MR_OK)
            return e;
        const char *last = NULL;
        const cJSON *o;
        cJSON_ArrayForEach(o, cJSON_GetObjectItemCaseSensitive(res->object, "data")) {
            const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
            last = cJSON_IsString(id) ? id->valuestring : NULL;
            each(o, arg);
        }
        if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(res->object, "has_more")))
            return MR_OK;
        if (!last || strlen(last) >= sizeof after || strcmp(last, after) == 0)
            return mr_seterr(err, errlen, MR_EINTERNAL, "Stripe %s: the list does not advance "
                             "after page %d (request %s)", path, page, res->request_id);
        memcpy(after, last, strlen(last) + 1);
    }
}

mr_err mr_stripe_api_delete(mr_httpc *http, const mr_stripe_api_config *cfg, const char *path,
                            const char *idempotency_key, int64_t deadline_ms,
                            mr_stripe_api_result *res, char *err, size_t errlen)
{
    return request(http, cfg, "DELETE", path, NULL, idempotency_key, deadline_ms, res, err, errlen);
}

void mr_stripe_api_result_free(mr_stripe_api_result *res)
{
    if (!res)
        return;
    cJSON_Delete(res->object);
    res->object = NULL;
}

void mr_stripe_api_reply_error(mr_req *r, mr_err e, const mr_stripe_api_result *res)
{
    if (e == MR_ETRANSIENT) {
        mr_reply_error(r, 503, "stripe_unavailable",
                       "the payment provider did not answer; try again in a moment");
        return;
    }
    if (res && res->request_id[0])
        mr_reply_error(r, 502, "stripe_error",
                       "the payment provider refused the request (Stripe request %s)",
                       res->request_id);
    else
        mr_reply_error(r, 502, "stripe_error", "the payment provider refused the request");
}

void mr_stripe_api_reply_not_configured(mr_req *r)
{
    mr_reply_error(r, 503, "stripe_not_configured",
                   "payments are not set up on this server (STRIPE_SECRET_KEY is unset)");
}
