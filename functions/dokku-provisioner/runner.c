/* runner.c: runs one `dokku` command and nothing else.
 *
 * Always an argv array through posix_spawn, never a shell. Local mode execs
 * DOKKU_BIN directly. SSH mode execs `ssh -o BatchMode=yes ... dokku@host --
 * <args>`: ssh joins the arguments with spaces and Dokku's forced command
 * word-splits them again on the host, so every argument must come from a
 * narrow alphabet (names, numbers, the image, base64). validate.c guarantees
 * that, and run_one() refuses anything else instead of trusting it.
 *
 * ssh reads no configuration file (-F /dev/null: neither /etc/ssh/ssh_config
 * nor ~/.ssh/config can relax host-key checking, add a ProxyCommand or change
 * the destination) and trusts only the host keys in DOKKU_SSH_KNOWN_HOSTS
 * (StrictHostKeyChecking=yes, GlobalKnownHostsFile=/dev/null); main.c refuses
 * to start in ssh mode without that file. Everything ssh needs is on its
 * command line: user, host and port, the key (-i, IdentitiesOnly) when one is
 * configured, otherwise ssh's default key files and agent.
 *
 * The command gets stdin from /dev/null or a pipe we feed (a tarball for
 * storage:exec or certs:add, JSON for config:import), stdout and stderr on
 * pipes (kept, truncated, never logged: `config:import` echoes values), no
 * other descriptor, an allow-listed environment, and a deadline after which
 * its whole process group is killed: a stalled ssh or docker pull must not
 * pin a worker forever.
 *
 * The command is not the worker's child but its keeper's: a fork of the
 * worker that leads the command's process group, keeps nothing of the
 * worker's but the instance's lock (prov_lock: an OFD lock, which lives while
 * any descriptor of its open file description does), starts the command,
 * waits for it and exits with its status. So the lock is held until the
 * command has ended even when the worker dies first (SIGKILL, a crash) and
 * the command runs on as an orphan: the request the caller retries waits for
 * it ("another request is working on this app") instead of running a second
 * command on the app beside it, a destroy beside a deploy. The keeper also
 * kills the group at the command's deadline (a little after the worker would
 * have), so an orphan does not hold its app forever either.
 *
 * Why a keeper and not the lock's descriptor handed to the command: ssh
 * closes every descriptor above stderr as it starts, so in ssh mode the lock
 * would go with the worker all the same; and a descriptor handed on reaches
 * whatever the command starts, so a process that outlives the command (a
 * background job of a plugin) would hold the app's lock for as long as it
 * runs. The keeper holds it for the life of the command's own process (dokku,
 * or ssh while the host runs the command), no longer. Why not the supervisor
 * killing an orphan's group when its worker dies: it would need to learn each
 * worker's command groups (state shared between processes) to do what the
 * keeper's deadline already bounds, and cutting a deploy short leaves more
 * for the retry to repair than letting it finish does.
 *
 * The environment is built from names, not filtered by them: a deny-list
 * ("anything named *SECRET*") lets SENTRY_DSN or a cloud token through, so
 * the child gets only what running `dokku` or `ssh` needs (CHILD_ENV) plus
 * the names an operator lists in PROVISIONER_CHILD_ENV (SSH_AUTH_SOCK for an
 * agent, say). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "prov.h"

extern char **environ;

#define MAX_ARGV 320

const char *prov_subcommand(const char *const *args)
{
    for (size_t i = 0; args[i]; i++)
        if (args[i][0] != '-') return args[i];
    return "dokku";
}

static int contains(const char *hay, size_t len, const char *needle)
{
    return len > 0 && memmem(hay, len, needle, strlen(needle)) != NULL;
}

int prov_lock_contended(const prov_result *res)
{
    /* Dokku: "<app> currently has a deploy lock in place. Exiting..." (exit 1). */
    return res->status != 0 &&
           (contains(res->err, res->err_len, "has a deploy lock in place") ||
            contains(res->out, res->out_len, "has a deploy lock in place"));
}

/* A readable, value-free rendering of the command for the log. */
static void describe(const char *const *args, char *buf, size_t cap)
{
    size_t n = (size_t)snprintf(buf, cap, "dokku");
    for (size_t i = 0; args[i] && n < cap; i++) {
        const char *eq = strchr(args[i], '=');
        if (eq)
            n += (size_t)snprintf(buf + n, cap - n, " %.*s=...", (int)(eq - args[i]), args[i]);
        else
            n += (size_t)snprintf(buf + n, cap - n, " %s", args[i]);
    }
}

