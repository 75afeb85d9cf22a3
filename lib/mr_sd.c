/* mr_sd.c: see mr_sd.h (why it is hand-written is said there). */
#include "mr_sd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define SD_LISTEN_FDS_START 3

static int parse_long(const char *s, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 0)
        return -1;
    *out = v;
    return 0;
}

int mr_sd_listen_fd(char *err, size_t errlen)
{
    const char *pid_s = getenv("LISTEN_PID"), *fds_s = getenv("LISTEN_FDS");
    long pid, n;
    if (!pid_s || !fds_s)
        return -1;
    /* Variables meant for another process (our parent was activated and forgot
     * to clear them) are not ours: sd_listen_fds(3) ignores them too. */
    if (parse_long(pid_s, &pid) != 0 || pid != (long)getpid())
        return -1;
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    if (parse_long(fds_s, &n) != 0 || n != 1) {
        snprintf(err, errlen, "LISTEN_FDS=%s: exactly one socket must be passed", fds_s);
        return -2;
    }
    int fd = SD_LISTEN_FDS_START;
    struct stat st;
    int type = 0, listening = 0;
    socklen_t len = sizeof type;
    if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode) ||
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM ||
        (len = sizeof listening, getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len)) != 0 ||
        !listening) {
        snprintf(err, errlen, "the socket passed as fd %d is not a listening stream socket", fd);
        return -2;
    }
    int flags = fcntl(fd, F_GETFD);
    if (flags < 0 || fcntl(fd, F_SETFD, flags | FD_CLOEXEC) != 0) {
        snprintf(err, errlen, "fd %d: %s", fd, strerror(errno));
        return -2;
    }
    return fd;
}

static struct sockaddr_un notify_addr;
static socklen_t notify_len;

void mr_sd_init(void)
{
    const char *path = getenv("NOTIFY_SOCKET");
    notify_len = 0;
    if (path && (path[0] == '/' || path[0] == '@') && strlen(path) < sizeof notify_addr.sun_path) {
        size_t n = strlen(path);
        memset(&notify_addr, 0, sizeof notify_addr);
        notify_addr.sun_family = AF_UNIX;
        memcpy(notify_addr.sun_path, path, n);
        if (path[0] == '@')
            notify_addr.sun_path[0] = '\0'; /* abstract namespace */
        notify_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    }
    unsetenv("NOTIFY_SOCKET");
}

int mr_sd_notify(const char *state)
{
    if (!notify_len || !state)
        return 0;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    ssize_t w = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (const struct sockaddr *)&notify_addr,
                       notify_len);
    close(fd);
    return w == (ssize_t)strlen(state) ? 1 : -1;
}
