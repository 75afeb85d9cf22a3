/* handle-stripe-webhook (stub until issue 4 lands): enforces the contract's
 * method and the presence of Stripe-Signature, nothing else yet. */
#include "mindroom.h"

static void handle(mr_req *r)
{
    if (!*r->stripe_signature) {
        mr_reply_error(r, 400, "invalid", "missing Stripe-Signature header");
        return;
    }
    cJSON *out = cJSON_CreateObject();
    cJSON_AddBoolToObject(out, "received", 1);
    mr_reply_json(r, 200, out);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "handle-stripe-webhook", .methods = "POST", .auth = MR_AUTH_NONE, .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
