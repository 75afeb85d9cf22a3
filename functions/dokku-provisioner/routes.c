/* routes.c: who may call, which route, and what the answer looks like.
 *
 *   POST   /apps                  create or update      200 (updated) / 201 (created)
 *   GET    /apps/{app}            state                 200, 404 not_found
 *   POST   /apps/{app}/stop       ps:stop               200, 404 not_found
 *   POST   /apps/{app}/start      ps:start              200, 404 not_found / not_deployed
 *   POST   /apps/{app}/restart    ps:restart            200, 404 not_found / not_deployed
 *   DELETE /apps/{app}            destroy, keep storage 200 (also when the app is missing)
 *   DELETE /apps/{app}?purge=true destroy with storage  200
 *   DELETE /apps/{app}/storage    storage of a destroyed instance  200, 409 apps_exist
 *
 * The token is checked before the route, so an unauthenticated caller learns
 * nothing about which paths exist. Every route takes only app names with
 * PROVISIONER_APP_PREFIX: the token must not reach other apps on the host. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prov.h"

static int authorized(const mr_req *r)
{
    const char *tok = mr_http_bearer(r->authorization);
    if (!tok) return 0;
    return mr_ct_equal(tok, strlen(tok), prov_cfg.token, strlen(prov_cfg.token));
}

static void reply_failure(mr_req *r, const prov_outcome *o, const char *err)
{
    mr_reply_error(r, o->fail_status ? o->fail_status : 500,
                   o->fail_code ? o->fail_code : "internal", "%s", err);
}

static const char *storage_name(prov_storage s)
{
    return s == PROV_STORAGE_PRESENT ? "present" : "missing";
}

/* {"app", "state", "apps": {...}, "storage": {...}, "dry_run"}: the parts this
 * request looked at. */
static cJSON *base_answer(const char *app, const prov_outcome *o)
{
    cJSON *j = cJSON_CreateObject();
    if (!j) return NULL;
    cJSON_AddStringToObject(j, "app", app);
    cJSON_AddStringToObject(j, "state", o->state);
    cJSON *apps = cJSON_AddObjectToObject(j, "apps");
    if (apps && o->app_state) cJSON_AddStringToObject(apps, "mindroom", o->app_state);
    if (apps && o->hs_state) cJSON_AddStringToObject(apps, "homeserver", o->hs_state);
    if (o->storage || o->hs_storage) {
        cJSON *st = cJSON_AddObjectToObject(j, "storage");
        if (st && o->storage) cJSON_AddStringToObject(st, "mindroom", storage_name(o->storage));
        if (st && o->hs_storage)
            cJSON_AddStringToObject(st, "homeserver", storage_name(o->hs_storage));
    }
    cJSON_AddBoolToObject(j, "dry_run", prov_cfg.mode == PROV_MODE_DRY_RUN);
    return j;
}

static void answer(mr_req *r, int status, cJSON *j)
{
    if (!j) {
        mr_reply_error(r, 500, "internal", "out of memory");
        return;
    }
    mr_reply_json(r, status, j);
}

static void create_app(mr_req *r)
{
    char err[256];
    cJSON *tree = NULL;
    prov_spec *spec = calloc(1, sizeof *spec);
    if (!spec) {
        mr_reply_error(r, 500, "internal", "out of memory");
        return;
    }
    if (prov_parse_spec(r->body, r->body_len, &prov_cfg, &tree, spec, err, sizeof err) != MR_OK) {
        mr_reply_error(r, 400, "invalid_request", "%s", err);
        goto done;
    }
    char urls[3][1024];
    const char *tpls[3] = {prov_cfg.backend_tpl, prov_cfg.frontend_tpl, prov_cfg.matrix_url_tpl};
    for (int i = 0; i < 3; i++) {
        if (prov_expand_url(tpls[i], spec->app, spec->subdomain, &prov_cfg, urls[i],
                            sizeof urls[i]) != MR_OK) {
            mr_reply_error(r, 400, "invalid_request", "the app's URLs would be too long");
            goto done;
        }
    }
    prov_outcome o;
    if (prov_apply(&prov_cfg, spec, &o, err, sizeof err) != MR_OK) {
        reply_failure(r, &o, err);
        goto done;
    }
    cJSON *j = base_answer(spec->app, &o);
    if (j) {
        cJSON_AddStringToObject(j, "backend_url", urls[0]);
        cJSON_AddStringToObject(j, "frontend_url", urls[1]);
        cJSON_AddStringToObject(j, "matrix_server_url", urls[2]);
        if (spec->hs.present)
            cJSON_AddStringToObject(j, "matrix_server_name", spec->hs.server_name);
        cJSON_AddBoolToObject(j, "created", !o.existed);
        cJSON_AddBoolToObject(j, "deployed", o.deployed);
        cJSON_AddBoolToObject(j, "restarted", o.restarted);
        cJSON_AddBoolToObject(j, "all_restarted", o.all_restarted);
    }
    answer(r, o.status, j);
done:
    prov_spec_free(tree);
    free(spec);
}

