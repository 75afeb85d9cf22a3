/* track-usage: an instance reports one message of its users.
 *
 * POST with "Authorization: Bearer <MINDROOM_CONTROL_PLANE_TOKEN>" (the instance's
 * own token, lib/mr_itoken.h; never a JWT or an API key) and an optional body
 * {"agent": "...", "tool": "..."} (report.h). The token names the instance: an
 * instance can only ever report for itself. Answers
 *   200 {"allowed": true, "remaining": n | null, "resets_at",
 *        "agents": {"used", "max": n | null}}
 *   429 the same with "allowed": false, "limit": "messages" | "agents" and an
 *       error, and Retry-After (seconds until the daily counters reset): the
 *       plan's daily messages are used up, or the message names an agent beyond
 *       the plan's distinct agents of the day. Nothing was counted.
 *   401 no token, not a token, unknown or revoked (a rotated token stops working
 *       with the rotation's commit); 400 a bad body (nothing counted).
 * With "Idempotency-Key: <1-255 visible ASCII characters>", a report whose key the
 * instance used before (until the end of the day after) for a counted report counts
 * nothing: it is answered as the first one was, with the counters as they are and
 * "Idempotent-Replayed: true"; one whose key holds a refusal is judged again; 422
 * when that first report named another agent or tool.
 *
 * Verification: the token's key id finds its credential (public.instance_tokens:
 * instance id and SHA-256 of the token), and the hashes are compared in constant
 * time. Each worker remembers the credentials it has verified (key id -> instance
 * and hash), so a report is one round trip: public.instance_track_usage, which
 * first checks that the key id is still the instance's live credential (so a
 * revoked or rotated token is refused at once, whatever is remembered) and then
 * counts through track_usage. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "mindroom.h"
#include "mr_itoken.h"
#include "report.h"

/* Remembered credentials: a direct-mapped table, a slot per key id hash. A
 * colliding key id replaces the older one (a miss costs one more round trip). */
#define CACHE_SLOTS 4096
#define CACHE_TTL_MS (600 * 1000)

typedef struct {
    int64_t expires_ms; /* 0: empty */
    char key_id[MR_ITOKEN_KEY_ID_LEN + 1];
    char instance_id[40];
    char hash[MR_ITOKEN_HASH_HEX_LEN + 1];
} credential;

static credential *g_cache; /* per worker process */

static const mr_db_stmt lookup_stmt = {
    "mr_tu_lookup",
    "SELECT t.instance_id::text || ' ' || t.token_hash FROM public.instance_tokens t"
    " WHERE t.key_id = $1",
    1};
static const mr_db_stmt track_stmt = {
    "mr_tu_track", "SELECT public.instance_track_usage($1::uuid, $2, $3, $4, $5)::text", 5};

/* An Idempotency-Key: 1 to 255 visible ASCII characters (migration 181's check). */
static int valid_idempotency_key(const char *k)
{
    size_t n = strlen(k);
    for (size_t i = 0; i < n; i++)
        if (k[i] < '!' || k[i] > '~')
            return 0;
    return n >= 1 && n <= 255;
}

static void worker_init(void)
{
    g_cache = calloc(CACHE_SLOTS, sizeof *g_cache);
}

static credential *slot(const char *key_id)
{
    unsigned long h = 5381;
    for (const char *p = key_id; *p; p++)
        h = h * 33 + (unsigned char)*p;
    return g_cache ? &g_cache[h % CACHE_SLOTS] : NULL;
}

static void unauthorized(mr_req *r, const char *why)
{
    static const char *const hdr[] = {"WWW-Authenticate: Bearer", NULL};
    cJSON *j = cJSON_CreateObject();
    cJSON *e = cJSON_AddObjectToObject(j, "error");
    cJSON_AddStringToObject(e, "code", "unauthorized");
    cJSON_AddStringToObject(e, "message", why);
    mr_reply_json_h(r, 401, j, hdr);
}

/* The instance whose credential the presented token is, into instance_id (40
 * bytes). Returns MR_OK, MR_EAUTH (no such credential, or another token), or a
 * database failure with err. */
static mr_err verify(mr_req *r, const char *token, const char *key_id, char *instance_id,
                     char *err, size_t errlen)
{
    size_t tlen = strlen(token);
    int64_t now = mr_now_ms();
    credential *c = slot(key_id);
    if (c && c->expires_ms > now && strcmp(c->key_id, key_id) == 0) {
        if (!mr_itoken_verify(token, tlen, c->hash))
            return MR_EAUTH;
        memcpy(instance_id, c->instance_id, sizeof c->instance_id);
        return MR_OK;
    }
    char *row = NULL;
    const char *p[] = {key_id};
    mr_identity who = mr_req_service(r);
    mr_err e = mr_db_call(r->db, &who, &lookup_stmt, p, NULL, &row, err, errlen);
    if (e != MR_OK)
        return e;
    char *sp = row ? strchr(row, ' ') : NULL;
    if (!sp || sp - row != 36) {
        free(row);
        return MR_EAUTH;
    }
    *sp = '\0';
    int ok = mr_itoken_verify(token, tlen, sp + 1);
    if (ok) {
        memcpy(instance_id, row, 37);
        if (c) {
            c->expires_ms = now + CACHE_TTL_MS;
            memcpy(c->key_id, key_id, sizeof c->key_id);
            memcpy(c->instance_id, row, 37);
            snprintf(c->hash, sizeof c->hash, "%s", sp + 1);
        }
    }
    free(row);
    return ok ? MR_OK : MR_EAUTH;
}

static void forget(const char *key_id)
{
    credential *c = slot(key_id);
    if (c && strcmp(c->key_id, key_id) == 0)
        memset(c, 0, sizeof *c);
}

