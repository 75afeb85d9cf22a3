/* dokku-provisioner (stub until issue 6 lands): checks the provisioner bearer
 * token in constant time, then answers 501. */
#include "mindroom.h"

#include <string.h>

static const char *token;

static void init(void)
{
    token = mr_config_secret("DOKKU_PROVISIONER_TOKEN", NULL, 16);
}

static void handle(mr_req *r)
{
    const char *got = mr_http_bearer(r->authorization);
    if (!got || !mr_ct_equal(got, strlen(got), token, strlen(token))) {
        mr_reply_error(r, 401, "unauthorized", "missing or invalid provisioner token");
        return;
    }
    mr_reply_error(r, 501, "not_implemented", "dokku-provisioner is not implemented yet");
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "dokku-provisioner", .methods = "GET,POST,DELETE", .auth = MR_AUTH_CUSTOM,
        .init = init, .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
