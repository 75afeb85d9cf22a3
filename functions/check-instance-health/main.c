/* check-instance-health (stub until its issue lands): the runtime enforces the method
 * (GET,POST) and the JWT role; the behaviour itself is not built yet. */
#include "mindroom.h"

static void handle(mr_req *r)
{
    mr_reply_error(r, 501, "not_implemented", "check-instance-health is not implemented yet");
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "check-instance-health", .methods = "GET,POST", .auth = MR_AUTH_USER, .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
