/* ops.c: the command sequences, one instance at a time.
 *
 * An instance is up to two Dokku apps: <app> (MindRoom) and, when the request
 * carries a homeserver, <app>-matrix (its Synapse), each with a named storage
 * entry (<app>-data, <app>-matrix-data), joined by a private network
 * (<app>-net). Create and update are one sequence, written so that running it
 * again after a failure at any step completes the instance instead of
 * duplicating anything:
 *
 *   [network:exists -> network:create]          only with a homeserver
 *   per app, the homeserver first:
 *     apps:exists -> apps:create (only when missing)
 *     storage:info -> storage:create (only when missing)
 *     storage:mount (idempotent: same entry, same container dir)
 *     [storage:labels:set <entry> mindroom.chat/storage-gb <N>]
 *     resource:limit -> [network:set attach-post-create] -> ports:set -> checks:disable ->
 *     [nginx:set client-max-body-size]           the homeserver only
 *     [config:get -> [config:unset --no-restart] -> config:import --no-restart --format json]
 *     -> domains:set -> [certs:add]
 *     [storage:exec <entry> -- tar ...]          the homeserver's configuration
 *     git:from-image -> [ps:rebuild | ps:start when the image was already committed]
 *     [letsencrypt:active -> letsencrypt:enable]
 *
 * With DOKKU_SCHEDULER=k3s the same sequence differs where Dokku's k3s
 * scheduler does: no network (MindRoom reaches the homeserver's Service),
 * scheduler:set after apps:create, storage:create --scheduler k3s with a size,
 * resource:reserve after resource:limit (Kubernetes units), no checks:disable
 * (the k3s scheduler does not read it, and Dokku has no setting for the
 * Deployment's rolling update: an update runs the new pod beside the old one
 * on the same volume until the old one exits; docs/provisioner.md), cert-manager
 * through scheduler-k3s:set instead of the letsencrypt plugin, and a
 * storage:exec for both apps (it makes the volume's root the app's own).
 *
 * Storage is created and mounted before the first deploy of its app and is
 * never unmounted, recreated or destroyed by this sequence, nor by stop or
 * start: only DELETE ?purge=true and DELETE /apps/{app}/storage destroy it.
 *
 * Limits, config, mounts and network attachments take effect on a deploy.
 * When git:from-image finds the image already committed ("No changes
 * detected"), nothing was deployed, so the app is rebuilt from that commit
 * unless what we apply is what its last successful run applied (a keyed hash
 * kept in the state directory; losing it costs one rebuild, never
 * correctness) and Dokku reports it deployed; then it is only started if it
 * is not running. The answer's all_restarted says whether every app got new
 * processes in the call (deployed, rebuilt or started); an app left running as
 * it was is restarted only by POST /apps/{app}/restart.
 *
 * One request per instance at a time: an OFD lock in the state directory
 * (prov_lock), which works across this function's worker processes and is
 * held by every command run under it until that command has ended, even past
 * its worker's death (runner.c). A state read takes none. Dokku's own deploy
 * lock (another deploy of the same app from elsewhere) is retried in runner.c. */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mr_hmac.h"
#include "prov.h"

#define STORAGE_LABEL "mindroom.chat/storage-gb"

/* ---- running commands ---- */

typedef struct {
    const prov_config *cfg;
    prov_outcome *out;
    prov_result *res;
    char *err;
    size_t errlen;
    int lock_fd;                /* the instance's lock (prov_lock), -1 for none: every
                                 * command runs holding it (runner.c's keeper) */
} run_ctx;

/* Runs one command; on a start failure or timeout fills out and returns the error.
 * A command that ran returns MR_OK whatever its exit status. */
static mr_err run_in(run_ctx *c, const char *const *args, const unsigned char *in, size_t in_len,
                     int64_t timeout_ms)
{
    mr_err e = prov_dokku(c->cfg, args, in, in_len, timeout_ms, c->out->deadline_ms, c->lock_fd,
                          c->res, c->err, c->errlen);
    if (e == MR_OK && c->cfg->mode == PROV_MODE_SSH && c->res->status == 255) {
        /* ssh's own failure (ssh exits 255: no connection, or the host's key or our
         * key refused; Dokku's commands do not use 255): the host was not reached,
         * and the caller's placement passes this provisioner over while it is so. */
        c->out->fail_status = 503;
        c->out->fail_code = "dokku_unreachable";
        return mr_seterr(c->err, c->errlen, MR_ETRANSIENT, "%s: ssh to %s exited 255: the Dokku "
                         "host was not reached", prov_subcommand(args), c->cfg->host);
    }
    if (e != MR_OK) {
        c->out->fail_status = c->res->timed_out ? 504 : 503;
        c->out->fail_code = c->res->timed_out ? "dokku_timeout" : "dokku_unavailable";
        if (e == MR_EINTERNAL) {
            c->out->fail_status = 500;
            c->out->fail_code = "internal";
        }
    }
    return e;
}

static mr_err run(run_ctx *c, const char *const *args, int64_t timeout_ms)
{
    return run_in(c, args, NULL, 0, timeout_ms);
}

static mr_err failed(run_ctx *c, const char *const *args)
{
    c->out->fail_status = 502;
    c->out->fail_code = prov_lock_contended(c->res) ? "dokku_locked" : "dokku_failed";
    return mr_seterr(c->err, c->errlen, MR_EINTERNAL, "%s exited %d", prov_subcommand(args),
                     c->res->status);
}

