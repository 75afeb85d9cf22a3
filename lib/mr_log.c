/* mr_log.c: JSON lines on stderr.
 *
 * Each line is built in a stack buffer and written with one write(2), so lines
 * from several workers sharing stderr never interleave mid-line. A process that
 * asks for it (mr_log_hold: the webhook's batching workers) holds its info and
 * debug lines and writes them together, whole lines in one write(2) of at most
 * LINE_MAX_BYTES: when it is about to wait for a peer (mr_log_flush), when a
 * warning or an error comes (after them, in order), when no more fit, and when a
 * line comes and the oldest has waited HOLD_MAX_MS. A write to a file or the
 * journal's stream can wait, and a request's answer has gone out before its line
 * is logged: held, a burst costs a write per several requests instead of one each.
 * Lines held wait at most for the requests being served (their database round
 * trips); a crash loses them.
 *
 * When stderr is the journal's stream (systemd sets JOURNAL_STREAM to its
 * "device:inode"; a child that redirected stderr elsewhere no longer matches),
 * each line starts with its syslog priority, "<3>" error, "<4>" warn, "<6>" info,
 * "<7>" debug, which journald strips and records, so `journalctl -p err` finds
 * the errors. The JSON after it is unchanged. */
#include "mr_log.h"
#include "mr_common.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_BYTES 4096
#define HOLD_MAX_MS 100

static const char *log_name = "mindroom";
static mr_log_level log_min = MR_LOG_INFO;
static const char *const level_names[] = {"debug", "info", "warn", "error"};
static const char *const level_prefix[] = {"<7>", "<6>", "<4>", "<3>"};
static int to_journal; /* stderr is journald's stream: prefix the priority */

/* Held lines (mr_log_hold); one process, one thread. */
static int holding;
static char held[LINE_MAX_BYTES];
static size_t held_len;
static int64_t held_since_ms; /* mr_now_ms */

/* Whether stderr is the stream JOURNAL_STREAM names ("<st_dev>:<st_ino>"). */
static int stderr_is_journal(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    char tail;
    struct stat st;
    if (!js || sscanf(js, "%llu:%llu%c", &dev, &ino, &tail) != 2 || fstat(STDERR_FILENO, &st) != 0)
        return 0;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

/* getpid(2) is a real system call (glibc stopped caching it), and a worker logs
 * at least one line per request. The pid is kept here instead and refreshed in
 * every child that fork(2) makes (the runtime's workers, a function's own
 * children), which is the only way a process's pid changes. A child made with
 * vfork/posix_spawn execs at once and never logs through this copy. */
static pid_t log_pid;

static void refresh_pid(void)
{
    log_pid = getpid();
    held_len = 0; /* a child writes only its own lines */
}

static void register_atfork(void)
{
    (void)pthread_atfork(NULL, NULL, refresh_pid);
}

void mr_log_init(const char *name, mr_log_level min)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    log_name = name ? name : "mindroom";
    log_min = min;
    to_journal = stderr_is_journal();
    refresh_pid();
    (void)pthread_once(&once, register_atfork);
}

const char *mr_log_name(void)
{
    return log_name;
}

typedef struct {
    char buf[LINE_MAX_BYTES];
    size_t len;
} line;

static void put_raw(line *l, const char *s, size_t n)
{
    /* Leave room for the closing "}\n"; a line that would overflow is cut. */
    size_t room = sizeof(l->buf) - 3 - l->len;
    if (n > room)
        n = room;
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

static void put_str(line *l, const char *s)
{
    put_raw(l, s, strlen(s));
}

/* Appends s as JSON string content (without quotes). Control bytes become
 * \u00XX so a hostile header value cannot forge a second log line. */
static void put_escaped(line *l, const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            put_raw(l, esc, 2);
        } else if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof(esc), "\\u%04x", c);
            put_raw(l, esc, 6);
        } else {
            put_raw(l, (const char *)&c, 1);
        }
    }
}

static void begin_line(line *l, mr_log_level level)
{
    struct timeval tv;
    struct tm tm;
    char ts[64];
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + n, sizeof(ts) - n, ".%03dZ", (int)(tv.tv_usec / 1000));

    l->len = 0;
    if (to_journal)
        put_str(l, level_prefix[level]);
    put_str(l, "{\"time\":\"");
    put_str(l, ts);
    put_str(l, "\",\"level\":\"");
    put_str(l, level_names[level]);
    put_str(l, "\",\"function\":\"");
    put_escaped(l, log_name);
    char pid[32];
    snprintf(pid, sizeof(pid), "\",\"pid\":%d", (int)(log_pid ? log_pid : getpid()));
    put_str(l, pid);
}

static void write_all(const char *p, size_t left)
{
    while (left > 0) {
        ssize_t w = write(STDERR_FILENO, p, left);
        if (w <= 0)
            return; /* nowhere to report a failing stderr */
        p += w;
        left -= (size_t)w;
    }
}

void mr_log_flush(void)
{
    if (held_len > 0)
        write_all(held, held_len);
    held_len = 0;
}

void mr_log_hold(int on)
{
    if (!on)
        mr_log_flush();
    holding = on;
}

static void end_line(line *l, mr_log_level level)
{
    l->buf[l->len++] = '}';
    l->buf[l->len++] = '\n';
    if (!holding) {
        write_all(l->buf, l->len);
        return;
    }
    if (held_len + l->len > sizeof held)
        mr_log_flush();
    if (held_len == 0)
        held_since_ms = mr_now_ms();
    memcpy(held + held_len, l->buf, l->len); /* a line is at most sizeof held */
    held_len += l->len;
    if (level >= MR_LOG_WARN || mr_now_ms() - held_since_ms >= HOLD_MAX_MS)
        mr_log_flush();
}

void mr_log(mr_log_level level, const char *fmt, ...)
{
    if (level < log_min || level > MR_LOG_ERROR)
        return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);

    line l;
    begin_line(&l, level);
    put_str(&l, ",\"msg\":\"");
    put_escaped(&l, msg);
    put_str(&l, "\"");
    end_line(&l, level);
}

void mr_log_request(const char *request_id, const char *method, int status,
                    int64_t duration_ms, const char *role, const char *note)
{
    if (MR_LOG_INFO < log_min)
        return;
    line l;
    char num[64];
    begin_line(&l, MR_LOG_INFO);
    put_str(&l, ",\"msg\":\"request\",\"request_id\":\"");
    put_escaped(&l, request_id ? request_id : "");
    put_str(&l, "\",\"method\":\"");
    put_escaped(&l, method ? method : "");
    snprintf(num, sizeof(num), "\",\"status\":%d,\"duration_ms\":%lld,\"role\":\"", status,
             (long long)duration_ms);
    put_str(&l, num);
    put_escaped(&l, role && *role ? role : "none");
    put_str(&l, "\"");
    if (note && *note) {
        put_str(&l, ",\"note\":\"");
        put_escaped(&l, note);
        put_str(&l, "\"");
    }
    end_line(&l, MR_LOG_INFO);
}

void mr_log_init_env(const char *name)
{
    static const char *const names[] = {"debug", "info", "warn", "error"};
    const char *v = getenv("MR_LOG_LEVEL");
    if (!v || !*v)
        v = "info";
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strcmp(v, names[i]) == 0) {
            mr_log_init(name, (mr_log_level)i);
            return;
        }
    }
    fprintf(stderr, "config: MR_LOG_LEVEL must be debug, info, warn or error\n");
    exit(2);
}