static int ssh_safe(const char *s)
{
    if (!*s) return 0;
    for (const char *c = s; *c; c++) {
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              strchr("._:@/+=,-", *c)))
            return 0;
    }
    return 1;
}

static const char *const CHILD_ENV[] = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL",
                                         "LC_CTYPE", "TZ"};

mr_err prov_check_child_env(const char *names, char *err, size_t errlen)
{
    char name[256];
    for (const char *p = names; p && *p;) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        if (n == 0 || n >= sizeof name || (comma && !comma[1]))
            return mr_seterr(err, errlen, MR_EINVAL,
                             "PROVISIONER_CHILD_ENV: names separated by ',', none empty");
        memcpy(name, p, n);
        name[n] = '\0';
        if (!mr_appenv_valid_key(name))
            return mr_seterr(err, errlen, MR_EINVAL,
                             "PROVISIONER_CHILD_ENV: %s is not a variable name (^[A-Z_][A-Z0-9_]*$)",
                             name);
        p = comma ? comma + 1 : p + n;
    }
    return MR_OK;
}

static int listed(const char *names, const char *name, size_t len)
{
    for (const char *p = names; p && *p;) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        if (n == len && strncmp(p, name, len) == 0) return 1;
        p = comma ? comma + 1 : p + n;
    }
    return 0;
}

/* The child's environment: the allow-listed variables of ours, nothing else. */
static char **child_env(const prov_config *cfg)
{
    size_t n = 0;
    for (char **e = environ; *e; e++) n++;
    char **out = calloc(n + 1, sizeof *out);
    if (!out) return NULL;
    size_t k = 0;
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq) continue;
        size_t nl = (size_t)(eq - *e);
        int keep = listed(cfg->child_env, *e, nl);
        for (size_t i = 0; i < MR_ARRAY_LEN(CHILD_ENV) && !keep; i++)
            keep = strlen(CHILD_ENV[i]) == nl && strncmp(*e, CHILD_ENV[i], nl) == 0;
        if (keep) out[k++] = *e;
    }
    out[k] = NULL;
    return out;
}

/* Wipes what the last command wrote (config:import echoes the values it sets, and
 * a tarball's files may come back in an error) and empties the result. Only the
 * bytes written are touched: the buffers are large (out holds config:get's list of
 * managed names), and writing them whole at every command kept every page of them
 * resident in each worker. */
static void result_reset(prov_result *res)
{
    OPENSSL_cleanse(res->out, res->out_len + 1);
    OPENSSL_cleanse(res->err, res->err_len + 1);
    res->status = -1;
    res->timed_out = 0;
    res->lock_retries = 0;
    res->out_len = res->err_len = 0;
}

prov_result *prov_result_new(void)
{
    prov_result *res = malloc(sizeof *res);
    if (res) {
        res->out_len = res->err_len = 0;
        result_reset(res);
    }
    return res;
}

void prov_result_free(prov_result *res)
{
    if (!res) return;
    result_reset(res);
    free(res);
}

static void drain(int *fd, char *buf, size_t *len)
{
    char tmp[4096];
    ssize_t r = read(*fd, tmp, sizeof tmp);
    if (r > 0) {
        size_t room = PROV_OUT_MAX - 1 - *len;
        size_t take = (size_t)r < room ? (size_t)r : room;
        memcpy(buf + *len, tmp, take);
        OPENSSL_cleanse(tmp, (size_t)r);
        *len += take;
        buf[*len] = '\0';
    } else if (r == 0 || (errno != EINTR && errno != EAGAIN)) {
        close(*fd);
        *fd = -1;
    }
}

#define KILL_GRACE_MS 1000 /* from SIGTERM to SIGKILL when a command's group is killed */

/* Kills the process group pgid: SIGTERM, up to KILL_GRACE_MS for pid (the
 * keeper, or in the keeper the command) to exit, then SIGKILL. */
