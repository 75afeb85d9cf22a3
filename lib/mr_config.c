/* mr_config.c: environment configuration, validated once at start-up.
 *
 * The parse/check functions are pure (tests call them); the mr_config_* wrappers
 * read the environment and exit(2) with one line naming the variable.
 *
 * Every process of an install is given the same environment file, so each is
 * handed every secret; mr_config_seal() leaves it only those it read. */
#include "mr_config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <curl/curl.h>

static void die(const char *msg)
{
    /* Plain text as well as a log line: this is read by a person starting the stack. */
    fprintf(stderr, "config: %s\n", msg);
    exit(2);
}

/* ---- secrets in the environment ------------------------------------------- */

/* The settings whose values are secrets (.env.example and provisioner.env); a
 * name ending in _TOKEN is one too: a provisioner target's token, which the
 * worker reads by the name of its token_ref (env:NAME_TOKEN). */
static const char *const secret_names[] = {
    "DATABASE_URL",          "DATABASE_LISTEN_URL",     "SUPABASE_SECRET_KEYS",
    "SUPABASE_JWT_SECRET",   "SUPABASE_JWT_SECRET_PREVIOUS", "MINDROOM_INTERNAL_SECRET",
    "MINDROOM_SECRETS_KEY",  "MINDROOM_SECRETS_KEY_PREVIOUS", "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET", "RESEND_API_KEY",          "DOKKU_PROVISIONER_TOKEN",
};
static unsigned secrets_read; /* bit i: secret_names[i] was read */

/* secret_names' index of the name's first len bytes, or -1. */
static int secret_index(const char *name, size_t len)
{
    for (size_t i = 0; i < MR_ARRAY_LEN(secret_names); i++)
        if (strlen(secret_names[i]) == len && memcmp(name, secret_names[i], len) == 0)
            return (int)i;
    return -1;
}

const char *mr_config_getenv(const char *name)
{
    int i = secret_index(name, strlen(name));
    if (i >= 0)
        secrets_read |= 1u << i;
    return getenv(name);
}

void mr_config_forget(const char *name)
{
    char *v = getenv(name);
    if (v)
        explicit_bzero(v, strlen(v));
    unsetenv(name);
}

/* Forgets the next *_TOKEN variable not in secret_names; 0 when none is left. */
static int forget_a_token(void)
{
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        size_t n = eq ? (size_t)(eq - *e) : 0;
        char name[128];
        if (n <= 6 || n >= sizeof name || memcmp(eq - 6, "_TOKEN", 6) != 0 ||
            secret_index(*e, n) >= 0)
            continue;
        memcpy(name, *e, n);
        name[n] = '\0';
        mr_config_forget(name); /* reorders environ: the caller looks again */
        return 1;
    }
    return 0;
}

