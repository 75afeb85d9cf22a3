/* mr_log.h: one JSON object per line on stderr (nginx/systemd/docker collect it);
 * under systemd each line starts with its syslog priority ("<3>" error ... "<7>"
 * debug) so that journald records it (mr_log.c says when).
 *
 * Never pass a secret, a token, a request body or an env value to these. */
#ifndef MR_LOG_H
#define MR_LOG_H

#include <stdint.h>

typedef enum { MR_LOG_DEBUG, MR_LOG_INFO, MR_LOG_WARN, MR_LOG_ERROR } mr_log_level;

/* Sets the function name stamped on every line ("provision-instance") and
 * the minimum level (from MR_LOG_LEVEL at start-up), and looks whether stderr is
 * the journal (JOURNAL_STREAM). `name` must outlive logging. */
void mr_log_init(const char *name, mr_log_level min);

/* The name given to mr_log_init ("mindroom" before it). */
const char *mr_log_name(void);

/* Reads MR_LOG_LEVEL (debug, info, warn, error; default info) and calls
 * mr_log_init(name, level); another value prints why and exits 2. */
void mr_log_init_env(const char *name);

/* Logs {"time","level","function","pid","msg"} with msg formatted and JSON-escaped. */
void mr_log(mr_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Whether this process holds its info and debug lines to write several with one
 * write(2) (mr_log.c says when they are written); off by default. Turning it off
 * writes what is held. One thread only: the lines are held in one buffer. */
void mr_log_hold(int on);

/* Writes the held lines now: before the process waits for work, and before it
 * exits. */
void mr_log_flush(void);

/* The per-request access line: time, function, request_id, method, status,
 * duration_ms, role (NULL -> "none") and, when note is neither NULL nor "",
 * "note": what the handler did (escaped like msg). */
void mr_log_request(const char *request_id, const char *method, int status,
                    int64_t duration_ms, const char *role, const char *note);

#endif
