/* worker.h: the lifecycle worker's modules.
 *
 *   main.c   configuration (checked once, before fork), the supervisor, and each
 *            worker process's loop: periodic jobs, claim, wait for a notification
 *   wake.c   one claim a wake-up on each host, however many processes were woken
 *   steps.c  one claimed instance: carry out its steps (the provisioner, Resend),
 *            record each outcome, give the lease back when told to stop
 *   payload.c what a create, update or start sends the provisioner: the step's
 *            payload with the instance's secrets opened (the only place they are)
 *   jobs.c   the periodic jobs: the health round, the Stripe sweep, teardowns,
 *            the Stripe cancellations of deleted accounts' subscriptions
 *   targets.c which provisioner a step or a teardown goes to (its target's URL
 *            and token, or DOKKU_PROVISIONER_URL)
 *
 * The worker is not a FastCGI function: it serves no requests. It lives beside
 * them because it is built and linked the same way (libmindroom). */
#ifndef WORKER_H
#define WORKER_H

#include "mindroom.h"
#include "mr_action.h"
#include "mr_health.h"
#include "mr_provisioner.h"
#include "mr_secrets.h"
#include "mr_stripe_api.h"

typedef struct {
    int workers;                /* MR_LIFECYCLE_WORKERS: processes on this host */
    int lease_s;                /* MR_LIFECYCLE_LEASE_S */
    int backoff_base_s;         /* MR_PROVISION_BACKOFF_BASE_S */
    int backoff_cap_s;          /* MR_PROVISION_BACKOFF_CAP_S */
    char backoff_base_arg[16];  /* backoff_base_s and _cap_s, formatted once: the text */
    char backoff_cap_arg[16];   /* parameters of each SQL call that records a failure */
    long poll_ms;               /* MR_LIFECYCLE_POLL_MS: longest the host goes without a claim */
    long stop_grace_ms;         /* MR_LIFECYCLE_STOP_GRACE_MS */
    const char *database_url;   /* DATABASE_URL */
    const char *listen_url;     /* where LISTEN goes, or NULL: poll only */
    mr_provisioner provisioner; /* DOKKU_PROVISIONER_URL, _TOKEN, MR_PROVISION_*TIMEOUT_MS */
    const char *resend_api_key; /* RESEND_API_KEY, NULL when unset: the email waits */
    const char *resend_base_url, *resend_from;
    long resend_timeout_ms;     /* MR_RESEND_TIMEOUT_MS */
    mr_health_config health;    /* HEALTH_* (HEALTH_INTERVAL_S: the round's interval) */
    int sweep_interval_s;       /* SWEEP_INTERVAL_S: the Stripe sweep's interval */
    int sweep_batch;            /* SWEEP_BATCH: events retried per run */
    int defer_max_hours;        /* STRIPE_DEFER_MAX_HOURS */
    mr_stripe_api_config stripe;/* STRIPE_SECRET_KEY (unset: cancellations stay owed), _API_BASE, ... */
    int retention_days;         /* MINDROOM_RETENTION_DAYS: a destroyed instance's storage is kept */
    mr_secrets *secrets;        /* MINDROOM_SECRETS_KEY (+ _PREVIOUS): opens instance secrets */
    char control_plane_url[512];/* MINDROOM_CONTROL_PLANE_URL: where instances report usage */
} worker_config;

extern worker_config wcfg;

/* One worker process's handles and name. */
typedef struct {
    mr_db *db;                  /* its work connection */
    mr_db *listen;              /* its LISTEN connection, or NULL */
    mr_httpc *http;
    char owner[160];            /* "<host>/<pid>": leases and job runs carry it */
    int untrimmed;              /* work done since the heap was last trimmed (main.c) */
} worker;

/* Whether the process has been asked to stop (SIGTERM/SIGINT seen or pending). */
int worker_stopping(void);

/* ---- steps.c ---- */

typedef enum {
    CLAIM_NONE,    /* nothing claimable */
    CLAIM_FULL,    /* work is due, but max_in_flight steps are under way */
    CLAIM_DONE,    /* a step was claimed (and carried out, by wake_claim) */
    CLAIM_ANSWERED /* no claim made: another process's claim answers this wake-up (wake.c) */
} claim_outcome;

/* Claims the next due instance (public.lifecycle_claim). CLAIM_DONE: *claimed is
 * the claim's answer, for steps_run, and *more whether another instance was due
 * when it was taken (1 when the claim does not say). Otherwise *next_due_ms is the
 * time until the next owed work falls due (-1: none). Returns MR_OK or a database
 * failure (then nothing was claimed, or the lease simply expires). */
