/* payload.c: what the provisioner receives for a create, update or start, with the
 * instance's secrets opened here and nowhere else.
 *
 * The step (public.lifecycle_step_json) carries the non-secret part of the
 * request and the instance's sealed secrets (instance_secrets: ciphertext only).
 * This file opens them with the keyring (MINDROOM_SECRETS_KEY), adds them to the
 * request, and makes sure they exist first:
 *   * the homeserver's keys are generated once per instance (lib/mr_homeserver.c),
 *     sealed, and stored before the provisioner is ever called, so a retry sends
 *     the same keys (public.instance_homeserver_keys keeps the first set when two
 *     workers race); an instance that took over a destroyed one's kept storage
 *     gets that homeserver's keys instead (the step's "predecessor"), opened and
 *     sealed again for it, never new ones, and with them that instance's operator
 *     variables (stored in the same call, never over one this instance has);
 *   * a legacy plaintext environment_vars is sealed into instance_secrets, and
 *     emptied once every value is stored (public.instance_plain_env, then
 *     public.instance_plain_env_sealed: a failure part-way loses nothing); a name
 *     that already has a sealed value keeps it (public.instance_plain_env_put);
 *   * the instance's control-plane token (lib/mr_itoken.c) is generated when it has
 *     no live one (its first deploy, a start after a stop, a rotation), stored as a
 *     hash and sealed (public.instance_token_issue keeps the first token when two
 *     workers race), and delivered with the control plane's URL.
 * What must be stored (a new token, new keys, variables carried over) is stored in one call,
 * public.instance_secrets_issue, whose answer is what is in force.
 * PostgreSQL never receives a plaintext secret from here (what was read of the legacy
 * column is named back by its SHA-256). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "mr_appenv.h"
#include "mr_homeserver.h"
#include "mr_itoken.h"
#include "mr_secrets.h"
#include "worker.h"

static const mr_db_stmt read_env_stmt = {
    "mr_pl_read_env", "SELECT public.instance_plain_env($1::uuid)::text", 1};
static const mr_db_stmt sealed_env_stmt = {
    "mr_pl_sealed_env", "SELECT public.instance_plain_env_sealed($1::uuid, $2::text)::text", 2};
static const mr_db_stmt put_plain_stmt = {
    "mr_pl_put_plain", "SELECT public.instance_plain_env_put($1::uuid, $2, $3, $4, $5)", 5};
static const mr_db_stmt issue_stmt = {
    "mr_pl_issue",
    "SELECT public.instance_secrets_issue($1::uuid, $2::jsonb, $3::jsonb, $4::jsonb)::text", 4};

/* The names of the homeserver's keys, as instance_secrets and POST /apps call them. */
static const char *const hs_names[] = {"signing_key", "registration_shared_secret",
                                       "macaroon_secret_key", "form_secret"};

/* The context a secret is sealed for: its own row (mr_secrets_instance_context). */
static void context(char *out, size_t cap, const char *instance_id, const char *kind,
                    const char *name)
{
    if (mr_secrets_instance_context(out, cap, instance_id, kind, name) != 0)
        out[0] = '\0'; /* names are bounded by instance_secrets' CHECK; never reached */
}

static mr_err seal(const char *instance_id, const char *kind, const char *name, const char *value,
                   char **ct, char digest[MR_SECRETS_DIGEST_LEN + 1], char *err, size_t errlen)
{
    char ctx[MR_SECRETS_CONTEXT_MAX];
    context(ctx, sizeof ctx, instance_id, kind, name);
    mr_err e = mr_secrets_seal(wcfg.secrets, ctx, value, strlen(value), ct, err, errlen);
    if (e == MR_OK && mr_secrets_digest(wcfg.secrets, ctx, value, strlen(value), digest) != MR_OK) {
        free(*ct);
        *ct = NULL;
        e = mr_seterr(err, errlen, MR_EINTERNAL, "cannot digest a secret");
    }
    return e;
}

