/* dokku-provisioner: the service behind DOKKU_PROVISIONER_URL.
 *
 * Turns POST /apps, GET/DELETE /apps/{app}, POST /apps/{app}/stop|start and
 * DELETE /apps/{app}/storage into `dokku` commands (ops.c), locally, over
 * SSH, or recorded only (dry-run). Served by nginx on its own loopback listener, never on the
 * public server block. Configuration is read and checked once, here. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* Synapse v1.156.0 (matrixdotorg/synapse), pinned by digest like MINDROOM_IMAGE. */
#define DEFAULT_MATRIX_IMAGE \
    "matrixdotorg/synapse@sha256:6882d26594b87171e0fe807ac6bd7f0000665cd70e73fb88c58ec9bff14c19ce"

static void check_template(const char *var, const char *tpl)
{
    prov_config probe = prov_cfg;
    char out[1024];
    if (prov_expand_url(tpl, "app", "sub", &probe, out, sizeof out) != MR_OK)
        die("%s: unknown placeholder (use {scheme}, {subdomain}, {domain}, {app}, "
            "{matrix_host}) or too long",
            var);
    if (strncmp(out, "http://", 7) != 0 && strncmp(out, "https://", 8) != 0)
        die("%s must start with http:// or https:// (or {scheme}://)", var);
}

static void check_image(const char *var, const char *image)
{
    if (!prov_valid_image(image))
        die("%s must be pinned by digest: <name>@sha256:<64 lowercase hex>", var);
}

static prov_tls tls_mode(void)
{
    const char *v = mr_config_str("DOKKU_TLS", "off");
    static const char *const off[] = {"off", "0", "false", "no"};
    static const char *const on[] = {"letsencrypt", "on", "1", "true", "yes"};
    for (size_t i = 0; i < MR_ARRAY_LEN(off); i++)
        if (strcmp(v, off[i]) == 0) return PROV_TLS_OFF;
    for (size_t i = 0; i < MR_ARRAY_LEN(on); i++)
        if (strcmp(v, on[i]) == 0) return PROV_TLS_LETSENCRYPT;
    if (strcmp(v, "wildcard") == 0) return PROV_TLS_WILDCARD;
    if (strcmp(v, "issuer") == 0) return PROV_TLS_ISSUER;
    die("%s must be off, letsencrypt, wildcard or issuer (on means letsencrypt)", "DOKKU_TLS");
}

/* Values that go onto a command line (and through ssh's word splitting) come
 * from a narrow alphabet: a DNS-1123 name, or an email address. */
static int dns_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 253 || s[0] == '-' || s[0] == '.' || s[n - 1] == '-' || s[n - 1] == '.')
        return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-' || *p == '.'))
            return 0;
    return 1;
}

/* An address whose local part is of the alphabet every argument is sent in over
 * ssh (no '%'), and which cannot be read as an option (no leading '-'). */
static int email_address(const char *s)
{
    const char *at = strchr(s, '@');
    if (!at || at == s || s[0] == '-' || s[0] == '.' || strchr(at + 1, '@') || strlen(s) > 254 ||
        !prov_valid_host(at + 1))
        return 0;
    for (const char *p = s; p < at; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              strchr("._+-", *p)))
            return 0;
    return 1;
}

