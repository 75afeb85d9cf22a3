/* mr_addr.c: see mr_addr.h. */
#include "mr_addr.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <curl/curl.h>

typedef enum { ADDR_PUBLIC, ADDR_LOOPBACK, ADDR_PRIVATE, ADDR_NEVER } addr_class;

static addr_class classify_v4(uint32_t a)
{
    uint32_t b0 = a >> 24, b1 = (a >> 16) & 0xff;
    if (b0 == 127) return ADDR_LOOPBACK;
    if (b0 == 0 || b0 >= 224) return ADDR_NEVER;          /* this-net, multicast, reserved, broadcast */
    if (b0 == 169 && b1 == 254) return ADDR_NEVER;        /* link-local: cloud metadata lives here */
    if (a == 0x646464c8u) return ADDR_NEVER;               /* 100.100.100.200: Alibaba Cloud's metadata */
    if ((a >> 8) == 0xc00000u) return ADDR_NEVER;          /* 192.0.0/24: protocol assignments
                                                               (192.0.0.192: Oracle Cloud's metadata) */
    if ((a >> 8) == 0xc00002u || (a >> 8) == 0xc63364u || (a >> 8) == 0xcb0071u)
        return ADDR_NEVER;                                 /* 192.0.2/24, 198.51.100/24,
                                                               203.0.113/24: documentation */
    if ((a >> 8) == 0xc05863u) return ADDR_NEVER;          /* 192.88.99/24: 6to4 relays */
    if (b0 == 10) return ADDR_PRIVATE;
    if (b0 == 172 && (b1 & 0xf0) == 16) return ADDR_PRIVATE;
    if (b0 == 192 && b1 == 168) return ADDR_PRIVATE;
    if (b0 == 100 && (b1 & 0xc0) == 64) return ADDR_PRIVATE; /* carrier-grade NAT */
    if (b0 == 198 && (b1 & 0xfe) == 18) return ADDR_PRIVATE; /* 198.18/15: benchmarking networks */
    return ADDR_PUBLIC;
}

static uint32_t v4_at(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The IANA special-purpose registries: an address that carries an IPv4 address
 * (mapped, NAT64's well-known prefix, 6to4) is judged by it; the other
 * translation and tunnel prefixes, whose IPv4 address the prefix's operator
 * chooses where to put or hides, are never connected to. */
static addr_class classify_v6(const unsigned char *b)
{
    static const unsigned char loop[16] = {[15] = 1};
    static const unsigned char zero96[12] = {0};
    static const unsigned char mapped[12] = {[10] = 0xff, [11] = 0xff};
    static const unsigned char nat64[12] = {0x00, 0x64, 0xff, 0x9b};
    static const unsigned char nat64_local[6] = {0x00, 0x64, 0xff, 0x9b, 0x00, 0x01};
    static const unsigned char discard[8] = {0x01, 0x00};
    static const unsigned char teredo[4] = {0x20, 0x01, 0x00, 0x00};
    static const unsigned char doc[4] = {0x20, 0x01, 0x0d, 0xb8};
    if (memcmp(b, loop, 16) == 0) return ADDR_LOOPBACK;
    if (memcmp(b, zero96, 12) == 0) return ADDR_NEVER;        /* unspecified, IPv4-compatible */
    if (memcmp(b, mapped, 12) == 0 || memcmp(b, nat64, 12) == 0)
        return classify_v4(v4_at(b + 12));
    if (b[0] == 0x20 && b[1] == 0x02) return classify_v4(v4_at(b + 2)); /* 6to4 */
    if (memcmp(b, nat64_local, 6) == 0) return ADDR_NEVER;    /* 64:ff9b:1::/48: local NAT64 */
    if (memcmp(b, discard, 8) == 0) return ADDR_NEVER;        /* 100::/64: discard only */
    if (memcmp(b, teredo, 4) == 0) return ADDR_NEVER;         /* 2001::/32: Teredo */
    if (memcmp(b, doc, 4) == 0) return ADDR_NEVER;            /* 2001:db8::/32: documentation */
    if (b[0] == 0xff) return ADDR_NEVER;                      /* multicast */
    if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80) return ADDR_NEVER; /* link-local */
    static const unsigned char aws[16] = {0xfd, 0x00, 0x0e, 0xc2, [14] = 0x02, [15] = 0x54};
    if (memcmp(b, aws, 16) == 0) return ADDR_NEVER;           /* fd00:ec2::254: AWS's metadata */
    if ((b[0] & 0xfe) == 0xfc) return ADDR_PRIVATE;           /* unique local */
    if (b[0] == 0xfe && (b[1] & 0xc0) == 0xc0) return ADDR_PRIVATE; /* fec0::/10: site-local */
    return ADDR_PUBLIC;
}

const char *mr_addr_refusal(int family, const void *addr, const mr_addr_rule *r)
{
    static const char never[] = "a link-local, multicast, unspecified or reserved address "
                                "(where cloud metadata services answer)";
    addr_class c;
    if (family == AF_INET)
        c = classify_v4(ntohl(((const struct in_addr *)addr)->s_addr));
    else if (family == AF_INET6)
        c = classify_v6(((const struct in6_addr *)addr)->s6_addr);
    else
        return "not an IP address";
    switch (c) {
    case ADDR_PUBLIC: return NULL;
    case ADDR_LOOPBACK: return r->allow_loopback ? NULL : "a loopback address";
    case ADDR_PRIVATE: return r->allow_private ? NULL : "a private address";
    case ADDR_NEVER: return never;
    }
    return never;
}

const void *mr_addr_in(int family, const void *sockaddr)
{
    if (family == AF_INET)
        return &((const struct sockaddr_in *)sockaddr)->sin_addr;
    if (family == AF_INET6)
        return &((const struct sockaddr_in6 *)sockaddr)->sin6_addr;
    return NULL;
}

mr_err mr_addr_check_url(const char *url, const mr_addr_rule *r, char *why, size_t whylen)
{
    CURLU *u = curl_url();
    char *host = NULL;
    mr_err rc = MR_OK;
    if (!u)
        return mr_seterr(why, whylen, MR_EINTERNAL, "out of memory");
    /* libcurl's own parser: it is what the call will connect by, and it rewrites
     * the other spellings of an IPv4 address (decimal, octal, hex, fewer parts)
     * to the dotted quad. */
    if (!url || curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
        rc = mr_seterr(why, whylen, MR_EINVAL, "URL is malformed");
        goto out;
    }
    char h[128];
    size_t n = strlen(host);
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']')
        snprintf(h, sizeof h, "%.*s", (int)(n - 2), host + 1);
    else
        snprintf(h, sizeof h, "%s", host);
    char *zone = strchr(h, '%'); /* fe80::1%eth0: the address is before the zone */
    if (zone)
        *zone = '\0';
    struct in_addr a4;
    struct in6_addr a6;
    const char *no = NULL;
    if (inet_pton(AF_INET, h, &a4) == 1)
        no = mr_addr_refusal(AF_INET, &a4, r);
    else if (inet_pton(AF_INET6, h, &a6) == 1)
        no = mr_addr_refusal(AF_INET6, &a6, r);
    if (no)
        rc = mr_seterr(why, whylen, MR_EINVAL, "%s is %s", h, no);
out:
    curl_free(host);
    curl_url_cleanup(u);
    return rc;
}
