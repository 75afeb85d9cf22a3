/* test_probe.c: the SSRF rules of mr_probe and the multi loop against real sockets. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "mr_common.h"
#include "mr_probe.h"
#include "peer.h"

static const mr_probe_opts prod = {
    .base_domain = "mindroom.chat", .allow_loopback = 0, .allow_private = 0,
    .concurrency = 8, .timeout_ms = 300, .max_body = 1024};
static const mr_probe_opts local = {
    .base_domain = "mindroom.chat", .allow_loopback = 1, .allow_private = 0,
    .concurrency = 8, .timeout_ms = 300, .max_body = 1024};

static int url_ok(const char *url, const mr_probe_opts *o, const char *want_why)
{
    char why[64] = "";
    mr_err e = mr_probe_check_url(url, o, why, sizeof why);
    if (want_why && e != MR_OK)
        assert_string_equal(why, want_why);
    return e == MR_OK;
}

static void test_url_rules(void **state)
{
    (void)state;
    assert_true(url_ok("https://api.m1.mindroom.chat/api/health", &prod, NULL));
    assert_true(url_ok("http://mindroom.chat:8080/x", &prod, NULL));
    assert_true(url_ok("https://API.M1.MindRoom.Chat./api/health", &prod, NULL));
    assert_false(url_ok("https://evilmindroom.chat/", &prod, "outside base domain"));
    assert_false(url_ok("https://mindroom.chat.evil.com/", &prod, "outside base domain"));
    assert_false(url_ok("https://evil.com/?x=.mindroom.chat", &prod, "outside base domain"));
    assert_false(url_ok("https://evil.com#.mindroom.chat", &prod, "outside base domain"));
    assert_false(url_ok("https://a.mindroom.chat@evil.com/", &prod, "outside base domain"));
    assert_false(url_ok("ftp://m1.mindroom.chat/", &prod, "scheme not allowed"));
    assert_false(url_ok("file:///etc/passwd", &prod, NULL));
    assert_false(url_ok("gopher://m1.mindroom.chat/", &prod, NULL));
    assert_false(url_ok("not a url", &prod, "malformed URL"));
    assert_false(url_ok(NULL, &prod, "malformed URL"));
    /* Loopback only when allowed. */
    assert_false(url_ok("http://127.0.0.1:8080/i/a", &prod, "outside base domain"));
    assert_false(url_ok("http://localhost:8080/", &prod, "outside base domain"));
    assert_false(url_ok("http://[::1]:8080/", &prod, "outside base domain"));
    assert_true(url_ok("http://127.0.0.1:8080/i/a", &local, NULL));
    assert_true(url_ok("http://127.9.9.9/", &local, NULL));
    assert_true(url_ok("http://localhost:8080/", &local, NULL));
    assert_true(url_ok("http://[::1]:8080/", &local, NULL));
    assert_false(url_ok("http://10.0.0.1/", &local, "outside base domain"));
    assert_false(url_ok("http://169.254.169.254/latest/meta-data/", &local, "outside base domain"));
    /* No base domain: nothing but (allowed) loopback. */
    mr_probe_opts none = local;
    none.base_domain = "";
    assert_false(url_ok("https://m1.mindroom.chat/", &none, "outside base domain"));
    assert_true(url_ok("http://127.0.0.1/", &none, NULL));
}

static int v4(const char *s, const mr_probe_opts *o)
{
    struct in_addr a;
    assert_int_equal(inet_pton(AF_INET, s, &a), 1);
    return mr_probe_addr_allowed(AF_INET, &a, o);
}

static int v6(const char *s, const mr_probe_opts *o)
{
    struct in6_addr a;
    assert_int_equal(inet_pton(AF_INET6, s, &a), 1);
    return mr_probe_addr_allowed(AF_INET6, &a, o);
}

