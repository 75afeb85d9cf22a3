/* ops.c: the command sequences, one app at a time.
 *
 * Create and update are one sequence, written so that running it again after
 * a failure at any step completes the app instead of duplicating it:
 *
 *   apps:exists -> apps:create (only when missing) -> resource:limit ->
 *   config:set --no-restart --encoded -> domains:set -> git:from-image ->
 *   [ps:restart | ps:start when the image was already deployed] ->
 *   [letsencrypt:active -> letsencrypt:enable when DOKKU_TLS is on]
 *
 * Resource limits and config only take effect on a deploy. When
 * git:from-image finds the image already deployed ("No changes detected"),
 * nothing was deployed, so the app is restarted if what we applied differs
 * from what the last successful run applied (a keyed hash kept in the state
 * directory; losing it costs one restart, never correctness), and otherwise
 * only started if it is not running.
 *
 * One request per app at a time: an flock on <state>/locks/<app>.lock, which
 * works across this function's worker processes. Dokku's own deploy lock
 * (another deploy of the same app from elsewhere) is retried in runner.c. */
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "prov.h"

mr_err prov_state_init(const prov_config *cfg, char *err, size_t errlen)
{
    static const char *const subdirs[] = {"", "/locks", "/apps", "/dry-run"};
    for (size_t i = 0; i < MR_ARRAY_LEN(subdirs); i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s%s", cfg->state_dir, subdirs[i]);
        if (mkdir(path, 0700) != 0 && errno != EEXIST)
            return mr_seterr(err, errlen, MR_EINTERNAL, "cannot create %s: %s", path,
                             strerror(errno));
    }
    return MR_OK;
}

static mr_err lock_app(const prov_config *cfg, const char *app, int *fd, prov_outcome *out,
                       char *err, size_t errlen)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/locks/%s.lock", cfg->state_dir, app);
    *fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (*fd < 0) {
        out->fail_status = 500;
        out->fail_code = "internal";
        return mr_seterr(err, errlen, MR_EINTERNAL, "cannot open the app's lock file");
    }
    int64_t until = mr_now_ms() + cfg->app_lock_wait_ms;
    while (flock(*fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK && errno != EINTR) break;
        if (mr_now_ms() >= until) {
            close(*fd);
            *fd = -1;
            out->fail_status = 503;
            out->fail_code = "app_busy";
            return mr_seterr(err, errlen, MR_ETRANSIENT,
                             "another request is working on this app; retry later");
        }
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return MR_OK;
}

static void unlock_app(int fd)
{
    if (fd >= 0) close(fd); /* closing releases the flock */
}

/* Runs one command; on a start failure or timeout fills out and returns the error.
 * A command that ran returns MR_OK whatever its exit status. */
static mr_err run(const prov_config *cfg, const char *const *args, int64_t timeout_ms,
                  prov_result *res, prov_outcome *out, char *err, size_t errlen)
{
    mr_err e = prov_dokku(cfg, args, timeout_ms, out->deadline_ms, res, err, errlen);
    if (e != MR_OK) {
        out->fail_status = res->timed_out ? 504 : 503;
        out->fail_code = res->timed_out ? "dokku_timeout" : "dokku_unavailable";
        if (e == MR_EINTERNAL) {
            out->fail_status = 500;
            out->fail_code = "internal";
        }
    }
    return e;
}

static mr_err failed(const char *const *args, const prov_result *res, prov_outcome *out,
                     char *err, size_t errlen)
{
    out->fail_status = 502;
    out->fail_code = prov_lock_contended(res) ? "dokku_locked" : "dokku_failed";
    return mr_seterr(err, errlen, MR_EINTERNAL, "%s exited %d", prov_subcommand(args),
                     res->status);
}

/* Runs a command that must exit 0. */
static mr_err must(const prov_config *cfg, const char *const *args, int64_t timeout_ms,
                   prov_result *res, prov_outcome *out, char *err, size_t errlen)
{
    mr_err e = run(cfg, args, timeout_ms, res, out, err, errlen);
    if (e != MR_OK) return e;
    if (res->status != 0) return failed(args, res, out, err, errlen);
    return MR_OK;
}