/* Opens one ciphertext into a new cJSON string (wiped before it is freed by the
 * caller's payload_free). */
static mr_err open_secret(const char *instance_id, const char *kind, const char *name,
                          const char *ct, char **out, char *err, size_t errlen)
{
    char ctx[MR_SECRETS_CONTEXT_MAX];
    unsigned char *pt = NULL;
    size_t len = 0;
    context(ctx, sizeof ctx, instance_id, kind, name);
    mr_err e = mr_secrets_open(wcfg.secrets, ctx, ct, strlen(ct), &pt, &len, err, errlen);
    if (e != MR_OK)
        return mr_seterr(err, errlen, MR_EINTERNAL, "secret %s/%s cannot be opened with the "
                         "configured MINDROOM_SECRETS_KEY(_PREVIOUS)", kind, name);
    *out = (char *)pt;
    (void)len;
    return MR_OK;
}

/* 1 when a stored variable may reach the app (mr_appenv_operator_key); else 0, said
 * in the log. One stored before the rule, or not through mindroomctl env set (a
 * legacy environment_vars, a row written by hand), stays stored and is not sent:
 * `mindroomctl env unset` removes it. */
static int operator_key(const char *iid, const char *name)
{
    if (mr_appenv_operator_key(name))
        return 1;
    mr_log(MR_LOG_WARN, "instance %s: stored variable %s not sent: an operator may not set it "
           "(mindroomctl env unset %s %s removes it)", iid, name, iid, name);
    return 0;
}

/* Seals a legacy plaintext environment into instance_secrets; adds to env the value
 * in force for each of its names. A sealed value is always newer than the column (an
 * operator's `mindroomctl env set`, whose update may be this very step, or one set
 * after an earlier attempt stored the legacy value and was stopped): it is kept and
 * sent, never replaced by the legacy one. A value is stored, and the column emptied
 * once every value is, only while the column holds what was read (named by its digest):
 * a name unset meanwhile is not stored again. */
static mr_err move_plain_env(worker *w, const char *iid, cJSON *env, char *err, size_t errlen)
{
    const char *p1[] = {iid};
    char *text = NULL;
    mr_err e = mr_db_call(w->db, &mr_service_identity, &read_env_stmt, p1, NULL, &text, err, errlen);
    if (e != MR_OK)
        return e;
    cJSON *vars = text ? mr_json_parse(text, strlen(text)) : NULL;
    char was[MR_ITOKEN_HASH_HEX_LEN + 1] = ""; /* what was read, named by its digest */
    if (text)
        mr_itoken_hash_hex(text, strlen(text), was);
    for (const cJSON *kv = vars ? vars->child : NULL; kv && e == MR_OK; kv = kv->next) {
        char *val = cJSON_IsString(kv) ? strdup(kv->valuestring) : cJSON_PrintUnformatted(kv);
        char *ct = NULL, digest[MR_SECRETS_DIGEST_LEN + 1], *out = NULL;
        if (!val)
            e = mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
        if (e == MR_OK)
            e = seal(iid, "env", kv->string, val, &ct, digest, err, errlen);
        if (e == MR_OK) {
            const char *p[] = {iid, kv->string, ct, digest, was};
            e = mr_db_call(w->db, &mr_service_identity, &put_plain_stmt, p, NULL, &out, err,
                           errlen);
        }
        /* out: the ciphertext in force; ours, or a sealed value's, opened instead of
         * the legacy one (NULL: removed meanwhile, and that removal owes an update; or
         * the column changed, and the step fails below). */
        if (e == MR_OK && out && strcmp(out, ct) != 0) {
            OPENSSL_cleanse(val, strlen(val));
            free(val);
            val = NULL;
            e = open_secret(iid, "env", kv->string, out, &val, err, errlen);
        }
        if (e == MR_OK && out && !cJSON_GetObjectItemCaseSensitive(env, kv->string) &&
            operator_key(iid, kv->string))
            cJSON_AddStringToObject(env, kv->string, val);
        free(out);
        free(ct);
        if (val) {
            OPENSSL_cleanse(val, strlen(val));
            free(val);
        }
    }
    payload_free(vars); /* the legacy values, wiped as text is below */
    if (e == MR_OK && text) {
        const char *p2[] = {iid, was};
        char *done = NULL;
        e = mr_db_call(w->db, &mr_service_identity, &sealed_env_stmt, p2, NULL, &done, err, errlen);
        if (e == MR_OK && (!done || strcmp(done, "true") != 0))
            e = mr_seterr(err, errlen, MR_ETRANSIENT,
                          "environment_vars changed while it was sealed; the next step seals it");
        free(done);
    }
    if (text) {
        OPENSSL_cleanse(text, strlen(text));
        free(text);
    }
    if (e == MR_OK)
        mr_log(MR_LOG_INFO, "instance %s: plaintext environment sealed into instance_secrets", iid);
    return e;
}

