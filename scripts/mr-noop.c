/* mr-noop: a FastCGI function that does nothing but answer {"ok":true} through
 * the same runtime (body read, request id, access log) as the real functions.
 * The benchmark's yardstick: what a function costs before it does any work. */
#include "mindroom.h"

static void handle(mr_req *r)
{
    cJSON *out = cJSON_CreateObject();
    cJSON_AddBoolToObject(out, "ok", 1);
    mr_reply_json(r, 200, out);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "mr-noop", .methods = "GET,POST", .auth = MR_AUTH_NONE, .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