mr_err steps_claim(worker *w, cJSON **claimed, claim_outcome *outcome, int64_t *next_due_ms,
                   int *more, char *err, size_t errlen);

/* Carries out the claimed steps (chained under the same lease until nothing more
 * is due, a step fails, the lease is lost, or the worker stops). Takes claimed. */
mr_err steps_run(worker *w, cJSON *claimed, char *err, size_t errlen);

/* ---- wake.c ---- */

/* Sets up what the processes of this host share (before the fork). */
mr_err wake_init(char *err, size_t errlen);

/* Claims for a wake-up at `need` (an mr_now_ns() time: work may have become due by
 * then), unless a claim another process began at or after it answers it, and
 * carries out the step claimed (steps_run). Returns MR_OK with *outcome, or a
 * database failure. */
mr_err wake_claim(worker *w, int64_t need, claim_outcome *outcome, char *err, size_t errlen);

/* When this host should claim next without being woken (*at, an mr_now_ns() time:
 * when the last claim that found nothing said work falls due, else poll_ms after
 * the latest claim), and when to wake for it (*wake_at: at, or a little later when
 * at has passed and another process is claiming for it). */
void wake_next(long poll_ms, int64_t *at, int64_t *wake_at);

/* The descriptor a sleeping process polls for a sibling's "more is due": readable
 * while a wake is waiting; wake_take_poke takes it (1) or finds none (0). */
int wake_pokefd(void);
int wake_take_poke(void);

/* ---- targets.c ---- */

/* The provisioner target of one step (see targets.c); its strings back p's. */
typedef struct {
    int chosen;                 /* a target was chosen (else DOKKU_PROVISIONER_URL) */
    int answering;              /* as the database last knew it ("answering") */
    char name[48];
    char url[320];
    char token[512];            /* wiped by targets_forget */
} worker_target;

/* Points p (a copy of wcfg.provisioner) at a target read from the database: a
 * claimed step's "target" object (NULL or JSON null: no target, p unchanged), with
 * *t (caller-owned, wiped with targets_forget) holding the URL and token. Returns
 * MR_OK, MR_ETRANSIENT when the target is disabled, MR_EINVAL when its token cannot
 * be had (the step fails and is retried). err never holds a token. */
mr_err targets_use(const cJSON *target, mr_provisioner *p, worker_target *t, char *err,
                   size_t errlen);
/* The same for a target as JSON text (public.instance_teardowns_due gives it; NULL
 * or empty: no target). */
mr_err targets_use_text(const char *target_json, mr_provisioner *p, worker_target *t, char *err,
                        size_t errlen);
/* Wipes t's token. */
void targets_forget(worker_target *t);
/* Whether a call sent to a target says the target answers: 1 yes; 0 no (its
 * provisioner gave no answer, mr_httpc.h, or answered that it could not reach its
 * Dokku host); -1 neither (aborted, or never sent). */
int targets_answers(const mr_provisioner_call *call);
/* After a call sent to t (a chosen target): records whether it was answered when
 * that differs from what the target's row said (public.target_answered: placement
 * prefers the targets that answer) and logs the change; nothing otherwise. */
void targets_note_answer(worker *w, worker_target *t, const mr_provisioner_call *call);

/* ---- payload.c ---- */

/* The body of POST /apps for a claimed create/update/start step: its "payload"
 * with the operator's environment and the homeserver's keys opened (generated and
 * stored first if the instance has none yet), and the instance's control-plane
 * URL and token (a token issued now when the instance has no live one). Free with
 * payload_free, which wipes every string. */
mr_err payload_build(worker *w, const cJSON *step, cJSON **out, char *err, size_t errlen);
void payload_free(cJSON *payload);
/* Generates, seals and opens throwaway secrets once, as a first deploy does, in
 * the supervisor before it forks the workers: OpenSSL builds its random generator
 * and algorithm tables on first use, and built here they are shared by the
 * workers (copy on write) instead of built again in each (about 120 KB less PSS
 * per worker once it has created instances: docs/benchmarks.md). Each worker's
 * generator still seeds itself anew: OpenSSL 3 reseeds it in a process of
 * another pid (tests/unit/test_itoken.c checks it). A failure means the worker
 * could seal nothing, so it does not start. */
mr_err payload_prime(char *err, size_t errlen);

/* ---- jobs.c ---- */

/* Runs every periodic job whose turn it is, if this process takes its lease.
 * Returns the milliseconds until it should be asked again. */
int64_t jobs_run_due(worker *w);

#endif
