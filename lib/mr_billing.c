/* mr_billing.c: see mr_billing.h. */
#include "mr_billing.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "mr_db.h"
#include "mr_json.h"
#include "mr_log.h"

static char service_claims[] = "{\"role\":\"service_role\"}";
static const mr_identity service = {.role = "service_role", .claims_json = service_claims};

typedef struct {
    const char *sql;
    int n;
    const char *const *params;
    char *text;
} one_value;

static mr_err run_one(mr_db *db, void *arg, char *err, size_t errlen)
{
    one_value *q = arg;
    PGresult *res;
    mr_err e = mr_db_exec(db, q->sql, q->n, q->params, &res, NULL, err, errlen);
    if (e != MR_OK)
        return e;
    free(q->text); /* a retried transaction starts over */
    q->text = NULL;
    if (PQntuples(res) != 1 || PQnfields(res) != 1 || PQgetisnull(res, 0, 0)) {
        PQclear(res);
        return mr_seterr(err, errlen, MR_EINTERNAL, "unexpected database result");
    }
    q->text = strdup(PQgetvalue(res, 0, 0));
    PQclear(res);
    return q->text ? MR_OK : mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
}

/* mr_billing_sql without the reply. */
static mr_err sql_value(mr_db *db, const char *sql, int n, const char *const *params, cJSON **out,
                        char *err, size_t errlen)
{
    one_value q = {.sql = sql, .n = n, .params = params};
    *out = NULL;
    mr_err e = mr_db_tx(db, &service, run_one, &q, err, errlen);
    if (e == MR_OK) {
        *out = mr_json_parse(q.text, strlen(q.text));
        if (!*out)
            e = mr_seterr(err, errlen, MR_EINTERNAL, "unreadable database result");
    }
    free(q.text);
    return e;
}

mr_err mr_billing_sql(mr_req *r, const char *sql, int nparams, const char *const *params,
                      cJSON **out)
{
    char err[256] = "";
    mr_err e = sql_value(r->db, sql, nparams, params, out, err, sizeof err);
    if (e != MR_OK)
        mr_reply_err(r, e, err);
    return e;
}

static void copy_str(const cJSON *obj, const char *key, char *dst, size_t cap)
{
    const char *s = NULL;
    snprintf(dst, cap, "%s", mr_json_str(obj, key, &s) == MR_OK ? s : "");
}

mr_err mr_billing_account_get(mr_req *r, const char *account_id, mr_billing_account *out)
{
    memset(out, 0, sizeof(*out));
    const char *p[1] = {account_id};
    cJSON *a;
    mr_err e = mr_billing_sql(r, "SELECT public.billing_account($1)::text", 1, p, &a);
    if (e != MR_OK)
        return e;
    mr_json_bool(a, "found", &out->found);
    mr_json_bool(a, "had_subscription", &out->had_subscription);
    mr_json_bool(a, "checkout_paid", &out->checkout_paid);
    copy_str(a, "email", out->email, sizeof out->email);
    copy_str(a, "customer", out->customer, sizeof out->customer);
    copy_str(a, "live_status", out->live_status, sizeof out->live_status);
    cJSON_Delete(a);
    return MR_OK;
}

int mr_billing_require_user(mr_req *r)
{
    if (strcmp(r->who.role, "authenticated") == 0 && r->who.sub[0])
        return 1;
    mr_reply_error(r, 403, "forbidden",
                   "this function acts for a signed-in user: call it with the user's access token");
    return 0;
}

/* sha256 hex of "<path>\n<form>": the request an attempt stands for. */
static int fingerprint(const char *path, const char *form, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) &&
             EVP_DigestUpdate(ctx, path, strlen(path)) && EVP_DigestUpdate(ctx, "\n", 1) &&
             EVP_DigestUpdate(ctx, form, strlen(form)) && EVP_DigestFinal_ex(ctx, md, &mdlen) &&
             mdlen == 32;
    EVP_MD_CTX_free(ctx);
    if (!ok)
        return 0;
    mr_hex(md, 32, hex);
    return 1;
}

/* Fills out from a {"object_id", "url", "expires_at"} object. */
static mr_err take_result(const cJSON *v, int reused, mr_billing_result *out)
{
    const char *id = NULL, *url = NULL, *attempt = NULL;
    int64_t exp = 0;
    if (mr_json_str(v, "object_id", &id) != MR_OK || !*id)
        return MR_EINTERNAL;
    mr_json_str(v, "url", &url);
    if (reused && mr_json_str(v, "attempt_id", &attempt) == MR_OK)
        snprintf(out->attempt_id, sizeof out->attempt_id, "%s", attempt);
    mr_json_i64(v, "expires_at", 0, INT64_MAX, &exp);
    out->object_id = strdup(id);
    out->url = url ? strdup(url) : NULL;
    out->expires_at = exp;
    out->reused = reused;
    if (!out->object_id || (url && !out->url)) {
        mr_billing_result_free(out);
        return MR_EINTERNAL;
    }
    return MR_OK;
}