static void scheduler_settings(prov_config *c)
{
    const char *s = mr_config_str("DOKKU_SCHEDULER", "docker-local");
    if (strcmp(s, "docker-local") == 0) c->scheduler = PROV_SCHED_DOCKER_LOCAL;
    else if (strcmp(s, "k3s") == 0) c->scheduler = PROV_SCHED_K3S;
    else die("%s must be docker-local or k3s", "DOKKU_SCHEDULER");
    int k3s = c->scheduler == PROV_SCHED_K3S;
    c->storage_class = mr_config_str("PROVISIONER_STORAGE_CLASS", "");
    c->acme_email = mr_config_str("PROVISIONER_ACME_EMAIL", "");
    c->cert_issuer = mr_config_str("PROVISIONER_CERT_ISSUER", "");
    if (*c->storage_class && (!k3s || !dns_name(c->storage_class)))
        die("%s is a StorageClass name (lowercase DNS name) and needs DOKKU_SCHEDULER=k3s",
            "PROVISIONER_STORAGE_CLASS");
    if (c->tls == PROV_TLS_ISSUER && !k3s)
        die("DOKKU_TLS=issuer needs DOKKU_SCHEDULER=k3s (cert-manager)");
    if (k3s && c->tls == PROV_TLS_LETSENCRYPT && !email_address(c->acme_email))
        die("DOKKU_SCHEDULER=k3s with DOKKU_TLS=letsencrypt needs %s, the ACME account's "
            "email address", "PROVISIONER_ACME_EMAIL");
    if (*c->acme_email && !(k3s && c->tls == PROV_TLS_LETSENCRYPT))
        die("%s is used with DOKKU_SCHEDULER=k3s and DOKKU_TLS=letsencrypt only",
            "PROVISIONER_ACME_EMAIL");
    if (c->tls == PROV_TLS_ISSUER && (!dns_name(c->cert_issuer) || strcmp(c->cert_issuer, "false") == 0))
        die("DOKKU_TLS=issuer needs %s, the name of a cert-manager ClusterIssuer",
            "PROVISIONER_CERT_ISSUER");
    if (*c->cert_issuer && c->tls != PROV_TLS_ISSUER)
        die("%s is used with DOKKU_TLS=issuer only", "PROVISIONER_CERT_ISSUER");
}

/* ssh mode talks to one Dokku host whose key is pinned, or not at all: the
 * instances' environments and secrets cross that connection on stdin. The
 * runner gives ssh no configuration files (-F /dev/null), no global known
 * hosts and StrictHostKeyChecking=yes, so this file is the only trust there
 * is; without it ssh would fall back to whatever ~/.ssh and /etc/ssh say
 * (accept-new or no there: any key is taken). The path goes into
 * -o UserKnownHostsFile=, where ssh splits on whitespace and expands ~, %
 * tokens and ${VAR}: an absolute path with none of those. */
