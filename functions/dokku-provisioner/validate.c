/* validate.c: everything a request says is checked here, before any command runs.
 *
 * The alphabets are deliberately narrow: every argument that reaches `dokku`
 * is built from a validated name, a number, the configured image or base64
 * text. That is what makes the ssh mode safe too, where the remote side
 * word-splits the command line (see runner.c). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

int prov_valid_env_key(const char *s)
{
    if (!s || !((s[0] >= 'A' && s[0] <= 'Z') || s[0] == '_')) return 0;
    size_t n = 0;
    for (const char *c = s; *c; c++, n++) {
        if (n >= 255) return 0;
        if (!((*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '_')) return 0;
    }
    return 1;
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

static int env_cmp(const void *a, const void *b)
{
    return strcmp(((const prov_env *)a)->key, ((const prov_env *)b)->key);
}

static const char *const known_fields[] = {"app", "subdomain", "memory_mb", "cpu", "env"};

mr_err prov_parse_spec(const char *body, size_t len, const prov_config *cfg,
                       cJSON **tree, prov_spec *spec, char *err, size_t errlen)
{
    memset(spec, 0, sizeof *spec);
    *tree = mr_json_parse(body, len);
    if (!*tree) return mr_seterr(err, errlen, MR_EINVAL, "body is not valid JSON");
    const cJSON *root = *tree;
    if (!cJSON_IsObject(root)) return mr_seterr(err, errlen, MR_EINVAL, "body must be a JSON object");

    /* Unknown fields are refused rather than ignored: a caller that believes it
     * set something must learn that it did not. */
    for (const cJSON *f = root->child; f; f = f->next) {
        int known = 0;
        for (size_t i = 0; i < MR_ARRAY_LEN(known_fields); i++)
            if (f->string && strcmp(f->string, known_fields[i]) == 0) known = 1;
        if (!known) return mr_seterr(err, errlen, MR_EINVAL, "unknown field in body");
        for (const cJSON *g = f->next; g; g = g->next)
            if (g->string && strcmp(g->string, f->string) == 0)
                return mr_seterr(err, errlen, MR_EINVAL, "duplicate field \"%s\"", f->string);
    }

    if (mr_json_str(root, "app", &spec->app) != MR_OK)
        return mr_seterr(err, errlen, MR_EINVAL, "\"app\" is required and must be a string");
    if (!prov_valid_name(spec->app))
        return mr_seterr(err, errlen, MR_EINVAL,
                         "\"app\" must match ^[a-z][a-z0-9-]{0,62}$");
    if (mr_json_str(root, "subdomain", &spec->subdomain) != MR_OK)
        return mr_seterr(err, errlen, MR_EINVAL, "\"subdomain\" is required and must be a string");
    if (!prov_valid_name(spec->subdomain))
        return mr_seterr(err, errlen, MR_EINVAL,
                         "\"subdomain\" must match ^[a-z][a-z0-9-]{0,62}$");
    if (strlen(spec->subdomain) + 1 + strlen(cfg->base_domain) > 253)
        return mr_seterr(err, errlen, MR_EINVAL, "\"subdomain\" makes the domain too long");

    mr_err e = mr_json_i64(root, "memory_mb", cfg->min_memory_mb, cfg->max_memory_mb,
                           &spec->memory_mb);
    if (e != MR_OK)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "\"memory_mb\" is required: an integer in [%lld, %lld]",
                         (long long)cfg->min_memory_mb, (long long)cfg->max_memory_mb);

    const cJSON *cpu = cJSON_GetObjectItemCaseSensitive(root, "cpu");
    double maxcpu = (double)cfg->max_cpu_milli / 1000.0;
    if (!cJSON_IsNumber(cpu) || !isfinite(cpu->valuedouble) || cpu->valuedouble <= 0 ||
        cpu->valuedouble * 1000.0 > (double)cfg->max_cpu_milli + 1e-6)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "\"cpu\" is required: a number in (0, %g]", maxcpu);
    double milli = cpu->valuedouble * 1000.0;
    spec->cpu_milli = (int64_t)llround(milli);
    if (spec->cpu_milli < 1 || fabs(milli - (double)spec->cpu_milli) > 1e-6)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "\"cpu\" must be a multiple of 0.001 and at least 0.001");

    const cJSON *env = cJSON_GetObjectItemCaseSensitive(root, "env");
    if (env && !cJSON_IsNull(env)) {
        if (!cJSON_IsObject(env))
            return mr_seterr(err, errlen, MR_EINVAL, "\"env\" must be an object of strings");
        for (const cJSON *kv = env->child; kv; kv = kv->next) {
            if (spec->n_env >= PROV_MAX_ENV)
                return mr_seterr(err, errlen, MR_EINVAL, "\"env\" has more than %d keys",
                                 PROV_MAX_ENV);
            /* The key is never echoed: it failed validation, so it may be anything. */
            if (!prov_valid_env_key(kv->string))
                return mr_seterr(err, errlen, MR_EINVAL,
                                 "env key #%zu must match ^[A-Z_][A-Z0-9_]*$", spec->n_env + 1);
            /* Dokku keeps its own settings in DOKKU_* variables of the app. */
            if (strncmp(kv->string, "DOKKU_", 6) == 0)
                return mr_seterr(err, errlen, MR_EINVAL, "env key %s is reserved for Dokku",
                                 kv->string);
            if (!cJSON_IsString(kv) || !kv->valuestring)
                return mr_seterr(err, errlen, MR_EINVAL, "env value of %s must be a string",
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

mr_err prov_expand_url(const char *tpl, const char *app, const char *subdomain,
                       const prov_config *cfg, char *out, size_t cap)
{
    static const struct { const char *name; size_t len; } ph[] = {
        {"{scheme}", 8}, {"{subdomain}", 11}, {"{domain}", 8}, {"{app}", 5},
    };
    size_t n = 0;
    for (const char *c = tpl; *c;) {
        const char *val = NULL;
        size_t skip = 1;
        if (*c == '{') {
            for (size_t i = 0; i < MR_ARRAY_LEN(ph); i++) {
                if (strncmp(c, ph[i].name, ph[i].len) == 0) {
                    val = i == 0 ? (cfg->tls ? "https" : "http")
                        : i == 1 ? subdomain : i == 2 ? cfg->base_domain : app;
                    skip = ph[i].len;
                }
            }
            if (!val) return MR_EINVAL;
        }
        if (val) {
            size_t vl = strlen(val);
            if (n + vl >= cap) return MR_EINVAL;
            memcpy(out + n, val, vl);
            n += vl;
        } else {
            if (n + 1 >= cap) return MR_EINVAL;
            out[n++] = *c;
        }
        c += skip;
    }
    out[n] = '\0';
    return MR_OK;
}
