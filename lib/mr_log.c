/* mr_log.c: JSON lines on stderr.
 *
 * Each line is built in a stack buffer and written with one write(2), so lines
 * from several workers sharing stderr never interleave mid-line.
 *
 * When stderr is the journal's stream (systemd sets JOURNAL_STREAM to its
 * "device:inode"; a child that redirected stderr elsewhere no longer matches),
 * each line starts with its syslog priority, "<3>" error, "<4>" warn, "<6>" info,
 * "<7>" debug, which journald strips and records, so `journalctl -p err` finds
 * the errors. The JSON after it is unchanged. */
#include "mr_log.h"

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

static const char *log_name = "mindroom";
static mr_log_level log_min = MR_LOG_INFO;
static const char *const level_names[] = {"debug", "info", "warn", "error"};
static const char *const level_prefix[] = {"<7>", "<6>", "<4>", "<3>"};
static int to_journal; /* stderr is journald's stream: prefix the priority */

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

static void end_line(line *l)
{
    l->buf[l->len++] = '}';
    l->buf[l->len++] = '\n';
    const char *p = l->buf;
    size_t left = l->len;
    while (left > 0) {
        ssize_t w = write(STDERR_FILENO, p, left);
        if (w <= 0)
            return; /* nowhere to report a failing stderr */
        p += w;
        left -= (size_t)w;
    }
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
    end_line(&l);
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
    end_line(&l);
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
