/* deprovision-instance (stub until its issue lands): the runtime enforces the method
 * (POST) and the JWT role; the behaviour itself is not built yet. */
#include "mindroom.h"

static void handle(mr_req *r)
{
    mr_reply_error(r, 501, "not_implemented", "deprovision-instance is not implemented yet");
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "deprovision-instance", .methods = "POST", .auth = MR_AUTH_SERVICE, .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