static void app_action(mr_req *r, const char *app, prov_verb verb)
{
    char err[256];
    prov_outcome o;
    if (prov_app_action(&prov_cfg, app, verb, &o, err, sizeof err) != MR_OK) {
        reply_failure(r, &o, err);
        return;
    }
    cJSON *j = base_answer(app, &o);
    if (j && (verb == PROV_DESTROY || verb == PROV_PURGE || verb == PROV_DESTROY_STORAGE)) {
        if (verb != PROV_DESTROY_STORAGE) cJSON_AddBoolToObject(j, "existed", o.existed);
        cJSON_AddBoolToObject(j, "purged", o.purged);
    }
    answer(r, 200, j);
}

static void not_allowed(mr_req *r, const char *allow)
{
    char hdr[64];
    snprintf(hdr, sizeof hdr, "Allow: %s", allow);
    const char *const extra[] = {hdr, NULL};
    cJSON *j = cJSON_CreateObject();
    cJSON *e = cJSON_AddObjectToObject(j, "error");
    cJSON_AddStringToObject(e, "code", "method_not_allowed");
    cJSON_AddStringToObject(e, "message", "method not allowed on this path");
    mr_reply_json_h(r, 405, j, extra);
}

void prov_handle(mr_req *r)
{
    if (!authorized(r)) {
        const char *const extra[] = {"WWW-Authenticate: Bearer", NULL};
        cJSON *j = cJSON_CreateObject();
        cJSON *e = cJSON_AddObjectToObject(j, "error");
        cJSON_AddStringToObject(e, "code", "unauthorized");
        cJSON_AddStringToObject(e, "message", "missing or invalid bearer token");
        mr_reply_json_h(r, 401, j, extra);
        return;
    }
    const char *path = r->path ? r->path : "";
    const char *query = r->query ? r->query : "";
    const char *m = r->method;

    /* The one query parameter there is: DELETE /apps/{app}?purge=true|false.
     * Anything else is refused, so that a caller who believes it asked for
     * something learns that it did not. */
    int purge = strcmp(query, "purge=true") == 0;
    if (*query && !purge && strcmp(query, "purge=false") != 0) {
        mr_reply_error(r, 400, "invalid_request",
                       "the only query parameter is purge=true|false (DELETE /apps/{app})");
        return;
    }

    if (strcmp(path, "/apps") == 0) {
        if (*query) mr_reply_error(r, 400, "invalid_request", "no query parameters here");
        else if (strcmp(m, "POST") == 0) create_app(r);
        else not_allowed(r, "POST");
        return;
    }
    if (strncmp(path, "/apps/", 6) != 0) {
        mr_reply_error(r, 404, "no_route", "no such route");
        return;
    }

    /* /apps/{app} or /apps/{app}/{action}; nginx has already decoded and
     * normalized the path, so the name is checked exactly as it will be used. */
    char app[PROV_NAME_MAX + 2];
    const char *name = path + 6, *slash = strchr(name, '/');
    size_t nl = slash ? (size_t)(slash - name) : strlen(name);
    const char *action = slash ? slash + 1 : NULL;
    if (nl > 0 && nl <= PROV_NAME_MAX) {
        memcpy(app, name, nl);
        app[nl] = '\0';
    }
    if (nl == 0 || nl > PROV_NAME_MAX || !prov_valid_app(&prov_cfg, app)) {
        mr_reply_error(r, 400, "invalid_app",
                       "app name must be \"%s\" followed by [a-z0-9], at most %d characters",
                       prov_cfg.app_prefix, PROV_APP_MAX);
        return;
    }

    if (!action) {
        if (strcmp(m, "DELETE") == 0) {
            app_action(r, app, purge ? PROV_PURGE : PROV_DESTROY);
        } else if (*query) {
            mr_reply_error(r, 400, "invalid_request", "purge applies to DELETE only");
        } else if (strcmp(m, "GET") == 0) {
            app_action(r, app, PROV_STATE);
        } else {
            not_allowed(r, "GET, DELETE");
        }
        return;
    }
    if (*query) {
        mr_reply_error(r, 400, "invalid_request", "purge applies to DELETE /apps/{app} only");
        return;
    }
    if (strcmp(action, "stop") == 0 || strcmp(action, "start") == 0 ||
        strcmp(action, "restart") == 0) {
        prov_verb v = action[0] == 'r' ? PROV_RESTART : action[2] == 'o' ? PROV_STOP : PROV_START;
        if (strcmp(m, "POST") == 0) app_action(r, app, v);
        else not_allowed(r, "POST");
        return;
    }
    if (strcmp(action, "storage") == 0) {
        if (strcmp(m, "DELETE") == 0) app_action(r, app, PROV_DESTROY_STORAGE);
        else not_allowed(r, "DELETE");
        return;
    }
    mr_reply_error(r, 404, "no_route", "no such route");
}
