/* prov.h: the dokku-provisioner's modules.
 *
 *   main.c     the mr_app, start-up configuration (prov_cfg)
 *   routes.c   bearer check, routing, answers
 *   validate.c request parsing and strict validation (nothing runs before it passes),
 *              names derived from an app, URL and host templates
 *   files.c    what is fed to a command's stdin: tarballs (the homeserver's
 *              configuration, the wildcard certificate), homeserver.yaml
 *   runner.c   one `dokku` command: argv building (local/ssh), posix_spawn, stdin,
 *              allow-listed environment, deadline, output capture, deploy-lock
 *              retry, dry-run recording
 *   state.c    the state directory: its ownership checks, per-instance locks,
 *              applied-spec fingerprints, every file opened O_NOFOLLOW
 *   ops.c      the sequences: create/update, stop, start, destroy, purge,
 *              storage destroy, state
 *
 * Every prov_* function that can fail returns an mr_err and fills a caller's
 * err buffer with a message safe to answer with (a subcommand and an exit
 * status, never an argument value). */
#ifndef PROV_H
#define PROV_H

#include <stddef.h>
#include <stdint.h>
#include "mindroom.h"
#include "mr_appenv.h"

typedef enum { PROV_MODE_LOCAL, PROV_MODE_SSH, PROV_MODE_DRY_RUN } prov_mode;
/* DOKKU_TLS. On k3s, letsencrypt and issuer go through the scheduler's
 * cert-manager integration (scheduler-k3s:set); issuer is k3s only. */
typedef enum { PROV_TLS_OFF, PROV_TLS_LETSENCRYPT, PROV_TLS_WILDCARD, PROV_TLS_ISSUER } prov_tls;
/* DOKKU_SCHEDULER: Dokku's default docker-local scheduler (one host), or its
 * k3s scheduler (a Kubernetes cluster of one or more nodes). */
typedef enum { PROV_SCHED_DOCKER_LOCAL, PROV_SCHED_K3S } prov_scheduler;

/* The homeserver's container side: Synapse's image keeps everything in /data
 * and listens on 8008; its processes run as 991:991 (docker/start.py). */
#define PROV_HS_DATA_DIR "/data"
#define PROV_HS_PORT 8008
#define PROV_HS_UID 991
/* The largest upload Synapse takes (its max_upload_size, written into
 * homeserver.yaml), and the request body the homeserver's public proxy lets
 * through (nginx:set client-max-body-size): Dokku's nginx default is 1m. */
#define PROV_HS_MAX_UPLOAD "50M"
/* MindRoom's configuration, kept in its storage entry (under MINDROOM_DATA_DIR)
 * so that what its dashboard saves survives a redeploy; seeded by MindRoom on
 * its first start from the config.yaml its image ships (WORKDIR /app). */
#define PROV_MINDROOM_CONFIG "/config/config.yaml"
#define PROV_MINDROOM_CONFIG_TEMPLATE "/app/config.yaml"
/* On k3s, Dokku exposes an app's web process as the Service <app>-web in the
 * app's namespace, on the host port of its http mapping (80). The provisioner
 * leaves the k3s `namespace` property at its default, where Dokku also makes
 * the storage entries' PersistentVolumeClaims. */
#define PROV_K3S_NAMESPACE "default"
/* Dokku's exit status for a command naming an app that does not exist
 * (plugins/common: AppDoesNotExist.ExitCode, and verify_app_name's
 * DOKKU_FAIL_EXIT_CODE), apps:exists included. ops.c reads it, and the
 * dry-run registry answers it. */
#define PROV_APP_MISSING_STATUS 20
/* Dokku's storage:create --chown takes a uid up to 65535
 * (plugins/storage ResolveChownID: strconv.ParseUint(value, 10, 16)). */
#define PROV_MAX_CHOWN_UID 65535
/* The largest uid a ustar header holds (7 octal digits): files.c. */
#define PROV_MAX_TAR_UID 07777777

