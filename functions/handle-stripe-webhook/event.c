/* event.c: see event.h. */
#include <string.h>

#include "event.h"

mr_err wh_event_parse(const char *body, size_t len, wh_event *ev, const char **code,
                      char *err, size_t errlen)
{
    memset(ev, 0, sizeof *ev);
    cJSON *root = mr_json_parse(body, len);
    if (root == NULL) {
        *code = "malformed_json";
        return mr_seterr(err, errlen, MR_EINVAL, "the body is not valid JSON");
    }
    const cJSON *obj = mr_json_path(root, "data.object");
    const cJSON *live = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "livemode")
                                             : NULL;
    if (!cJSON_IsObject(root) || mr_json_str(root, "id", &ev->id) != MR_OK || !*ev->id
        || strlen(ev->id) > 255
        || mr_json_str(root, "type", &ev->type) != MR_OK || !*ev->type || strlen(ev->type) > 255
        || mr_json_i64(root, "created", 0, 253402300799LL, &ev->created) != MR_OK
        || !cJSON_IsObject(obj) || (live != NULL && !cJSON_IsBool(live))) {
        cJSON_Delete(root);
        memset(ev, 0, sizeof *ev);
        *code = "invalid_event";
        return mr_seterr(err, errlen, MR_EINVAL,
                         "an event needs a string id and type, an integer created and data.object "
                         "(and a boolean livemode, when present)");
    }
    ev->root = root;
    ev->object = obj;
    ev->livemode = cJSON_IsTrue(live);
    return MR_OK;
}

void wh_event_free(wh_event *ev)
{
    cJSON_Delete(ev->root);
    memset(ev, 0, sizeof *ev);
}
