/* mr_proc.h: a supervisor for N identical child processes.
 *
 * The FastCGI runtime's pre-forked workers and the lifecycle worker's processes
 * share one process model: the parent forks N children and then only supervises
 * them. It respawns a child that dies (one that dies within a second of its start
 * is respawned a second later, so a crash loop cannot spin), and on SIGTERM or
 * SIGINT it forwards SIGTERM to every child, re-sending it every second (a child
 * may have been between its stop check and a blocking call), and returns once
 * all have exited. Children get PR_SET_PDEATHSIG=SIGTERM, so none outlives the
 * parent. Under systemd (Type=notify) the parent says READY=1 once every child has
 * been started and STOPPING=1 when the drain begins (mr_sd.h). */
#ifndef MR_PROC_H
#define MR_PROC_H

/* Runs n (1..256) children, each calling child(arg) and exiting with its return
 * value. Blocks SIGTERM, SIGINT and SIGCHLD in the caller (the parent takes them
 * with sigtimedwait); a child starts with them still blocked and sets its own
 * mask. Returns 0 after a clean stop. */
int mr_proc_supervise(int n, int (*child)(void *arg), void *arg);

/* Blocks the signals mr_proc_supervise takes, now: a stop that arrives before it
 * runs stays pending and is taken by it, instead of killing a process that has
 * something to clean up, or reaching a handler a library installed meanwhile
 * (libfcgi's FCGX_Init sets one for SIGTERM that only raises a flag, so the stop
 * would be lost and the process run on until killed). */
void mr_proc_hold_signals(void);

#define MR_PROC_MAX 256

#endif