static void kill_group(pid_t pgid, pid_t pid)
{
    kill(-pgid, SIGTERM);
    for (int i = 0; i < KILL_GRACE_MS / 50; i++) {
        if (waitpid(pid, NULL, WNOHANG) != 0) break;
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    kill(-pgid, SIGKILL);
}

/* The keeper (see the top of this file), in the child of fork(): leads its own
 * process group, starts argv in it, writes posix_spawnp's error to status_fd
 * if it could not, closes every descriptor but lock_fd (-1: none; the FastCGI
 * and database sockets, the pipes' ends, whose EOF the command and the worker
 * wait for), waits for the command and exits with its status (128+N for
 * signal N, as the worker reports it). Past limit_ms it kills the group,
 * itself included. Never returns. */
static void keep(char *const *argv, char **envp, const posix_spawn_file_actions_t *fa,
                 const posix_spawnattr_t *at, int lock_fd, int status_fd, int64_t limit_ms)
{
    setpgid(0, 0);
    /* SIGTERM to the group is for the command: the keeper, and with it the
     * lock, stays until the command has gone (or SIGKILL). The worker's SIGCHLD
     * disposition might lose the command's status; blocked, it is waited for. */
    signal(SIGTERM, SIG_IGN);
    signal(SIGCHLD, SIG_DFL);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_SETMASK, &chld, NULL);
    pid_t cmd;
    int rc = posix_spawnp(&cmd, argv[0], fa, at, argv, envp);
    if (rc != 0) {
        ssize_t w = write(status_fd, &rc, sizeof rc);
        _exit(w == (ssize_t)sizeof rc ? 127 : 126);
    }
    for (int fd = 0; fd < lock_fd; fd++) close(fd);
    closefrom(lock_fd + 1);
    int64_t until = mr_now_ms() + limit_ms;
    for (;;) {
        int st;
        pid_t w = waitpid(cmd, &st, WNOHANG);
        if (w == cmd) _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
        if (w < 0 && errno != EINTR) _exit(127);
        int64_t left = until - mr_now_ms();
        if (left <= 0) {
            kill_group(getpid(), cmd);
            _exit(128 + SIGKILL);
        }
        struct timespec ts = {(time_t)(left / 1000), (long)(left % 1000) * 1000000L};
        sigtimedwait(&chld, NULL, &ts);
    }
}

/* Runs argv with in on its stdin under a keeper holding lock_fd (-1: none) and
 * waits for it within timeout_ms. Returns MR_OK with res->status, or
 * MR_ETRANSIENT (not started, or timed out). */