typedef struct {
    prov_mode mode;
    const char *token;          /* DOKKU_PROVISIONER_TOKEN */
    const char *dokku_bin;      /* DOKKU_BIN (local mode) */
    const char *ssh_bin;        /* DOKKU_SSH_BIN (ssh mode) */
    const char *ssh_user;       /* DOKKU_SSH_USER, "dokku" */
    const char *host;           /* DOKKU_HOST (ssh mode) */
    const char *ssh_key;        /* DOKKU_SSH_KEY, a file path, or "" for ssh's defaults */
    const char *known_hosts;    /* DOKKU_SSH_KNOWN_HOSTS: the pinned host keys (ssh mode) */
    int64_t ssh_port;           /* DOKKU_SSH_PORT */
    const char *app_prefix;     /* PROVISIONER_APP_PREFIX, "mindroom-" */
    const char *image;          /* MINDROOM_IMAGE, name@sha256:<64 hex> */
    const char *matrix_image;   /* MATRIX_IMAGE, name@sha256:<64 hex> */
    const char *base_domain;    /* MINDROOM_BASE_DOMAIN */
    prov_scheduler scheduler;   /* DOKKU_SCHEDULER */
    const char *storage_class;  /* PROVISIONER_STORAGE_CLASS (k3s), "" for the cluster's default */
    const char *acme_email;     /* PROVISIONER_ACME_EMAIL (k3s, DOKKU_TLS=letsencrypt) */
    const char *cert_issuer;    /* PROVISIONER_CERT_ISSUER (k3s, DOKKU_TLS=issuer) */
    prov_tls tls;               /* DOKKU_TLS */
    unsigned char *tls_tar;     /* wildcard: server.crt + server.key, read at start-up */
    size_t tls_tar_len;
    int64_t mindroom_port;      /* MINDROOM_PORT: MindRoom's container port */
    const char *mindroom_data_dir; /* MINDROOM_DATA_DIR: where its storage is mounted */
    int64_t mindroom_uid;       /* MINDROOM_DATA_UID: owner of its storage */
    const char *child_env;      /* PROVISIONER_CHILD_ENV: more variable names for children */
    int64_t min_memory_mb, max_memory_mb;
    int64_t max_cpu_milli;      /* PROVISIONER_MAX_CPU in thousandths of a CPU */
    int64_t max_storage_gb;     /* PROVISIONER_MAX_STORAGE_GB */
    int64_t command_timeout_ms; /* DOKKU_COMMAND_TIMEOUT_MS: one command */
    int64_t deploy_timeout_ms;  /* DOKKU_DEPLOY_TIMEOUT_MS: deploys, ps:*, destroys, storage:exec */
    int64_t lock_retries;       /* DOKKU_LOCK_RETRIES */
    int64_t lock_backoff_ms;    /* DOKKU_LOCK_BACKOFF_MS: first wait, doubled each time */
    int64_t app_lock_wait_ms;   /* PROVISIONER_APP_LOCK_WAIT_MS: wait for another request on the app */
    int64_t request_timeout_ms; /* PROVISIONER_REQUEST_TIMEOUT_MS: a whole request, all commands */
    const char *state_dir;      /* PROVISIONER_STATE_DIR */
    const char *frontend_tpl, *backend_tpl; /* PROVISIONER_FRONTEND_URL, _BACKEND_URL */
    const char *matrix_host_tpl;            /* PROVISIONER_MATRIX_HOST: one DNS label */
    const char *matrix_url_tpl;             /* PROVISIONER_MATRIX_URL ({matrix_host}...) */
} prov_config;

extern prov_config prov_cfg;

/* ---- routes.c ---- */

/* The mr_app handler: bearer check, routing, answers. */
void prov_handle(mr_req *r);

/* ---- validate.c ---- */

#define PROV_NAME_MAX 63
/* Storage entry names are DNS-1123 labels of at most 45 characters and the
 * longest one is "<app>-matrix-data": an app name has at most 45 - 12. */
#define PROV_APP_MAX 33
#define PROV_MAX_ENV 256
#define PROV_HOST_MAX 253

typedef struct {
    const char *key;            /* points into the request's cJSON tree, or a static name */
    const char *value;
} prov_env;

typedef struct {
    int64_t memory_mb;
    int64_t cpu_milli;          /* CPUs in thousandths: 0.5 -> 500 */
    int64_t storage_gb;         /* 0: not given */
} prov_limits;

