/* check-instance-health: probes running instances concurrently and records what
 * it saw (lib/mr_health.c, public.health_record). It only probes and records: the
 * periodic round runs in the lifecycle worker, and a redeploy the threshold makes
 * owed is the worker's to do.
 *
 * GET or POST, ?instance_id=<uuid> or {"instance_id"} for one instance.
 *   service_role JWT: every running instance (or one); failures count toward a
 *                     redeploy, at most once per HEALTH_INTERVAL_S per instance.
 *   user JWT: only the caller's own instances, selected under RLS; recorded, but
 *             a tenant's probe never counts toward a redeploy. It only looks, so a
 *             third-party app the user authorised (client_id) may call it too. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mindroom.h"
#include "mr_health.h"

static mr_health_config cfg;

static void init(void)
{
    mr_health_config_load(&cfg);
}

static void handle(mr_req *r)
{
    char id[40], err[256] = "";
    /* The one instance asked for, if any: "" for all (an empty id is an error,
     * never a round over every instance). */
    if (mr_req_instance_id(r, id) != 0)
        return;
    int counted = strcmp(r->who.role, "service_role") == 0;
    cJSON *out = NULL;
    mr_err e = mr_health_round(r->db, &r->who, &cfg, id[0] ? id : NULL, counted, NULL,
                               cfg.round_ms, &out, err, sizeof err);
    if (e == MR_ENOTFOUND)
        mr_reply_error(r, 404, "not_found", "%s", err);
    else if (e == MR_ECONFLICT)
        mr_reply_error(r, 409, "not_running", "%s", err);
    else if (e != MR_OK)
        mr_reply_err(r, e, err);
    else
        mr_reply_json(r, 200, out);
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "check-instance-health",
        .methods = "GET,POST",
        .auth = MR_AUTH_USER,
        .oauth_client_methods = "GET,POST",
        .init = init,
        .handle = handle,
    };
    return mr_app_main(&app, argc, argv);
}