static void handle(mr_req *r)
{
    /* 1. A token's shape, then the body: neither needs the database. */
    const char *bearer = mr_http_bearer(r->authorization);
    char key_id[MR_ITOKEN_KEY_ID_LEN + 1], token[MR_ITOKEN_LEN + 1];
    if (!bearer) {
        unauthorized(r, "missing instance token (Authorization: Bearer $MINDROOM_CONTROL_PLANE_TOKEN)");
        return;
    }
    if (mr_itoken_parse(bearer, strlen(bearer), key_id) != MR_OK) {
        unauthorized(r, "not an instance token: track-usage takes the instance's "
                        "MINDROOM_CONTROL_PLANE_TOKEN, never a JWT or an API key");
        return;
    }
    memcpy(token, bearer, MR_ITOKEN_LEN + 1);
    char err[256] = "";
    tu_report rep;
    if (tu_report_parse(r->body, r->body_len, &rep, err, sizeof err) != MR_OK) {
        OPENSSL_cleanse(token, sizeof token);
        mr_reply_error(r, 400, "invalid_report", "%s", err);
        return;
    }
    const char *idem = mr_req_header(r, "HTTP_IDEMPOTENCY_KEY");
    if (idem && !valid_idempotency_key(idem)) {
        OPENSSL_cleanse(token, sizeof token);
        mr_reply_error(r, 400, "invalid_report",
                       "Idempotency-Key must be 1 to 255 visible ASCII characters");
        return;
    }

    /* 2. Whose token. */
    char iid[40];
    mr_err e = verify(r, token, key_id, iid, err, sizeof err);
    OPENSSL_cleanse(token, sizeof token);
    if (e == MR_EAUTH) {
        unauthorized(r, "unknown or revoked instance token");
        return;
    }
    if (e != MR_OK) {
        mr_reply_err(r, e, err);
        return;
    }

    /* 3. Count it (or not), in one round trip. */
    const char *p[] = {iid, key_id, rep.agent[0] ? rep.agent : NULL, rep.tool[0] ? rep.tool : NULL,
                       idem};
    cJSON *res = NULL;
    mr_identity who = mr_req_service(r);
    e = mr_db_call_json(r->db, &who, &track_stmt, p, &res, err, sizeof err);
    const char *outcome = "";
    if (e == MR_OK && mr_json_str(res, "outcome", &outcome) != MR_OK)
        e = mr_seterr(err, sizeof err, MR_EINTERNAL, "unexpected answer from the database");
    if (e != MR_OK) {
        cJSON_Delete(res);
        mr_reply_err(r, e, err);
        return;
    }
    if (strcmp(outcome, "revoked") == 0) {
        forget(key_id);
        cJSON_Delete(res);
        unauthorized(r, "unknown or revoked instance token");
        return;
    }
    if (strcmp(outcome, "key_reused") == 0) {
        cJSON_Delete(res);
        mr_reply_error(r, 422, "idempotency_key_reused",
                       "this Idempotency-Key was sent with a report of another agent or tool: "
                       "give each message a key of its own");
        return;
    }

    int allowed = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(res, "allowed"));
    const cJSON *remaining = cJSON_GetObjectItemCaseSensitive(res, "remaining");
    const char *resets = "", *limit = NULL;
    mr_json_str(res, "resets_at", &resets);
    mr_json_str(res, "limit", &limit);
    int64_t retry = 1, max_agents = -1, agents_today = 0;
    /* Up to the next midnight UTC (mr_db's transactions run in UTC): a day, and a
     * little more for a report whose transaction began just before midnight. */
    mr_json_i64(res, "retry_after_s", 1, 90001, &retry);
    /* Left at -1 when NULL: a subscription without an agent limit (an operator's setting). */
    mr_json_i64(res, "max_agents", 0, INT32_MAX, &max_agents);
    mr_json_i64(res, "agents_today", 0, INT32_MAX, &agents_today);

    cJSON *out = cJSON_CreateObject();
    cJSON_AddBoolToObject(out, "allowed", allowed);
    if (cJSON_IsNumber(remaining))
        cJSON_AddNumberToObject(out, "remaining", remaining->valuedouble);
    else
        cJSON_AddNullToObject(out, "remaining");
    cJSON_AddStringToObject(out, "resets_at", resets);
    cJSON *ag = cJSON_AddObjectToObject(out, "agents");
    cJSON_AddNumberToObject(ag, "used", (double)agents_today);
    if (max_agents >= 0)
        cJSON_AddNumberToObject(ag, "max", (double)max_agents);
    else
        cJSON_AddNullToObject(ag, "max");
    /* Sent again: what the first one was answered, and it says so. */
    const char *replayed = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(res, "replayed"))
                               ? "Idempotent-Replayed: true" : NULL;
    if (allowed) {
        cJSON_Delete(res);
        const char *const hdr[] = {replayed, NULL};
        mr_reply_json_h(r, 200, out, hdr);
        return;
    }
    int agents = limit && strcmp(limit, "agents") == 0;
    cJSON_AddStringToObject(out, "limit", agents ? "agents" : "messages");
    cJSON *eo = cJSON_AddObjectToObject(out, "error");
    cJSON_AddStringToObject(eo, "code", "limit_reached");
    cJSON_AddStringToObject(eo, "message",
                            agents ? "the plan's distinct agents for today are used: refuse this "
                                     "agent's message"
                                   : "the plan's messages for today are used: refuse the message");
    cJSON_Delete(res);
    char after[48];
    snprintf(after, sizeof after, "Retry-After: %lld", (long long)retry);
    const char *const hdr[] = {after, replayed, NULL};
    mr_reply_json_h(r, 429, out, hdr);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "track-usage",
        .methods = "POST",
        .auth = MR_AUTH_CUSTOM,
        .worker_init = worker_init,
        .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
