/* mr_metrics.c: see mr_metrics.h.
 *
 * A segment is one fixed struct; its layout number changes whenever the struct
 * does, and a reader skips segments of another layout or size (an old process
 * still draining during an upgrade). The file is complete before it appears under
 * its name (rename), so a reader never sees a half-initialised one. */
#include "mr_metrics.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "mr_version.h"

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "shared counters need lock-free 64-bit atomics");

#define SEG_MAGIC 0x314d524du /* "MRM1" */
#define SEG_LAYOUT 6
#define DB_CLASSES (36 * 36)  /* a SQLSTATE class is two characters of [0-9A-Z] */

typedef _Atomic uint64_t counter;

/* Request durations: upper bounds in microseconds and their labels, up to the
 * longest wait a function may have (provision-instance's "wait": true). */
static const int64_t req_bounds[] = {1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000,
                                     500000, 1000000, 2500000, 5000000, 10000000, 30000000,
                                     60000000, 300000000, 900000000};
static const char *const req_le[] = {"0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
                                     "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "300", "900"};
#define REQ_BUCKETS (sizeof req_bounds / sizeof req_bounds[0])

/* Provisioner calls: a quick stop to a deploy near its deadline. */
static const int64_t prov_bounds[] = {100000, 500000, 1000000, 5000000, 10000000, 30000000,
                                      60000000, 120000000, 300000000, 600000000, 900000000};
static const char *const prov_le[] = {"0.1", "0.5", "1", "5", "10", "30", "60", "120", "300",
                                      "600", "900"};
#define PROV_BUCKETS (sizeof prov_bounds / sizeof prov_bounds[0])

/* The label values of the Stripe family: a bounded set (the types the webhook
 * handles, those of SQL's stripe_event_kind, which test_contracts.py holds this
 * list to; any other type is "other"), so an unexpected stream of event types
 * cannot grow the exposition without bound. */
static const char *const stripe_types[] = {
    "checkout.session.completed", "customer.subscription.created",
    "customer.subscription.updated", "customer.subscription.deleted",
    "customer.subscription.paused", "customer.subscription.resumed",
    "invoice.paid", "invoice.payment_failed", "customer.deleted", "charge.refunded",
    "charge.dispute.created", "charge.dispute.closed", "other", "unknown"};
#define STRIPE_TYPES (sizeof stripe_types / sizeof stripe_types[0])
static const char *const stripe_outcomes[] = {"processed", "duplicate", "ignored", "stale",
                                              "failed", "deferred", "refused", "invalid",
                                              "error"};
#define STRIPE_OUTCOMES (sizeof stripe_outcomes / sizeof stripe_outcomes[0])

/* The provisioner's routes, as its API names them. */
static const char *const prov_routes[MR_PROV_ROUTES] = {
    "POST /apps", "POST /apps/{app}/start", "POST /apps/{app}/stop", "DELETE /apps/{app}",
    "DELETE /apps/{app}/storage", "POST /apps/{app}/restart"};
static const char *const prov_outcomes[MR_PROV_OUTCOMES] = {"ok", "rejected", "failed", "aborted"};
static const char *const health_results[] = {"healthy", "unhealthy", "unreachable"};
static const char *const claim_outcomes[MR_CLAIM_OUTCOMES] = {"claimed", "none", "full"};

typedef struct {
    uint32_t magic, layout, size, kind;
    int32_t pid;
    int32_t pad;
    int64_t started_s;
    char name[64];
    char version[64];
    counter requests[5]; /* by status class, 1xx..5xx */
    counter req_bucket[REQ_BUCKETS + 1];
    counter req_sum_us;
    counter dropped;
    counter db_errors[DB_CLASSES];
    counter stripe[STRIPE_TYPES][STRIPE_OUTCOMES];
    counter prov[MR_PROV_ROUTES][MR_PROV_OUTCOMES];
    counter prov_bucket[MR_PROV_ROUTES][PROV_BUCKETS + 1];
    counter prov_sum_us[MR_PROV_ROUTES];
    counter health[3];
    counter health_marked;
    counter health_rounds;
    counter claims[MR_CLAIM_OUTCOMES];
} seg;

/* ---- writing ----------------------------------------------------------- */

static seg *g_seg;
static int g_dirfd = -1;
static char g_file[80];
static dev_t g_dev;
static ino_t g_ino;

static int valid_name(const char *s)
{
    size_t n = 0;
    for (; s[n]; n++)
        if (n >= 63 || !((s[n] >= 'a' && s[n] <= 'z') || (s[n] >= '0' && s[n] <= '9') || s[n] == '-'))
            return 0;
    return n > 0;
}

static void seg_init(seg *s, const char *name, mr_metrics_kind kind)
{
    memset(s, 0, sizeof *s);
    s->layout = SEG_LAYOUT;
    s->size = sizeof *s;
    s->kind = (uint32_t)kind;
    s->pid = (int32_t)getpid();
    s->started_s = (int64_t)time(NULL);
    snprintf(s->name, sizeof s->name, "%s", name);
    snprintf(s->version, sizeof s->version, "%s", mr_version());
    s->magic = SEG_MAGIC;
}

mr_err mr_metrics_open(const char *name, mr_metrics_kind kind, char *err, size_t errlen)
{
    if (!name || !valid_name(name))
        return mr_seterr(err, errlen, MR_EINVAL, "metrics: bad process name");
    const char *dir = getenv("MR_METRICS_DIR");
    if (!dir || !*dir) {
        void *p = mmap(NULL, sizeof(seg), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return mr_seterr(err, errlen, MR_EINTERNAL, "metrics: mmap: %s", strerror(errno));
        g_seg = p;
        seg_init(g_seg, name, kind);
        return MR_OK;
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (dfd < 0 || fstat(dfd, &st) != 0) {
        if (dfd >= 0)
            close(dfd);
        return mr_seterr(err, errlen, MR_EINVAL, "MR_METRICS_DIR %s: %s (a directory, not a symlink)",
                         dir, strerror(errno));
    }
    /* Anyone able to write here could replace a segment with a file of their own
     * choosing for the exporter to read: the place must be the owner's and its
     * group's only (the units' is mindroom's, shared through its group). */
    if (st.st_mode & S_IWOTH) {
        close(dfd);
        return mr_seterr(err, errlen, MR_EINVAL, "MR_METRICS_DIR %s must not be writable by others",
                         dir);
    }
    char tmp[128];
    snprintf(g_file, sizeof g_file, "%s.metrics", name);
    snprintf(tmp, sizeof tmp, "%s.metrics.%ld.new", name, (long)getpid());
    (void)unlinkat(dfd, tmp, 0);
    int fd = openat(dfd, tmp, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0640);
    void *p = MAP_FAILED;
    /* 0640 whatever the umask: the exporter may read it through the group. */
    if (fd < 0 || fchmod(fd, 0640) != 0 || ftruncate(fd, (off_t)sizeof(seg)) != 0 ||
        (p = mmap(NULL, sizeof(seg), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
        int saved = errno;
        if (fd >= 0) {
            close(fd);
            unlinkat(dfd, tmp, 0);
        }
        close(dfd);
        return mr_seterr(err, errlen, MR_EINVAL, "MR_METRICS_DIR %s: cannot create %s: %s", dir,
                         g_file, strerror(saved));
    }
    seg_init(p, name, kind);
    if (fstat(fd, &st) != 0 || renameat(dfd, tmp, dfd, g_file) != 0) {
        int saved = errno;
        munmap(p, sizeof(seg));
        close(fd);
        unlinkat(dfd, tmp, 0);
        close(dfd);
        return mr_seterr(err, errlen, MR_EINVAL, "MR_METRICS_DIR %s: cannot place %s: %s", dir,
                         g_file, strerror(saved));
    }
    close(fd); /* the mapping stays */
    g_seg = p;
    g_dirfd = dfd;
    g_dev = st.st_dev;
    g_ino = st.st_ino;
    return MR_OK;
}

void mr_metrics_close(void)
{
    if (g_dirfd >= 0) {
        struct stat st;
        if (fstatat(g_dirfd, g_file, &st, AT_SYMLINK_NOFOLLOW) == 0 && st.st_dev == g_dev &&
            st.st_ino == g_ino)
            unlinkat(g_dirfd, g_file, 0);
        close(g_dirfd);
        g_dirfd = -1;
    }
    if (g_seg)
        munmap(g_seg, sizeof(seg));
    g_seg = NULL;
}

static inline void add(counter *c, uint64_t v)
{
    atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

static size_t bucket_of(const int64_t *bounds, size_t n, int64_t v)
{
    size_t i = 0;
    while (i < n && v > bounds[i])
        i++;
    return i;
}

void mr_metrics_request(int status, int64_t duration_us)
{
    if (!g_seg)
        return;
    int cls = status / 100;
    if (cls < 1 || cls > 5)
        cls = 5;
    if (duration_us < 0)
        duration_us = 0;
    add(&g_seg->requests[cls - 1], 1);
    add(&g_seg->req_bucket[bucket_of(req_bounds, REQ_BUCKETS, duration_us)], 1);
    add(&g_seg->req_sum_us, (uint64_t)duration_us);
}

void mr_metrics_dropped_connection(void)
{
    if (g_seg)
        add(&g_seg->dropped, 1);
}

static int class_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'Z')
        return c - 'A' + 10;
    return -1;
}

void mr_metrics_db_error(const char *sqlstate)
{
    if (!g_seg || !sqlstate)
        return;
    int a = class_digit(sqlstate[0]), b = a < 0 ? -1 : class_digit(sqlstate[1]);
    if (a < 0 || b < 0)
        a = class_digit('X'), b = class_digit('X'); /* not a SQLSTATE: internal_error's class */
    add(&g_seg->db_errors[a * 36 + b], 1);
}

static size_t index_of(const char *const *table, size_t n, const char *s, size_t fallback)
{
    for (size_t i = 0; s && i < n; i++)
        if (strcmp(table[i], s) == 0)
            return i;
    return fallback;
}

void mr_metrics_stripe_event(const char *type, const char *outcome)
{
    if (!g_seg)
        return;
    size_t t = type ? index_of(stripe_types, STRIPE_TYPES - 2, type, STRIPE_TYPES - 2)
                    : STRIPE_TYPES - 1;
    size_t o = index_of(stripe_outcomes, STRIPE_OUTCOMES, outcome, STRIPE_OUTCOMES - 1);
    add(&g_seg->stripe[t][o], 1);
}

void mr_metrics_provisioner_call(mr_metrics_prov_route route, mr_metrics_prov_outcome outcome,
                                 int64_t duration_us)
{
    if (!g_seg || route >= MR_PROV_ROUTES || outcome >= MR_PROV_OUTCOMES)
        return;
    if (duration_us < 0)
        duration_us = 0;
    add(&g_seg->prov[route][outcome], 1);
    add(&g_seg->prov_bucket[route][bucket_of(prov_bounds, PROV_BUCKETS, duration_us)], 1);
    add(&g_seg->prov_sum_us[route], (uint64_t)duration_us);
}

void mr_metrics_health_round(int healthy, int unhealthy, int unreachable, int marked_failed)
{
    if (!g_seg)
        return;
    add(&g_seg->health[0], (uint64_t)(healthy > 0 ? healthy : 0));
    add(&g_seg->health[1], (uint64_t)(unhealthy > 0 ? unhealthy : 0));
    add(&g_seg->health[2], (uint64_t)(unreachable > 0 ? unreachable : 0));
    add(&g_seg->health_marked, (uint64_t)(marked_failed > 0 ? marked_failed : 0));
    add(&g_seg->health_rounds, 1);
}

void mr_metrics_lifecycle_claim(mr_metrics_claim_outcome outcome)
{
    if (g_seg && outcome < MR_CLAIM_OUTCOMES)
        add(&g_seg->claims[outcome], 1);
}

/* ---- reading ----------------------------------------------------------- */

typedef struct {
    const seg *s;
    char name[64];
    int alive;
} view_entry;

struct mr_metrics_view {
    view_entry *e;
    size_t n;
};

static uint64_t get(const counter *c)
{
    return atomic_load_explicit(c, memory_order_relaxed);
}

static int valid_version(const char *s, size_t cap)
{
    size_t n = strnlen(s, cap);
    if (n == 0 || n == cap)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+-~_", s[i]))
            return 0;
    return 1;
}

/* Maps one directory entry when it is a segment this build can read; NULL otherwise. */
static const seg *map_segment(int dfd, const char *file)
{
    int fd = openat(dfd, file, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return NULL;
    struct stat st;
    const seg *s = NULL;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size == (off_t)sizeof(seg)) {
        void *p = mmap(NULL, sizeof(seg), PROT_READ, MAP_SHARED, fd, 0);
        if (p != MAP_FAILED)
            s = p;
    }
    close(fd);
    if (s && (s->magic != SEG_MAGIC || s->layout != SEG_LAYOUT || s->size != sizeof(seg) ||
              strnlen(s->name, sizeof s->name) == sizeof s->name || !valid_name(s->name) ||
              !valid_version(s->version, sizeof s->version))) {
        munmap((void *)s, sizeof(seg));
        s = NULL;
    }
    return s;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(((const view_entry *)a)->name, ((const view_entry *)b)->name);
}

mr_err mr_metrics_view_open(const char *dir, mr_metrics_view **out, char *err, size_t errlen)
{
    *out = NULL;
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!d) {
        int saved = errno;
        if (dfd >= 0)
            close(dfd);
        return mr_seterr(err, errlen, MR_EINVAL, "MR_METRICS_DIR %s: %s", dir, strerror(saved));
    }
    mr_metrics_view *v = calloc(1, sizeof *v);
    size_t cap = 0;
    struct dirent *de;
    while (v && (de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if (len <= 8 || strcmp(de->d_name + len - 8, ".metrics") != 0)
            continue;
        const seg *s = map_segment(dirfd(d), de->d_name);
        if (!s)
            continue;
        if (v->n == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            view_entry *ne = realloc(v->e, ncap * sizeof *ne);
            if (!ne) {
                munmap((void *)s, sizeof(seg));
                break;
            }
            v->e = ne;
            cap = ncap;
        }
        view_entry *e = &v->e[v->n++];
        e->s = s;
        memcpy(e->name, s->name, sizeof e->name);
        e->name[sizeof e->name - 1] = '\0';
        /* kill(pid, 0): EPERM means it exists under another user. */
        e->alive = s->pid > 0 && (kill((pid_t)s->pid, 0) == 0 || errno == EPERM);
    }
    closedir(d);
    if (!v)
        return mr_seterr(err, errlen, MR_EINTERNAL, "out of memory");
    if (v->n)
        qsort(v->e, v->n, sizeof *v->e, by_name);
    *out = v;
    return MR_OK;
}

void mr_metrics_view_close(mr_metrics_view *v)
{
    if (!v)
        return;
    for (size_t i = 0; i < v->n; i++)
        munmap((void *)v->e[i].s, sizeof(seg));
    free(v->e);
    free(v);
}

size_t mr_metrics_view_count(const mr_metrics_view *v)
{
    return v ? v->n : 0;
}

const char *mr_metrics_view_name(const mr_metrics_view *v, size_t i)
{
    return v && i < v->n ? v->e[i].name : NULL;
}

int mr_metrics_view_alive(const mr_metrics_view *v, size_t i)
{
    return v && i < v->n ? v->e[i].alive : 0;
}

void mr_metrics_label(FILE *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            fputc('\\', out), fputc(*s, out);
        else if (*s == '\n')
            fputs("\\n", out);
        else
            fputc(*s, out);
    }
}

static void family(FILE *out, const char *name, const char *type, const char *help)
{
    fprintf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* One histogram's samples: buckets[n+1] (counts per bucket, the last above every
 * bound), sum in microseconds. labels: the label text without braces. */
static void histogram(FILE *out, const char *name, const char *labels, const uint64_t *buckets,
                      const char *const *le, size_t n, uint64_t sum_us)
{
    uint64_t cum = 0;
    for (size_t i = 0; i <= n; i++) {
        cum += buckets[i];
        fprintf(out, "%s_bucket{%s,le=\"%s\"} %llu\n", name, labels, i < n ? le[i] : "+Inf",
                (unsigned long long)cum);
    }
    fprintf(out, "%s_sum{%s} %llu.%06llu\n", name, labels, (unsigned long long)(sum_us / 1000000),
            (unsigned long long)(sum_us % 1000000));
    fprintf(out, "%s_count{%s} %llu\n", name, labels, (unsigned long long)cum);
}

void mr_metrics_write(FILE *out, const mr_metrics_view *v)
{
    static const char *const classes[] = {"1xx", "2xx", "3xx", "4xx", "5xx"};
    size_t n = mr_metrics_view_count(v);
    char labels[128];

    family(out, "mindroom_build_info", "gauge", "The running processes' versions (value 1).");
    for (size_t i = 0; i < n; i++)
        if (v->e[i].alive)
            fprintf(out, "mindroom_build_info{function=\"%s\",version=\"%s\"} 1\n", v->e[i].name,
                    v->e[i].s->version);

    family(out, "mindroom_process_start_time_seconds", "gauge",
           "When each process group started, Unix seconds.");
    for (size_t i = 0; i < n; i++)
        if (v->e[i].alive)
            fprintf(out, "mindroom_process_start_time_seconds{function=\"%s\"} %lld\n",
                    v->e[i].name, (long long)v->e[i].s->started_s);

    family(out, "mindroom_http_requests_total", "counter",
           "Requests each function answered, by status class.");
    for (size_t i = 0; i < n; i++) {
        if (!v->e[i].alive || v->e[i].s->kind != MR_METRICS_FUNCTION)
            continue;
        for (size_t c = 0; c < 5; c++)
            fprintf(out, "mindroom_http_requests_total{function=\"%s\",code=\"%s\"} %llu\n",
                    v->e[i].name, classes[c], (unsigned long long)get(&v->e[i].s->requests[c]));
    }

    family(out, "mindroom_http_request_duration_seconds", "histogram",
           "Time from a request's arrival in a worker to its answer.");
    for (size_t i = 0; i < n; i++) {
        if (!v->e[i].alive || v->e[i].s->kind != MR_METRICS_FUNCTION)
            continue;
        uint64_t b[REQ_BUCKETS + 1];
        for (size_t k = 0; k <= REQ_BUCKETS; k++)
            b[k] = get(&v->e[i].s->req_bucket[k]);
        snprintf(labels, sizeof labels, "function=\"%s\"", v->e[i].name);
        histogram(out, "mindroom_http_request_duration_seconds", labels, b, req_le, REQ_BUCKETS,
                  get(&v->e[i].s->req_sum_us));
    }

    family(out, "mindroom_fastcgi_dropped_connections_total", "counter",
           "Connections dropped for sending no complete request within MR_READ_TIMEOUT_MS.");
    for (size_t i = 0; i < n; i++)
        if (v->e[i].alive && v->e[i].s->kind == MR_METRICS_FUNCTION)
            fprintf(out, "mindroom_fastcgi_dropped_connections_total{function=\"%s\"} %llu\n",
                    v->e[i].name, (unsigned long long)get(&v->e[i].s->dropped));

    family(out, "mindroom_db_errors_total", "counter",
           "Failed database statements and connections, by SQLSTATE class.");
    static const char digits[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    for (size_t i = 0; i < n; i++) {
        if (!v->e[i].alive)
            continue;
        for (size_t k = 0; k < DB_CLASSES; k++) {
            uint64_t c = get(&v->e[i].s->db_errors[k]);
            if (c)
                fprintf(out, "mindroom_db_errors_total{function=\"%s\",class=\"%c%c\"} %llu\n",
                        v->e[i].name, digits[k / 36], digits[k % 36], (unsigned long long)c);
        }
    }

    family(out, "mindroom_stripe_events_total", "counter",
           "Webhook deliveries, by event type and outcome.");
    for (size_t t = 0; t < STRIPE_TYPES; t++)
        for (size_t o = 0; o < STRIPE_OUTCOMES; o++) {
            uint64_t c = 0;
            for (size_t i = 0; i < n; i++)
                if (v->e[i].alive)
                    c += get(&v->e[i].s->stripe[t][o]);
            if (c)
                fprintf(out, "mindroom_stripe_events_total{type=\"%s\",outcome=\"%s\"} %llu\n",
                        stripe_types[t], stripe_outcomes[o], (unsigned long long)c);
        }

    family(out, "mindroom_provisioner_calls_total", "counter",
           "The lifecycle worker's provisioner calls, by route and outcome.");
    for (size_t r = 0; r < MR_PROV_ROUTES; r++)
        for (size_t o = 0; o < MR_PROV_OUTCOMES; o++) {
            uint64_t c = 0;
            for (size_t i = 0; i < n; i++)
                if (v->e[i].alive)
                    c += get(&v->e[i].s->prov[r][o]);
            if (c)
                fprintf(out, "mindroom_provisioner_calls_total{route=\"%s\",outcome=\"%s\"} %llu\n",
                        prov_routes[r], prov_outcomes[o], (unsigned long long)c);
        }

    family(out, "mindroom_provisioner_call_duration_seconds", "histogram",
           "How long the lifecycle worker's provisioner calls took, by route.");
    for (size_t r = 0; r < MR_PROV_ROUTES; r++) {
        uint64_t b[PROV_BUCKETS + 1] = {0}, sum_us = 0, total = 0;
        for (size_t i = 0; i < n; i++) {
            if (!v->e[i].alive)
                continue;
            for (size_t k = 0; k <= PROV_BUCKETS; k++) {
                uint64_t c = get(&v->e[i].s->prov_bucket[r][k]);
                b[k] += c;
                total += c;
            }
            sum_us += get(&v->e[i].s->prov_sum_us[r]);
        }
        if (!total)
            continue;
        snprintf(labels, sizeof labels, "route=\"%s\"", prov_routes[r]);
        histogram(out, "mindroom_provisioner_call_duration_seconds", labels, b, prov_le,
                  PROV_BUCKETS, sum_us);
    }

    /* Health: only the processes that ran a round (the worker, check-instance-health). */
    family(out, "mindroom_health_probes_total", "counter",
           "Health probe results, by the process that probed (rounds and operators' calls).");
    for (size_t i = 0; i < n; i++)
        if (v->e[i].alive && get(&v->e[i].s->health_rounds))
            for (size_t k = 0; k < 3; k++)
                fprintf(out, "mindroom_health_probes_total{function=\"%s\",result=\"%s\"} %llu\n",
                        v->e[i].name, health_results[k],
                        (unsigned long long)get(&v->e[i].s->health[k]));
    family(out, "mindroom_health_marked_failed_total", "counter",
           "Instances a health round marked failed (a redeploy becomes owed).");
    for (size_t i = 0; i < n; i++)
        if (v->e[i].alive && get(&v->e[i].s->health_rounds))
            fprintf(out, "mindroom_health_marked_failed_total{function=\"%s\"} %llu\n",
                    v->e[i].name, (unsigned long long)get(&v->e[i].s->health_marked));
    family(out, "mindroom_health_rounds_total", "counter", "Health rounds run.");
    for (size_t i = 0; i < n; i++)
        if (v->e[i].alive && get(&v->e[i].s->health_rounds))
            fprintf(out, "mindroom_health_rounds_total{function=\"%s\"} %llu\n", v->e[i].name,
                    (unsigned long long)get(&v->e[i].s->health_rounds));

    /* Claims: only the processes that made one (the lifecycle worker). */
    family(out, "mindroom_lifecycle_claims_total", "counter",
           "The lifecycle worker's claims, by what they answered.");
    for (size_t i = 0; i < n; i++) {
        if (!v->e[i].alive)
            continue;
        uint64_t any = 0;
        for (size_t k = 0; k < MR_CLAIM_OUTCOMES; k++)
            any += get(&v->e[i].s->claims[k]);
        for (size_t k = 0; any && k < MR_CLAIM_OUTCOMES; k++)
            fprintf(out, "mindroom_lifecycle_claims_total{function=\"%s\",outcome=\"%s\"} %llu\n",
                    v->e[i].name, claim_outcomes[k],
                    (unsigned long long)get(&v->e[i].s->claims[k]));
    }
}
