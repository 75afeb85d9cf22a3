/* validate.c: everything a request says is checked here, before any command runs.
 *
 * The alphabets are deliberately narrow: every argument that reaches `dokku`
 * is built from a validated name, a number, the configured image or base64
 * text. That is what makes the ssh mode safe too, where the remote side
 * word-splits the command line (see runner.c). The homeserver's secrets never
 * reach a command line at all: they travel on stdin (files.c), and are
 * checked here only so that what lands in its files is what Synapse reads. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "mr_homeserver.h"
#include "prov.h"

int prov_valid_name(const char *s)
{
    if (!s || !(s[0] >= 'a' && s[0] <= 'z')) return 0;
    size_t n = 0;
    for (const char *c = s; *c; c++, n++) {
        if (n >= PROV_NAME_MAX) return 0;
        if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '-')) return 0;
    }
    return 1;
}

int prov_valid_app(const prov_config *cfg, const char *s)
{
    size_t pl = strlen(cfg->app_prefix);
    if (!s || strncmp(s, cfg->app_prefix, pl) != 0 || !prov_valid_name(s)) return 0;
    size_t n = strlen(s);
    if (n <= pl || n > PROV_APP_MAX) return 0;
    for (const char *c = s + pl; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9'))) return 0;
    return 1;
}

void prov_names_of(const char *app, prov_names *n)
{
    snprintf(n->app, sizeof n->app, "%s", app);
    snprintf(n->hs_app, sizeof n->hs_app, "%.40s-matrix", app);
    snprintf(n->data, sizeof n->data, "%.40s-data", app);
    snprintf(n->hs_data, sizeof n->hs_data, "%.40s-matrix-data", app);
    snprintf(n->network, sizeof n->network, "%.40s-net", app);
}

int prov_valid_image(const char *s)
{
    if (!s) return 0;
    const char *at = strrchr(s, '@');
    if (!at || at == s || (size_t)(at - s) > 200) return 0;
    /* Repository part: registry host, port, path and optional tag characters. */
    for (const char *c = s; c < at; c++) {
        if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '.' || *c == '-' ||
              *c == '_' || *c == '/' || *c == ':'))
            return 0;
    }
    if (strncmp(at + 1, "sha256:", 7) != 0) return 0;
    const char *hex = at + 8;
    if (strlen(hex) != 64) return 0;
    for (const char *c = hex; *c; c++)
        if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f'))) return 0;
    return 1;
}

int prov_valid_host(const char *s)
{
    if (!s) return 0;
    size_t n = strlen(s), label = 0;
    if (n == 0 || n > PROV_HOST_MAX) return 0;
    for (size_t i = 0; i <= n; i++) {
        char c = s[i];
        if (c == '.' || c == '\0') {
            if (label == 0 || s[i - 1] == '-') return 0;
            label = 0;
            continue;
        }
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return 0;
        if (label == 0 && c == '-') return 0;
        if (++label > 63) return 0;
    }
    return 1;
}

static int env_cmp(const void *a, const void *b)
{
    return strcmp(((const prov_env *)a)->key, ((const prov_env *)b)->key);
}

/* Unknown fields are refused rather than ignored: a caller that believes it
 * set something must learn that it did not. Duplicate keys too: cJSON keeps
 * both and a getter would silently pick one. */
static mr_err check_fields(const cJSON *obj, const char *const *known, size_t n, const char *where,
                           char *err, size_t errlen)
{
    for (const cJSON *f = obj->child; f; f = f->next) {
        int ok = 0;
        for (size_t i = 0; i < n; i++)
            if (f->string && strcmp(f->string, known[i]) == 0) ok = 1;
        if (!ok) return mr_seterr(err, errlen, MR_EINVAL, "unknown field in %s", where);
        for (const cJSON *g = f->next; g; g = g->next)
            if (g->string && strcmp(g->string, f->string) == 0)
                return mr_seterr(err, errlen, MR_EINVAL, "duplicate field \"%s\" in %s",
                                 f->string, where);
    }
    return MR_OK;
}