static mr_err spawn_wait(const prov_config *cfg, char *const *argv, const unsigned char *in,
                         size_t in_len, int64_t timeout_ms, int lock_fd, prov_result *res,
                         char *err, size_t errlen)
{
    int po[2] = {-1, -1}, pe[2] = {-1, -1}, pi[2] = {-1, -1}, ps[2] = {-1, -1};
    if (pipe2(po, O_CLOEXEC) != 0 || pipe2(pe, O_CLOEXEC) != 0 ||
        (in && pipe2(pi, O_CLOEXEC) != 0) || pipe2(ps, O_CLOEXEC) != 0) {
        int *all[] = {po, pe, pi, ps};
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 2; j++)
                if (all[i][j] >= 0) close(all[i][j]);
        return mr_seterr(err, errlen, MR_ETRANSIENT, "cannot create pipes");
    }
    char **envp = child_env(cfg);
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    posix_spawn_file_actions_init(&fa);
    posix_spawnattr_init(&at);
    if (in) posix_spawn_file_actions_adddup2(&fa, pi[0], 0);
    else posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, po[1], 1);
    posix_spawn_file_actions_adddup2(&fa, pe[1], 2);
    /* Nothing else of ours: not the FastCGI sockets, not the database's, not
     * the lock (the keeper holds it). */
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    /* The keeper's process group (killed as a whole on the deadline), default
     * signal dispositions and an empty mask whatever the worker has installed. */
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    sigdelset(&all, SIGKILL);
    sigdelset(&all, SIGSTOP);
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setsigdefault(&at, &all);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    /* posix_spawnp (in the keeper): a bare "dokku" or "ssh" is looked up in PATH.
     * The keeper's deadline comes after the worker's kill would have ended it. */
    pid_t pid = envp ? fork() : -1;
    if (pid == 0)
        keep(argv, envp, &fa, &at, lock_fd, ps[1], timeout_ms + 2 * KILL_GRACE_MS);
    int rc = !envp ? ENOMEM : pid < 0 ? errno : 0;
    close(ps[1]);
    if (pid > 0) {
        /* Also here, so that a kill of the group cannot come before the keeper's own. */
        setpgid(pid, pid);
        /* The keeper's error, or EOF once it has started the command. */
        ssize_t r;
        while ((r = read(ps[0], &rc, sizeof rc)) < 0 && errno == EINTR) {}
        if (r != (ssize_t)sizeof rc) rc = 0;
        else waitpid(pid, NULL, 0);
    }
    close(ps[0]);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    free(envp);
    close(po[1]);
    close(pe[1]);
    if (in) close(pi[0]);
    if (rc != 0) {
        close(po[0]);
        close(pe[0]);
        if (in) close(pi[1]);
        return mr_seterr(err, errlen, MR_ETRANSIENT, "cannot start %s: %s",
                         strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0],
                         strerror(rc));
    }

    /* stdin is written as the child reads it, in the same poll loop as its
     * output, so neither side can block the other on a full pipe. */
    int wfd = in ? pi[1] : -1;
    size_t woff = 0;
    if (wfd >= 0) {
        fcntl(wfd, F_SETFL, fcntl(wfd, F_GETFL) | O_NONBLOCK);
        if (in_len == 0) {
            close(wfd);
            wfd = -1;
        }
    }
    int fds[2] = {po[0], pe[0]};
    int64_t deadline = mr_now_ms() + timeout_ms, exited_at = -1;
    int wstatus = 0, reaped = 0;
    for (;;) {
        if (!reaped) {
            pid_t w = waitpid(pid, &wstatus, WNOHANG);
            if (w == pid || (w < 0 && errno == ECHILD)) {
                reaped = 1;
                exited_at = mr_now_ms();
            }
        }
        if (reaped && wfd >= 0) {
            close(wfd);
            wfd = -1;
        }
        /* A grandchild may keep the pipes open after the child exited: stop
         * reading shortly after the exit instead of waiting for their EOF. */
        if ((fds[0] < 0 && fds[1] < 0 && reaped) || (reaped && mr_now_ms() - exited_at > 200))
            break;
        int64_t now = mr_now_ms();
        if (!reaped && now >= deadline) {
            kill_group(pid, pid);
            waitpid(pid, &wstatus, 0);
            res->timed_out = 1;
            break;
        }
        struct pollfd p[3];
        nfds_t np = 0;
        for (int i = 0; i < 2; i++)
            if (fds[i] >= 0) p[np++] = (struct pollfd){.fd = fds[i], .events = POLLIN};
        if (wfd >= 0) p[np++] = (struct pollfd){.fd = wfd, .events = POLLOUT};
        /* With every pipe closed only the exit is left to see: look again soon. */
        int64_t step = np ? 50 : 2;
        int wait = (int)(deadline - now < step ? deadline - now : step);
        if (wait < 0) wait = 0;
        int pr = np ? poll(p, np, wait) : poll(NULL, 0, wait);
        if (pr > 0) {
            for (nfds_t i = 0; i < np; i++) {
                if (!p[i].revents) continue;
                if (p[i].fd == wfd) {
                    ssize_t w = write(wfd, in + woff, in_len - woff);
                    if (w > 0) woff += (size_t)w;
                    /* Done, or the child closed its stdin (EPIPE: SIGPIPE is ignored). */
                    if (woff == in_len || (w < 0 && errno != EAGAIN && errno != EINTR)) {
                        close(wfd);
                        wfd = -1;
                    }
                } else if (p[i].revents & (POLLIN | POLLHUP | POLLERR)) {
                    if (p[i].fd == fds[0]) drain(&fds[0], res->out, &res->out_len);
                    else drain(&fds[1], res->err, &res->err_len);
                }
            }
        }
    }
    if (wfd >= 0) close(wfd);
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0) close(fds[i]);
    if (res->timed_out) {
        res->status = -1;
        return mr_seterr(err, errlen, MR_ETRANSIENT, "timed out after %lld ms",
                         (long long)timeout_ms);
    }
    res->status = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus)
                : WIFSIGNALED(wstatus) ? 128 + WTERMSIG(wstatus) : -1;
    return MR_OK;
}

/* ---- dry-run: a simulated registry of apps, storage entries and networks ----
 *
 * Just enough state for the sequences in ops.c to take the paths they would
 * take against a real Dokku: an app's entry holds "created", "running" or
 * "stopped"; a storage entry or a network exists while its entry does
 * (prov_state_record). */

/* What the registry models: a command sets its entry's value ("" removes the
 * entry), or asks whether it exists, or asks ps:report's question of it. */