/* apps:exists: 0 exists, 1 missing (Dokku's "App ... does not exist"), else a failure. */
static mr_err app_exists(const prov_config *cfg, const char *app, int *exists,
                         prov_result *res, prov_outcome *out, char *err, size_t errlen)
{
    const char *args[] = {"apps:exists", app, NULL};
    mr_err e = run(cfg, args, cfg->command_timeout_ms, res, out, err, errlen);
    if (e != MR_OK) return e;
    if (res->status == 0 || res->status == 1) {
        *exists = res->status == 0;
        return MR_OK;
    }
    return failed(args, res, out, err, errlen);
}

/* `dokku ps:report <app> <flag>` or `letsencrypt:active <app>`: 1 when stdout says "true". */
static mr_err report_true(const prov_config *cfg, const char *const *args, int *yes,
                          prov_result *res, prov_outcome *out, char *err, size_t errlen)
{
    mr_err e = must(cfg, args, cfg->command_timeout_ms, res, out, err, errlen);
    if (e != MR_OK) return e;
    const char *s = res->out;
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') s++;
    *yes = strncmp(s, "true", 4) == 0 && (s[4] == '\0' || s[4] == '\n' || s[4] == '\r' ||
                                          s[4] == ' ');
    return MR_OK;
}

/* ---- the applied-spec fingerprint ---- */

static void spec_path(const prov_config *cfg, const char *app, char *out, size_t cap)
{
    snprintf(out, cap, "%s/apps/%s.spec", cfg->state_dir, app);
}

/* HMAC (keyed by the provisioner token, so the file says nothing about the
 * values) over everything the sequence applies. hex gets 65 bytes. */
static void spec_fingerprint(const prov_config *cfg, const prov_spec *spec, char *hex)
{
    hex[0] = '\0';
    size_t cap = 1024;
    for (size_t i = 0; i < spec->n_env; i++)
        cap += strlen(spec->env[i].key) + strlen(spec->env[i].value) + 48;
    char *buf = malloc(cap);
    if (!buf) return;
    size_t n = (size_t)snprintf(buf, cap, "v1\n%s\n%s.%s\n%lld\n%lld\n%s\n%d\n", spec->app,
                                spec->subdomain, cfg->base_domain, (long long)spec->memory_mb,
                                (long long)spec->cpu_milli, cfg->image, cfg->tls);
    for (size_t i = 0; i < spec->n_env && n < cap; i++) {
        /* Length-prefixed, so no choice of keys and values can collide. */
        size_t kl = strlen(spec->env[i].key), vl = strlen(spec->env[i].value);
        n += (size_t)snprintf(buf + n, cap - n, "%zu:%zu:", kl, vl);
        memcpy(buf + n, spec->env[i].key, kl);
        memcpy(buf + n + kl, spec->env[i].value, vl);
        n += kl + vl;
    }
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    if (HMAC(EVP_sha256(), cfg->token, (int)strlen(cfg->token), (const unsigned char *)buf, n,
             mac, &maclen))
        for (unsigned int i = 0; i < maclen && i < 32; i++) sprintf(hex + 2 * i, "%02x", mac[i]);
    free(buf);
}

static int spec_matches(const prov_config *cfg, const char *app, const char *hex)
{
    char path[1024], buf[80] = "";
    spec_path(cfg, app, path, sizeof path);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return n >= 64 && strncmp(buf, hex, 64) == 0;
}

static void spec_store(const prov_config *cfg, const char *app, const char *hex)
{
    char path[1024], tmp[1100];
    spec_path(cfg, app, path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "%s\n", hex);
    if (fclose(f) == 0 && rename(tmp, path) == 0) return;
    unlink(tmp);
}

static void spec_forget(const prov_config *cfg, const char *app)
{
    char path[1024];
    spec_path(cfg, app, path, sizeof path);
    unlink(path);
}

/* ---- create / update ---- */