/* Wipes and frees each of the homeserver's values (NULL ones are fine). */
static void hs_values_free(char *values[])
{
    for (size_t i = 0; i < MR_ARRAY_LEN(hs_names); i++) {
        if (values[i]) {
            OPENSSL_cleanse(values[i], strlen(values[i]));
            free(values[i]);
            values[i] = NULL;
        }
    }
}

/* The homeserver's keys of the instance whose storage this one took over
 * (predecessor: {"instance_id", "homeserver": {"name": ciphertext}}), opened under
 * that instance's context into values (malloc'd: hs_values_free). A key that is
 * missing or does not open fails the step: the kept homeserver's database goes with
 * those keys, and new ones would change its identity. */
static mr_err hs_inherit(const cJSON *predecessor, char *values[], char *err, size_t errlen)
{
    const char *pid = NULL;
    const cJSON *keys = cJSON_GetObjectItemCaseSensitive(predecessor, "homeserver");
    if (mr_json_str(predecessor, "instance_id", &pid) != MR_OK || !cJSON_IsObject(keys))
        return mr_seterr(err, errlen, MR_EINTERNAL, "step with a malformed predecessor");
    for (size_t i = 0; i < MR_ARRAY_LEN(hs_names); i++) {
        const char *ct = NULL;
        if (mr_json_str(keys, hs_names[i], &ct) != MR_OK ||
            open_secret(pid, "homeserver", hs_names[i], ct, &values[i], err, errlen) != MR_OK) {
            hs_values_free(values);
            return mr_seterr(err, errlen, MR_EINTERNAL, "the homeserver keys of instance %s, "
                             "whose storage this one took over, cannot be opened with the "
                             "configured MINDROOM_SECRETS_KEY(_PREVIOUS)", pid);
        }
    }
    return MR_OK;
}

/* A fresh set of the homeserver's keys into values (malloc'd: hs_values_free). */
static mr_err hs_generate(char *values[], char *err, size_t errlen)
{
    mr_homeserver_secrets hs;
    mr_err e = mr_homeserver_generate(&hs, err, errlen);
    if (e != MR_OK)
        return e;
    const char *fresh[] = {hs.signing_key, hs.registration_shared_secret,
                           hs.macaroon_secret_key, hs.form_secret};
    for (size_t i = 0; i < MR_ARRAY_LEN(hs_names) && e == MR_OK; i++)
        if (!(values[i] = strdup(fresh[i])))
            e = mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    mr_homeserver_wipe(&hs);
    if (e != MR_OK)
        hs_values_free(values);
    return e;
}

/* The homeserver's keys as {"name": ciphertext} (*keys) when all are stored; else the
 * set to store, sealed for this instance as the rows instance_homeserver_keys takes
 * (*rows): those of the instance whose storage it took over when the step names one
 * (predecessor, hs_inherit), else a fresh set. The caller frees both. */
