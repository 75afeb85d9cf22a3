/* mr_provisioner.h: the client of the Dokku provisioner (DOKKU_PROVISIONER_URL),
 * as the lifecycle worker calls it.
 *
 *   POST   /apps               create or update an instance to match a spec (idempotent)
 *   POST   /apps/{app}/start   start a stopped instance
 *   POST   /apps/{app}/restart restart both apps of a running instance (storage kept)
 *   POST   /apps/{app}/stop    stop it (a missing app counts as stopped)
 *   DELETE /apps/{app}         destroy its apps, keep its storage (?purge=true: the
 *                              storage too); a missing app counts as destroyed
 *   DELETE /apps/{app}/storage destroy a destroyed instance's storage
 *
 * Every call has a connect deadline and a total deadline, carries the bearer token
 * only in its Authorization header, and may be aborted by the caller (a stopping
 * worker). An answer is classified for the lifecycle: ok, rejected (a 4xx that
 * retrying unchanged cannot fix) or failed (anything else: retried with backoff).
 *
 * A call connects only to an address the provisioners' rule allows (mr_addr.h:
 * loopback and private networks, where provisioners live, and public addresses;
 * never a link-local, multicast, unspecified or reserved one, where a cloud's
 * metadata service would take the bearer token and the instance's secrets). The
 * rule is checked on what the URL's host resolves to, at connect time; a call
 * refused by it is sent nowhere and reads as unanswered (MR_HTTPC_NO_ANSWER), with
 * the address and why in its error. */
#ifndef MR_PROVISIONER_H
#define MR_PROVISIONER_H

#include <cjson/cJSON.h>
#include "mr_action.h"
#include "mr_common.h"
#include "mr_httpc.h"

typedef struct {
    const char *url;          /* DOKKU_PROVISIONER_URL; a trailing slash is ignored */
    const char *token;        /* DOKKU_PROVISIONER_TOKEN */
    long timeout_ms;          /* one call, total */
    long connect_timeout_ms;
    int (*abort_cb)(void *);  /* may be NULL; see mr_httpc_req */
    void *abort_arg;
} mr_provisioner;

typedef struct {
    int ok;             /* 2xx (or a missing app where that means done) */
    int rejected;       /* 4xx: the provisioner refused the input; not retried blindly */
    mr_httpc_outcome outcome; /* whether the provisioner answered (MR_HTTPC_ABORTED: the
                                 caller's abort_cb stopped the call); MR_HTTPC_UNSENT
                                 for a call refused before it was sent */
    long status;        /* HTTP status, 0 when no answer */
    int host_unreachable; /* it answered that it could not reach its Dokku host
                             (503 dokku_unreachable) */
    char error[256];    /* why, when !ok: safe to store and show (no token, no body dump) */
    char backend_url[512], frontend_url[512], matrix_server_url[512];
    char matrix_server_name[256]; /* the homeserver's server_name, when it has one */
    int purged;         /* a destroy removed the storage too */
    int all_restarted;  /* POST /apps gave every app of the instance new processes
                           (its "all_restarted": true); 0 when it did not say so */
    int dry_run;        /* 1: the provisioner ran nothing (its "dry_run": true), 0: it
                           ran Dokku, -1: its answer did not say */
} mr_provisioner_call;

/* Checks a provisioner URL an operator gives (DOKKU_PROVISIONER_URL, a target's
 * URL) against the rule above where its host is an address literal, so that it is
 * refused when given rather than at each call. Returns MR_OK (a name, or an allowed
 * address) or MR_EINVAL with why filled. */
mr_err mr_provisioner_check_url(const char *url, char *why, size_t whylen);

/* POST /apps with payload (the step's payload object). */
void mr_provisioner_apply(mr_httpc *http, const mr_provisioner *p, const cJSON *payload,
                          mr_provisioner_call *out);

/* The route of an owed action on an existing instance: MR_ACTION_START -> POST
 * /apps/{app}/start, MR_ACTION_RESTART -> POST /apps/{app}/restart, MR_ACTION_STOP
 * -> POST /apps/{app}/stop, MR_ACTION_DESTROY ->
 * DELETE /apps/{app} (with ?purge=true when purge), MR_ACTION_DESTROY_STORAGE ->
 * DELETE /apps/{app}/storage; any other action is rejected unsent. A 404 for stop
 * or destroy is success (the app is gone); for start and restart it is a failure
 * with status 404 (the caller creates the app again); app must be [a-z0-9-]
 * (instance_names()), anything else is rejected unsent. */
void mr_provisioner_app(mr_httpc *http, const mr_provisioner *p, const char *app,
                        mr_action action, int purge, mr_provisioner_call *out);

#endif
