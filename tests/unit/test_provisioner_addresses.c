/* test_provisioner_addresses.c: where the lifecycle worker's provisioner calls may
 * connect (mr_provisioner.h, the rule of mr_addr.h through mr_httpc).
 *
 * A provisioner call carries the bearer token and, for POST /apps, the instance's
 * secrets: it must never reach a link-local, multicast or unspecified address (a
 * cloud's metadata service at 169.254.169.254), whether the URL names the address
 * or a name that resolves to it. Loopback and private addresses are where
 * provisioners live, and stay allowed. The resolver is replaced for a few names by
 * defining getaddrinfo here (libcurl's threaded resolver calls it), and connect()
 * is wrapped to record every address a connection was attempted to, so a test can
 * say that nothing was sent to a refused one; hence a binary of its own. */
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
#include <unistd.h>

#include "mindroom.h"
#include "mr_provisioner.h"
#include "peer.h"

typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);

/* Appends the numeric address `ip` to *res. */
static int add_addr(gai_fn real, const char *ip, const char *service, struct addrinfo **res)
{
    struct addrinfo h = {.ai_family = strchr(ip, ':') ? AF_INET6 : AF_INET,
                         .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *a = NULL;
    int rc = real(ip, service, &h, &a);
    if (rc != 0)
        return rc;
    struct addrinfo **t = res;
    while (*t)
        t = &(*t)->ai_next;
    *t = a;
    return 0;
}

/* metadata.provisioner.test: 169.254.169.254 only. mapped.provisioner.test:
 * ::ffff:169.254.169.254 only. mixed.provisioner.test: 169.254.169.254, then
 * 127.0.0.1. private.provisioner.test: 10.255.255.1 (nothing answers there). */
int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res);
int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
    gai_fn real = (gai_fn)dlsym(RTLD_NEXT, "getaddrinfo");
    const char *first = NULL, *second = NULL;
    if (node && strcmp(node, "metadata.provisioner.test") == 0)
        first = "169.254.169.254";
    else if (node && strcmp(node, "mapped.provisioner.test") == 0)
        first = "::ffff:169.254.169.254";
    else if (node && strcmp(node, "mixed.provisioner.test") == 0)
        first = "169.254.169.254", second = "127.0.0.1";
    else if (node && strcmp(node, "private.provisioner.test") == 0)
        first = "10.255.255.1";
    else
        return real(node, service, hints, res);
    *res = NULL;
    int rc = add_addr(real, first, service, res);
    if (rc == 0 && second)
        rc = add_addr(real, second, service, res);
    return rc;
}

/* Every address a connection was attempted to since the last reset. */
static char attempted[8][INET6_ADDRSTRLEN];
static int nattempted;