static mr_err hs_prepare(const char *iid, const cJSON *secrets, const cJSON *predecessor,
                         cJSON **keys, cJSON **rows, char *err, size_t errlen)
{
    *rows = NULL;
    *keys = cJSON_CreateObject();
    for (const cJSON *s = secrets ? secrets->child : NULL; s; s = s->next) {
        const char *kind = NULL, *name = NULL, *ct = NULL;
        if (mr_json_str(s, "kind", &kind) == MR_OK && !strcmp(kind, "homeserver") &&
            mr_json_str(s, "name", &name) == MR_OK && mr_json_str(s, "ciphertext", &ct) == MR_OK)
            cJSON_AddStringToObject(*keys, name, ct);
    }
    if (cJSON_GetArraySize(*keys) == (int)MR_ARRAY_LEN(hs_names))
        return MR_OK;

    char *values[MR_ARRAY_LEN(hs_names)] = {NULL};
    mr_err e = cJSON_IsObject(predecessor) ? hs_inherit(predecessor, values, err, errlen)
                                           : hs_generate(values, err, errlen);
    if (e != MR_OK)
        return e;
    *rows = cJSON_CreateArray();
    for (size_t i = 0; i < MR_ARRAY_LEN(hs_names) && e == MR_OK; i++) {
        char *ct = NULL, digest[MR_SECRETS_DIGEST_LEN + 1];
        e = seal(iid, "homeserver", hs_names[i], values[i], &ct, digest, err, errlen);
        if (e == MR_OK) {
            cJSON *r = cJSON_CreateObject();
            cJSON_AddStringToObject(r, "name", hs_names[i]);
            cJSON_AddStringToObject(r, "ciphertext", ct);
            cJSON_AddStringToObject(r, "digest", digest);
            cJSON_AddItemToArray(*rows, r);
        }
        free(ct);
    }
    hs_values_free(values);
    return e;
}

/* The operator's variables of the instance whose storage this one took over
 * (predecessor's "env": {"name": ciphertext}, absent when it had none), opened under
 * that instance's context and sealed again for this one, as the rows
 * instance_secrets_issue takes (*rows, the caller frees it; NULL when there are
 * none). A variable that does not open fails the step, naming it (never its value):
 * MindRoom would come back on its data without it, and nothing is stored. */
static mr_err env_inherit(const char *iid, const cJSON *predecessor, cJSON **rows, char *err,
                          size_t errlen)
{
    const char *pid = NULL;
    const cJSON *vars = cJSON_GetObjectItemCaseSensitive(predecessor, "env");
    *rows = NULL;
    if (!cJSON_IsObject(vars) || !vars->child)
        return MR_OK;
    if (mr_json_str(predecessor, "instance_id", &pid) != MR_OK)
        return mr_seterr(err, errlen, MR_EINTERNAL, "step with a malformed predecessor");
    mr_err e = MR_OK;
    *rows = cJSON_CreateArray();
    for (const cJSON *v = vars->child; v && e == MR_OK; v = v->next) {
        char *val = NULL, *ct = NULL, digest[MR_SECRETS_DIGEST_LEN + 1];
        if (!cJSON_IsString(v) ||
            open_secret(pid, "env", v->string, v->valuestring, &val, err, errlen) != MR_OK) {
            e = mr_seterr(err, errlen, MR_EINTERNAL, "the variable %s of instance %s, whose "
                          "storage this one took over, cannot be opened with the configured "
                          "MINDROOM_SECRETS_KEY(_PREVIOUS)", v->string, pid);
            break;
        }
        e = seal(iid, "env", v->string, val, &ct, digest, err, errlen);
        OPENSSL_cleanse(val, strlen(val));
        free(val);
        if (e == MR_OK) {
            cJSON *r = cJSON_CreateObject();
            cJSON_AddStringToObject(r, "name", v->string);
            cJSON_AddStringToObject(r, "ciphertext", ct);
            cJSON_AddStringToObject(r, "digest", digest);
            cJSON_AddItemToArray(*rows, r);
        }
        free(ct);
    }
    if (e != MR_OK) {
        cJSON_Delete(*rows);
        *rows = NULL;
    }
    return e;
}

