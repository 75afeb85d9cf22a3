/* mindroom-lifecycle: the lifecycle worker. It does all owed work: the
 * provisioner calls, the welcome email, retries with backoff, and the periodic
 * jobs (the health round, the Stripe sweep). Edges (the webhook, provision- and
 * deprovision-instance) only record intent; the same commit NOTIFYs this worker.
 *
 * MR_LIFECYCLE_WORKERS processes (default 2) share the work with every other
 * worker on every other host through PostgreSQL alone: a claim takes an expiring
 * lease with FOR UPDATE SKIP LOCKED (public.lifecycle_claim), the concurrency
 * limit is a row (lifecycle_limits), periodic jobs take a lease row
 * (scheduled_jobs). Each process loops:
 *   1. the periodic jobs whose turn it is, if it takes their lease;
 *   2. when woken for work, claim the next due instance and carry out its steps
 *      (steps.c): one process of the host claims for each wake-up (wake.c);
 *   3. sleep until a notification on mindroom_lifecycle, a sibling's "more is
 *      due", the next owed work falls due, a job's turn, or MR_LIFECYCLE_POLL_MS
 *      after the host's last claim.
 * Notifications come over DATABASE_LISTEN_URL, else over DATABASE_URL unless that
 * is a transaction-mode pooler (DATABASE_POOLER=transaction, where LISTEN does not
 * work): then the worker polls.
 *
 * SIGTERM: no new claim; a step in flight runs for MR_LIFECYCLE_STOP_GRACE_MS at
 * most, then is aborted and its lease given back, so every claim is finished or
 * released within the grace. */
#include <errno.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>

#include "mr_deadlines.h"
#include "mr_metrics.h"
#include "mr_proc.h"
#include "mr_version.h"
#include "worker.h"

#define CHANNEL "mindroom_lifecycle"
#define TRIM_EVERY_MS 1000

worker_config wcfg;

static volatile sig_atomic_t g_stop;

static void on_stop(int sig)
{
    (void)sig;
    g_stop = 1;
}

int worker_stopping(void)
{
    /* The stop signals stay blocked except while the process sleeps, so that no
     * libpq or libcurl call sees EINTR; a pending one counts as seen. */
    if (!g_stop) {
        sigset_t pending;
        if (sigpending(&pending) == 0 &&
            (sigismember(&pending, SIGTERM) == 1 || sigismember(&pending, SIGINT) == 1))
            g_stop = 1;
    }
    return g_stop;
}

