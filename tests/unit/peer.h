/* peer.h: an HTTP peer on 127.0.0.1 for the unit tests of the HTTP clients, played
 * by a forked child. Included by test_httpc.c, test_probe.c and test_stripe_api.c. */
#ifndef PEER_H
#define PEER_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

/* A listening socket on 127.0.0.1 and a free port. */
static inline int listener(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(fd, 8), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

/* A child that accepts one connection, reads the request, writes `answer` (NULL:
 * nothing), then holds the connection for `hold_s` seconds before it closes it. */
static inline pid_t peer(int lfd, const char *answer, unsigned hold_s)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int c = accept(lfd, NULL, NULL);
        char buf[4096];
        if (c >= 0 && read(c, buf, sizeof buf) > 0 && answer) {
            size_t n = strlen(answer);
            if (write(c, answer, n) != (ssize_t)n)
                _exit(1);
        }
        sleep(hold_s);
        _exit(0);
    }
    return pid;
}

static inline void reap(pid_t pid)
{
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

#endif