void mr_config_seal(unsigned keep)
{
    for (size_t i = 0; i < MR_ARRAY_LEN(secret_names); i++)
        if (!(secrets_read & (1u << i)))
            mr_config_forget(secret_names[i]);
    if (!(keep & MR_CONFIG_KEEP_TOKENS))
        while (forget_a_token())
            ;
    /* Not dumpable: no core file, and /proc/PID/environ, mem and ptrace are
     * root's alone, not every process's of the same user. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
        die("cannot make the process non-dumpable (prctl PR_SET_DUMPABLE)");
}

/* ---- reading settings ------------------------------------------------------- */

static const char *env(const char *name)
{
    const char *v = mr_config_getenv(name);
    return (v && *v) ? v : NULL;
}

const char *mr_config_str(const char *name, const char *def)
{
    const char *v = env(name);
    if (v)
        return v;
    if (!def) {
        char msg[256];
        snprintf(msg, sizeof(msg), "%s is required but not set", name);
        die(msg);
    }
    return def;
}

mr_err mr_config_check_secret(const char *name, const char *value, size_t min_len,
                              char *err, size_t errlen)
{
    if (!value || !*value)
        return mr_seterr(err, errlen, MR_EINVAL, "%s is required but not set", name);
    size_t n = strlen(value);
    /* Stray whitespace from a copy-paste would make every signature silently
     * mismatch; refusing to start says what is wrong. */
    if (isspace((unsigned char)value[0]) || isspace((unsigned char)value[n - 1]))
        return mr_seterr(err, errlen, MR_EINVAL,
                         "%s has leading or trailing whitespace", name);
    for (size_t i = 0; i < n; i++)
        if (iscntrl((unsigned char)value[i]))
            return mr_seterr(err, errlen, MR_EINVAL, "%s contains control characters", name);
    if (n < min_len)
        return mr_seterr(err, errlen, MR_EINVAL, "%s is too short (%zu characters, need at least %zu)",
                         name, n, min_len);
    return MR_OK;
}

const char *mr_config_secret(const char *name, const char *def, size_t min_len)
{
    const char *v = mr_config_getenv(name);
    if (!v || !*v) {
        if (def)
            return def;
    }
    char msg[256];
    if (mr_config_check_secret(name, v, min_len, msg, sizeof(msg)) != MR_OK)
        die(msg);
    return v;
}

#define MAX_URL 2048

mr_err mr_config_check_url(const char *name, const char *value, char *err, size_t errlen)
{
    if (!value || !*value)
        return mr_seterr(err, errlen, MR_EINVAL, "%s is required but not set", name);
    size_t n = strlen(value);
    if (n > MAX_URL)
        return mr_seterr(err, errlen, MR_EINVAL, "%s is longer than %d characters", name, MAX_URL);
    for (size_t i = 0; i < n; i++)
        if (isspace((unsigned char)value[i]) || iscntrl((unsigned char)value[i]))
            return mr_seterr(err, errlen, MR_EINVAL, "%s contains whitespace or control characters",
                             name);
    /* libcurl's parser, the one that will send to it, decides what a URL is. */
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL;
    mr_err e = MR_OK;
    if (!u)
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    if (curl_url_set(u, CURLUPART_URL, value, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK || !*host)
        e = mr_seterr(err, errlen, MR_EINVAL, "%s is not an absolute URL", name);
    else if (strcmp(scheme, "https") != 0 && strcmp(scheme, "http") != 0)
        e = mr_seterr(err, errlen, MR_EINVAL, "%s must be an http:// or https:// URL", name);
    curl_free(scheme);
    curl_free(host);
    curl_url_cleanup(u);
    return e;
}

const char *mr_config_url(const char *name, const char *def)
{
    const char *v = env(name);
    if (!v && def)
        return def;
    char msg[256];
    if (mr_config_check_url(name, v, msg, sizeof(msg)) != MR_OK)
        die(msg);
    return v;
}

mr_err mr_config_parse_int(const char *name, const char *value, int64_t def,
                           int64_t min, int64_t max, int64_t *out,
                           char *err, size_t errlen)
{
    if (!value || !*value) {
        *out = def;
        return MR_OK;
    }
    /* strtoll alone would accept " 12", "12abc" and saturate on overflow. */
    const char *p = value;
    if (*p == '-' || *p == '+')
        p++;
    if (!isdigit((unsigned char)*p))
        return mr_seterr(err, errlen, MR_EINVAL, "%s is not an integer: \"%.32s\"", name, value);
    errno = 0;
    char *end;
    long long v = strtoll(value, &end, 10);
    if (*end != '\0')
        return mr_seterr(err, errlen, MR_EINVAL, "%s is not an integer: \"%.32s\"", name, value);
    if (errno == ERANGE || v < min || v > max)
        return mr_seterr(err, errlen, MR_EINVAL, "%s must be between %" PRId64 " and %" PRId64,
                         name, min, max);
    *out = v;
    return MR_OK;
}

int64_t mr_config_int(const char *name, int64_t def, int64_t min, int64_t max)
{
    int64_t v;
    char msg[256];
    if (mr_config_parse_int(name, mr_config_getenv(name), def, min, max, &v, msg, sizeof(msg)) != MR_OK)
        die(msg);
    return v;
}

mr_err mr_config_parse_bool(const char *name, const char *value, int def,
                            int *out, char *err, size_t errlen)
{
    static const char *const yes[] = {"1", "true", "yes", "on"};
    static const char *const no[] = {"0", "false", "no", "off"};
    if (!value || !*value) {
        *out = def;
        return MR_OK;
    }
    for (size_t i = 0; i < MR_ARRAY_LEN(yes); i++) {
        if (strcasecmp(value, yes[i]) == 0) {
            *out = 1;
            return MR_OK;
        }
        if (strcasecmp(value, no[i]) == 0) {
            *out = 0;
            return MR_OK;
        }
    }
    return mr_seterr(err, errlen, MR_EINVAL, "%s must be one of 1/true/yes/on or 0/false/no/off",
                     name);
}

int mr_config_bool(const char *name, int def)
{
    int v;
    char msg[256];
    if (mr_config_parse_bool(name, mr_config_getenv(name), def, &v, msg, sizeof(msg)) != MR_OK)
        die(msg);
    return v;
}