static void load_config(void)
{
    worker_config *c = &wcfg;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    c->workers = (int)mr_config_int("MR_LIFECYCLE_WORKERS", ncpu > 1 ? ncpu : 2, 1, MR_PROC_MAX);
    c->lease_s = (int)mr_config_int("MR_LIFECYCLE_LEASE_S", MR_DL_LIFECYCLE_LEASE_S, 1, 86400);
    c->backoff_base_s = (int)mr_config_int("MR_PROVISION_BACKOFF_BASE_S", 30, 1, 86400);
    c->backoff_cap_s = (int)mr_config_int("MR_PROVISION_BACKOFF_CAP_S", 3600, 1, 7 * 86400);
    c->poll_ms = (long)mr_config_int("MR_LIFECYCLE_POLL_MS", 30000, 50, 3600000);
    c->stop_grace_ms = (long)mr_config_int("MR_LIFECYCLE_STOP_GRACE_MS", MR_DL_LIFECYCLE_STOP_GRACE_MS,
                                           0, 3600000);
    c->database_url = mr_config_str("DATABASE_URL", NULL);
    const char *listen = mr_config_str("DATABASE_LISTEN_URL", "");
    const char *pooler = mr_config_str("DATABASE_POOLER", "none");
    if (strcmp(pooler, "none") && strcmp(pooler, "session") && strcmp(pooler, "transaction")) {
        fprintf(stderr, "config: DATABASE_POOLER must be none, session or transaction\n");
        exit(2);
    }
    c->listen_url = *listen ? listen : strcmp(pooler, "transaction") ? c->database_url : NULL;

    c->provisioner.url = mr_config_str("DOKKU_PROVISIONER_URL", "http://127.0.0.1:8002");
    char why[200];
    if (mr_provisioner_check_url(c->provisioner.url, why, sizeof why) != MR_OK) {
        fprintf(stderr, "config: DOKKU_PROVISIONER_URL: %s: the worker never connects there\n",
                why);
        exit(2);
    }
    c->provisioner.token = mr_config_secret("DOKKU_PROVISIONER_TOKEN", NULL, 16);
    c->provisioner.timeout_ms = (long)mr_config_int("MR_PROVISION_TIMEOUT_MS", MR_DL_PROVISION_CALL_MS,
                                                    100, 7200000);
    c->provisioner.connect_timeout_ms = (long)mr_config_int("MR_PROVISION_CONNECT_TIMEOUT_MS",
                                                            MR_DL_PROVISION_CONNECT_MS, 50, 60000);
    const char *key = mr_config_str("RESEND_API_KEY", "");
    c->resend_api_key = *key ? mr_config_secret("RESEND_API_KEY", NULL, 1) : NULL;
    c->resend_base_url = mr_config_url("RESEND_BASE_URL", "https://api.resend.com");
    c->resend_from = mr_config_str("RESEND_FROM", "MindRoom <hello@mindroom.chat>");
    c->resend_timeout_ms = (long)mr_config_int("MR_RESEND_TIMEOUT_MS", MR_DL_RESEND_MS, 100, 120000);

    mr_health_config_load(&c->health);
    c->sweep_interval_s = (int)mr_config_int("SWEEP_INTERVAL_S", 60, 1, 86400);
    c->sweep_batch = (int)mr_config_int("SWEEP_BATCH", 50, 0, 10000);
    c->defer_max_hours = (int)mr_config_int("STRIPE_DEFER_MAX_HOURS", 72, 1, 24 * 365);
    c->retention_days = (int)mr_config_int("MINDROOM_RETENTION_DAYS", 30, 0, 3650);
    mr_stripe_api_config_load(&c->stripe, "the Stripe subscriptions of deleted accounts are "
                              "not cancelled until it is set (they stay owed in "
                              "stripe_cancellations)");
    char kerr[256];
    if (mr_secrets_load_env(&c->secrets, kerr, sizeof kerr) != MR_OK) {
        fprintf(stderr, "config: %s (instances' secrets are sealed with it: generate one with "
                "`openssl rand -base64 32`; the same key on every host)\n", kerr);
        exit(2);
    }

    /* The lease must outlive every step its holder can be inside, and leave room to
     * record the outcome; otherwise a slow but healthy worker would lose it and a
     * second one would repeat the call. */
    long longest = c->provisioner.timeout_ms + c->provisioner.connect_timeout_ms;
    if (c->resend_timeout_ms > longest)
        longest = c->resend_timeout_ms;
    long margin = longest / 2 < MR_DL_RECORD_MARGIN_MS ? longest / 2 : MR_DL_RECORD_MARGIN_MS;
    if ((long)c->lease_s * 1000 < longest + margin) {
        fprintf(stderr, "config: MR_LIFECYCLE_LEASE_S (%d s) must be longer than the longest step "
                "(MR_PROVISION_TIMEOUT_MS + MR_PROVISION_CONNECT_TIMEOUT_MS, or MR_RESEND_TIMEOUT_MS: "
                "%ld ms) plus the time to record its outcome\n", c->lease_s, longest);
        exit(2);
    }
    if (c->stop_grace_ms >= (long)MR_DL_WORKER_STOP_S * 1000 - MR_DL_RECORD_MARGIN_MS) {
        fprintf(stderr, "config: MR_LIFECYCLE_STOP_GRACE_MS must leave %d ms before the service "
                "manager's %d s stop timeout\n", MR_DL_RECORD_MARGIN_MS, MR_DL_WORKER_STOP_S);
        exit(2);
    }
    if (c->backoff_cap_s < c->backoff_base_s) {
        fprintf(stderr, "config: MR_PROVISION_BACKOFF_CAP_S must be >= MR_PROVISION_BACKOFF_BASE_S\n");
        exit(2);
    }
    snprintf(c->backoff_base_arg, sizeof c->backoff_base_arg, "%d", c->backoff_base_s);
    snprintf(c->backoff_cap_arg, sizeof c->backoff_cap_arg, "%d", c->backoff_cap_s);
    /* The address instances report usage to, handed to each in its environment. */
    const char *cp = mr_config_str("MINDROOM_CONTROL_PLANE_URL", "");
    size_t cpl = strlen(cp);
    while (cpl > 0 && cp[cpl - 1] == '/')
        cpl--;
    int cp_ok = cpl > 0 && cpl < sizeof c->control_plane_url &&
                (strncmp(cp, "http://", 7) == 0 || strncmp(cp, "https://", 8) == 0);
    for (size_t i = 0; cp_ok && i < cpl; i++)
        cp_ok = cp[i] > 0x20 && cp[i] < 0x7f;
    if (!cp_ok) {
        fprintf(stderr, "config: MINDROOM_CONTROL_PLANE_URL is required: the control plane's "
                "http(s) base URL that instances report usage to (%s/functions/v1/track-usage), "
                "e.g. https://api.mindroom.example\n", "<URL>");
        exit(2);
    }
    snprintf(c->control_plane_url, sizeof c->control_plane_url, "%.*s", (int)cpl, cp);
    if (!c->resend_api_key)
        mr_log(MR_LOG_INFO, "RESEND_API_KEY is not set: welcome emails wait until it is");
    if (!c->listen_url)
        mr_log(MR_LOG_INFO, "no LISTEN connection (DATABASE_POOLER=transaction and no "
               "DATABASE_LISTEN_URL): polling every %ld ms", c->poll_ms);
}