/* Runs a command that must exit 0. */
static mr_err must_in(run_ctx *c, const char *const *args, const unsigned char *in,
                      size_t in_len, int64_t timeout_ms)
{
    mr_err e = run_in(c, args, in, in_len, timeout_ms);
    if (e != MR_OK) return e;
    if (c->res->status != 0) return failed(c, args);
    return MR_OK;
}

static mr_err must(run_ctx *c, const char *const *args, int64_t timeout_ms)
{
    return must_in(c, args, NULL, 0, timeout_ms);
}

static mr_err internal(run_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static mr_err internal(run_ctx *c, const char *fmt, ...)
{
    c->out->fail_status = 500;
    c->out->fail_code = "internal";
    if (c->err && c->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, c->errlen, fmt, ap);
        va_end(ap);
    }
    return MR_EINTERNAL;
}

static int said(const prov_result *res, const char *needle)
{
    return strstr(res->out, needle) != NULL || strstr(res->err, needle) != NULL;
}

/* Exit 0: it exists. Missing is the one answer Dokku gives for it, its exit
 * status and "does not exist": apps:exists exits 20 ("App <app> does not
 * exist", common.AppDoesNotExist, the status of every command naming a
 * missing app); network:exists 1 ("Network does not exist"); storage:info 1
 * ('storage entry "<name>" does not exist'). Anything else is a failure, never
 * "missing": exit 1 from apps:exists is another error (access denied, sudo),
 * and exit 1 from network:exists without that message is Docker failing; a
 * destroy that read either as "missing" would answer destroyed and leave the
 * app or the network behind. */
static mr_err exists(run_ctx *c, const char *sub, const char *name, int *yes)
{
    const char *args[] = {sub, name, NULL};
    mr_err e = run(c, args, c->cfg->command_timeout_ms);
    if (e != MR_OK) return e;
    int st = c->res->status;
    int missing = strcmp(sub, "apps:exists") == 0 ? PROV_APP_MISSING_STATUS : 1;
    if (st == 0 || (st == missing && said(c->res, "does not exist"))) {
        *yes = st == 0;
        return MR_OK;
    }
    return failed(c, args);
}

/* `ps:report <app> <flag>` or `letsencrypt:active <app>`: 1 when stdout says "true". */
static mr_err report_true(run_ctx *c, const char *const *args, int *yes)
{
    mr_err e = must(c, args, c->cfg->command_timeout_ms);
    if (e != MR_OK) return e;
    const char *s = c->res->out;
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') s++;
    *yes = strncmp(s, "true", 4) == 0 && (s[4] == '\0' || s[4] == '\n' || s[4] == '\r' ||
                                          s[4] == ' ');
    return MR_OK;
}

/* ---- the applied-spec fingerprint ---- */

/* Everything one app's sequence applies, in order, each item length-prefixed
 * so that no choice of values can collide. */
typedef struct {
    char *buf;
    size_t len, cap;
} fp_text;

static void fp_add(fp_text *t, const char *s)
{
    size_t sl = strlen(s), need = t->len + sl + 24;
    if (!t->buf) return;
    if (need > t->cap) {
        size_t cap = t->cap * 2 > need ? t->cap * 2 : need;
        char *b = malloc(cap);
        if (b) memcpy(b, t->buf, t->len);
        OPENSSL_cleanse(t->buf, t->cap);
        free(t->buf);
        t->buf = b;
        t->cap = cap;
        if (!b) return;
    }
    t->len += (size_t)snprintf(t->buf + t->len, 24, "%zu:", sl);
    memcpy(t->buf + t->len, s, sl);
    t->len += sl;
}

/* An app's environment, hashed as the argv `config:set --no-restart --encoded
 * <app> KEY=<base64 value> ...` (sorted by key) that the fingerprints already
 * recorded for existing apps were made from: the same environment keeps its
 * fingerprint, so no app is rebuilt for nothing. */
static void fp_add_env(fp_text *t, const char *app, const prov_env *env, size_t n)
{
    const char *head[] = {"config:set", "--no-restart", "--encoded", app};
    for (size_t i = 0; i < MR_ARRAY_LEN(head); i++) fp_add(t, head[i]);
    for (size_t i = 0; i < n && t->buf; i++) {
        size_t kl = strlen(env[i].key), vl = strlen(env[i].value);
        size_t cap = kl + 1 + 4 * ((vl + 2) / 3) + 1;
        char *kv = malloc(cap);
        if (!kv) {
            OPENSSL_cleanse(t->buf, t->cap);
            free(t->buf);
            t->buf = NULL; /* fp_finish makes "": the app is rebuilt, which is always safe */
            return;
        }
        memcpy(kv, env[i].key, kl);
        kv[kl] = '=';
        EVP_EncodeBlock((unsigned char *)kv + kl + 1, (const unsigned char *)env[i].value,
                        (int)vl);
        fp_add(t, kv);
        OPENSSL_cleanse(kv, cap);
        free(kv);
    }
}

/* HMAC-SHA256 keyed by the provisioner token, so the file says nothing about
 * the values. hex gets 65 bytes; "" when the hash could not be made (the
 * app is then rebuilt, which is always safe). */
static void fp_finish(const prov_config *cfg, fp_text *t, char *hex)
{
    hex[0] = '\0';
    unsigned char mac[32];
    const mr_hmac_part part = {t->buf, t->len};
    if (t->buf && mr_hmac_sha256(cfg->token, strlen(cfg->token), &part, 1, mac))
        mr_hex(mac, sizeof mac, hex);
    if (t->buf) OPENSSL_cleanse(t->buf, t->cap);
    free(t->buf);
    t->buf = NULL;
}

static int spec_matches(const prov_config *cfg, const char *app, const char *hex)
{
    char buf[80];
    return hex[0] && prov_state_record(cfg, "apps", app, NULL, buf, sizeof buf) > 0 &&
           strcmp(buf, hex) == 0;
}