typedef enum { DRY_SET, DRY_EXISTS, DRY_REPORT } dry_ask;
typedef struct {
    const char *sub;
    dry_ask ask;
    const char *set;
} dry_rule;
static const dry_rule dry_model[] = {
    {"apps:create", DRY_SET, "created"},    {"storage:create", DRY_SET, "created"},
    {"network:create", DRY_SET, "created"}, {"git:from-image", DRY_SET, "running"},
    {"ps:start", DRY_SET, "running"},       {"ps:restart", DRY_SET, "running"},
    {"ps:rebuild", DRY_SET, "running"},     {"ps:stop", DRY_SET, "stopped"},
    {"apps:destroy", DRY_SET, ""},          {"storage:destroy", DRY_SET, ""},
    {"network:destroy", DRY_SET, ""},       {"apps:exists", DRY_EXISTS, NULL},
    {"storage:info", DRY_EXISTS, NULL},     {"network:exists", DRY_EXISTS, NULL},
    {"ps:report", DRY_REPORT, NULL},
};

/* The registry could not be read or written: the command fails as a Dokku
 * command would, with its reason on stderr. */
static void registry_failed(prov_result *res, const char *name)
{
    res->status = 1;
    res->out_len = 0;
    res->err_len = (size_t)snprintf(res->err, sizeof res->err,
                                    " !     dry-run registry: cannot record %s\n", name);
}

static void dry_answer(const prov_config *cfg, const char *const *args, prov_result *res)
{
    const char *sub = prov_subcommand(args);
    const char *name = NULL;
    /* The app, entry or network is the first non-flag argument after the subcommand. */
    int seen = 0;
    for (size_t i = 0; args[i]; i++) {
        if (args[i][0] == '-') continue;
        if (!seen) { seen = 1; continue; }
        name = args[i];
        break;
    }
    res->status = 0;
    if (!name || !prov_valid_name(name)) return;
    const dry_rule *rule = NULL;
    for (size_t i = 0; !rule && i < MR_ARRAY_LEN(dry_model); i++)
        if (strcmp(sub, dry_model[i].sub) == 0) rule = &dry_model[i];
    if (!rule) return; /* the registry does not model it: it succeeds */
    const char *kind = strncmp(sub, "storage:", 8) == 0 ? "storage"
                     : strncmp(sub, "network:", 8) == 0 ? "networks" : "apps";
    char dir[64], state[16] = "";
    snprintf(dir, sizeof dir, "dry-run/%s", kind);
    int exists = prov_state_record(cfg, dir, name, rule->set, state, sizeof state);
    if (exists < 0) {
        registry_failed(res, name);
    } else if (rule->ask == DRY_EXISTS) {
        res->status = exists ? 0 : strcmp(sub, "apps:exists") == 0 ? PROV_APP_MISSING_STATUS : 1;
        if (!exists)
            res->err_len = (size_t)snprintf(res->err, sizeof res->err,
                                            " !     %s does not exist\n", name);
    } else if (rule->ask == DRY_REPORT) {
        int deployed = strncmp(state, "running", 7) == 0 || strncmp(state, "stopped", 7) == 0;
        int running = strncmp(state, "running", 7) == 0;
        const char *flag = "";
        for (size_t i = 1; args[i]; i++)
            if (strncmp(args[i], "--", 2) == 0) flag = args[i];
        snprintf(res->out, sizeof res->out, "%s\n",
                 strcmp(flag, "--deployed") == 0 ? (deployed ? "true" : "false")
                                                 : (running ? "true" : "false"));
        res->out_len = strlen(res->out);
    }
}

/* ---- one attempt ---- */