/* Sleeps until a notification, a sibling's wake (when pokes), a stop, timeout_ms,
 * or claim_at (an mr_now_ns() time, 0: none). Returns what to claim for: the time
 * of a notification or a wake, claim_at once it has come; 0 for nothing. */
static int64_t wait_for_work(worker *w, int64_t timeout_ms, int64_t claim_at, int pokes)
{
    char err[200];
    if (w->listen && mr_db_socket(w->listen) < 0) {
        /* (Re)connect and listen; whatever was notified meanwhile is covered by the
         * claim that follows. */
        if (mr_db_listen(w->listen, CHANNEL, err, sizeof err) != MR_OK) {
            mr_log(MR_LOG_WARN, "LISTEN %s: %s; polling until it works", CHANNEL, err);
            if (timeout_ms > 1000)
                timeout_ms = 1000;
        } else {
            return mr_now_ns(); /* listening again: look for work before sleeping */
        }
    }
    struct pollfd p[2] = {{.fd = w->listen ? mr_db_socket(w->listen) : -1, .events = POLLIN},
                          {.fd = pokes ? wake_pokefd() : -1, .events = POLLIN}};
    if (timeout_ms > INT32_MAX)
        timeout_ms = INT32_MAX;
    struct timespec ts = {.tv_sec = timeout_ms / 1000, .tv_nsec = (timeout_ms % 1000) * 1000000L};
    sigset_t open;
    sigemptyset(&open);
    /* The stop signals are delivered only here (ppoll's mask), so no other call is
     * interrupted by them. */
    int rc = ppoll(p, 2, &ts, &open);
    if (rc < 0 && errno != EINTR)
        mr_log(MR_LOG_WARN, "ppoll: %s", strerror(errno));
    int64_t now = mr_now_ns(), need = 0;
    /* A notification read now was committed before: a claim begun from now on
     * sees its work. -1: the connection broke (re-listened on the next wait), and
     * what it would have said is looked for too. */
    if (rc > 0 && p[0].revents && mr_db_notifications(w->listen) != 0)
        need = now;
    if (rc > 0 && p[1].revents && wake_take_poke())
        need = now;
    if (!need && claim_at && now >= claim_at)
        need = claim_at;
    return need;
}