static void test_addr_rules(void **state)
{
    mr_probe_opts priv = prod;
    (void)state;
    priv.allow_private = 1;
    assert_true(v4("93.184.216.34", &prod));
    assert_false(v4("127.0.0.1", &prod));
    assert_true(v4("127.0.0.1", &local));
    assert_false(v4("169.254.169.254", &local));      /* metadata: never */
    assert_false(v4("169.254.169.254", &priv));
    assert_false(v4("0.0.0.0", &local));
    assert_false(v4("224.0.0.1", &local));
    assert_false(v4("255.255.255.255", &local));
    assert_false(v4("10.1.2.3", &prod));
    assert_false(v4("172.16.0.1", &prod));
    assert_false(v4("172.31.255.1", &prod));
    assert_true(v4("172.32.0.1", &prod));
    assert_false(v4("192.168.1.1", &prod));
    assert_false(v4("100.64.0.1", &prod));
    assert_true(v4("10.1.2.3", &priv));
    assert_true(v6("2606:4700::1", &prod));
    assert_false(v6("::1", &prod));
    assert_true(v6("::1", &local));
    assert_false(v6("::", &local));
    assert_false(v6("fe80::1", &local));
    assert_false(v6("ff02::1", &local));
    assert_false(v6("fd00::1", &prod));
    assert_true(v6("fd00::1", &priv));
    assert_false(v6("::ffff:169.254.169.254", &priv)); /* mapped v4 judged as v4 */
    assert_false(v6("::ffff:127.0.0.1", &prod));
    assert_false(v6("64:ff9b::a9fe:a9fe", &priv));     /* NAT64 of 169.254.169.254 */
    assert_false(mr_probe_addr_allowed(AF_UNIX, "x", &local));
}

/* A host longer than DNS allows is refused, never judged by a copy cut short
 * ("<pad>.mindroom.chat" as the first 255 characters of a longer name). */
static void test_long_host_refused(void **state)
{
    char url[400] = "https://";
    (void)state;
    size_t pad = 255 - strlen(".mindroom.chat");
    for (size_t i = 0; i < pad; i++)
        strcat(url, i % 60 == 59 ? "." : "a");
    strcat(url, ".mindroom.chat.evil.example/api/health");
    assert_false(url_ok(url, &prod, "outside base domain"));
}

/* Cloud metadata outside 169.254/16 is never probed, private addresses allowed
 * or not. */
static void test_metadata_never(void **state)
{
    mr_probe_opts priv = prod;
    (void)state;
    priv.allow_private = 1;
    assert_false(v6("fd00:ec2::254", &priv));       /* AWS IMDS over IPv6 */
    assert_false(v4("100.100.100.200", &priv));     /* Alibaba Cloud metadata */
    assert_false(v4("192.0.0.192", &priv));         /* Oracle Cloud metadata */
}

/* The special-purpose ranges outside the private ones: an address that carries an
 * IPv4 address (6to4) is judged by it; translation and tunnel prefixes that hide
 * or place it as they like, documentation and discard ranges are never probed. */
static void test_special_purpose_ranges(void **state)
{
    mr_probe_opts priv = prod;
    (void)state;
    priv.allow_private = 1;
    assert_false(v4("192.0.0.1", &priv));
    assert_false(v4("192.0.2.1", &priv));
    assert_false(v4("198.51.100.1", &priv));
    assert_false(v4("203.0.113.1", &priv));
    assert_false(v4("192.88.99.1", &priv));
    assert_false(v4("198.18.0.1", &prod));          /* benchmarking: private */
    assert_false(v4("198.19.255.1", &prod));
    assert_true(v4("198.19.255.1", &priv));
    assert_true(v4("198.20.0.1", &prod));
    assert_true(v4("192.0.1.1", &prod));
    assert_false(v6("2002:a9fe:a9fe::1", &priv));   /* 6to4 of 169.254.169.254 */
    assert_false(v6("2002:7f00:1::1", &prod));      /* 6to4 of 127.0.0.1 */
    assert_false(v6("2002:0a00:0001::1", &prod));   /* 6to4 of 10.0.0.1 */
    assert_true(v6("2002:0a00:0001::1", &priv));
    assert_true(v6("2002:5db8:d822::1", &prod));    /* 6to4 of a public address */
    assert_false(v6("::a9fe:a9fe", &priv));         /* IPv4-compatible */
    assert_false(v6("::7f00:1", &local));
    assert_false(v6("64:ff9b:1::a9fe:a9fe", &priv)); /* local-use NAT64 */
    assert_false(v6("64:ff9b:1:ffff::1", &priv));
    assert_false(v6("100::1", &priv));              /* discard only */
    assert_false(v6("2001::1", &priv));             /* Teredo */
    assert_false(v6("2001:db8::1", &priv));         /* documentation */
    assert_true(v6("2001:4860::8888", &prod));      /* not Teredo: 2001:4860::/32 */
    assert_false(v6("fec0::1", &prod));             /* site-local: private */
    assert_true(v6("fec0::1", &priv));
}