static void check_known_hosts(const char *path)
{
    static const char *const var = "DOKKU_SSH_KNOWN_HOSTS";
    if (!*path)
        die("%s is required with DOKKU_MODE=ssh: a known_hosts file pinning DOKKU_HOST's "
            "host key (ssh-keyscan, fingerprint checked on the host)", var);
    if (strlen(path) > 1000 || path[0] != '/' || strpbrk(path, " \t\r\n\"'%$\\"))
        die("%s must be an absolute file path without whitespace, quotes, '%%', '$' or '\\'",
            var);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) die("%s: cannot read %s: %s", var, path, strerror(errno));
    struct stat st;
    int ok = fstat(fd, &st) == 0;
    int saved = errno;
    close(fd);
    if (!ok) die("%s: cannot read %s: %s", var, path, strerror(saved));
    if (!S_ISREG(st.st_mode)) die("%s: %s is not a regular file", var, path);
    if (st.st_size == 0)
        die("%s: %s is empty: it must hold DOKKU_HOST's pinned host key", var, path);
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
        check_known_hosts(c->known_hosts);
    }
    c->child_env = mr_config_str("PROVISIONER_CHILD_ENV", "");
    {
        char err[200];
        if (prov_check_child_env(c->child_env, err, sizeof err) != MR_OK) die("%s", err);
    }

    c->app_prefix = mr_config_str("PROVISIONER_APP_PREFIX", "mindroom-");
    {
        size_t n = strlen(c->app_prefix);
        if (n > 20 || !prov_valid_name(c->app_prefix))
            die("%s must match ^[a-z][a-z0-9-]{0,19}$", "PROVISIONER_APP_PREFIX");
    }
    c->image = mr_config_str("MINDROOM_IMAGE", dry ? "" : NULL);
    if (!dry || *c->image) check_image("MINDROOM_IMAGE", c->image);
    else c->image = "MINDROOM_IMAGE-unset";
    c->matrix_image = mr_config_str("MATRIX_IMAGE", DEFAULT_MATRIX_IMAGE);
    check_image("MATRIX_IMAGE", c->matrix_image);
    c->base_domain = mr_config_str("MINDROOM_BASE_DOMAIN", dry ? "mindroom.localhost" : NULL);
    if (!prov_valid_host(c->base_domain) || strlen(c->base_domain) > 200)
        die("%s must be a lowercase domain name", "MINDROOM_BASE_DOMAIN");
    c->tls = tls_mode();
    if (c->tls == PROV_TLS_WILDCARD) {
        prov_buf tar;
        char err[256];
        const char *cert = mr_config_str("DOKKU_TLS_CERT", NULL);
        const char *key = mr_config_str("DOKKU_TLS_KEY", NULL);
        if (prov_load_wildcard(cert, key, c->base_domain, &tar, err, sizeof err) != MR_OK)
            die("DOKKU_TLS=wildcard: %s", err);
        c->tls_tar = tar.data;
        c->tls_tar_len = tar.len;
    }
    scheduler_settings(c);

    c->mindroom_port = mr_config_int("MINDROOM_PORT", 8765, 1, 65535);
    /* docker-local: the uid storage:create --chown takes; k3s: the owner of the
     * volume's root in the storage:exec tarball, a ustar field of 7 octal digits. */
    c->mindroom_uid = mr_config_int("MINDROOM_DATA_UID", 1000, 0,
                                    c->scheduler == PROV_SCHED_K3S ? PROV_MAX_TAR_UID
                                                                   : PROV_MAX_CHOWN_UID);
    c->mindroom_data_dir = mr_config_str("MINDROOM_DATA_DIR", "/mindroom_data");
    {
        const char *d = c->mindroom_data_dir;
        int ok = d[0] == '/' && d[1] && strlen(d) < 200 && !strstr(d, "..") && !strstr(d, "//") &&
                 d[strlen(d) - 1] != '/';
        for (const char *p = d; ok && *p; p++)
            ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                 (*p >= '0' && *p <= '9') || strchr("/._-", *p);
        if (!ok) die("%s must be an absolute path of [A-Za-z0-9/._-], not /", "MINDROOM_DATA_DIR");
    }

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
    c->max_storage_gb = mr_config_int("PROVISIONER_MAX_STORAGE_GB", 1024, 1, 1 << 20);
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
    /* systemd's StateDirectory=mindroom-provisioner makes this, owned by the service user. */
    c->state_dir = mr_config_str("PROVISIONER_STATE_DIR", "/var/lib/mindroom-provisioner");

    c->frontend_tpl = mr_config_str("PROVISIONER_FRONTEND_URL", "{scheme}://{subdomain}.{domain}");
    c->backend_tpl = mr_config_str("PROVISIONER_BACKEND_URL", "{scheme}://{subdomain}.{domain}/api");
    c->matrix_host_tpl = mr_config_str("PROVISIONER_MATRIX_HOST", "{subdomain}-matrix");
    /* Where the control plane reaches the homeserver (its health probe, the
     * instance's matrix_server_url): its public host unless told otherwise. */
    c->matrix_url_tpl = mr_config_str("PROVISIONER_MATRIX_URL", "{scheme}://{matrix_host}");
    check_template("PROVISIONER_FRONTEND_URL", c->frontend_tpl);
    check_template("PROVISIONER_BACKEND_URL", c->backend_tpl);
    check_template("PROVISIONER_MATRIX_URL", c->matrix_url_tpl);
    {
        char host[PROV_HOST_MAX + 1];
        if (prov_matrix_host(c, "mindroom-0123456789ab", "m0123456789ab", host, sizeof host) !=
            MR_OK)
            die("%s must expand ({subdomain}, {app}) to one DNS label under MINDROOM_BASE_DOMAIN",
                "PROVISIONER_MATRIX_HOST");
    }

    char err[256];
    if (prov_state_init(c, err, sizeof err) != MR_OK) die("%s", err);

    static const char *const tls_names[] = {"off", "letsencrypt", "wildcard", "issuer"};
    if (dry)
        mr_log(MR_LOG_WARN, "dry_run: true; DOKKU_MODE=%s: commands are recorded, never run",
               *mode ? mode : "(unset)");
    else
        mr_log(MR_LOG_INFO, "mode %s %s, scheduler %s, image %s, homeserver %s, domain %s, tls %s",
               c->mode == PROV_MODE_SSH ? "ssh to" : "local",
               c->mode == PROV_MODE_SSH ? c->host : c->dokku_bin,
               c->scheduler == PROV_SCHED_K3S ? "k3s" : "docker-local", c->image, c->matrix_image,
               c->base_domain, tls_names[c->tls]);
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
