/* create-portal-session: a Stripe Billing Portal session for the caller's
 * customer, where the subscription is changed, cancelled (at the period's
 * end, as the portal is configured) and its invoices and payment methods are
 * managed. Stripe sends the resulting events to the webhook.
 *
 * POST with a user's JWT (role authenticated); the body is empty or {}.
 * 200 {"id", "url"}: the browser goes to url, and comes back to
 * STRIPE_PORTAL_RETURN_URL. 404 no_customer for an account that never went
 * through checkout. The request is an attempt (lib/mr_billing.h).
 *
 * Without STRIPE_SECRET_KEY every call is answered 503 stripe_not_configured. */
#include <stdio.h>
#include <string.h>

#include "mindroom.h"
#include "mr_billing.h"
#include "mr_stripe_api.h"

static mr_stripe_api_config stripe;
static const char *return_url;

static void init(void)
{
    mr_stripe_api_config_load(&stripe, "payments answer 503 stripe_not_configured");
    if (!stripe.secret_key)
        return;
    return_url = mr_config_url("STRIPE_PORTAL_RETURN_URL", NULL);
}


static void handle(mr_req *r)
{
    if (!stripe.secret_key) {
        mr_stripe_api_reply_not_configured(r);
        return;
    }
    if (!mr_billing_require_user(r))
        return;
    /* Nothing to choose: whatever a body could name (another customer, another
     * return URL) is refused rather than ignored. */
    if (r->body_len > 0) {
        cJSON *body = mr_json_parse(r->body, r->body_len);
        int empty = cJSON_IsObject(body) && !body->child;
        cJSON_Delete(body);
        if (!empty) {
            mr_reply_error(r, 400, "invalid_body",
                           "the body must be empty or {}: the portal is always the caller's");
            return;
        }
    }
    const char *account = r->who.sub;
    mr_billing_account acc;
    if (mr_billing_account_get(r, account, &acc) != MR_OK)
        return;
    if (!acc.found) {
        mr_reply_error(r, 404, "no_account", "no account for this user");
        return;
    }
    if (!acc.customer[0]) {
        mr_reply_error(r, 404, "no_customer",
                       "this account has no billing details yet: subscribe first "
                       "(create-checkout-session)");
        return;
    }
    cJSON *p = cJSON_CreateObject();
    cJSON_AddStringToObject(p, "customer", acc.customer);
    cJSON_AddStringToObject(p, "return_url", return_url);
    mr_billing_result s;
    mr_err e = mr_billing_call(r, &stripe, account, "portal", "/v1/billing_portal/sessions", p,
                               r->started_ms + stripe.deadline_ms, &s);
    cJSON_Delete(p);
    if (e != MR_OK)
        return;
    if (!s.url) {
        mr_billing_result_free(&s);
        mr_reply_error(r, 502, "stripe_error", "the payment provider sent a session without a URL");
        return;
    }
    cJSON *out = cJSON_CreateObject();
    cJSON_AddStringToObject(out, "id", s.object_id);
    cJSON_AddStringToObject(out, "url", s.url);
    mr_billing_result_free(&s);
    mr_reply_json(r, 200, out);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "create-portal-session",
        .methods = "POST",
        .auth = MR_AUTH_USER,
        .init = init,
        .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