/* Logs the names (never the values) of the variables env_rows carried over that are
 * in force (env, {"name": ciphertext}: the very ciphertext sent), and of those the
 * instance already had of its own. */
static void env_inherit_log(const char *iid, const cJSON *predecessor, const cJSON *env_rows,
                            const cJSON *env)
{
    size_t cap = 1;
    for (const cJSON *r = env_rows->child; r; r = r->next)
        cap += strlen(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(r, "name"))) + 2;
    char *carried = calloc(1, cap), *kept = calloc(1, cap);
    if (carried && kept) {
        for (const cJSON *r = env_rows->child; r; r = r->next) {
            const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(r, "name"));
            const char *sent = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(r, "ciphertext"));
            const char *now = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(env, name));
            char *list = now && sent && !strcmp(now, sent) ? carried : kept;
            if (list[0])
                strcat(list, ", ");
            strcat(list, name);
        }
        const char *pid = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(predecessor,
                                                                                "instance_id"));
        if (carried[0])
            mr_log(MR_LOG_INFO, "instance %s: variables %s carried over from instance %s, whose "
                   "storage it took over", iid, carried, pid);
        if (kept[0])
            mr_log(MR_LOG_INFO, "instance %s: variables %s of instance %s not carried over: "
                   "this instance has its own", iid, kept, pid);
    }
    free(carried);
    free(kept);
}

/* The sealed control-plane token of the live credential live_key (*ct, pointing
 * into secrets) when the instance has one; else a fresh token generated and sealed, as
 * {"key_id", "hash", "ciphertext", "digest"} for instance_token_issue (*fresh, the
 * caller frees it). */
static mr_err token_prepare(const char *iid, const char *live_key, const cJSON *secrets,
                            const char **ct, cJSON **fresh, char *err, size_t errlen)
{
    *ct = NULL;
    *fresh = NULL;
    for (const cJSON *s = secrets ? secrets->child : NULL; s && live_key; s = s->next) {
        const char *kind = NULL, *name = NULL;
        if (mr_json_str(s, "kind", &kind) == MR_OK && !strcmp(kind, "control_plane") &&
            mr_json_str(s, "name", &name) == MR_OK && !strcmp(name, MR_APPENV_CONTROL_PLANE_TOKEN))
            mr_json_str(s, "ciphertext", ct);
    }
    if (*ct)
        return MR_OK;
    char token[MR_ITOKEN_LEN + 1], kid[MR_ITOKEN_KEY_ID_LEN + 1], hash[MR_ITOKEN_HASH_HEX_LEN + 1],
        *sealed = NULL, digest[MR_SECRETS_DIGEST_LEN + 1];
    mr_err e = mr_itoken_generate(token, kid, hash) == MR_OK
                   ? MR_OK : mr_seterr(err, errlen, MR_EINTERNAL, "no randomness for a token");
    if (e == MR_OK)
        e = seal(iid, "control_plane", MR_APPENV_CONTROL_PLANE_TOKEN, token, &sealed, digest, err,
                 errlen);
    OPENSSL_cleanse(token, sizeof token);
    if (e == MR_OK) {
        *fresh = cJSON_CreateObject();
        cJSON_AddStringToObject(*fresh, "key_id", kid);
        cJSON_AddStringToObject(*fresh, "hash", hash);
        cJSON_AddStringToObject(*fresh, "ciphertext", sealed);
        cJSON_AddStringToObject(*fresh, "digest", digest);
    }
    free(sealed);
    return e;
}

/* Stores what was generated (a token, homeserver keys, a predecessor's variables
 * sealed again: any may be NULL) in one call; *stored is the answer, {"token",
 * "homeserver"}, and "env" when env_rows is given: what is in force. */