static void spec_store(const prov_config *cfg, const char *app, const char *hex)
{
    if (hex[0]) prov_state_record(cfg, "apps", app, hex, NULL, 0);
}

/* 0, or -1 when the record is still there to be read: its bucket can be read but
 * not written. One that cannot be read either is as good as forgotten (a run that
 * cannot read a record rebuilds). */
static int spec_forget(const prov_config *cfg, const char *app)
{
    if (prov_state_record(cfg, "apps", app, "", NULL, 0) >= 0) return 0;
    return prov_state_record(cfg, "apps", app, NULL, NULL, 0) == 1 ? -1 : 0;
}

/* ---- create / update of one app ---- */

#define UNSET_BATCH 64

/* 1 when key is one of the comma-separated names of list. */
static int listed(const char *list, const char *key)
{
    size_t kl = strlen(key);
    for (const char *s = list;;) {
        size_t n = strcspn(s, ",");
        if (n == kl && strncmp(s, key, kl) == 0) return 1;
        if (!s[n]) return 0;
        s += n + 1;
    }
}

/* config:import (without --replace) only adds and overwrites, so a variable
 * the control plane stopped sending (an operator's key being revoked) would
 * stay in MindRoom's environment. The names this provisioner set last time
 * are in the app's own MR_APPENV_MANAGED (it survives a move of the
 * provisioner to another host); those missing from now (the same form) are
 * unset before config:import records now, so that a run stopped between the
 * two still finds them listed next time. Only names of that list are
 * touched, never Dokku's own (DOKKU_*) or a variable someone set by hand; an
 * app without the variable (set up before it existed) has nothing to unset. */
static mr_err unset_dropped(run_ctx *c, const char *app, const char *now)
{
    const int64_t quick = c->cfg->command_timeout_ms;
    const char *q[] = {"config:get", app, MR_APPENV_MANAGED, NULL};
    mr_err e = run(c, q, quick);
    if (e != MR_OK) return e;
    /* Not set: exit 1 and no output at all (an error says " !" on stderr). */
    if (c->res->status == 1 && c->res->out_len == 0 && !said(c->res, " !")) return MR_OK;
    if (c->res->status != 0) return failed(c, q);
    if (c->res->out_len >= PROV_OUT_MAX - 1) return internal(c, "config:get answered too much");
    char *was = strdup(c->res->out);
    if (!was) return internal(c, "out of memory");
    const char *a[3 + UNSET_BATCH + 1] = {"config:unset", "--no-restart", app};
    size_t k = 3;
    char *save = NULL;
    for (char *key = strtok_r(was, ",\r\n", &save); key && e == MR_OK;
         key = strtok_r(NULL, ",\r\n", &save)) {
        if (!mr_appenv_valid_key(key) || strncmp(key, "DOKKU_", 6) == 0 ||
            strcmp(key, MR_APPENV_MANAGED) == 0 || listed(now, key))
            continue;
        a[k++] = key;
        if (k == 3 + UNSET_BATCH) {
            a[k] = NULL;
            e = must(c, a, quick);
            k = 3;
        }
    }
    if (e == MR_OK && k > 3) {
        a[k] = NULL;
        e = must(c, a, quick);
    }
    free(was);
    return e;
}

typedef struct {
    const char *app, *image, *entry, *container_dir, *network, *domain;
    const prov_limits *lim;
    int64_t uid, port;
    const prov_env *env;         /* the environment config:import sets, or NULL */
    size_t n_env;
    const unsigned char *config; /* with env: it as config:import reads it on stdin */
    size_t config_len;
    const char *managed;         /* with env: the names it sets (MR_APPENV_MANAGED's value) */
    const unsigned char *files;  /* tarball for storage:exec before the deploy, or NULL */
    size_t files_len;
    const char *const *fp_extra; /* more values the app depends on (NULL-terminated), or NULL */
    const char *body_max;        /* nginx client-max-body-size of its public host, or NULL */
    int created;                 /* out: apps:create ran */
    int started;                 /* out: the app's processes were replaced or started here
                                  * (a deploy, a rebuild, a start of a stopped app) */
} app_plan;