typedef struct {
    int present;
    prov_limits lim;
    const char *server_name;    /* the request's, else default_server_name */
    char default_server_name[PROV_HOST_MAX + 1]; /* the homeserver's host (PROVISIONER_MATRIX_HOST) */
    const char *signing_key;
    const char *registration_shared_secret;
    const char *macaroon_secret_key;
    const char *form_secret;
} prov_hs_spec;

/* A validated POST /apps body. Strings point into the cJSON tree it was parsed from. */
typedef struct {
    const char *app;
    const char *subdomain;
    prov_limits lim;            /* MindRoom's */
    prov_env env[PROV_MAX_ENV]; /* MindRoom's, sorted by key, no duplicates */
    size_t n_env;
    prov_hs_spec hs;
} prov_spec;

/* Everything named after an instance's app. */
typedef struct {
    char app[PROV_NAME_MAX + 1];     /* <app>: MindRoom */
    char hs_app[PROV_NAME_MAX + 1];  /* <app>-matrix: the homeserver */
    char data[PROV_NAME_MAX + 1];    /* <app>-data: MindRoom's storage entry */
    char hs_data[PROV_NAME_MAX + 1]; /* <app>-matrix-data: the homeserver's */
    char network[PROV_NAME_MAX + 1]; /* <app>-net: the private network between them */
} prov_names;

/* 1 when s is a Dokku app name / subdomain label: ^[a-z][a-z0-9-]{0,62}$. */
int prov_valid_name(const char *s);
/* 1 when s is an instance's app name: cfg->app_prefix, then [a-z0-9]+, at most
 * PROV_APP_MAX characters in all (no '-' after the prefix, so no name can end
 * in "-matrix" and reach another instance's homeserver). */
int prov_valid_app(const prov_config *cfg, const char *s);
/* Fills *n from a valid app name. */
void prov_names_of(const char *app, prov_names *n);
/* 1 when s is an image pinned by digest: <name>@sha256:<64 lowercase hex>. */
int prov_valid_image(const char *s);
/* 1 when s is a lowercase DNS name: labels of [a-z0-9-], 1..63, not starting
 * or ending with '-', at most PROV_HOST_MAX in all. */
int prov_valid_host(const char *s);
/* Parses and validates a POST /apps body against cfg's bounds. Returns MR_OK with
 * *spec filled (pointing into *tree, which the caller frees with prov_spec_free
 * whatever the result), or MR_EINVAL with err naming the offending field. */
mr_err prov_parse_spec(const char *body, size_t len, const prov_config *cfg,
                       cJSON **tree, prov_spec *spec, char *err, size_t errlen);
/* Wipes every string of a parsed body (env values, the homeserver's keys) and
 * frees it; NULL is fine. */
void prov_spec_free(cJSON *tree);
/* Writes cpu_milli as Dokku reads it ("1", "0.5", "2.25") into out. */
void prov_format_cpu(int64_t cpu_milli, char *out, size_t cap);
/* Expands a URL template ({scheme}, {subdomain}, {domain}, {app}) into out.
 * Returns MR_OK, or MR_EINVAL for an unknown placeholder or a result over cap. */
mr_err prov_expand_url(const char *tpl, const char *app, const char *subdomain,
                       const prov_config *cfg, char *out, size_t cap);
/* The homeserver's public host: cfg->matrix_host_tpl ({subdomain}, {app})
 * expanded to one DNS label, then "." and the base domain, so one wildcard
 * certificate for *.<base domain> covers it. Returns MR_OK or MR_EINVAL. */
mr_err prov_matrix_host(const prov_config *cfg, const char *app, const char *subdomain,
                        char *out, size_t cap);

/* ---- files.c ---- */

/* A growing byte buffer; free data with free(). */
typedef struct {
    unsigned char *data;
    size_t len, cap;
    int failed;                 /* an allocation failed: the content is incomplete */
} prov_buf;

/* Appends one regular file to a ustar archive in b (name at most 99 bytes). */
void prov_tar_file(prov_buf *b, const char *name, unsigned mode, unsigned uid,
                   const void *data, size_t len);
/* Appends a directory entry (name "./" is the directory tar extracts into:
 * tar run as root gives it the entry's owner and mode). */
void prov_tar_dir(prov_buf *b, const char *name, unsigned mode, unsigned uid);
/* Ends the archive (two zero blocks). Returns MR_OK, or MR_EINTERNAL when any
 * append failed. */
