/* mr_sd.h: the two parts of systemd's service protocol the processes speak.
 *
 *   socket activation   a listening socket passed as fd 3 with LISTEN_PID (our
 *                       pid) and LISTEN_FDS=1, as sd_listen_fds(3) describes; the
 *                       runtime serves it instead of binding its own.
 *   notification        "READY=1", "STOPPING=1", "STATUS=..." datagrams to
 *                       $NOTIFY_SOCKET, as sd_notify(3) describes, for Type=notify
 *                       units.
 *
 * Hand-written rather than linked from libsystemd: each is a few lines of
 * documented, stable protocol, and the binaries then need no systemd library (the
 * local stack and the tests run without systemd). Outside systemd (no variables)
 * both are no-ops. */
#ifndef MR_SD_H
#define MR_SD_H

#include <stddef.h>

/* The socket systemd passed, checked to be a listening stream socket and made
 * close-on-exec; the LISTEN_* variables are then removed from the environment so
 * no child sees them. Returns the fd (3), -1 when none was passed to this process
 * (no variables, or LISTEN_PID names another), or -2 with err filled when what was
 * passed is not one listening stream socket. */
int mr_sd_listen_fd(char *err, size_t errlen);

/* Takes $NOTIFY_SOCKET for this process and removes it from the environment, so
 * that children (workers, programs they start) never speak for the service. Call
 * once in the main process before forking. */
void mr_sd_init(void);

/* Sends state ("READY=1", "STOPPING=1", "STATUS=...", newline-separated) to the
 * socket mr_sd_init took. Returns 1 when sent, 0 when there is no socket, -1 on
 * a send error (the caller carries on: notification is advisory). */
int mr_sd_notify(const char *state);

#endif
