/* mr_action.c: see mr_action.h. */
#include "mr_action.h"

#include <string.h>

static const char *const names[MR_ACTION_COUNT] = {
    [MR_ACTION_NONE] = "none",       [MR_ACTION_CREATE] = "create",
    [MR_ACTION_START] = "start",     [MR_ACTION_UPDATE] = "update",
    [MR_ACTION_STOP] = "stop",       [MR_ACTION_DESTROY] = "destroy",
    [MR_ACTION_EMAIL] = "email",     [MR_ACTION_DESTROY_STORAGE] = "destroy_storage",
    [MR_ACTION_RESTART] = "restart",
};

const char *mr_action_name(mr_action a)
{
    return (unsigned)a < MR_ACTION_COUNT ? names[a] : "none";
}

mr_err mr_action_parse(const char *s, mr_action *out)
{
    *out = MR_ACTION_NONE;
    if (!s || !*s)
        return MR_OK;
    for (int a = MR_ACTION_CREATE; a < MR_ACTION_COUNT; a++) {
        if (strcmp(s, names[a]) == 0) {
            *out = (mr_action)a;
            return MR_OK;
        }
    }
    return MR_EINVAL;
}