static mr_err secrets_issue(worker *w, const char *iid, const cJSON *token, const cJSON *hs_rows,
                            const cJSON *env_rows, cJSON **stored, char *err, size_t errlen)
{
    char *t = token ? mr_json_print(token) : NULL, *h = hs_rows ? mr_json_print(hs_rows) : NULL,
         *v = env_rows ? mr_json_print(env_rows) : NULL;
    *stored = NULL;
    mr_err e = (token && !t) || (hs_rows && !h) || (env_rows && !v)
                   ? mr_seterr(err, errlen, MR_EINTERNAL, "out of memory") : MR_OK;
    const char *p[] = {iid, t, h, v};
    if (e == MR_OK)
        e = mr_db_call_json(w->db, &mr_service_identity, &issue_stmt, p, stored, err, errlen);
    free(t);
    free(h);
    free(v);
    return e;
}

/* The instance's token in clear (*token, malloc'd: the caller wipes and frees it),
 * opened from ct; it must be a token, of the live credential unless just issued. */
static mr_err token_open(const char *iid, const char *live_key, const char *ct, int issued,
                         char **token, char *err, size_t errlen)
{
    char kid[MR_ITOKEN_KEY_ID_LEN + 1];
    mr_err e = open_secret(iid, "control_plane", MR_APPENV_CONTROL_PLANE_TOKEN, ct, token, err,
                           errlen);
    if (e != MR_OK)
        return e;
    if (mr_itoken_parse(*token, strlen(*token), kid) != MR_OK ||
        (!issued && (!live_key || strcmp(kid, live_key) != 0))) {
        OPENSSL_cleanse(*token, strlen(*token));
        free(*token);
        *token = NULL;
        return mr_seterr(err, errlen, MR_EINTERNAL, "the sealed control-plane token does not match "
                         "the instance's credential: mindroomctl rotate-instance-token %s", iid);
    }
    if (issued)
        mr_log(MR_LOG_INFO, "instance %s: control-plane token issued (key id %s)", iid, kid);
    return MR_OK;
}

/* The control-plane token and the homeserver's keys: those stored, or new ones
 * generated, sealed and stored now (one call), with the variables of the instance
 * whose storage this one took over when its keys are carried. *token is the token in
 * clear (the caller wipes and frees it); *keys the homeserver's keys as {"name":
 * ciphertext} when the payload has a homeserver, else NULL; *env the operator's
 * variables in force as {"name": ciphertext} when some were carried over (the step's
 * secrets do not have them yet), else NULL. The caller frees both. */
