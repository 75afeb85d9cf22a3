/* test_probe_addresses.c: a probe whose host has a refused address and an allowed one.
 *
 * curl connects only to an address the open-socket guard allows (mr_probe.c,
 * guard 2): with a name resolving to 10.0.0.1 (private, not allowed here) and then
 * 127.0.0.1 (loopback, allowed), the first connect is refused by the guard, curl
 * moves on to the second, and the endpoint answers 200. The probe must say what the
 * endpoint said (healthy), not "refused: address not allowed": a refused candidate
 * address that was never contacted is not a failure of the instance. The resolver
 * is replaced for that one name by defining getaddrinfo here (libcurl's threaded
 * resolver calls it), which is why this is a binary of its own. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <dlfcn.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mr_common.h"
#include "mr_probe.h"

typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res);
int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
    gai_fn real = (gai_fn)dlsym(RTLD_NEXT, "getaddrinfo");
    if (!node || strcmp(node, "mixed.mindroom.chat") != 0)
        return real(node, service, hints, res);
    struct addrinfo h = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM,
                         .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *a = NULL, *b = NULL;
    int rc = real("10.0.0.1", service, &h, &a);
    if (rc != 0)
        return rc;
    rc = real("127.0.0.1", service, &h, &b);
    if (rc != 0)
        return rc;
    struct addrinfo *t = a;
    while (t->ai_next)
        t = t->ai_next;
    t->ai_next = b;
    *res = a;
    return 0;
}

/* A child process answering 200 to every connection on a loopback port. */
static pid_t serve_ok(int *port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(fd, 16), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        for (;;) {
            int c = accept(fd, NULL, NULL);
            if (c < 0)
                _exit(0);
            char buf[2048];
            (void)!read(c, buf, sizeof buf);
            static const char ok[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                     "Connection: close\r\n\r\nok";
            (void)!write(c, ok, sizeof ok - 1);
            close(c);
        }
    }
    close(fd);
    return pid;
}

static void test_refused_candidate_then_allowed_address(void **state)
{
    (void)state;
    int port;
    pid_t srv = serve_ok(&port);
    const mr_probe_opts o = {.base_domain = "mindroom.chat", .allow_loopback = 1,
                             .allow_private = 0, .concurrency = 4, .timeout_ms = 2000,
                             .max_body = 1024};
    char url[96], err[64];
    snprintf(url, sizeof url, "http://mixed.mindroom.chat:%d/api/health", port);
    mr_probe p = {.url = url};
    assert_int_equal(mr_probe_run(&p, 1, &o, 0, err, sizeof err), MR_OK);
    kill(srv, SIGTERM);
    waitpid(srv, NULL, 0);
    /* The endpoint was reached (on 127.0.0.1) and answered 200. */
    assert_true(p.contacted);
    assert_int_equal(p.http_status, 200);
    assert_string_equal(p.status, "healthy");
    assert_int_equal(p.outcome, MR_PROBE_HEALTHY);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_refused_candidate_then_allowed_address),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