static mr_err apply_app(run_ctx *c, app_plan *p)
{
    const prov_config *cfg = c->cfg;
    const int64_t quick = cfg->command_timeout_ms, slow = cfg->deploy_timeout_ms;
    const int k3s = cfg->scheduler == PROV_SCHED_K3S;
    mr_err e;
    char mem[32], cpu[32], uid[24], gb[24], size[24], http[48], https[48], fp[65];
    /* Units are the scheduler's: docker-local hands "<N>m" to `docker run`
     * (megabytes); Kubernetes reads "m" as milli-bytes, so k3s gets "<N>Mi". */
    snprintf(mem, sizeof mem, k3s ? "%lldMi" : "%lldm", (long long)p->lim->memory_mb);
    prov_format_cpu(p->lim->cpu_milli, cpu, sizeof cpu);
    snprintf(uid, sizeof uid, "%lld", (long long)p->uid);
    snprintf(gb, sizeof gb, "%lld", (long long)p->lim->storage_gb);
    snprintf(size, sizeof size, "%lldGi", (long long)p->lim->storage_gb);
    snprintf(http, sizeof http, "http:80:%lld", (long long)p->port);
    snprintf(https, sizeof https, "https:443:%lld", (long long)p->port);

    fp_text t = {malloc(1024), 0, 1024};
    const char *items[] = {"v2", p->app, p->image, p->entry, p->container_dir, uid,
                           p->network ? p->network : "", http, p->domain, mem, cpu, gb,
                           cfg->tls == PROV_TLS_OFF ? "off" : "tls"};
    for (size_t i = 0; i < MR_ARRAY_LEN(items); i++) fp_add(&t, items[i]);
    if (p->env) fp_add_env(&t, p->app, p->env, p->n_env);
    for (size_t i = 0; p->fp_extra && p->fp_extra[i]; i++) fp_add(&t, p->fp_extra[i]);
    /* nginx properties take effect when Dokku rebuilds the app's proxy config:
     * on a deploy or rebuild. */
    if (p->body_max) fp_add(&t, p->body_max);
    if (k3s) {
        const char *more[] = {"k3s", cfg->storage_class, cfg->acme_email, cfg->cert_issuer,
                              cfg->tls == PROV_TLS_ISSUER ? "issuer" : ""};
        for (size_t i = 0; i < MR_ARRAY_LEN(more); i++) fp_add(&t, more[i]);
    }
    fp_finish(cfg, &t, fp);
    /* A new spec: the recorded one stops being true with the first change below
     * (config:import and the limits apply at once, and a restart, this run's or a later
     * one's, starts a container from them). Forgotten before it, so that a run cut
     * short is followed by a rebuild whatever spec comes next, even the old one. One
     * that cannot be forgotten stops the run before any change: the next run of the
     * old spec would find it and skip the rebuild its app then needs. */
    if (!spec_matches(cfg, p->app, fp) && spec_forget(cfg, p->app) != 0)
        return internal(c, "%s: its recorded spec in PROVISIONER_STATE_DIR/apps could not be "
                        "removed and can still be read: the app was left as it was", p->app);

    /* 1. The app, created only when missing, so a repeat or a resume never duplicates it. */
    int yes = 0;
    if ((e = exists(c, "apps:exists", p->app, &yes)) != MR_OK) return e;
    if (!yes) {
        const char *a[] = {"apps:create", p->app, NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
        p->created = 1;
    }
    if (k3s) {
        /* Every time, before anything that depends on the scheduler (storage
         * mounts, the first deploy): a resumed create sets it too. */
        const char *a[] = {"scheduler:set", p->app, "selected", "k3s", NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }

    /* 2. Its storage: created when missing, mounted before any deploy. The
     * entry's directory belongs to the user the image runs as, and nobody else. */
    if ((e = exists(c, "storage:info", p->entry, &yes)) != MR_OK) return e;
    if (!yes && !k3s) {
        const char *a[] = {"storage:create", p->entry, "--chown", uid, "--mode", "0700", NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    } else if (!yes) {
        /* A PersistentVolumeClaim of the plan's size. --chown and --mode are
         * docker-local only: the volume's root is made the app's own by the
         * storage:exec below. Reclaim policy Delete: the volume goes with
         * storage:destroy, which only purge and the retention sweep run
         * (--destroy-host-dir is docker-local only). */
        const char *a[] = {"storage:create", p->entry, "--scheduler", "k3s", "--size", size,
                           "--access-mode", "ReadWriteOnce", "--reclaim-policy", "Delete",
                           *cfg->storage_class ? "--storage-class-name" : NULL,
                           cfg->storage_class, NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }
    {
        const char *a[] = {"storage:mount", p->app, p->entry, "--container-dir", p->container_dir,
                           NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }
    if (p->lim->storage_gb > 0) {
        const char *a[] = {"storage:labels:set", p->entry, STORAGE_LABEL, gb, NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }

    /* 3. Limits, network, ports, config (its values on stdin, never on a
     * command line), domain, certificate. */
    {
        const char *a[] = {"resource:limit", "--memory", mem, "--cpu", cpu, p->app, NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }
    if (k3s) {
        /* Requests equal to the limits: the k3s default reservation (0.1 CPU,
         * 128Mi) would let a node take more instances than it can hold. */
        const char *a[] = {"resource:reserve", "--memory", mem, "--cpu", cpu, p->app, NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }
    if (p->network) {
        const char *a[] = {"network:set", p->app, "attach-post-create", p->network, NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }
    {
        /* With TLS the https mapping is set up front: Dokku ignores it until a
         * certificate exists, and keeps it when one is installed or renewed. */
        /* On k3s the scheduler adds https:443 itself once the app has a
         * certificate source (cert-manager or an imported certificate). */
        const char *a[] = {"ports:set", p->app, http,
                           cfg->tls != PROV_TLS_OFF && !k3s ? https : NULL, NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }
    if (!k3s) {
        /* Dokku's zero-downtime deploy starts the new container beside the old
         * one and retires the old one only after its checks: for that while two
         * processes share the app's storage (two Synapses on one SQLite database,
         * which Synapse assumes it alone writes; two MindRooms on one state
         * directory and one set of Matrix accounts). Disabled, every deploy,
         * rebuild and restart stops the old container before starting the new.
         * k3s has no counterpart: Dokku's chart leaves each Deployment on
         * Kubernetes' default rolling update and offers no setting for it. */
        const char *a[] = {"checks:disable", p->app, NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }
    if (p->body_max) {
        /* k3s turns it into the ingress's proxy-body-size annotation. */
        const char *a[] = {"nginx:set", p->app, "client-max-body-size", p->body_max, NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }
    if (p->env) {
        /* Never --replace: it would drop Dokku's own variables and any set by hand. */
        const char *a[] = {"config:import", "--no-restart", "--format", "json", p->app, "-",
                           NULL};
        if ((e = unset_dropped(c, p->app, p->managed)) != MR_OK) return e;
        if ((e = must_in(c, a, p->config, p->config_len, quick)) != MR_OK) return e;
    }
    {
        const char *a[] = {"domains:set", p->app, p->domain, NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }
    if (cfg->tls == PROV_TLS_WILDCARD) {
        /* Re-installed every time: a renewed wildcard certificate reaches the
         * app on its next update; nginx is reloaded, the app is not restarted. */
        const char *a[] = {"certs:add", p->app, NULL};
        if ((e = must_in(c, a, cfg->tls_tar, cfg->tls_tar_len, quick)) != MR_OK) return e;
    }
    if (k3s && (cfg->tls == PROV_TLS_LETSENCRYPT || cfg->tls == PROV_TLS_ISSUER)) {
        /* cert-manager through the scheduler: an ACME account email (HTTP-01,
         * a per-app Issuer) or a named ClusterIssuer (e.g. DNS-01 for a
         * wildcard). A property, set every time; it takes effect on deploy. */
        int le = cfg->tls == PROV_TLS_LETSENCRYPT;
        const char *a[] = {"scheduler-k3s:set", p->app,
                           le ? "letsencrypt-email-prod" : "cert-issuer-name",
                           le ? cfg->acme_email : cfg->cert_issuer, NULL};
        if ((e = must(c, a, quick)) != MR_OK) return e;
    }

    /* 4. Files the image needs at its first start, written into the mounted
     * entry through a throwaway container that sees it at /data. */
    if (p->files) {
        const char *a[] = {"storage:exec", p->entry, "--", "tar", "-x", "-f", "-", "-C", "/data",
                           NULL};
        if ((e = must_in(c, a, p->files, p->files_len, slow)) != MR_OK) return e;
    }

    /* 5. Deploy the pinned image. git:from-image commits "FROM <image>" to the
     * app's repository, then builds and deploys that commit; a deploy that
     * fails takes the commit back out, but one that is killed (our deadline,
     * the OOM killer, the host going down) leaves it. "No changes detected,
     * skipping git commit" (on stderr, exit 1: git-from-directory returns 1)
     * only says the image is the one committed, not that it was deployed, and
     * ps:restart / ps:start of an app never deployed warn and exit 0. So an
     * unchanged image is rebuilt from that commit (a full deploy with the
     * current config) unless this very spec was deployed before and the app is
     * deployed; then it is only started if it is not running. */
    {
        const char *a[] = {"git:from-image", p->app, p->image, NULL};
        if ((e = run(c, a, slow)) != MR_OK) return e;
        int unchanged = said(c->res, "No changes detected");
        if (c->res->status != 0 && !unchanged) return failed(c, a);
        if (!unchanged) c->out->deployed = p->started = 1;
        int deployed = 0;
        if (unchanged && spec_matches(cfg, p->app, fp)) {
            const char *q[] = {"ps:report", p->app, "--deployed", NULL};
            if ((e = report_true(c, q, &deployed)) != MR_OK) return e;
        }
        if (unchanged && !deployed) {
            const char *r[] = {"ps:rebuild", p->app, NULL};
            if ((e = must(c, r, slow)) != MR_OK) return e;
            c->out->restarted = p->started = 1;
        } else if (unchanged) {
            const char *q[] = {"ps:report", p->app, "--running", NULL};
            int running = 0;
            if ((e = report_true(c, q, &running)) != MR_OK) return e;
            if (!running) {
                const char *s[] = {"ps:start", p->app, NULL};
                if ((e = must(c, s, slow)) != MR_OK) return e;
                p->started = 1;
            }
        }
    }
    /* This spec is deployed: a certificate that fails below (DNS not pointed here
     * yet, Let's Encrypt's rate limits) is asked for again by the next request
     * without rebuilding the app. */
    spec_store(cfg, p->app, fp);

    /* 6. Let's Encrypt, once: letsencrypt:enable on an app that already has a
     * certificate would request another and run into Let's Encrypt's rate limits. */
    if (cfg->tls == PROV_TLS_LETSENCRYPT && !k3s) {
        const char *q[] = {"letsencrypt:active", p->app, NULL};
        int active = 0;
        if ((e = report_true(c, q, &active)) != MR_OK) return e;
        if (!active) {
            const char *a[] = {"letsencrypt:enable", p->app, NULL};
            if ((e = must(c, a, slow)) != MR_OK) return e;
        }
    }
    return MR_OK;
}

/* The environment as config:import --format json reads it on stdin: one JSON
 * object of strings (Dokku decodes it into a map of string to string). Keys
 * are ^[A-Z_][A-Z0-9_]*$; a value is escaped where JSON requires it ('"', '\\'
 * and control characters) and otherwise copied byte for byte. NULL when out of
 * memory; free with free_config. */
static unsigned char *config_json(const prov_env *env, size_t n, size_t *len)
{
    size_t cap = 3;
    for (size_t i = 0; i < n; i++) cap += strlen(env[i].key) + 6 * strlen(env[i].value) + 6;
    char *b = malloc(cap), *o = b;
    if (!b) return NULL;
    *o++ = '{';
    for (size_t i = 0; i < n; i++) {
        o += sprintf(o, "%s\"%s\":\"", i ? "," : "", env[i].key);
        for (const unsigned char *v = (const unsigned char *)env[i].value; *v; v++) {
            if (*v == '"' || *v == '\\') {
                *o++ = '\\';
                *o++ = (char)*v;
            } else if (*v < 0x20) {
                o += sprintf(o, "\\u%04x", *v);
            } else {
                *o++ = (char)*v;
            }
        }
        *o++ = '"';
    }
    *o++ = '}';
    *o = '\0';
    *len = (size_t)(o - b);
    return (unsigned char *)b;
}

static void free_config(unsigned char *json, size_t len)
{
    if (!json) return;
    OPENSSL_cleanse(json, len);
    free(json);
}

static int env_cmp(const void *a, const void *b)
{
    return strcmp(((const prov_env *)a)->key, ((const prov_env *)b)->key);
}

static prov_outcome *begin(prov_outcome *out, const prov_config *cfg)
{
    memset(out, 0, sizeof *out);
    out->deadline_ms = mr_now_ms() + cfg->request_timeout_ms;
    return out;
}

mr_err prov_apply(const prov_config *cfg, const prov_spec *spec, prov_outcome *out,
                  char *err, size_t errlen)
{
    begin(out, cfg);
    prov_result *res = prov_result_new();
    /* MindRoom's environment: the request's plus what the provisioner defines. */
    prov_env *env = calloc(spec->n_env + 7, sizeof *env);
    run_ctx c = {cfg, out, res, err, errlen, -1};
    unsigned char *cjson = NULL;
    size_t cjson_len = 0;
    char *managed = NULL;
    prov_buf files = {0}, root = {0};
    const int k3s = cfg->scheduler == PROV_SCHED_K3S;
    mr_err e;
    if (!res || !env) {
        e = internal(&c, "out of memory");
        goto done;
    }
    if ((e = prov_lock(cfg, spec->app, &c.lock_fd, err, errlen)) != MR_OK) {
        out->fail_status = e == MR_ETRANSIENT ? 503 : 500;
        out->fail_code = e == MR_ETRANSIENT ? "app_busy" : "internal";
        goto done;
    }

    prov_names nm;
    prov_names_of(spec->app, &nm);
    char domain[PROV_HOST_MAX + 1], hs_host[PROV_HOST_MAX + 1], hs_url[PROV_HOST_MAX + 16],
        internal_url[PROV_NAME_MAX + 64];
    snprintf(domain, sizeof domain, "%s.%s", spec->subdomain, cfg->base_domain);
    if (prov_matrix_host(cfg, spec->app, spec->subdomain, hs_host, sizeof hs_host) != MR_OK) {
        e = internal(&c, "the homeserver's host name is invalid");
        goto done;
    }
    snprintf(hs_url, sizeof hs_url, "%s://%s", cfg->tls != PROV_TLS_OFF ? "https" : "http",
             hs_host);
    /* docker-local: Dokku's network alias of the homeserver's web process on
     * <app>-net. k3s (Dokku's network plugin is docker-local only): the
     * cluster's Service for that process, on its http mapping's port 80. */
    if (k3s)
        snprintf(internal_url, sizeof internal_url, "http://%s-web.%s.svc.cluster.local",
                 nm.hs_app, PROV_K3S_NAMESPACE);
    else
        snprintf(internal_url, sizeof internal_url, "http://%s.web:%d", nm.hs_app, PROV_HS_PORT);

    size_t n = 0;
    int hs_started = 0;
    for (size_t i = 0; i < spec->n_env; i++) env[n++] = spec->env[i];
    env[n++] = (prov_env){"MINDROOM_STORAGE_PATH", cfg->mindroom_data_dir};
    /* Its configuration too lives in its storage entry: unset, MindRoom reads and
     * saves the config.yaml of its working directory, which every deploy replaces. */
    char config_path[256];
    snprintf(config_path, sizeof config_path, "%s" PROV_MINDROOM_CONFIG, cfg->mindroom_data_dir);
    env[n++] = (prov_env){"MINDROOM_CONFIG_PATH", config_path};
    env[n++] = (prov_env){"MINDROOM_CONFIG_TEMPLATE", PROV_MINDROOM_CONFIG_TEMPLATE};

    /* 1. The homeserver first: MindRoom expects it when it starts. */
    if (spec->hs.present) {
        env[n++] = (prov_env){"MATRIX_HOMESERVER", internal_url};
        env[n++] = (prov_env){"MATRIX_SERVER_NAME", spec->hs.server_name};
        env[n++] = (prov_env){"MATRIX_REGISTRATION_SHARED_SECRET",
                              spec->hs.registration_shared_secret};
        int yes = 1;
        if (!k3s && (e = exists(&c, "network:exists", nm.network, &yes)) != MR_OK) goto done;
        if (!yes) {
            const char *a[] = {"network:create", nm.network, NULL};
            if ((e = must(&c, a, cfg->command_timeout_ms)) != MR_OK) goto done;
        }
        if (prov_hs_files(&spec->hs, hs_url, k3s, &files) != MR_OK) {
            e = internal(&c, "cannot build the homeserver's configuration");
            goto done;
        }
        const char *extra[] = {spec->hs.server_name, spec->hs.signing_key,
                               spec->hs.registration_shared_secret, spec->hs.macaroon_secret_key,
                               spec->hs.form_secret, hs_url, NULL};
        app_plan hp = {.app = nm.hs_app, .image = cfg->matrix_image, .entry = nm.hs_data,
                       .container_dir = PROV_HS_DATA_DIR, .network = k3s ? NULL : nm.network,
                       .domain = hs_host, .lim = &spec->hs.lim, .uid = PROV_HS_UID,
                       .port = PROV_HS_PORT, .files = files.data, .files_len = files.len,
                       .fp_extra = extra, .body_max = PROV_HS_MAX_UPLOAD};
        if ((e = apply_app(&c, &hp)) != MR_OK) goto done;
        hs_started = hp.started;
    }

    /* 2. MindRoom, with the names of its environment (see unset_dropped). */
    qsort(env, n, sizeof *env, env_cmp);
    size_t ml = 1;
    for (size_t i = 0; i < n; i++) ml += strlen(env[i].key) + 1;
    if (!(managed = malloc(ml))) {
        e = internal(&c, "out of memory");
        goto done;
    }
    managed[0] = '\0';
    for (size_t i = 0, at = 0; i < n; i++)
        at += (size_t)snprintf(managed + at, ml - at, "%s%s", i ? "," : "", env[i].key);
    env[n++] = (prov_env){MR_APPENV_MANAGED, managed};
    qsort(env, n, sizeof *env, env_cmp);
    if (!(cjson = config_json(env, n, &cjson_len))) {
        e = internal(&c, "out of memory");
        goto done;
    }
    if (k3s && prov_root_files((unsigned)cfg->mindroom_uid, &root) != MR_OK) {
        e = internal(&c, "out of memory");
        goto done;
    }
    app_plan mp = {.app = spec->app, .image = cfg->image, .entry = nm.data,
                   .container_dir = cfg->mindroom_data_dir,
                   .network = spec->hs.present && !k3s ? nm.network : NULL, .domain = domain,
                   .lim = &spec->lim, .uid = cfg->mindroom_uid, .port = cfg->mindroom_port,
                   .env = env, .n_env = n, .config = cjson, .config_len = cjson_len,
                   .managed = managed, .files = root.data,
                   .files_len = root.len};
    if ((e = apply_app(&c, &mp)) != MR_OK) goto done;

    /* Whether this call gave every app of the instance new processes: an app left
     * running as it was (nothing changed) may be the one that hangs, so a caller
     * that owes a restart still has to ask for one (POST /apps/{app}/restart). */
    out->all_restarted = mp.started && (!spec->hs.present || hs_started);
    out->existed = !mp.created;
    out->status = mp.created ? 201 : 200;
    out->state = out->app_state = "running";
    out->hs_state = spec->hs.present ? "running" : "missing";
    out->storage = PROV_STORAGE_PRESENT;
    out->hs_storage = spec->hs.present ? PROV_STORAGE_PRESENT : PROV_STORAGE_UNKNOWN;
    e = MR_OK;
done:
    prov_buf_free(&files);
    prov_buf_free(&root);
    free_config(cjson, cjson_len);
    free(managed);
    prov_unlock(c.lock_fd);
    free(env);
    prov_result_free(res);
    return e;
}

/* ---- stop, start, state, destroy, purge, storage ---- */

static const char *const RANKED[] = {"created", "stopped", "running"};

/* An existing app's state: created (never deployed), stopped or running; rank 0..2. */
static mr_err app_state(run_ctx *c, const char *app, int *rank)
{
    int yes = 0;
    const char *q[] = {"ps:report", app, "--deployed", NULL};
    mr_err e = report_true(c, q, &yes);
    if (e != MR_OK || !yes) {
        *rank = 0;
        return e;
    }
    const char *r[] = {"ps:report", app, "--running", NULL};
    if ((e = report_true(c, r, &yes)) != MR_OK) return e;
    *rank = yes ? 2 : 1;
    return MR_OK;
}

/* storage:info, then (destroy) storage:destroy --force --destroy-host-dir:
 * plain storage:destroy deregisters the entry and keeps its data on disk. */
static mr_err storage_step(run_ctx *c, const char *entry, int destroy, prov_storage *st)
{
    int yes = 0;
    mr_err e = exists(c, "storage:info", entry, &yes);
    if (e != MR_OK) return e;
    if (yes && destroy) {
        /* k3s entries were created with reclaim policy Delete, and passing
         * --destroy-host-dir for one is an error. */
        int k3s = c->cfg->scheduler == PROV_SCHED_K3S;
        const char *a[] = {"storage:destroy", entry, "--force", k3s ? NULL : "--destroy-host-dir",
                           NULL};
        if ((e = must(c, a, c->cfg->deploy_timeout_ms)) != MR_OK) return e;
        c->out->purged = 1;
        yes = 0;
    }
    *st = yes ? PROV_STORAGE_PRESENT : PROV_STORAGE_MISSING;
    return MR_OK;
}

static mr_err not_found(run_ctx *c, const char *code, const char *msg)
{
    c->out->fail_status = 404;
    c->out->fail_code = code;
    return mr_seterr(c->err, c->errlen, MR_ENOTFOUND, "%s", msg);
}

mr_err prov_app_action(const prov_config *cfg, const char *app, prov_verb verb,
                       prov_outcome *out, char *err, size_t errlen)
{
    begin(out, cfg);
    prov_result *res = prov_result_new();
    run_ctx c = {cfg, out, res, err, errlen, -1};
    int mr = 0, hs = 0;
    mr_err e = MR_OK;
    prov_names nm;
    prov_names_of(app, &nm);
    const int64_t slow = cfg->deploy_timeout_ms;
    if (!res) {
        e = internal(&c, "out of memory");
        goto done;
    }
    /* A state read does not wait behind a deploy of the same app that takes minutes. */
    if (verb != PROV_STATE && (e = prov_lock(cfg, app, &c.lock_fd, err, errlen)) != MR_OK) {
        out->fail_status = e == MR_ETRANSIENT ? 503 : 500;
        out->fail_code = e == MR_ETRANSIENT ? "app_busy" : "internal";
        goto done;
    }
    if ((e = exists(&c, "apps:exists", nm.app, &mr)) != MR_OK) goto done;
    if ((e = exists(&c, "apps:exists", nm.hs_app, &hs)) != MR_OK) goto done;
    out->existed = mr || hs;
    out->status = 200;
    out->app_state = mr ? "created" : "missing";
    out->hs_state = hs ? "created" : "missing";

    switch (verb) {
    case PROV_DESTROY:
    case PROV_PURGE: {
        /* MindRoom first, then its homeserver, then the network they shared
         * (Docker refuses to remove a network with containers attached).
         * --force is Dokku's global flag, before the subcommand: it skips the
         * interactive confirmation that would otherwise wait on stdin. */
        const char *apps[] = {mr ? nm.app : NULL, hs ? nm.hs_app : NULL};
        for (int i = 0; i < 2; i++) {
            if (!apps[i]) continue;
            const char *a[] = {"--force", "apps:destroy", apps[i], NULL};
            if ((e = must(&c, a, slow)) != MR_OK) goto done;
        }
        /* Left behind, a record is harmless: a new app of the name deploys whatever
         * it says (its image is not yet committed). */
        (void)spec_forget(cfg, nm.app);
        (void)spec_forget(cfg, nm.hs_app);
        out->app_state = out->hs_state = "missing";
        int net = 0;
        if (cfg->scheduler != PROV_SCHED_K3S &&
            (e = exists(&c, "network:exists", nm.network, &net)) != MR_OK)
            goto done;
        if (net) {
            const char *a[] = {"--force", "network:destroy", nm.network, NULL};
            if ((e = must(&c, a, cfg->command_timeout_ms)) != MR_OK) goto done;
        }
        int purge = verb == PROV_PURGE;
        if ((e = storage_step(&c, nm.data, purge, &out->storage)) != MR_OK) goto done;
        if ((e = storage_step(&c, nm.hs_data, purge, &out->hs_storage)) != MR_OK) goto done;
        out->state = "destroyed";
        goto done;
    }
    case PROV_DESTROY_STORAGE:
        /* Only an instance's leftovers: a mounted entry is its apps' data. */
        if (mr || hs) {
            out->fail_status = 409;
            out->fail_code = "apps_exist";
            e = mr_seterr(err, errlen, MR_ECONFLICT,
                          "the instance's apps still exist; DELETE /apps/{app} first");
            goto done;
        }
        if ((e = storage_step(&c, nm.data, 1, &out->storage)) != MR_OK) goto done;
        if ((e = storage_step(&c, nm.hs_data, 1, &out->hs_storage)) != MR_OK) goto done;
        out->state = "destroyed";
        goto done;
    case PROV_STATE: {
        int r = 2, rank = 0;
        if (mr) {
            if ((e = app_state(&c, nm.app, &rank)) != MR_OK) goto done;
            out->app_state = RANKED[rank];
            r = rank;
        }
        if (hs) {
            if ((e = app_state(&c, nm.hs_app, &rank)) != MR_OK) goto done;
            out->hs_state = RANKED[rank];
            if (rank < r) r = rank;
        }
        /* Half-created (the homeserver without MindRoom): POST /apps completes it. */
        if (!mr) r = 0;
        if ((e = storage_step(&c, nm.data, 0, &out->storage)) != MR_OK) goto done;
        if ((e = storage_step(&c, nm.hs_data, 0, &out->hs_storage)) != MR_OK) goto done;
        if (!mr && !hs && out->storage != PROV_STORAGE_PRESENT &&
            out->hs_storage != PROV_STORAGE_PRESENT) {
            e = not_found(&c, "not_found", "app does not exist");
            goto done;
        }
        out->state = mr || hs ? RANKED[r] : "destroyed";
        goto done;
    }
    case PROV_STOP:
    case PROV_START:
    case PROV_RESTART:
        break;
    }

    /* A stop stops whichever app exists (a half-created instance may have only its
     * homeserver, serving): not_found, which the control plane takes as stopped,
     * only when neither does. A start or restart needs MindRoom (else the control
     * plane creates it). */
    if (!mr && (verb != PROV_STOP || !hs)) {
        e = not_found(&c, "not_found", "app does not exist");
        goto done;
    }
    if (verb == PROV_STOP) {
        /* MindRoom first: it must not see its homeserver vanish under it. */
        const char *apps[] = {mr ? nm.app : NULL, hs ? nm.hs_app : NULL};
        for (int i = 0; i < 2; i++) {
            if (!apps[i]) continue;
            const char *a[] = {"ps:stop", apps[i], NULL};
            if ((e = must(&c, a, slow)) != MR_OK) goto done;
        }
        out->state = "stopped";
        out->app_state = mr ? "stopped" : "missing";
        if (hs) out->hs_state = "stopped";
        goto done;
    }
    /* start and restart: the homeserver first (MindRoom expects it when it starts);
     * both must have been deployed. A restart replaces each app's containers on the
     * same storage: the data stays. */
    const char *apps[] = {hs ? nm.hs_app : NULL, nm.app};
    for (int i = 0; i < 2; i++) {
        int deployed = 0;
        if (!apps[i]) continue;
        const char *q[] = {"ps:report", apps[i], "--deployed", NULL};
        if ((e = report_true(&c, q, &deployed)) != MR_OK) goto done;
        if (!deployed) {
            /* Half-created: only POST /apps can finish it (it knows the spec). */
            e = not_found(&c, "not_deployed",
                          "app exists but was never deployed; POST /apps completes it");
            goto done;
        }
    }
    for (int i = 0; i < 2; i++) {
        if (!apps[i]) continue;
        const char *a[] = {verb == PROV_RESTART ? "ps:restart" : "ps:start", apps[i], NULL};
        if ((e = must(&c, a, slow)) != MR_OK) goto done;
    }
    out->state = out->app_state = "running";
    if (hs) out->hs_state = "running";
done:
    prov_unlock(c.lock_fd);
    prov_result_free(res);
    return e;
}