static mr_err step_secrets(worker *w, const char *iid, const cJSON *step, const cJSON *secrets,
                           int homeserver, char **token, cJSON **keys, cJSON **env, char *err,
                           size_t errlen)
{
    const char *ct = NULL, *live_key = NULL; /* the live credential's key id, if any */
    cJSON *fresh = NULL, *rows = NULL, *env_rows = NULL, *stored = NULL;
    *token = NULL;
    *keys = NULL;
    *env = NULL;
    mr_json_str(step, "token_key_id", &live_key);
    mr_err e = token_prepare(iid, live_key, secrets, &ct, &fresh, err, errlen);
    const cJSON *predecessor = cJSON_GetObjectItemCaseSensitive(step, "predecessor");
    if (e == MR_OK && homeserver)
        e = hs_prepare(iid, secrets, predecessor, keys, &rows, err, errlen);
    /* The predecessor's variables go where its keys go: only with keys still to store. */
    if (e == MR_OK && rows && cJSON_IsObject(predecessor))
        e = env_inherit(iid, predecessor, &env_rows, err, errlen);
    if (e == MR_OK && (fresh || rows))
        e = secrets_issue(w, iid, fresh, rows, env_rows, &stored, err, errlen);
    if (e == MR_OK && env_rows) {
        *env = cJSON_DetachItemFromObjectCaseSensitive(stored, "env");
        if (!cJSON_IsObject(*env))
            e = mr_seterr(err, errlen, MR_EINTERNAL, "the carried variables were not stored");
        else
            env_inherit_log(iid, predecessor, env_rows, *env);
    }
    if (e == MR_OK && fresh) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(stored, "token");
        ct = cJSON_IsString(t) ? t->valuestring : NULL;
        if (!ct)
            e = mr_seterr(err, errlen, MR_EINTERNAL, "the control-plane token was not stored");
    }
    if (e == MR_OK && rows) {
        cJSON *k = cJSON_DetachItemFromObjectCaseSensitive(stored, "homeserver");
        cJSON_Delete(*keys);
        *keys = k;
        if (!cJSON_IsObject(k) || cJSON_GetArraySize(k) != (int)MR_ARRAY_LEN(hs_names))
            e = mr_seterr(err, errlen, MR_EINTERNAL, "the homeserver's keys were not stored");
        else if (cJSON_IsObject(predecessor))
            mr_log(MR_LOG_INFO, "instance %s: homeserver keys carried over from instance %s, "
                   "whose storage it took over", iid,
                   cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(predecessor, "instance_id")));
        else
            mr_log(MR_LOG_INFO, "instance %s: homeserver keys generated", iid);
    }
    if (e == MR_OK)
        e = token_open(iid, live_key, ct, fresh != NULL, token, err, errlen);
    cJSON_Delete(fresh);
    cJSON_Delete(rows);
    payload_free(env_rows);
    cJSON_Delete(stored);
    if (e != MR_OK) {
        cJSON_Delete(*keys);
        *keys = NULL;
        cJSON_Delete(*env);
        *env = NULL;
    }
    return e;
}

mr_err payload_build(worker *w, const cJSON *step, cJSON **out, char *err, size_t errlen)
{
    const char *iid = NULL;
    *out = NULL;
    const cJSON *base = cJSON_GetObjectItemCaseSensitive(step, "payload");
    if (mr_json_str(step, "instance_id", &iid) != MR_OK || !cJSON_IsObject(base))
        return mr_seterr(err, errlen, MR_EINTERNAL, "step without a payload");
    cJSON *p = cJSON_Duplicate(base, 1);
    cJSON *env = cJSON_GetObjectItemCaseSensitive(p, "env");
    if (!cJSON_IsObject(env)) {
        cJSON_DeleteItemFromObjectCaseSensitive(p, "env");
        env = cJSON_AddObjectToObject(p, "env");
    }
    mr_err e = MR_OK;
    const cJSON *secrets = cJSON_GetObjectItemCaseSensitive(step, "secrets");

    /* The control plane's address and the instance's credential for it; the
     * homeserver's keys. */
    char *token = NULL;
    cJSON *hs = cJSON_GetObjectItemCaseSensitive(p, "homeserver"), *keys = NULL, *carried = NULL;
    cJSON_DeleteItemFromObjectCaseSensitive(env, MR_APPENV_CONTROL_PLANE_URL);
    cJSON_DeleteItemFromObjectCaseSensitive(env, MR_APPENV_CONTROL_PLANE_TOKEN);
    cJSON_AddStringToObject(env, MR_APPENV_CONTROL_PLANE_URL, wcfg.control_plane_url);
    e = step_secrets(w, iid, step, secrets, cJSON_IsObject(hs), &token, &keys, &carried, err,
                     errlen);
    if (e == MR_OK) {
        cJSON_AddStringToObject(env, MR_APPENV_CONTROL_PLANE_TOKEN, token);
        OPENSSL_cleanse(token, strlen(token));
        free(token);
    }

    if (e == MR_OK && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(step, "plain_env")))
        e = move_plain_env(w, iid, env, err, errlen);

    /* The operator's sealed environment (as stored now when variables were carried
     * over, else as the step read it); ours (already in env) wins over a stored
     * variable of the same name. */
    for (const cJSON *s = carried ? carried->child : secrets ? secrets->child : NULL;
         s && e == MR_OK; s = s->next) {
        const char *kind = NULL, *name = NULL, *ct = NULL;
        if (carried) {
            name = s->string;
            ct = cJSON_GetStringValue(s);
        } else if (mr_json_str(s, "kind", &kind) != MR_OK || strcmp(kind, "env") != 0 ||
                   mr_json_str(s, "name", &name) != MR_OK ||
                   mr_json_str(s, "ciphertext", &ct) != MR_OK) {
            continue;
        }
        if (!name || !ct || cJSON_GetObjectItemCaseSensitive(env, name) ||
            !operator_key(iid, name))
            continue;
        char *val = NULL;
        if ((e = open_secret(iid, "env", name, ct, &val, err, errlen)) == MR_OK) {
            cJSON_AddStringToObject(env, name, val);
            OPENSSL_cleanse(val, strlen(val));
            free(val);
        }
    }

    /* The homeserver: its keys, opened. */
    if (e == MR_OK && keys) {
        for (size_t i = 0; i < MR_ARRAY_LEN(hs_names) && e == MR_OK; i++) {
            const char *ct = NULL;
            char *val = NULL;
            if (mr_json_str(keys, hs_names[i], &ct) != MR_OK) {
                e = mr_seterr(err, errlen, MR_EINTERNAL, "the homeserver's %s is missing", hs_names[i]);
                break;
            }
            if ((e = open_secret(iid, "homeserver", hs_names[i], ct, &val, err, errlen)) == MR_OK) {
                cJSON_AddStringToObject(hs, hs_names[i], val);
                OPENSSL_cleanse(val, strlen(val));
                free(val);
            }
        }
    }
    cJSON_Delete(keys);
    cJSON_Delete(carried);
    if (e != MR_OK) {
        payload_free(p);
        return e;
    }
    *out = p;
    return MR_OK;
}