mr_err mr_billing_call(mr_req *r, const mr_stripe_api_config *cfg, const char *account_id,
                       const char *kind, const char *path, const cJSON *params,
                       int64_t deadline_ms, mr_billing_result *out)
{
    memset(out, 0, sizeof(*out));
    char fp[65];
    char *form = mr_stripe_api_form(params);
    if (!form || !fingerprint(path, form, fp)) {
        free(form);
        mr_reply_error(r, 500, "internal", "could not build the payment request");
        return MR_EINTERNAL;
    }

    /* 1. The attempt, recorded before anything is sent; a customer attempt with the
     * email it sends (public.billing_attempt_begin keeps it for that kind alone: the
     * checkout looks for a customer Stripe may have made under it). */
    const char *email = NULL;
    (void)mr_json_str(params, "email", &email);
    const char *bp[4] = {account_id, kind, fp, email};
    cJSON *b;
    mr_err e = mr_billing_sql(r, "SELECT public.billing_attempt_begin($1, $2, $3, $4)::text", 4,
                              bp, &b);
    if (e != MR_OK) {
        free(form);
        return e;
    }
    const char *state = "", *attempt = NULL, *key = NULL;
    int resumed = 0;
    mr_json_str(b, "state", &state);
    if (strcmp(state, "done") == 0) {
        free(form);
        e = take_result(b, 1, out);
        cJSON_Delete(b);
        if (e != MR_OK)
            mr_reply_error(r, 500, "internal", "unreadable billing record");
        return e;
    }
    if (mr_json_str(b, "attempt_id", &attempt) != MR_OK ||
        mr_json_str(b, "idempotency_key", &key) != MR_OK) {
        free(form);
        cJSON_Delete(b);
        mr_reply_error(r, 500, "internal", "unreadable billing record");
        return MR_EINTERNAL;
    }
    mr_json_bool(b, "resumed", &resumed);
    char attempt_id[40];
    snprintf(attempt_id, sizeof attempt_id, "%s", attempt);
    if (resumed)
        mr_log(MR_LOG_INFO, "billing: %s attempt %s sent again with its key (request %s)", kind,
               attempt_id, r->request_id);

    /* 2. Stripe, with no transaction open. */
    mr_stripe_api_result sr;
    char err[256] = "";
    e = mr_stripe_api_post(r->http, cfg, path, form, key, deadline_ms, &sr, err, sizeof err);
    cJSON_Delete(b);
    free(form);

    /* 3. The outcome. A refusal closes the attempt; so does a 5xx Stripe replayed:
     * Stripe keeps a key's first answer, a 500 too, and the key would only get it
     * again (the next call starts a new attempt; still a 503 now). Anything else
     * leaves it pending for the next call to resume (its outcome is unknown). */
    if (e != MR_OK) {
        const char *final = e == MR_ETRANSIENT && !sr.replayed ? "false" : "true";
        const char *fp3[3] = {attempt_id, err, final};
        cJSON *ignored = NULL;
        char dberr[256];
        if (sql_value(r->db, "SELECT public.billing_attempt_failed($1, $2, $3)::text", 3, fp3,
                      &ignored, dberr, sizeof dberr) != MR_OK)
            mr_log(MR_LOG_WARN, "billing: could not record the failure of attempt %s: %s",
                   attempt_id, dberr);
        cJSON_Delete(ignored);
        mr_stripe_api_reply_error(r, e, &sr);
        mr_stripe_api_result_free(&sr);
        return e;
    }
    const char *oid = NULL, *url = NULL;
    int64_t exp = 0;
    int live = 0;
    mr_json_str(sr.object, "id", &oid);
    mr_json_str(sr.object, "url", &url);
    mr_json_i64(sr.object, "expires_at", 0, INT64_MAX, &exp);
    mr_json_bool(sr.object, "livemode", &live);
    if (!oid || !*oid) {
        const char *fp3[3] = {attempt_id, "answer without an id", "true"};
        cJSON *ignored = NULL;
        sql_value(r->db, "SELECT public.billing_attempt_failed($1, $2, $3)::text", 3, fp3,
                  &ignored, err, sizeof err);
        cJSON_Delete(ignored);
        mr_log(MR_LOG_ERROR, "billing: Stripe %s answered without an id (request %s)", path,
               sr.request_id);
        mr_stripe_api_reply_error(r, MR_EINTERNAL, &sr);
        mr_stripe_api_result_free(&sr);
        return MR_EINTERNAL;
    }
    char expires[24];
    snprintf(expires, sizeof expires, "%" PRId64, exp);
    const char *sp[5] = {attempt_id, oid, url, exp ? expires : NULL, live ? "true" : "false"};
    cJSON *v;
    e = mr_billing_sql(r, "SELECT public.billing_attempt_succeeded($1, $2, $3, $4, $5)::text", 5,
                       sp, &v);
    mr_stripe_api_result_free(&sr);
    if (e != MR_OK)
        return e; /* the attempt stays pending: the next call replays Stripe's answer */
    e = take_result(v, 0, out);
    cJSON_Delete(v);
    if (e != MR_OK)
        mr_reply_error(r, 500, "internal", "unreadable billing record");
    return e;
}

void mr_billing_result_free(mr_billing_result *res)
{
    if (!res)
        return;
    free(res->object_id);
    free(res->url);
    res->object_id = res->url = NULL;
}