mr_err prov_tar_end(prov_buf *b);
/* Wipes and frees b's data. */
void prov_buf_free(prov_buf *b);

/* The tarball written into the homeserver's storage before its deploys:
 * homeserver.yaml and the secret files it names, owned by PROV_HS_UID, after
 * a "./" entry (PROV_HS_UID, 0700) when own_root is set (k3s: a volume's root
 * belongs to root until something changes it). public_url is the homeserver's
 * public base URL. Returns MR_OK with *out (free with prov_buf_free), or
 * MR_EINTERNAL. */
mr_err prov_hs_files(const prov_hs_spec *hs, const char *public_url, int own_root,
                     prov_buf *out);
/* A tarball holding only "./" owned by uid, mode 0700: on k3s it makes a new
 * volume's root the app's own before the first deploy. Returns MR_OK with
 * *out (free with prov_buf_free), or MR_EINTERNAL. */
mr_err prov_root_files(unsigned uid, prov_buf *out);

/* Reads the wildcard certificate and key (PEM files), checks that the key
 * matches, that the certificate is valid now and covers every name one label
 * under base_domain, and returns them as a certs:add tarball (server.crt,
 * server.key) in *out. Returns MR_OK or MR_EINVAL with err. */
mr_err prov_load_wildcard(const char *cert_path, const char *key_path, const char *base_domain,
                          prov_buf *out, char *err, size_t errlen);

/* ---- runner.c ---- */

/* Room for config:get of MR_APPENV_MANAGED: PROV_MAX_ENV + 4 names of at most
 * 255 characters, comma-separated. */
#define PROV_OUT_MAX 69632

typedef struct {
    int status;                 /* exit status; 128+N when killed by signal N; -1 not started */
    int timed_out;              /* the deadline passed and the process group was killed */
    int lock_retries;           /* deploy-lock contentions retried */
    char out[PROV_OUT_MAX];     /* stdout (truncated), NUL-terminated; never logged */
    size_t out_len;
    char err[PROV_OUT_MAX];     /* stderr (truncated), NUL-terminated; never logged */
    size_t err_len;
} prov_result;

/* A result for prov_dokku, empty; NULL when out of memory. prov_result_free wipes
 * what its last command wrote (Dokku's output may hold secrets: config:import
 * echoes the values it sets) and frees it; prov_dokku wipes it before each command. */
prov_result *prov_result_new(void);
void prov_result_free(prov_result *res);

/* Runs `dokku <args...>` (args NULL-terminated; args[0] is the subcommand,
 * or a global flag such as "--force" followed by it) per cfg->mode, with in
 * (in_len bytes; NULL: /dev/null) on its stdin, a deadline of timeout_ms but
 * never past deadline_ms (absolute, mr_now_ms(); 0 for none), retrying
 * deploy-lock contention with backoff within it. lock_fd is the instance's
 * lock (prov_lock; -1 for none): a keeper process holds a copy of it until
 * the command has ended, even if this process dies first (runner.c); the
 * caller keeps and releases its own. Fills *res (caller-owned).
 * Returns MR_OK when the command ran to an exit status (any status: the
 * caller decides what it means), MR_ETRANSIENT when it could not be started
 * or timed out, with err filled. Arguments containing '=' are logged as
 * "KEY=..." without their value; stdin is never logged. In dry-run mode
 * nothing is spawned: the command is logged and answered by a simulated
 * registry under cfg->state_dir/dry-run. */
mr_err prov_dokku(const prov_config *cfg, const char *const *args, const unsigned char *in,
                  size_t in_len, int64_t timeout_ms, int64_t deadline_ms, int lock_fd,
                  prov_result *res, char *err, size_t errlen);
/* The subcommand of an argv (skips leading "--flags"), for messages. */
const char *prov_subcommand(const char *const *args);
/* 1 when a finished command's output reports Dokku's deploy lock held by another deploy. */
int prov_lock_contended(const prov_result *res);
/* Checks PROVISIONER_CHILD_ENV (names separated by ','). Returns MR_OK or MR_EINVAL. */
mr_err prov_check_child_env(const char *names, char *err, size_t errlen);

