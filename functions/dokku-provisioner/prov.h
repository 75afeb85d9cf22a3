/* prov.h: the dokku-provisioner's modules.
 *
 *   main.c     the mr_app, start-up configuration (prov_cfg)
 *   routes.c   bearer check, routing, answers
 *   validate.c request parsing and strict validation (nothing runs before it passes)
 *   runner.c   one `dokku` command: argv building (local/ssh), posix_spawn, deadline,
 *              output capture, deploy-lock retry, dry-run recording
 *   ops.c      the sequences: create/update, stop, start, destroy, state; per-app lock
 *
 * Every prov_* function that can fail returns an mr_err and fills a caller's
 * err buffer with a message safe to answer with (a subcommand and an exit
 * status, never an argument value). */
#ifndef PROV_H
#define PROV_H

#include <stddef.h>
#include <stdint.h>
#include "mindroom.h"

typedef enum { PROV_MODE_LOCAL, PROV_MODE_SSH, PROV_MODE_DRY_RUN } prov_mode;

typedef struct {
    prov_mode mode;
    const char *token;          /* DOKKU_PROVISIONER_TOKEN */
    const char *dokku_bin;      /* DOKKU_BIN (local mode) */
    const char *ssh_bin;        /* DOKKU_SSH_BIN (ssh mode) */
    const char *ssh_user;       /* DOKKU_SSH_USER, "dokku" */
    const char *host;           /* DOKKU_HOST (ssh mode) */
    const char *ssh_key;        /* DOKKU_SSH_KEY, a file path, or "" for ssh's defaults */
    const char *known_hosts;    /* DOKKU_SSH_KNOWN_HOSTS, or "" for ssh's defaults */
    int64_t ssh_port;           /* DOKKU_SSH_PORT */
    const char *image;          /* MINDROOM_IMAGE, name@sha256:<64 hex> */
    const char *base_domain;    /* MINDROOM_BASE_DOMAIN */
    int tls;                    /* DOKKU_TLS: letsencrypt on every create/update */
    int64_t min_memory_mb, max_memory_mb;
    int64_t max_cpu_milli;      /* PROVISIONER_MAX_CPU in thousandths of a CPU */
    int64_t command_timeout_ms; /* DOKKU_COMMAND_TIMEOUT_MS: one command */
    int64_t deploy_timeout_ms;  /* DOKKU_DEPLOY_TIMEOUT_MS: git:from-image, letsencrypt, ps:* */
    int64_t lock_retries;       /* DOKKU_LOCK_RETRIES */
    int64_t lock_backoff_ms;    /* DOKKU_LOCK_BACKOFF_MS: first wait, doubled each time */
    int64_t app_lock_wait_ms;   /* PROVISIONER_APP_LOCK_WAIT_MS: wait for another request on the app */
    int64_t request_timeout_ms; /* PROVISIONER_REQUEST_TIMEOUT_MS: a whole request, all commands */
    const char *state_dir;      /* PROVISIONER_STATE_DIR */
    const char *frontend_tpl, *backend_tpl, *matrix_tpl; /* PROVISIONER_*_URL templates */
} prov_config;

extern prov_config prov_cfg;

/* ---- routes.c ---- */

/* The mr_app handler: bearer check, routing, answers. */
void prov_handle(mr_req *r);

/* ---- validate.c ---- */

#define PROV_NAME_MAX 63
#define PROV_MAX_ENV 256

typedef struct {
    const char *key;            /* points into the request's cJSON tree */
    const char *value;
} prov_env;

/* A validated POST /apps body. Strings point into the cJSON tree it was parsed from. */
typedef struct {
    const char *app;
    const char *subdomain;
    int64_t memory_mb;
    int64_t cpu_milli;          /* CPUs in thousandths: 0.5 -> 500 */
    prov_env env[PROV_MAX_ENV]; /* sorted by key, no duplicates */
    size_t n_env;
} prov_spec;