static mr_err run_one(const prov_config *cfg, const char *const *args, const unsigned char *in,
                      size_t in_len, int64_t timeout_ms, int lock_fd, prov_result *res,
                      char *err, size_t errlen)
{
    const char *argv[MAX_ARGV];
    size_t n = 0;
    char port[16];
    char dest[512];
    char khopt[1100];
    size_t nargs = 0;
    while (args[nargs]) nargs++;
    if (nargs + 32 >= MAX_ARGV)
        return mr_seterr(err, errlen, MR_EINTERNAL, "too many arguments");

    if (cfg->mode == PROV_MODE_SSH) {
        snprintf(port, sizeof port, "%lld", (long long)cfg->ssh_port);
        snprintf(dest, sizeof dest, "%s@%s", cfg->ssh_user, cfg->host);
        /* main.c checked it; an ssh without a pinned host key is never started. */
        int kl = snprintf(khopt, sizeof khopt, "UserKnownHostsFile=%s", cfg->known_hosts);
        if (!cfg->known_hosts[0] || kl < 0 || (size_t)kl >= sizeof khopt)
            return mr_seterr(err, errlen, MR_EINTERNAL, "no pinned host key file for ssh");
        argv[n++] = cfg->ssh_bin;
        argv[n++] = "-F"; argv[n++] = "/dev/null";
        argv[n++] = "-o"; argv[n++] = "BatchMode=yes";
        argv[n++] = "-o"; argv[n++] = "ConnectTimeout=10";
        argv[n++] = "-o"; argv[n++] = "ServerAliveInterval=15";
        if (cfg->ssh_key[0]) {
            argv[n++] = "-i"; argv[n++] = cfg->ssh_key;
            argv[n++] = "-o"; argv[n++] = "IdentitiesOnly=yes";
        }
        argv[n++] = "-o"; argv[n++] = "StrictHostKeyChecking=yes";
        argv[n++] = "-o"; argv[n++] = khopt;
        argv[n++] = "-o"; argv[n++] = "GlobalKnownHostsFile=/dev/null";
        argv[n++] = "-p"; argv[n++] = port;
        argv[n++] = dest;
        argv[n++] = "--";
        for (size_t i = 0; i < nargs; i++) {
            if (!ssh_safe(args[i]))
                return mr_seterr(err, errlen, MR_EINTERNAL,
                                 "refusing an argument unsafe for ssh in %s",
                                 prov_subcommand(args));
        }
    } else {
        argv[n++] = cfg->dokku_bin;
    }
    for (size_t i = 0; i < nargs; i++) argv[n++] = args[i];
    argv[n] = NULL;
    return spawn_wait(cfg, (char *const *)argv, in, in_len, timeout_ms, lock_fd, res, err,
                      errlen);
}

mr_err prov_dokku(const prov_config *cfg, const char *const *args, const unsigned char *in,
                  size_t in_len, int64_t timeout_ms, int64_t deadline_ms, int lock_fd,
                  prov_result *res, char *err, size_t errlen)
{
    char what[1024];
    describe(args, what, sizeof what);
    const char *sub = prov_subcommand(args);
    int64_t backoff = cfg->lock_backoff_ms;
    result_reset(res);

    if (cfg->mode == PROV_MODE_DRY_RUN) {
        dry_answer(cfg, args, res);
        mr_log(MR_LOG_INFO, "dry_run: true; would run: %s%s", what, in ? " (with stdin)" : "");
        return MR_OK;
    }

    for (int attempt = 0;; attempt++) {
        int retries = res->lock_retries;
        result_reset(res);
        res->lock_retries = retries;
        int64_t t0 = mr_now_ms(), budget = timeout_ms;
        if (deadline_ms > 0 && deadline_ms - t0 < budget) budget = deadline_ms - t0;
        if (budget <= 0) {
            res->timed_out = 1;
            mr_log(MR_LOG_ERROR, "%s: not started, the request's deadline has passed", what);
            return mr_seterr(err, errlen, MR_ETRANSIENT,
                             "%s not started: the request's deadline has passed", sub);
        }
        mr_err e = run_one(cfg, args, in, in_len, budget, lock_fd, res, err, errlen);
        int64_t took = mr_now_ms() - t0;
        if (e != MR_OK) {
            mr_log(MR_LOG_ERROR, "%s: %s (%lld ms)", what, err, (long long)took);
            /* Keep the message about the subcommand only. */
            char why[200];
            snprintf(why, sizeof why, "%s", err);
            return mr_seterr(err, errlen, e, "%s %s", sub, why);
        }
        if (prov_lock_contended(res) && attempt < cfg->lock_retries &&
            (deadline_ms <= 0 || mr_now_ms() + backoff < deadline_ms)) {
            res->lock_retries++;
            mr_log(MR_LOG_WARN, "%s: deploy lock held by another deploy; retry %d/%lld in %lld ms",
                   what, attempt + 1, (long long)cfg->lock_retries, (long long)backoff);
            struct timespec ts = {(time_t)(backoff / 1000), (long)(backoff % 1000) * 1000000L};
            while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
            backoff = backoff * 2 > 30000 ? 30000 : backoff * 2;
            continue;
        }
        mr_log(res->status == 0 ? MR_LOG_INFO : MR_LOG_WARN, "%s: exit %d (%lld ms)", what,
               res->status, (long long)took);
        return MR_OK;
    }
}
