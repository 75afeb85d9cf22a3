/* list-plans: the plan catalogue for a pricing page.
 *
 * GET, no authentication (like a public Supabase function with verify_jwt =
 * false). 200 {"plans": [...]}: the active plans in display order, each with
 * price_id, tier, name, interval, amount (minor units), currency, trial_days
 * and limits (public.plan_catalogue, sql/migrations/050_billing.sql). The
 * answer may be cached by browsers and CDNs for PLANS_CACHE_SECONDS (default
 * 300; 0 = no-cache); errors are never cached. */
#include <stdio.h>

#include "mindroom.h"
#include "mr_billing.h"

static char cache_control[64];

static void init(void)
{
    int64_t s = mr_config_int("PLANS_CACHE_SECONDS", 300, 0, 86400);
    if (s > 0)
        snprintf(cache_control, sizeof cache_control, "Cache-Control: public, max-age=%lld",
                 (long long)s);
    else
        snprintf(cache_control, sizeof cache_control, "Cache-Control: no-cache");
}

static void handle(mr_req *r)
{
    cJSON *plans;
    if (mr_billing_sql(r, "SELECT public.plan_catalogue()::text", 0, NULL, &plans) != MR_OK)
        return;
    cJSON *out = cJSON_CreateObject();
    cJSON_AddItemToObject(out, "plans", plans);
    const char *const headers[] = {cache_control, NULL};
    mr_reply_json_h(r, 200, out, headers);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "list-plans",
        .methods = "GET",
        .auth = MR_AUTH_NONE,
        .init = init,
        .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