/* memory_mb, cpu and the optional storage_gb of one component. */
static mr_err parse_limits(const cJSON *obj, const char *where, const prov_config *cfg,
                           prov_limits *lim, char *err, size_t errlen)
{
    if (mr_json_i64(obj, "memory_mb", cfg->min_memory_mb, cfg->max_memory_mb, &lim->memory_mb) !=
        MR_OK)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "%s\"memory_mb\" is required: an integer in [%lld, %lld]", where,
                         (long long)cfg->min_memory_mb, (long long)cfg->max_memory_mb);

    const cJSON *cpu = cJSON_GetObjectItemCaseSensitive(obj, "cpu");
    double maxcpu = (double)cfg->max_cpu_milli / 1000.0;
    if (!cJSON_IsNumber(cpu) || !isfinite(cpu->valuedouble) || cpu->valuedouble <= 0 ||
        cpu->valuedouble * 1000.0 > (double)cfg->max_cpu_milli + 1e-6)
        return mr_seterr(err, errlen, MR_EINVAL, "%s\"cpu\" is required: a number in (0, %g]",
                         where, maxcpu);
    double milli = cpu->valuedouble * 1000.0;
    lim->cpu_milli = (int64_t)llround(milli);
    if (lim->cpu_milli < 1 || fabs(milli - (double)lim->cpu_milli) > 1e-6)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "%s\"cpu\" must be a multiple of 0.001 and at least 0.001", where);
    /* docker-local hands the limit to `docker container create --cpus`, which
     * refuses less than 0.01: every deploy would fail. Kubernetes takes 1m. */
    if (cfg->scheduler != PROV_SCHED_K3S && lim->cpu_milli < 10)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "%s\"cpu\" must be at least 0.01 (Docker's least --cpus)", where);

    lim->storage_gb = 0;
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(obj, "storage_gb");
    if (st && mr_json_i64(obj, "storage_gb", 1, cfg->max_storage_gb, &lim->storage_gb) != MR_OK)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "%s\"storage_gb\" must be an integer in [1, %lld]", where,
                         (long long)cfg->max_storage_gb);
    /* A PersistentVolumeClaim has a size: on k3s there is no unbounded entry. */
    if (!st && cfg->scheduler == PROV_SCHED_K3S)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "%s\"storage_gb\" is required with DOKKU_SCHEDULER=k3s: an integer in "
                         "[1, %lld]", where, (long long)cfg->max_storage_gb);
    return MR_OK;
}

static mr_err parse_homeserver(const cJSON *hs, const prov_config *cfg, prov_hs_spec *out,
                               char *err, size_t errlen)
{
    static const char *const known[] = {"memory_mb", "cpu", "storage_gb", "server_name",
                                        "signing_key", "registration_shared_secret",
                                        "macaroon_secret_key", "form_secret"};
    if (!cJSON_IsObject(hs))
        return mr_seterr(err, errlen, MR_EINVAL, "\"homeserver\" must be an object");
    mr_err e = check_fields(hs, known, MR_ARRAY_LEN(known), "\"homeserver\"", err, errlen);
    if (e != MR_OK) return e;
    if ((e = parse_limits(hs, "homeserver.", cfg, &out->lim, err, errlen)) != MR_OK) return e;

    /* Optional: the homeserver's host by default. Synapse cannot change it later,
     * so the control plane records the one the answer names and sends it back. */
    mr_err se = mr_json_str(hs, "server_name", &out->server_name);
    if (se == MR_ENOTFOUND)
        out->server_name = out->default_server_name;
    else if (se != MR_OK || !prov_valid_host(out->server_name))
        return mr_seterr(err, errlen, MR_EINVAL,
                         "homeserver.\"server_name\" must be a lowercase DNS name");

    /* The secrets' values are never echoed, whatever is wrong with them. */
    unsigned char seed[MR_HS_SEED_LEN];
    char key_id[MR_HS_KEY_ID_MAX + 1];
    if (mr_json_str(hs, "signing_key", &out->signing_key) != MR_OK ||
        mr_homeserver_parse_signing_key(out->signing_key, strlen(out->signing_key), seed, key_id,
                                        sizeof key_id) != MR_OK ||
        strchr(out->signing_key, '\n'))
        return mr_seterr(err, errlen, MR_EINVAL,
                         "homeserver.\"signing_key\" is required: \"ed25519 <key id> <base64 seed>\"");
    memset(seed, 0, sizeof seed);
    struct { const char *name; const char **dst; } secrets[] = {
        {"registration_shared_secret", &out->registration_shared_secret},
        {"macaroon_secret_key", &out->macaroon_secret_key},
        {"form_secret", &out->form_secret},
    };
    for (size_t i = 0; i < MR_ARRAY_LEN(secrets); i++)
        if (mr_json_str(hs, secrets[i].name, secrets[i].dst) != MR_OK ||
            !mr_homeserver_valid_secret(*secrets[i].dst))
            return mr_seterr(err, errlen, MR_EINVAL,
                             "homeserver.\"%s\" is required: %d to %d characters of "
                             "[A-Za-z0-9._~+/=-]", secrets[i].name, MR_HS_SECRET_MIN,
                             MR_HS_SECRET_MAX);
    out->present = 1;
    return MR_OK;
}