/* A port that refuses (bound, not listening) and one that hangs (listening,
 * never accepted: the kernel completes the handshake, nobody ever answers). */
static int bound_socket(int do_listen, int *port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    if (do_listen)
        assert_int_equal(listen(fd, 16), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

static void test_run(void **state)
{
    int refused_port, hang_port;
    int rfd = bound_socket(0, &refused_port), hfd = bound_socket(1, &hang_port);
    char u_refused[64], u_hang[64], u_hang_prod[64];
    (void)state;
    snprintf(u_refused, sizeof u_refused, "http://127.0.0.1:%d/api/health", refused_port);
    snprintf(u_hang, sizeof u_hang, "http://127.0.0.1:%d/api/health", hang_port);
    /* Passes the URL rule (under the base domain) but resolves to loopback,
     * which these options do not allow: refused at connect time. */
    snprintf(u_hang_prod, sizeof u_hang_prod, "http://m1.localhost:%d/api/health", hang_port);

    mr_probe p[4] = {{.url = u_refused}, {.url = u_hang}, {.url = "http://169.254.169.254/"},
                     {.url = u_hang_prod}};
    char err[64];
    int64_t t0 = mr_now_ms();
    assert_int_equal(mr_probe_run(p, 3, &local, 0, err, sizeof err), MR_OK);
    int64_t took = mr_now_ms() - t0;

    assert_int_equal(p[0].outcome, MR_PROBE_UNREACHABLE);
    assert_string_equal(p[0].status, "unreachable: connection refused");
    assert_int_equal(p[1].outcome, MR_PROBE_UNREACHABLE);
    assert_string_equal(p[1].status, "unreachable: timeout after 300 ms");
    assert_true(p[1].contacted);
    assert_int_equal(p[2].outcome, MR_PROBE_UNHEALTHY);
    assert_string_equal(p[2].status, "refused: outside base domain");
    assert_false(p[2].contacted);
    /* Concurrent: one deadline, not the sum. */
    assert_true(took < 300 + 700);

    mr_probe_opts lh = prod;
    lh.base_domain = "localhost";
    assert_int_equal(mr_probe_run(&p[3], 1, &lh, 0, err, sizeof err), MR_OK);
    assert_int_equal(p[3].outcome, MR_PROBE_UNHEALTHY);
    assert_string_equal(p[3].status, "refused: address not allowed");
    assert_false(p[3].contacted);

    assert_int_equal(mr_probe_run(NULL, 0, &local, 0, err, sizeof err), MR_OK);
    close(rfd);
    close(hfd);
}

/* A bound on the run (700 ms with 300 ms probes: none starts after 100 ms but the
 * first wave and those that follow a probe started): the probes started by then
 * run their course, the rest never start and say so, never healthy; the run ends
 * one probe's timeout after that, not after every hanging probe in turn. */
static void test_no_probe_starts_after_the_deadline(void **state)
{
    (void)state;
    int hang_port, hfd = bound_socket(1, &hang_port);
    char u[64], err[64];
    snprintf(u, sizeof u, "http://127.0.0.1:%d/api/health", hang_port);
    mr_probe_opts one = local;
    one.concurrency = 1;
    mr_probe p[3] = {{.url = u}, {.url = u}, {.url = u}};
    int64_t t0 = mr_now_ms();
    assert_int_equal(mr_probe_run(p, 3, &one, 100 + 2 * 300, err, sizeof err), MR_OK);
    int64_t took = mr_now_ms() - t0;
    assert_true(p[0].ran);
    assert_string_equal(p[0].status, "unreachable: timeout after 300 ms");
    for (int i = 1; i < 3; i++) {
        assert_false(p[i].ran);
        assert_false(p[i].contacted);
        assert_int_equal(p[i].outcome, MR_PROBE_UNREACHABLE);
        assert_string_equal(p[i].status, "not probed: the round's time ran out");
    }
    assert_true(took >= 300 && took < 300 + 250);

    /* A probe that follows one started (another part of its target) starts after the
     * deadline too, when a slot frees; the next target's does not. */
    p[1].follows = 1;
    t0 = mr_now_ms();
    assert_int_equal(mr_probe_run(p, 3, &one, 100 + 2 * 300, err, sizeof err), MR_OK);
    took = mr_now_ms() - t0;
    assert_true(p[0].ran && p[1].ran && !p[2].ran);
    assert_string_equal(p[1].status, "unreachable: timeout after 300 ms");
    assert_true(took >= 600 && took < 600 + 250);
    p[1].follows = 0;

    /* Without one, each waits its turn. */
    t0 = mr_now_ms();
    assert_int_equal(mr_probe_run(p, 3, &one, 0, err, sizeof err), MR_OK);
    took = mr_now_ms() - t0;
    for (int i = 0; i < 3; i++)
        assert_true(p[i].ran && p[i].contacted);
    assert_true(took >= 900);
    close(hfd);
}

/* An answer whose status line came and whose body then stalled or was dropped: the
 * instance answered, badly (unhealthy), as mr_httpc counts an answer; never
 * "unreachable" beside an http_status of 200. */
static void test_answer_cut_short_is_unhealthy(void **state)
{
    (void)state;
    int sport, dport, sfd = listener(&sport), dfd = listener(&dport);
    pid_t stall = peer(sfd, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"ok\"", 5);
    pid_t drop = peer(dfd, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"ok\"", 0);
    char u_stall[64], u_drop[64], err[64];
    snprintf(u_stall, sizeof u_stall, "http://127.0.0.1:%d/api/health", sport);
    snprintf(u_drop, sizeof u_drop, "http://127.0.0.1:%d/api/health", dport);
    mr_probe p[2] = {{.url = u_stall}, {.url = u_drop}};
    assert_int_equal(mr_probe_run(p, 2, &local, 0, err, sizeof err), MR_OK);
    assert_int_equal(p[0].outcome, MR_PROBE_UNHEALTHY);
    assert_int_equal(p[0].http_status, 200);
    assert_string_equal(p[0].status, "unhealthy: HTTP 200 cut short: timeout");
    assert_string_equal(p[0].error, "health endpoint's HTTP 200 answer cut short");
    assert_int_equal(p[1].outcome, MR_PROBE_UNHEALTHY);
    assert_int_equal(p[1].http_status, 200);
    assert_true(strncmp(p[1].status, "unhealthy: HTTP 200 cut short: ", 31) == 0);
    reap(stall);
    reap(drop);
    close(sfd);
    close(dfd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_url_rules),
        cmocka_unit_test(test_addr_rules),
        cmocka_unit_test(test_metadata_never),
        cmocka_unit_test(test_special_purpose_ranges),
        cmocka_unit_test(test_long_host_refused),
        cmocka_unit_test(test_run),
        cmocka_unit_test(test_no_probe_starts_after_the_deadline),
        cmocka_unit_test(test_answer_cut_short_is_unhealthy),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
