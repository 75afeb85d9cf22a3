/* wake.c: one claim a wake-up on each host, however many processes were woken.
 *
 * Every worker process LISTENs on a connection of its own (a process busy with a
 * step finds what was notified meanwhile when it is done), so one notification
 * wakes every idle process, and a due time read from a claim wakes every process
 * that read it. Were each to claim, a host of N processes would make N claims for
 * one instance, N - 1 of them finding nothing after waiting for the claim lock the
 * others hold (docs/benchmarks.md, "Where an event's time goes").
 *
 * So a wake-up is a *need*: a claim that begins at or after its time must run
 * (CLOCK_MONOTONIC, one clock for the processes of a host). A notification's time
 * is when it was read (its commit was visible before it was sent); a due time's is
 * that time; a sibling's wake and going on after a step are "now". The processes
 * share, in memory mapped before the fork:
 *   scout    the pid of the one process claiming for needs, or 0;
 *   started  when the latest claim began;
 *   wanted   the latest need a process left to the scout (it was claiming): the
 *            scout claims again before it lets go while wanted is later than its
 *            claim's start, and looks once more after letting go. Each side writes
 *            its word and then reads the other's, all sequentially consistent, so
 *            one of them sees the other: no need is left unclaimed;
 *   due      when the last claim that found nothing said work falls due (its
 *            processes' shared timer).
 * A need that a claim begun at or after it answers costs nothing more. A claim
 * that takes a step and says more is due (or saw a need arrive) wakes one more
 * process through an eventfd: one read takes its whole count, so however many
 * wakes were written, one process takes them (a process busy with steps takes
 * them when it is done, and the claim it then makes wakes the next if more is
 * due). So due instances are still worked on at once, one a process. The token only hastens work: every due row is notified
 * or timed, and a process claims again after its steps.
 *
 * A scout that dies holding the word (SIGKILL) is replaced by the next process that
 * finds it held (kill(pid, 0) fails with ESRCH). Other hosts' processes are woken
 * by the same notification: each host claims once for it.
 *
 * Hand-written because the rule is this worker's own; the pieces are C11 atomics
 * on shared memory and an eventfd (both lock-free: no process can block another). */
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "worker.h"

_Static_assert(ATOMIC_INT_LOCK_FREE == 2 && ATOMIC_LLONG_LOCK_FREE == 2,
               "the words processes share must be lock-free");

/* A claim that found due work held by another transaction (an edge's, an
 * operator's psql) says it is due now: ask again after this long (or when a
 * commit notifies), not at once, so that a lock held for seconds is not met by
 * thousands of claims, each taking the claim lock every worker shares. */
#define HELD_RETRY_MS 50

typedef struct {
    atomic_int scout;
    atomic_llong started;
    atomic_llong wanted;
    atomic_llong due;
} shared;

static shared *g;
static int g_poke = -1;

mr_err wake_init(char *err, size_t errlen)
{
    void *m = mmap(NULL, sizeof *g, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return mr_seterr(err, errlen, MR_EINTERNAL, "mmap: %s", strerror(errno));
    g = m; /* zeroed */
    g_poke = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (g_poke < 0)
        return mr_seterr(err, errlen, MR_EINTERNAL, "eventfd: %s", strerror(errno));
    return MR_OK;
}

int wake_pokefd(void)
{
    return g_poke;
}

int wake_take_poke(void)
{
    uint64_t v;
    return read(g_poke, &v, sizeof v) == (ssize_t)sizeof v;
}

/* Wakes one more process (a wake already waiting is the same wake). */
static void poke(void)
{
    uint64_t one = 1;
    if (wcfg.workers > 1 && write(g_poke, &one, sizeof one) < 0)
        mr_log(MR_LOG_WARN, "waking another worker process: %s", strerror(errno));
}

static void raise_to(atomic_llong *a, long long v)
{
    long long cur = atomic_load(a);
    while (cur < v && !atomic_compare_exchange_weak(a, &cur, v))
        ;
}

/* Becomes the scout: 1, or 0 when a live process is. */
static int take_scout(int me)
{
    int held = 0;
    if (atomic_compare_exchange_strong(&g->scout, &held, me))
        return 1;
    if (held != me && kill(held, 0) < 0 && errno == ESRCH &&
        atomic_compare_exchange_strong(&g->scout, &held, me)) {
        mr_log(MR_LOG_WARN, "process %d died while claiming; process %d claims instead", held, me);
        return 1;
    }
    return 0;
}

mr_err wake_claim(worker *w, int64_t need, claim_outcome *outcome, char *err, size_t errlen)
{
    int me = (int)getpid();
    *outcome = CLAIM_ANSWERED;
    if (atomic_load(&g->started) >= need)
        return MR_OK; /* a claim begun since answers it */
    raise_to(&g->wanted, need);
    if (!take_scout(me))
        return MR_OK; /* the scout claims again for it */
    for (;;) {
        long long start = mr_now_ns();
        atomic_store(&g->started, start);
        cJSON *claimed = NULL;
        int64_t due_ms;
        int more;
        mr_err e = steps_claim(w, &claimed, outcome, &due_ms, &more, err, errlen);
        if (e != MR_OK) {
            /* The needs left to this claim are met by this process's retry, after
             * its backoff, or by the next wake-up. */
            atomic_store(&g->scout, 0);
            return e;
        }
        if (*outcome == CLAIM_DONE) {
            atomic_store(&g->scout, 0);
            if (more || atomic_load(&g->wanted) > start)
                poke();
            return steps_run(w, claimed, err, errlen);
        }
        long long due = 0;
        if (*outcome == CLAIM_NONE && due_ms >= 0)
            due = mr_now_ns() + (due_ms < HELD_RETRY_MS ? HELD_RETRY_MS : due_ms) * 1000000LL;
        atomic_store(&g->due, due);
        if (atomic_load(&g->wanted) > start)
            continue; /* woken since this claim began: once more */
        atomic_store(&g->scout, 0);
        if (atomic_load(&g->wanted) <= start || !take_scout(me))
            return MR_OK;
    }
}

void wake_next(long poll_ms, int64_t *at, int64_t *wake_at)
{
    long long s = atomic_load(&g->started), d = atomic_load(&g->due);
    *at = s + poll_ms * 1000000LL;
    if (d > s && d < *at)
        *at = d;
    /* Passed and not yet claimed for: the scout is claiming and claims again
     * (wanted). Look shortly, for the same need, rather than spin. */
    long long now = mr_now_ns();
    *wake_at = *at > now ? *at : now + HELD_RETRY_MS * 1000000LL;
}