/* ---- state.c ---- */

/* Creates the state directory (0700) when missing, and its subdirectories;
 * refuses one that is a symlink, not a directory, not owned by this process's
 * user, or writable by group or others; makes fingerprints that older versions
 * kept in apps/<app>.spec records. Returns MR_OK or MR_EINVAL with err. */
mr_err prov_state_init(const prov_config *cfg, char *err, size_t errlen);
/* A record of the state directory (the fingerprints, the dry-run registry;
 * state.c says why no file a record): the entry `name` of the directory `dir`
 * ("apps", "dry-run/apps"), one line "<name> <value>" in the bucket file
 * dir/<xx> its name hashes to, read and changed under the bucket's flock. With
 * set NULL, only reads; with set "", removes the entry; else sets its value to
 * set (neither may hold a space or a newline). Copies the value it had into
 * state (cap bytes; "" if none). Returns 1 when the entry existed, 0 when not,
 * -1 when the bucket cannot be read or written (a symlink, not a file of ours,
 * an I/O error). */
int prov_state_record(const prov_config *cfg, const char *dir, const char *name,
                      const char *set, char *state, size_t cap);
/* Takes the exclusive lock of an instance (an OFD lock on its byte of
 * locks/instances), waiting up to cfg->app_lock_wait_ms. Returns MR_OK with *fd
 * (release with prov_unlock; the lock lasts while any copy of it is open: pass
 * it to prov_dokku), MR_ETRANSIENT when another request holds it, or a command
 * started under it still runs, MR_EINTERNAL when the lock file cannot be
 * opened safely or locked. */
mr_err prov_lock(const prov_config *cfg, const char *app, int *fd, char *err, size_t errlen);
void prov_unlock(int fd);

/* ---- ops.c ---- */

typedef enum { PROV_STORAGE_UNKNOWN = 0, PROV_STORAGE_MISSING, PROV_STORAGE_PRESENT } prov_storage;

typedef struct {
    int status;                 /* HTTP status to answer: 200 or 201 */
    const char *state;          /* "running", "stopped", "created", "destroyed" */
    const char *app_state;      /* MindRoom's app: those, or "missing" */
    const char *hs_state;       /* the homeserver's app: those, or "missing" */
    prov_storage storage, hs_storage; /* the two entries, when this request looked */
    int existed;                /* an app of the instance existed before this request */
    int deployed;               /* git:from-image deployed a change in this request */
    int restarted;              /* an app was rebuilt from its committed image (a changed
                                 * spec, or a deploy that never completed) */
    int all_restarted;          /* every app of the instance got new processes in this
                                 * request (deployed, rebuilt, or started from stopped) */
    int purged;                 /* storage entries were destroyed by this request */
    /* On failure: the status and error code to answer with (502 dokku_failed,
     * 504 dokku_timeout, 503 dokku_unavailable or app_busy, 404 not_found,
     * 409 apps_exist...). */
    int fail_status;
    const char *fail_code;
    int64_t deadline_ms;        /* the request's end (mr_now_ms()); no command runs past it */
} prov_outcome;

/* Creates or updates an instance to match spec, resuming a half-created one.
 * Returns MR_OK with *out filled, or an error with out->fail_status,
 * out->fail_code and err ("<subcommand> exited <status>") set. */
mr_err prov_apply(const prov_config *cfg, const prov_spec *spec, prov_outcome *out,
                  char *err, size_t errlen);

typedef enum {
    PROV_STOP, PROV_START, PROV_STATE,
    PROV_RESTART,               /* ps:restart of both apps (the homeserver first) */
    PROV_DESTROY,               /* both apps and the network; storage kept */
    PROV_PURGE,                 /* PROV_DESTROY, then the storage */
    PROV_DESTROY_STORAGE        /* the storage of an instance whose apps are gone */
} prov_verb;

/* Runs verb on the instance of app. A missing instance: MR_ENOTFOUND for
 * stop, start, restart and state (start and restart also when an app was never
 * deployed: fail_code not_deployed); destroy and purge succeed with existed = 0.
 * Errors as prov_apply. */
mr_err prov_app_action(const prov_config *cfg, const char *app, prov_verb verb,
                       prov_outcome *out, char *err, size_t errlen);

#endif