static void wipe_strings(cJSON *j)
{
    for (cJSON *c = j ? j->child : NULL; c; c = c->next) {
        if (cJSON_IsString(c) && c->valuestring)
            OPENSSL_cleanse(c->valuestring, strlen(c->valuestring));
        else if (cJSON_IsObject(c) || cJSON_IsArray(c))
            wipe_strings(c);
    }
}

void prov_spec_free(cJSON *tree)
{
    wipe_strings(tree);
    cJSON_Delete(tree);
}

mr_err prov_parse_spec(const char *body, size_t len, const prov_config *cfg,
                       cJSON **tree, prov_spec *spec, char *err, size_t errlen)
{
    static const char *const known[] = {"app", "subdomain", "memory_mb", "cpu", "storage_gb",
                                        "env", "homeserver"};
    memset(spec, 0, sizeof *spec);
    *tree = mr_json_parse(body, len);
    if (!*tree) return mr_seterr(err, errlen, MR_EINVAL, "body is not valid JSON");
    const cJSON *root = *tree;
    if (!cJSON_IsObject(root)) return mr_seterr(err, errlen, MR_EINVAL, "body must be a JSON object");
    mr_err e = check_fields(root, known, MR_ARRAY_LEN(known), "body", err, errlen);
    if (e != MR_OK) return e;

    if (mr_json_str(root, "app", &spec->app) != MR_OK || !prov_valid_app(cfg, spec->app))
        return mr_seterr(err, errlen, MR_EINVAL,
                         "\"app\" must be \"%s\" followed by [a-z0-9], at most %d characters",
                         cfg->app_prefix, PROV_APP_MAX);
    if (mr_json_str(root, "subdomain", &spec->subdomain) != MR_OK)
        return mr_seterr(err, errlen, MR_EINVAL, "\"subdomain\" is required and must be a string");
    if (!prov_valid_name(spec->subdomain) || spec->subdomain[strlen(spec->subdomain) - 1] == '-')
        return mr_seterr(err, errlen, MR_EINVAL,
                         "\"subdomain\" must match ^[a-z][a-z0-9-]{0,62}$ and not end with '-'");
    if (strlen(spec->subdomain) + 1 + strlen(cfg->base_domain) > PROV_HOST_MAX)
        return mr_seterr(err, errlen, MR_EINVAL, "\"subdomain\" makes the domain too long");
    char host[PROV_HOST_MAX + 1];
    if (prov_matrix_host(cfg, spec->app, spec->subdomain, host, sizeof host) != MR_OK)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "\"subdomain\" makes the homeserver's host name invalid or too long");

    if ((e = parse_limits(root, "", cfg, &spec->lim, err, errlen)) != MR_OK) return e;

    const cJSON *env = cJSON_GetObjectItemCaseSensitive(root, "env");
    if (env && !cJSON_IsNull(env)) {
        if (!cJSON_IsObject(env))
            return mr_seterr(err, errlen, MR_EINVAL, "\"env\" must be an object of strings");
        for (const cJSON *kv = env->child; kv; kv = kv->next) {
            if (spec->n_env >= PROV_MAX_ENV)
                return mr_seterr(err, errlen, MR_EINVAL, "\"env\" has more than %d keys",
                                 PROV_MAX_ENV);
            /* The key is never echoed: it failed validation, so it may be anything. */
            if (!mr_appenv_valid_key(kv->string))
                return mr_seterr(err, errlen, MR_EINVAL,
                                 "env key #%zu must match ^[A-Z_][A-Z0-9_]*$", spec->n_env + 1);
            if (mr_appenv_reserved_key(kv->string))
                return mr_seterr(err, errlen, MR_EINVAL,
                                 "env key %s is reserved (set by Dokku or the provisioner, "
                                 "or what the app's processes run by)",
                                 kv->string);
            if (!cJSON_IsString(kv) || !kv->valuestring)
                return mr_seterr(err, errlen, MR_EINVAL, "env value of %s must be a string",
                                 kv->string);
            if (!mr_appenv_valid_value(kv->valuestring))
                return mr_seterr(err, errlen, MR_EINVAL, "env value of %s must be UTF-8 text",
                                 kv->string);
            spec->env[spec->n_env].key = kv->string;
            spec->env[spec->n_env].value = kv->valuestring;
            spec->n_env++;
        }
        qsort(spec->env, spec->n_env, sizeof spec->env[0], env_cmp);
        for (size_t i = 1; i < spec->n_env; i++)
            if (strcmp(spec->env[i - 1].key, spec->env[i].key) == 0)
                return mr_seterr(err, errlen, MR_EINVAL, "env key %s appears twice",
                                 spec->env[i].key);
    }

    const cJSON *hs = cJSON_GetObjectItemCaseSensitive(root, "homeserver");
    snprintf(spec->hs.default_server_name, sizeof spec->hs.default_server_name, "%s", host);
    if (hs && !cJSON_IsNull(hs) && (e = parse_homeserver(hs, cfg, &spec->hs, err, errlen)) != MR_OK)
        return e;
    return MR_OK;
}