/* config:set --no-restart --encoded <app> KEY=<base64> ...; args freed by the caller. */
static const char **config_args(const prov_spec *spec)
{
    const char **args = calloc(spec->n_env + 5, sizeof *args);
    if (!args) return NULL;
    size_t n = 0;
    args[n++] = "config:set";
    args[n++] = "--no-restart";
    args[n++] = "--encoded";
    args[n++] = spec->app;
    for (size_t i = 0; i < spec->n_env; i++) {
        size_t kl = strlen(spec->env[i].key), vl = strlen(spec->env[i].value);
        char *kv = malloc(kl + 1 + 4 * ((vl + 2) / 3) + 1);
        if (!kv) {
            for (size_t j = 4; j < n; j++) free((void *)args[j]);
            free(args);
            return NULL;
        }
        memcpy(kv, spec->env[i].key, kl);
        kv[kl] = '=';
        EVP_EncodeBlock((unsigned char *)kv + kl + 1, (const unsigned char *)spec->env[i].value,
                        (int)vl);
        args[n++] = kv;
    }
    args[n] = NULL;
    return args;
}

static void free_config_args(const char **args)
{
    if (!args) return;
    for (size_t i = 4; args[i]; i++) free((void *)args[i]);
    free(args);
}

mr_err prov_apply(const prov_config *cfg, const prov_spec *spec, prov_outcome *out,
                  char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    out->deadline_ms = mr_now_ms() + cfg->request_timeout_ms;
    prov_result *res = malloc(sizeof *res);
    if (!res) {
        out->fail_status = 500;
        out->fail_code = "internal";
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    }
    int lockfd = -1;
    const char **cargs = NULL;
    mr_err e = lock_app(cfg, spec->app, &lockfd, out, err, errlen);
    if (e != MR_OK) goto done;

    const int64_t quick = cfg->command_timeout_ms, slow = cfg->deploy_timeout_ms;
    char mem[32], cpu[32], domain[512], fp[65];
    snprintf(mem, sizeof mem, "%lldm", (long long)spec->memory_mb);
    prov_format_cpu(spec->cpu_milli, cpu, sizeof cpu);
    snprintf(domain, sizeof domain, "%s.%s", spec->subdomain, cfg->base_domain);
    spec_fingerprint(cfg, spec, fp);

    /* 1. The app: created only when missing, so a repeat or a resume never duplicates it. */
    int exists = 0;
    if ((e = app_exists(cfg, spec->app, &exists, res, out, err, errlen)) != MR_OK) goto done;
    out->existed = exists;
    if (!exists) {
        const char *a[] = {"apps:create", spec->app, NULL};
        if ((e = must(cfg, a, quick, res, out, err, errlen)) != MR_OK) goto done;
    }

    /* 2. Limits, config (values base64, never on a command line in clear), domain. */
    {
        const char *a[] = {"resource:limit", "--memory", mem, "--cpu", cpu, spec->app, NULL};
        if ((e = must(cfg, a, quick, res, out, err, errlen)) != MR_OK) goto done;
    }
    if (spec->n_env > 0) {
        cargs = config_args(spec);
        if (!cargs) {
            out->fail_status = 500;
            out->fail_code = "internal";
            e = mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
            goto done;
        }
        if ((e = must(cfg, cargs, quick, res, out, err, errlen)) != MR_OK) goto done;
    }
    {
        const char *a[] = {"domains:set", spec->app, domain, NULL};
        if ((e = must(cfg, a, quick, res, out, err, errlen)) != MR_OK) goto done;
    }

    /* 3. Deploy the pinned image. Dokku reports an image that is already
     * deployed with "No changes detected, skipping git commit": exit 0 in
     * current releases, exit 1 in some older ones. Both are success. */
    {
        const char *a[] = {"git:from-image", spec->app, cfg->image, NULL};
        if ((e = run(cfg, a, slow, res, out, err, errlen)) != MR_OK) goto done;
        int unchanged = strstr(res->out, "No changes detected") != NULL ||
                        strstr(res->err, "No changes detected") != NULL;
        if (res->status != 0 && !unchanged) {
            e = failed(a, res, out, err, errlen);
            goto done;
        }
        out->deployed = !unchanged;
        if (unchanged && !spec_matches(cfg, spec->app, fp)) {
            const char *r[] = {"ps:restart", spec->app, NULL};
            if ((e = must(cfg, r, slow, res, out, err, errlen)) != MR_OK) goto done;
            out->restarted = 1;
        } else if (unchanged) {
            const char *q[] = {"ps:report", spec->app, "--running", NULL};
            int running = 0;
            if ((e = report_true(cfg, q, &running, res, out, err, errlen)) != MR_OK) goto done;
            if (!running) {
                const char *s[] = {"ps:start", spec->app, NULL};
                if ((e = must(cfg, s, slow, res, out, err, errlen)) != MR_OK) goto done;
            }
        }
    }

    /* 4. TLS, once: letsencrypt:enable on an app that already has a certificate
     * would request another and run into Let's Encrypt's rate limits. */
    if (cfg->tls) {
        const char *q[] = {"letsencrypt:active", spec->app, NULL};
        int active = 0;
        if ((e = report_true(cfg, q, &active, res, out, err, errlen)) != MR_OK) goto done;
        if (!active) {
            const char *a[] = {"letsencrypt:enable", spec->app, NULL};
            if ((e = must(cfg, a, slow, res, out, err, errlen)) != MR_OK) goto done;
        }
    }

    spec_store(cfg, spec->app, fp);
    out->status = exists ? 200 : 201;
    out->state = "running";
    e = MR_OK;
done:
    free_config_args(cargs);
    unlock_app(lockfd);
    free(res);
    return e;
}

