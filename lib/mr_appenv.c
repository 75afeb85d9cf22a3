/* mr_appenv.c: see mr_appenv.h. */
#include "mr_appenv.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "mr_common.h"

int mr_appenv_valid_key(const char *s)
{
    if (!s || !((s[0] >= 'A' && s[0] <= 'Z') || s[0] == '_')) return 0;
    size_t n = 0;
    for (const char *c = s; *c; c++, n++) {
        if (n >= 255) return 0;
        if (!((*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '_')) return 0;
    }
    return 1;
}

static int named(const char *key, const char *const *names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(key, names[i]) == 0) return 1;
    return 0;
}

int mr_appenv_reserved_key(const char *key)
{
    static const char *const mine[] = {
        /* the provisioner's (docs/instance.md) */
        "MATRIX_HOMESERVER", "MATRIX_SERVER_NAME", "MATRIX_REGISTRATION_SHARED_SECRET",
        "MINDROOM_STORAGE_PATH", "MINDROOM_CONFIG_PATH", "MINDROOM_CONFIG_TEMPLATE",
        MR_APPENV_MANAGED,
        /* Dokku's: the port it routes to */
        "PORT",
        /* what the container's processes are found and run by */
        "PATH", "HOME", "USER", "SHELL", "HOSTNAME", "PYTHONPATH", "PYTHONHOME",
        "PYTHONSTARTUP"};
    /* Dokku keeps its own settings in DOKKU_* variables of the app; LD_* tell the
     * dynamic loader what to load into every process (LD_PRELOAD, LD_LIBRARY_PATH). */
    if (strncmp(key, "DOKKU_", 6) == 0 || strncmp(key, "LD_", 3) == 0) return 1;
    return named(key, mine, MR_ARRAY_LEN(mine));
}

int mr_appenv_operator_key(const char *key)
{
    /* The control plane's (public.lifecycle_step_json's env, and the worker's). */
    static const char *const ours[] = {
        MR_APPENV_CONTROL_PLANE_URL, MR_APPENV_CONTROL_PLANE_TOKEN, "MINDROOM_INSTANCE_ID",
        "MINDROOM_SUBSCRIPTION_ID", "MINDROOM_SUBDOMAIN", "MINDROOM_TIER", "MAX_AGENTS",
        "MAX_MESSAGES_PER_DAY", "MAX_STORAGE_GB"};
    return mr_appenv_valid_key(key) && !mr_appenv_reserved_key(key) &&
           !named(key, ours, MR_ARRAY_LEN(ours));
}

int mr_appenv_valid_value(const char *str)
{
    for (const unsigned char *s = (const unsigned char *)str; *s;) {
        unsigned c = *s;
        size_t n = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2
                 : (c & 0xF8) == 0xF0 ? 3 : 4;
        if (n == 4 || (n == 1 && c < 0xC2)) return 0;
        uint32_t cp = n == 0 ? c : c & (0x3Fu >> n);
        for (size_t i = 1; i <= n; i++) {
            if ((s[i] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i] & 0x3Fu);
        }
        if ((n == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
            (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
            return 0;
        s += n + 1;
    }
    return 1;
}

size_t mr_appenv_json_size(const char *key, const char *value)
{
    size_t n = strlen(key) + 6; /* "key":"value", */
    for (const unsigned char *s = (const unsigned char *)value; *s; s++) {
        if (*s == '"' || *s == '\\' || (*s < 0x20 && strchr("\b\f\n\r\t", *s)))
            n += 2;
        else
            n += *s < 0x20 ? 6 : 1;
    }
    return n;
}
