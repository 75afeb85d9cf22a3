/* dokku-provisioner: the service behind DOKKU_PROVISIONER_URL.
 *
 * Turns POST /apps, GET/DELETE /apps/{app} and POST /apps/{app}/stop|start
 * into `dokku` commands (ops.c), locally, over SSH, or recorded only
 * (dry-run). Served by nginx on its own loopback listener, never on the
 * public server block. Configuration is read and checked once, here. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mr_deadlines.h"
#include "prov.h"

prov_config prov_cfg;

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "dokku-provisioner: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void check_template(const char *var, const char *tpl)
{
    prov_config probe = prov_cfg;
    char out[1024];
    if (prov_expand_url(tpl, "app", "sub", &probe, out, sizeof out) != MR_OK)
        die("%s: unknown placeholder (use {scheme}, {subdomain}, {domain}, {app}) or too long",
            var);
    if (strncmp(out, "http://", 7) != 0 && strncmp(out, "https://", 8) != 0)
        die("%s must start with http:// or https:// (or {scheme}://)", var);
}

static void init(void)
{
    prov_config *c = &prov_cfg;
    const char *mode = mr_config_str("DOKKU_MODE", "");
    /* With DOKKU_MODE unset nothing may reach a Dokku host by accident: the
     * provisioner only records, and says "dry_run": true in every answer. */
    if (!*mode || strcmp(mode, "dry-run") == 0) c->mode = PROV_MODE_DRY_RUN;
    else if (strcmp(mode, "local") == 0) c->mode = PROV_MODE_LOCAL;
    else if (strcmp(mode, "ssh") == 0) c->mode = PROV_MODE_SSH;
    else die("%s must be local, ssh or dry-run", "DOKKU_MODE");
    int dry = c->mode == PROV_MODE_DRY_RUN;

    c->token = mr_config_secret("DOKKU_PROVISIONER_TOKEN", NULL, 16);
    c->dokku_bin = mr_config_str("DOKKU_BIN", "dokku");
    c->ssh_bin = mr_config_str("DOKKU_SSH_BIN", "ssh");
    c->ssh_user = mr_config_str("DOKKU_SSH_USER", "dokku");
    c->host = mr_config_str("DOKKU_HOST", c->mode == PROV_MODE_SSH ? NULL : "");
    c->ssh_key = mr_config_str("DOKKU_SSH_KEY", "");
    c->known_hosts = mr_config_str("DOKKU_SSH_KNOWN_HOSTS", "");
    c->ssh_port = mr_config_int("DOKKU_SSH_PORT", 22, 1, 65535);
    if (c->mode == PROV_MODE_SSH) {
        if (!prov_valid_name(c->ssh_user)) die("%s must be a plain user name", "DOKKU_SSH_USER");
        for (const char *h = c->host; *h; h++)
            if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]", *h))
                die("%s must be a host name or address", "DOKKU_HOST");
        if (c->host[0] == '-') die("%s must be a host name or address", "DOKKU_HOST");
    }

    c->image = mr_config_str("MINDROOM_IMAGE", dry ? "" : NULL);
    if (!dry || *c->image) {
        if (!prov_valid_image(c->image))
            die("%s must be pinned by digest: <name>@sha256:<64 lowercase hex>", "MINDROOM_IMAGE");
    } else {
        c->image = "MINDROOM_IMAGE-unset";
    }
    c->base_domain = mr_config_str("MINDROOM_BASE_DOMAIN", dry ? "mindroom.localhost" : NULL);
    {
        size_t n = strlen(c->base_domain);
        if (n == 0 || n > 200 || c->base_domain[0] == '.' || c->base_domain[0] == '-' ||
            c->base_domain[n - 1] == '.')
            die("%s must be a domain name", "MINDROOM_BASE_DOMAIN");
        for (const char *d = c->base_domain; *d; d++)
            if (!strchr("abcdefghijklmnopqrstuvwxyz0123456789.-", *d))
                die("%s must be a lowercase domain name", "MINDROOM_BASE_DOMAIN");
    }
    c->tls = mr_config_bool("DOKKU_TLS", 0);

    c->min_memory_mb = mr_config_int("PROVISIONER_MIN_MEMORY_MB", 128, 6, 1 << 20);
    c->max_memory_mb = mr_config_int("PROVISIONER_MAX_MEMORY_MB", 16384, c->min_memory_mb,
                                     1 << 22);
    {
        const char *s = mr_config_str("PROVISIONER_MAX_CPU", "8");
        char *end = NULL;
        double v = strtod(s, &end);
        if (!end || *end || !(v >= 0.001) || v > 1024)
            die("%s must be a number of CPUs in [0.001, 1024]", "PROVISIONER_MAX_CPU");
        c->max_cpu_milli = (int64_t)(v * 1000.0 + 0.5);
    }
    /* Deadlines nest (lib/mr_deadlines.h): the whole request (which cuts any
     * command still running at its end) < nginx's read timeout on this listener <
     * the lifecycle worker's call. */
    c->command_timeout_ms = mr_config_int("DOKKU_COMMAND_TIMEOUT_MS", MR_DL_DOKKU_COMMAND_MS, 100, 3600000);
    c->deploy_timeout_ms = mr_config_int("DOKKU_DEPLOY_TIMEOUT_MS", MR_DL_DOKKU_DEPLOY_MS, 100, 7200000);
    c->request_timeout_ms = mr_config_int("PROVISIONER_REQUEST_TIMEOUT_MS", MR_DL_PROVISIONER_REQUEST_MS,
                                          100, 7200000);
    c->lock_retries = mr_config_int("DOKKU_LOCK_RETRIES", 5, 0, 100);
    c->lock_backoff_ms = mr_config_int("DOKKU_LOCK_BACKOFF_MS", 2000, 1, 600000);
    c->app_lock_wait_ms = mr_config_int("PROVISIONER_APP_LOCK_WAIT_MS", MR_DL_PROVISIONER_APP_LOCK_MS,
                                        0, 3600000);
    if (c->request_timeout_ms >= (int64_t)MR_DL_NGINX_PROVISIONER_S * 1000)
        die("PROVISIONER_REQUEST_TIMEOUT_MS must end before nginx's %d s read timeout on the "
            "provisioner listener", MR_DL_NGINX_PROVISIONER_S);
    c->state_dir = mr_config_str("PROVISIONER_STATE_DIR", "/tmp/mindroom-provisioner");

    c->frontend_tpl = mr_config_str("PROVISIONER_FRONTEND_URL", "{scheme}://{subdomain}.{domain}");
    c->backend_tpl = mr_config_str("PROVISIONER_BACKEND_URL", "{scheme}://{subdomain}.{domain}/api");
    c->matrix_tpl = mr_config_str("PROVISIONER_MATRIX_URL", "{scheme}://{subdomain}.{domain}");
    check_template("PROVISIONER_FRONTEND_URL", c->frontend_tpl);
    check_template("PROVISIONER_BACKEND_URL", c->backend_tpl);
    check_template("PROVISIONER_MATRIX_URL", c->matrix_tpl);

    char err[256];
    if (prov_state_init(c, err, sizeof err) != MR_OK) die("%s", err);

    if (dry)
        mr_log(MR_LOG_WARN, "dry_run: true; DOKKU_MODE=%s: commands are recorded, never run",
               *mode ? mode : "(unset)");
    else
        mr_log(MR_LOG_INFO, "mode %s %s, image %s, domain %s, tls %s",
               c->mode == PROV_MODE_SSH ? "ssh to" : "local",
               c->mode == PROV_MODE_SSH ? c->host : c->dokku_bin, c->image, c->base_domain,
               c->tls ? "on" : "off");
}

int main(int argc, char **argv)
{
    static const mr_app app = {
        .name = "dokku-provisioner",
        .methods = "GET,POST,DELETE",
        .auth = MR_AUTH_CUSTOM,
        .init = init,
        .worker_init = NULL,
        .handle = prov_handle,
    };
    return mr_app_main(&app, argc, argv);
}