/* ---- stop, start, destroy, state ---- */

mr_err prov_app_action(const prov_config *cfg, const char *app, const char *verb,
                       prov_outcome *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    out->deadline_ms = mr_now_ms() + cfg->request_timeout_ms;
    prov_result *res = malloc(sizeof *res);
    if (!res) {
        out->fail_status = 500;
        out->fail_code = "internal";
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    }
    int lockfd = -1, exists = 0;
    mr_err e = MR_OK;
    /* A state read does not wait behind a deploy of the same app that takes minutes. */
    if (strcmp(verb, "state") != 0 && (e = lock_app(cfg, app, &lockfd, out, err, errlen)) != MR_OK)
        goto done;
    if ((e = app_exists(cfg, app, &exists, res, out, err, errlen)) != MR_OK) goto done;
    out->existed = exists;
    out->status = 200;

    if (strcmp(verb, "destroy") == 0) {
        if (exists) {
            /* --force is Dokku's global flag, before the subcommand: it skips the
             * interactive confirmation that would otherwise wait on stdin. */
            const char *a[] = {"--force", "apps:destroy", app, NULL};
            if ((e = must(cfg, a, cfg->deploy_timeout_ms, res, out, err, errlen)) != MR_OK)
                goto done;
        }
        spec_forget(cfg, app);
        out->state = "destroyed";
        goto done;
    }
    if (!exists) {
        out->fail_status = 404;
        out->fail_code = "not_found";
        e = mr_seterr(err, errlen, MR_ENOTFOUND, "app does not exist");
        goto done;
    }
    if (strcmp(verb, "stop") == 0) {
        const char *a[] = {"ps:stop", app, NULL};
        if ((e = must(cfg, a, cfg->deploy_timeout_ms, res, out, err, errlen)) != MR_OK) goto done;
        out->state = "stopped";
        goto done;
    }

    /* start and state both need to know whether there is anything deployed. */
    int deployed = 0;
    {
        const char *q[] = {"ps:report", app, "--deployed", NULL};
        if ((e = report_true(cfg, q, &deployed, res, out, err, errlen)) != MR_OK) goto done;
    }
    if (strcmp(verb, "start") == 0) {
        if (!deployed) {
            /* Half-created: only POST /apps can finish it (it knows the spec). */
            out->fail_status = 404;
            out->fail_code = "not_deployed";
            e = mr_seterr(err, errlen, MR_ENOTFOUND,
                          "app exists but was never deployed; POST /apps completes it");
            goto done;
        }
        const char *a[] = {"ps:start", app, NULL};
        if ((e = must(cfg, a, cfg->deploy_timeout_ms, res, out, err, errlen)) != MR_OK) goto done;
        out->state = "running";
        goto done;
    }
    /* state */
    if (!deployed) {
        out->state = "created";
        goto done;
    }
    {
        const char *q[] = {"ps:report", app, "--running", NULL};
        int running = 0;
        if ((e = report_true(cfg, q, &running, res, out, err, errlen)) != MR_OK) goto done;
        out->state = running ? "running" : "stopped";
    }
done:
    unlock_app(lockfd);
    free(res);
    return e;
}