static int child_main(void *arg)
{
    (void)arg;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigset_t stopset;
    sigemptyset(&stopset);
    sigaddset(&stopset, SIGTERM);
    sigaddset(&stopset, SIGINT);
    sigprocmask(SIG_SETMASK, &stopset, NULL);

    worker w = {0};
    char host[64] = "";
    gethostname(host, sizeof host - 1);
    snprintf(w.owner, sizeof w.owner, "%s/%d", host[0] ? host : "host", (int)getpid());
    w.db = mr_db_open(wcfg.database_url);
    w.listen = wcfg.listen_url ? mr_db_open(wcfg.listen_url) : NULL;
    w.http = mr_httpc_open();
    if (!w.db || (wcfg.listen_url && !w.listen) || !w.http) {
        mr_log(MR_LOG_ERROR, "worker could not allocate its database or HTTP handles");
        return 1;
    }
    mr_log(MR_LOG_INFO, "worker %s ready", w.owner);

    int64_t need = mr_now_ns(); /* at start: look for work at once */
    int64_t backoff_ms = 0, trimmed_ms = 0;
    while (!worker_stopping()) {
        int64_t sleep_ms = jobs_run_due(&w);
        if (worker_stopping())
            break;
        if (need) {
            claim_outcome got;
            char err[256] = "";
            mr_err e = wake_claim(&w, need, &got, err, sizeof err);
            if (e != MR_OK) {
                /* The database is away: back off (up to 5 s) instead of spinning. */
                backoff_ms = backoff_ms ? (backoff_ms * 2 > 5000 ? 5000 : backoff_ms * 2) : 100;
                mr_log(MR_LOG_WARN, "claim: %s; retrying in %lld ms", err, (long long)backoff_ms);
                wait_for_work(&w, backoff_ms, 0, 0);
                need = mr_now_ns();
                continue;
            }
            backoff_ms = 0;
            if (got == CLAIM_DONE) {
                w.untrimmed = 1;
                need = mr_now_ns(); /* there may be more: look again at once */
                continue;
            }
        }
        int64_t at, wake_at;
        wake_next(wcfg.poll_ms, &at, &wake_at);
        int64_t until = (wake_at - mr_now_ns() + 999999) / 1000000;
        if (until < sleep_ms)
            sleep_ms = until < 0 ? 0 : until;
        if (w.untrimmed && mr_now_ms() - trimmed_ms >= TRIM_EVERY_MS) {
            /* Going idle after work (steps, a health round): the heap pages it
             * freed go back to the system (glibc gives back only the heap's top by
             * itself). About 50 us a call, so at most once a second: a worker woken
             * for each instance goes idle after each. */
            malloc_trim(0);
            trimmed_ms = mr_now_ms();
            w.untrimmed = 0;
        }
        need = wait_for_work(&w, sleep_ms, at, 1);
    }
    mr_log(MR_LOG_INFO, "worker %s stopped", w.owner);
    mr_db_close(w.db);
    mr_db_close(w.listen);
    mr_httpc_close(w.http);
    return 0;
}

int main(int argc, char **argv)
{
    if (mr_version_arg("mindroom-lifecycle", argc, argv))
        return 0;
    /* mindroomctl target add asks the worker's own rule of the URL it is given
     * (the rule lives in one place, and the address classes with it). */
    if (argc == 3 && strcmp(argv[1], "--check-target-url") == 0) {
        char why[200];
        if (mr_provisioner_check_url(argv[2], why, sizeof why) == MR_OK)
            return 0;
        fprintf(stderr, "%s: the worker never connects there\n", why);
        return 2;
    }
    if (argc > 1) {
        int help = strcmp(argv[1], "--help") == 0;
        fprintf(help ? stdout : stderr,
                "usage: %s [--version | --check-target-url URL]\n  the lifecycle worker; "
                "configured by the environment (docs/lifecycle.md)\n  --check-target-url: exit 0 "
                "when URL may be a provisioner's, else 2 with why\n", argv[0]);
        return help ? 0 : 2;
    }
    mr_log_init_env("mindroom-lifecycle");
    load_config();
    mr_config_seal(MR_CONFIG_KEEP_TOKENS); /* targets' tokens are read as they are met */
    char err[256];
    /* From here on the process owns a metrics segment: a stop waits for the
     * supervisor, which removes it (mr_proc.h). */
    mr_proc_hold_signals();
    if (mr_metrics_open("mindroom-lifecycle", MR_METRICS_DAEMON, err, sizeof err) != MR_OK) {
        fprintf(stderr, "config: %s\n", err);
        return 2;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (payload_prime(err, sizeof err) != MR_OK) {
        fprintf(stderr, "startup: cannot generate and seal a secret: %s\n", err);
        return 2;
    }
    if (wake_init(err, sizeof err) != MR_OK) {
        fprintf(stderr, "startup: %s\n", err);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    mr_log(MR_LOG_INFO, "starting %d workers (version %s)", wcfg.workers, mr_version());
    int rc = mr_proc_supervise(wcfg.workers, child_main, NULL);
    mr_metrics_close();
    curl_global_cleanup();
    return rc;
}