/* Wipes every string value (the secrets among them) and frees the payload. */
static void wipe(cJSON *j)
{
    for (cJSON *c = j ? j->child : NULL; c; c = c->next) {
        if (cJSON_IsString(c) && c->valuestring)
            OPENSSL_cleanse(c->valuestring, strlen(c->valuestring));
        else if (cJSON_IsObject(c) || cJSON_IsArray(c))
            wipe(c);
    }
}

void payload_free(cJSON *p)
{
    wipe(p);
    cJSON_Delete(p);
}

/* The nil UUID: no instance has it (gen_random_uuid is version 4). */
#define PRIME_INSTANCE "00000000-0000-0000-0000-000000000000"

/* A first deploy's secrets, prepared for no instance and thrown away: the same
 * calls, so that whatever they use of OpenSSL is built here. */
mr_err payload_prime(char *err, size_t errlen)
{
    const char *ct = NULL;
    char *opened = NULL;
    cJSON *fresh = NULL, *keys = NULL, *rows = NULL;
    mr_err e = token_prepare(PRIME_INSTANCE, NULL, NULL, &ct, &fresh, err, errlen);
    if (e == MR_OK)
        e = hs_prepare(PRIME_INSTANCE, NULL, NULL, &keys, &rows, err, errlen);
    if (e == MR_OK)
        e = mr_json_str(fresh, "ciphertext", &ct) != MR_OK
                ? mr_seterr(err, errlen, MR_EINTERNAL, "no sealed token was prepared")
                : open_secret(PRIME_INSTANCE, "control_plane", MR_APPENV_CONTROL_PLANE_TOKEN, ct,
                              &opened, err, errlen);
    if (opened) {
        OPENSSL_cleanse(opened, strlen(opened));
        free(opened);
    }
    payload_free(fresh);
    payload_free(keys);
    payload_free(rows);
    return e;
}
