/* mr_appenv.c: see mr_appenv.h. */
#include "mr_appenv.h"

#include <stddef.h>
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

int mr_appenv_reserved_key(const char *key)
{
    static const char *const mine[] = {"MATRIX_HOMESERVER", "MATRIX_SERVER_NAME",
                                       "MATRIX_REGISTRATION_SHARED_SECRET",
                                       "MINDROOM_STORAGE_PATH", MR_APPENV_MANAGED};
    /* Dokku keeps its own settings in DOKKU_* variables of the app. */
    if (strncmp(key, "DOKKU_", 6) == 0) return 1;
    for (size_t i = 0; i < MR_ARRAY_LEN(mine); i++)
        if (strcmp(key, mine[i]) == 0) return 1;
    return 0;
}