void prov_format_cpu(int64_t cpu_milli, char *out, size_t cap)
{
    long long whole = (long long)(cpu_milli / 1000), frac = (long long)(cpu_milli % 1000);
    if (frac == 0) {
        snprintf(out, cap, "%lld", whole);
        return;
    }
    char f[24];
    snprintf(f, sizeof f, "%03lld", frac);
    for (int i = 2; i > 0 && f[i] == '0'; i--) f[i] = '\0';
    snprintf(out, cap, "%lld.%s", whole, f);
}

/* Expands {name} placeholders from the table into out. */
static mr_err expand(const char *tpl, const char *const names[], const char *const values[],
                     size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (const char *c = tpl; *c;) {
        const char *val = NULL;
        size_t skip = 1;
        if (*c == '{') {
            for (size_t i = 0; i < n; i++) {
                size_t nl = strlen(names[i]);
                if (strncmp(c, names[i], nl) == 0) {
                    val = values[i];
                    skip = nl;
                }
            }
            if (!val) return MR_EINVAL;
        }
        if (val) {
            size_t vl = strlen(val);
            if (o + vl >= cap) return MR_EINVAL;
            memcpy(out + o, val, vl);
            o += vl;
        } else {
            if (o + 1 >= cap) return MR_EINVAL;
            out[o++] = *c;
        }
        c += skip;
    }
    out[o] = '\0';
    return MR_OK;
}

mr_err prov_expand_url(const char *tpl, const char *app, const char *subdomain,
                       const prov_config *cfg, char *out, size_t cap)
{
    char host[PROV_HOST_MAX + 1];
    if (prov_matrix_host(cfg, app, subdomain, host, sizeof host) != MR_OK)
        host[0] = '\0';
    const char *const names[] = {"{scheme}", "{subdomain}", "{domain}", "{app}", "{matrix_host}"};
    const char *const values[] = {cfg->tls != PROV_TLS_OFF ? "https" : "http", subdomain,
                                  cfg->base_domain, app, host};
    return expand(tpl, names, values, MR_ARRAY_LEN(names), out, cap);
}

mr_err prov_matrix_host(const prov_config *cfg, const char *app, const char *subdomain,
                        char *out, size_t cap)
{
    const char *const names[] = {"{subdomain}", "{app}"};
    const char *const values[] = {subdomain, app};
    char label[PROV_HOST_MAX + 1];
    if (expand(cfg->matrix_host_tpl, names, values, MR_ARRAY_LEN(names), label, sizeof label) !=
            MR_OK ||
        strchr(label, '.') || strlen(label) > 63 || !prov_valid_host(label))
        return MR_EINVAL;
    int n = snprintf(out, cap, "%s.%s", label, cfg->base_domain);
    if (n < 0 || (size_t)n >= cap || !prov_valid_host(out)) return MR_EINVAL;
    return MR_OK;
}