int connect(int fd, const struct sockaddr *sa, socklen_t len);
int connect(int fd, const struct sockaddr *sa, socklen_t len)
{
    connect_fn real = (connect_fn)dlsym(RTLD_NEXT, "connect");
    if (nattempted < 8 && (sa->sa_family == AF_INET || sa->sa_family == AF_INET6)) {
        const void *ip = sa->sa_family == AF_INET
                             ? (const void *)&((const struct sockaddr_in *)(const void *)sa)->sin_addr
                             : (const void *)&((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr;
        inet_ntop(sa->sa_family, ip, attempted[nattempted++], INET6_ADDRSTRLEN);
    }
    return real(fd, sa, len);
}

static int attempted_to(const char *ip)
{
    for (int i = 0; i < nattempted; i++)
        if (strcmp(attempted[i], ip) == 0)
            return 1;
    return 0;
}

/* A stop of mindroom-0123 through url (a provisioner at host:port), as the worker
 * calls it: returns the call's result. */
static void stop_at(const char *url, mr_provisioner_call *call)
{
    mr_provisioner p = {.url = url, .token = "provisioner-token-0123456789",
                        .timeout_ms = 3000, .connect_timeout_ms = 1000};
    mr_httpc *http = mr_httpc_open();
    assert_non_null(http);
    nattempted = 0;
    mr_provisioner_app(http, &p, "mindroom-0123", MR_ACTION_STOP, 0, call);
    mr_httpc_close(http);
}

static void assert_refused_unanswered(const mr_provisioner_call *call, const char *ip)
{
    assert_false(call->ok);
    assert_false(call->rejected);
    /* Read as a target that does not answer: the step is retried, the target recorded. */
    assert_int_equal(call->outcome, MR_HTTPC_NO_ANSWER);
    assert_int_equal(call->status, 0);
    char want[160];
    snprintf(want, sizeof want, "not connected to %s: it is a link-local, multicast, "
             "unspecified or reserved address", ip);
    if (!strstr(call->error, want))
        fail_msg("error \"%s\" lacks \"%s\"", call->error, want);
    assert_false(attempted_to(ip));
}

static void a_name_resolving_to_link_local_is_never_connected_to(void **state)
{
    (void)state;
    mr_provisioner_call call;
    stop_at("http://metadata.provisioner.test:8002", &call);
    assert_refused_unanswered(&call, "169.254.169.254");
    assert_int_equal(nattempted, 0);
}

static void an_ipv4_mapped_link_local_address_is_never_connected_to(void **state)
{
    (void)state;
    mr_provisioner_call call;
    stop_at("http://mapped.provisioner.test:8002", &call);
    assert_refused_unanswered(&call, "::ffff:169.254.169.254");
    assert_int_equal(nattempted, 0);
}

static void a_link_local_literal_is_never_connected_to(void **state)
{
    (void)state;
    mr_provisioner_call call;
    /* A URL that reached the database without mindroomctl's check: the same rule. */
    stop_at("http://169.254.169.254:80", &call);
    assert_refused_unanswered(&call, "169.254.169.254");
    stop_at("http://2852039166:80", &call); /* 169.254.169.254 spelt as one number */
    assert_refused_unanswered(&call, "169.254.169.254");
    stop_at("http://[fe80::1]:80", &call);
    assert_refused_unanswered(&call, "fe80::1");
    stop_at("http://224.0.0.1:80", &call);
    assert_refused_unanswered(&call, "224.0.0.1");
    assert_int_equal(nattempted, 0);
}

/* A name with a refused address and an allowed one: the refused one is skipped,
 * the call goes to the other and its answer counts. */
static void a_refused_candidate_is_skipped_for_an_allowed_one(void **state)
{
    (void)state;
    int port, fd = listener(&port);
    pid_t pid = peer(fd, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         "Content-Length: 19\r\nConnection: close\r\n\r\n{\"state\":\"stopped\"}", 2);
    char url[96];
    snprintf(url, sizeof url, "http://mixed.provisioner.test:%d", port);
    mr_provisioner_call call;
    stop_at(url, &call);
    reap(pid);
    close(fd);
    assert_true(call.ok);
    assert_int_equal(call.status, 200);
    assert_int_equal(call.outcome, MR_HTTPC_ANSWERED);
    assert_false(attempted_to("169.254.169.254"));
    assert_true(attempted_to("127.0.0.1"));
}

/* Loopback and private networks are where provisioners live. */
static void loopback_and_private_addresses_are_allowed(void **state)
{
    (void)state;
    int port, fd = listener(&port);
    pid_t pid = peer(fd, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", 2);
    char url[96];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", port);
    mr_provisioner_call call;
    stop_at(url, &call);
    reap(pid);
    close(fd);
    assert_true(call.ok);
    /* A private address: the connection is attempted (whatever answers there, or
     * fails to, is what the call reports, never the rule). */
    stop_at("http://private.provisioner.test:9", &call);
    assert_true(attempted_to("10.255.255.1"));
    assert_null(strstr(call.error, "not connected to"));
}

/* Other callers of mr_httpc (Stripe, Resend) give no rule and keep connecting
 * anywhere their configuration says. */
static void without_a_rule_any_address_is_attempted(void **state)
{
    (void)state;
    char err[200];
    mr_httpc_req req = {.method = "GET", .url = "http://metadata.provisioner.test:9/x",
                        .connect_timeout_ms = 200, .timeout_ms = 200};
    mr_httpc *c = mr_httpc_open();
    mr_httpc_resp r;
    nattempted = 0;
    (void)mr_httpc_do(c, &req, &r, err, sizeof err);
    mr_httpc_resp_free(&r);
    mr_httpc_close(c);
    assert_true(attempted_to("169.254.169.254"));
}

/* Where a URL is given (mindroomctl target add, DOKKU_PROVISIONER_URL), a literal is
 * judged by the same rule, in every spelling libcurl reads as that address. */
static void a_url_is_checked_where_it_is_given(void **state)
{
    (void)state;
    static const char *const refused[] = {
        "http://169.254.169.254:8002", "http://2852039166:8002", "http://0251.0376.0251.0376",
        "http://0xa9.254.169.254", "http://169.254.43518", "http://[fe80::1]:8002",
        "http://[::ffff:169.254.169.254]", "http://0.0.0.0:8002", "http://[::]:8002",
        "http://224.0.0.1", "http://[ff02::1]", "http://100.100.100.200", "http://[fd00:ec2::254]",
        "http://192.0.0.192", "http://[2002:a9fe:a9fe::1]", "http://[64:ff9b:1::a9fe:a9fe]",
        "http://[::a9fe:a9fe]", "http://[2001::1]", "https://203.0.113.7", "http://[2001:db8::1]"};
    static const char *const allowed[] = {
        "http://127.0.0.1:8002", "http://[::1]:8002", "http://10.0.0.5:8002",
        "https://192.168.1.2/prov", "http://100.64.0.1", "http://[fd12::1]", "https://prov.example.com",
        "http://localhost:8002", "https://93.184.216.34", "http://198.18.0.1",
        "http://[2002:5db8:d822::1]"};
    char why[200];
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        why[0] = '\0';
        if (mr_provisioner_check_url(refused[i], why, sizeof why) != MR_EINVAL)
            fail_msg("%s allowed", refused[i]);
        assert_non_null(strstr(why, " is a link-local, multicast, unspecified or reserved address"));
    }
    assert_int_equal(mr_provisioner_check_url("http://169.254.169.254:8002", why, sizeof why),
                     MR_EINVAL);
    assert_true(strncmp(why, "169.254.169.254 is ", 19) == 0);
    for (size_t i = 0; i < sizeof allowed / sizeof *allowed; i++)
        if (mr_provisioner_check_url(allowed[i], why, sizeof why) != MR_OK)
            fail_msg("%s refused: %s", allowed[i], why);
    assert_int_equal(mr_provisioner_check_url("not a url", why, sizeof why), MR_EINVAL);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(a_name_resolving_to_link_local_is_never_connected_to),
        cmocka_unit_test(an_ipv4_mapped_link_local_address_is_never_connected_to),
        cmocka_unit_test(a_link_local_literal_is_never_connected_to),
        cmocka_unit_test(a_refused_candidate_is_skipped_for_an_allowed_one),
        cmocka_unit_test(loopback_and_private_addresses_are_allowed),
        cmocka_unit_test(without_a_rule_any_address_is_attempted),
        cmocka_unit_test(a_url_is_checked_where_it_is_given),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
