/* mr_deadlines.h: the deadline table, one place for every default.
 *
 * A slow call is always waited on by someone with a longer deadline; each row
 * below must end before the row that waits for it (docs/deadlines.md draws the
 * chain). The programs read these as the defaults of their settings and refuse
 * to start with settings that break the nesting they can see; nginx's
 * fastcgi_read_timeout values live in the nginx configurations and a test holds them against
 * the MR_DL_NGINX_* rows here.
 *
 *   provisioner:  one dokku command        <  one provisioner request (all its
 *                 commands, after waiting for the app's lock)
 *                 < nginx's read timeout on the provisioner listener
 *   worker:       < its call to the provisioner (so the provisioner's own answer,
 *                 even nginx's 504, arrives first)
 *                 < the lease on the instance (so nobody takes over a step that
 *                 is still running), with room to record the outcome
 *   edges:        "wait": true  < nginx's read timeout for provision/deprovision
 *   webhook:      a batch of deliveries (each statement, then each again alone
 *                 after a failed batch), then a connection left for after it
 *                 < nginx's read timeout for the webhook
 *   tenant edges: a statement   < nginx's read timeout for track-usage, my-instance
 *   health:       one probe round < nginx's read timeout for check-instance-health
 *   stopping:     a worker's stop grace < systemd's TimeoutStopSec */
#ifndef MR_DEADLINES_H
#define MR_DEADLINES_H

/* The runtime: how long an accepted connection may take to deliver its whole
 * request (FastCGI params and body; nginx sends it at once, having buffered it)
 * before it is dropped, and the deadline of each write of an answer
 * (MR_READ_TIMEOUT_MS). */
#define MR_DL_FCGI_READ_MS 5000

/* PostgreSQL: any one statement (MR_DB_STATEMENT_TIMEOUT_MS); and how much longer
 * than its timeout a statement's answer is waited for before the connection is
 * dropped (a server that does not answer at all: lib/mr_db.c). */
#define MR_DL_DB_STATEMENT_MS 5000
#define MR_DL_DB_ANSWER_SLACK_MS 2000

/* The provisioner (DOKKU_COMMAND_TIMEOUT_MS, DOKKU_DEPLOY_TIMEOUT_MS,
 * PROVISIONER_APP_LOCK_WAIT_MS, PROVISIONER_REQUEST_TIMEOUT_MS). */
#define MR_DL_DOKKU_COMMAND_MS 60000
#define MR_DL_DOKKU_DEPLOY_MS 480000
#define MR_DL_PROVISIONER_APP_LOCK_MS 30000
#define MR_DL_PROVISIONER_REQUEST_MS 540000
/* nginx: fastcgi_read_timeout of the provisioner listener, seconds. */
#define MR_DL_NGINX_PROVISIONER_S 600

/* The lifecycle worker: one provisioner call (MR_PROVISION_TIMEOUT_MS), its
 * connect (MR_PROVISION_CONNECT_TIMEOUT_MS), one Resend call
 * (MR_RESEND_TIMEOUT_MS), the lease (MR_LIFECYCLE_LEASE_S), and how long a
 * stopping worker lets a step run before it aborts and releases it
 * (MR_LIFECYCLE_STOP_GRACE_MS). */
#define MR_DL_PROVISION_CALL_MS 610000
#define MR_DL_PROVISION_CONNECT_MS 2000
#define MR_DL_RESEND_MS 10000
/* A Resend call that got no answer: the worker's process calls Resend again only
 * after this many of its deadlines (the welcome emails due meanwhile wait). */
#define MR_DL_RESEND_QUIET_FACTOR 6
#define MR_DL_LIFECYCLE_LEASE_S 660
#define MR_DL_LIFECYCLE_STOP_GRACE_MS 20000
/* Room the lease leaves for recording a step's outcome (retries included). */
#define MR_DL_RECORD_MARGIN_MS 10000

/* provision-instance / deprovision-instance: "wait": true (MR_PROVISION_WAIT_MS)
 * and nginx's fastcgi_read_timeout for them, seconds. */
#define MR_DL_WAIT_MS 870000
#define MR_DL_NGINX_LIFECYCLE_S 900

/* The webhook: nginx's fastcgi_read_timeout, seconds; and how many deliveries
 * that arrive together share a transaction at most. A delivery's worst case when
 * no attempt is retried is its batch's statements each at the statement timeout,
 * then each again alone after the batch failed, then its own read if it was left
 * for after the batch: 2 x MR_DL_WEBHOOK_BATCH x MR_DL_DB_STATEMENT_MS +
 * MR_DL_FCGI_READ_MS, under nginx's timeout. Retries (a deadlock, a serialization
 * failure, a lost connection) add to it; what a 504 then costs: docs/deadlines.md. */
#define MR_DL_NGINX_WEBHOOK_S 60
#define MR_DL_WEBHOOK_BATCH 4

/* track-usage and my-instance (each request: one or two statements): nginx's
 * fastcgi_read_timeout, seconds. */
#define MR_DL_NGINX_TENANT_S 30

/* Health: one probe (HEALTH_TIMEOUT_MS), a round's probing (HEALTH_ROUND_MS: no
 * instance's probes start later than two probes' deadlines before its end; the rest
 * of nginx's timeout is the recording's) and nginx's fastcgi_read_timeout for
 * check-instance-health, seconds. */
#define MR_DL_HEALTH_PROBE_MS 5000
#define MR_DL_HEALTH_ROUND_MS 120000
#define MR_DL_NGINX_HEALTH_S 300

/* systemd's TimeoutStopSec for the worker's unit, seconds: longer than the stop
 * grace plus recording. */
#define MR_DL_WORKER_STOP_S 60

#endif