/* 1 when s is a Dokku app name / subdomain label: ^[a-z][a-z0-9-]{0,62}$. */
int prov_valid_name(const char *s);
/* 1 when s is an environment key: ^[A-Z_][A-Z0-9_]*$, at most 255 characters. */
int prov_valid_env_key(const char *s);
/* 1 when s is an image pinned by digest: <name>@sha256:<64 lowercase hex>. */
int prov_valid_image(const char *s);
/* Parses and validates a POST /apps body against cfg's bounds. Returns MR_OK with
 * *spec filled (pointing into *tree, which the caller frees with cJSON_Delete
 * whatever the result), or MR_EINVAL with err naming the offending field. */
mr_err prov_parse_spec(const char *body, size_t len, const prov_config *cfg,
                       cJSON **tree, prov_spec *spec, char *err, size_t errlen);
/* Writes cpu_milli as Dokku reads it ("1", "0.5", "2.25") into out. */
void prov_format_cpu(int64_t cpu_milli, char *out, size_t cap);
/* Expands a URL template ({scheme}, {subdomain}, {domain}, {app}) into out.
 * Returns MR_OK, or MR_EINVAL for an unknown placeholder or a result over cap. */
mr_err prov_expand_url(const char *tpl, const char *app, const char *subdomain,
                       const prov_config *cfg, char *out, size_t cap);

/* ---- runner.c ---- */

#define PROV_OUT_MAX 16384

typedef struct {
    int status;                 /* exit status; 128+N when killed by signal N; -1 not started */
    int timed_out;              /* the deadline passed and the process group was killed */
    int lock_retries;           /* deploy-lock contentions retried */
    char out[PROV_OUT_MAX];     /* stdout (truncated), NUL-terminated; never logged */
    size_t out_len;
    char err[PROV_OUT_MAX];     /* stderr (truncated), NUL-terminated; never logged */
    size_t err_len;
} prov_result;

/* Runs `dokku <args...>` (args NULL-terminated; args[0] is the subcommand,
 * or a global flag such as "--force" followed by it) per cfg->mode, with a
 * deadline of timeout_ms but never past deadline_ms (absolute, mr_now_ms();
 * 0 for none), retrying deploy-lock contention with backoff within it.
 * Fills *res (caller-owned). Returns MR_OK when the command ran to an exit
 * status (any status: the caller decides what it means), MR_ETRANSIENT when
 * it could not be started or timed out, with err filled. Arguments containing
 * '=' are logged as "KEY=..." without their value. In dry-run mode nothing is
 * spawned: the command is logged and answered by a simulated registry under
 * cfg->state_dir/dry-run. */
mr_err prov_dokku(const prov_config *cfg, const char *const *args, int64_t timeout_ms,
                  int64_t deadline_ms, prov_result *res, char *err, size_t errlen);
/* The subcommand of an argv (skips leading "--flags"), for messages. */
const char *prov_subcommand(const char *const *args);
/* 1 when a finished command's output reports Dokku's deploy lock held by another deploy. */
int prov_lock_contended(const prov_result *res);

/* ---- ops.c ---- */

typedef struct {
    int status;                 /* HTTP status to answer: 200 or 201 */
    const char *state;          /* "running", "stopped", "created", "destroyed" */
    int existed;                /* the app existed before this request */
    int deployed;               /* git:from-image deployed a change in this request */
    int restarted;              /* the app was restarted to apply a changed spec */
    /* On failure: the status and error code to answer with (502 dokku_failed,
     * 504 dokku_timeout, 503 dokku_unavailable or app_busy, 404 not_found...). */
    int fail_status;
    const char *fail_code;
    int64_t deadline_ms;        /* the request's end (mr_now_ms()); no command runs past it */
} prov_outcome;

/* Creates or updates an app to match spec, resuming a half-created one.
 * Returns MR_OK with *out filled, or an error with out->fail_status,
 * out->fail_code and err ("<subcommand> exited <status>") set. */
mr_err prov_apply(const prov_config *cfg, const prov_spec *spec, prov_outcome *out,
                  char *err, size_t errlen);
/* verb: "stop", "start", "destroy", "state". A missing app: MR_ENOTFOUND
 * (destroy: MR_OK with existed = 0). Errors as prov_apply. */
mr_err prov_app_action(const prov_config *cfg, const char *app, const char *verb,
                       prov_outcome *out, char *err, size_t errlen);
/* Returns MR_OK when the state directory exists (created 0700 if missing). */
mr_err prov_state_init(const prov_config *cfg, char *err, size_t errlen);

#endif
