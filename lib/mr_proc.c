/* mr_proc.c: see mr_proc.h. */
#include "mr_proc.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mr_common.h"
#include "mr_log.h"
#include "mr_sd.h"

#define RESPAWN_MIN_UPTIME_MS 1000 /* a child dying younger than this is a crash loop */

typedef struct {
    pid_t pid;
    int64_t started_ms;
    int64_t respawn_at_ms; /* when pid == 0: earliest time to start it again */
} slot;

static void spawn(slot *s, int (*child)(void *), void *arg)
{
    pid_t parent = getpid();
    fflush(NULL); /* or buffered output would be written twice */
    pid_t pid = fork();
    if (pid == 0) {
        /* Die with the supervisor rather than run on as an orphan nobody reaps. */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(0);
        signal(SIGCHLD, SIG_DFL);
        int st = child(arg);
        fflush(NULL);
        exit(st);
    }
    if (pid < 0) {
        mr_log(MR_LOG_ERROR, "fork failed: %s", strerror(errno));
        s->pid = 0;
        s->respawn_at_ms = mr_now_ms() + RESPAWN_MIN_UPTIME_MS;
        return;
    }
    s->pid = pid;
    s->started_ms = mr_now_ms();
}

static void signal_all(slot *slots, int n, int sig)
{
    for (int i = 0; i < n; i++)
        if (slots[i].pid > 0)
            kill(slots[i].pid, sig);
}

/* Reaps every exited child; returns how many are still alive. */
static int reap(slot *slots, int n, int stopping)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < n; i++) {
            if (slots[i].pid != pid)
                continue;
            slots[i].pid = 0;
            if (stopping)
                break;
            int64_t now = mr_now_ms();
            int young = now - slots[i].started_ms < RESPAWN_MIN_UPTIME_MS;
            slots[i].respawn_at_ms = young ? now + RESPAWN_MIN_UPTIME_MS : now;
            if (WIFSIGNALED(status))
                mr_log(MR_LOG_WARN, "worker %d killed by signal %d; respawning", (int)pid,
                       WTERMSIG(status));
            else
                mr_log(MR_LOG_WARN, "worker %d exited with status %d; respawning", (int)pid,
                       WEXITSTATUS(status));
            break;
        }
    }
    int alive = 0;
    for (int i = 0; i < n; i++)
        alive += slots[i].pid > 0;
    return alive;
}

static void supervisor_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGCHLD);
}

void mr_proc_hold_signals(void)
{
    sigset_t set;
    supervisor_signals(&set);
    sigprocmask(SIG_BLOCK, &set, NULL);
}

int mr_proc_supervise(int n, int (*child)(void *arg), void *arg)
{
    slot slots[MR_PROC_MAX];
    if (n < 1 || n > MR_PROC_MAX)
        return 2;
    memset(slots, 0, sizeof(slots));
    sigset_t set;
    supervisor_signals(&set);
    sigprocmask(SIG_BLOCK, &set, NULL);
    mr_sd_init(); /* the children never speak for the service */

    int stopping = 0, ready = 0;
    int64_t last_kick = 0;
    for (;;) {
        int alive = reap(slots, n, stopping);
        int64_t now = mr_now_ms();
        int64_t wait_ms = 1000;
        if (!stopping) {
            for (int i = 0; i < n; i++) {
                if (slots[i].pid != 0)
                    continue;
                if (now >= slots[i].respawn_at_ms)
                    spawn(&slots[i], child, arg);
                else if (slots[i].respawn_at_ms - now < wait_ms)
                    wait_ms = slots[i].respawn_at_ms - now;
            }
            if (!ready) {
                /* The listening socket (a function's) exists before this is called,
                 * and every child has been started: a Type=notify unit is up. */
                mr_sd_notify("READY=1");
                ready = 1;
            }
        } else {
            if (alive == 0)
                break;
            if (now - last_kick >= 1000) {
                signal_all(slots, n, SIGTERM);
                last_kick = now;
            }
        }
        struct timespec ts = {.tv_sec = wait_ms / 1000, .tv_nsec = (wait_ms % 1000) * 1000000};
        int sig = sigtimedwait(&set, NULL, &ts);
        if ((sig == SIGTERM || sig == SIGINT) && !stopping) {
            stopping = 1;
            mr_sd_notify("STOPPING=1");
            mr_log(MR_LOG_INFO, "stopping: draining %d workers", reap(slots, n, 1));
            signal_all(slots, n, SIGTERM);
            last_kick = mr_now_ms();
        }
    }
    mr_log(MR_LOG_INFO, "stopped");
    return 0;
}
