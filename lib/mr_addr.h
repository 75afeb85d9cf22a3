/* mr_addr.h: which addresses an outbound connection may go to.
 *
 * One rule for every caller that connects where a URL from configuration or the
 * database says: the health probes (mr_probe) and the lifecycle worker's calls to
 * its provisioners (mr_provisioner, through mr_httpc). Addresses fall in four
 * classes: public; loopback (127.0.0.0/8, ::1); private (RFC 1918, 100.64/10,
 * fc00::/7); and never (the unspecified address, this-net, link-local
 * 169.254/16 and fe80::/10 where cloud metadata services live, the known metadata
 * addresses, multicast, reserved, broadcast; an IPv4-mapped or NAT64 IPv6 address
 * counts as the IPv4 address it carries). A caller allows loopback and private or
 * not; never is never allowed. Applied to the address a socket is about to be
 * opened to (after DNS), a name that resolves to a refused address is refused
 * without a packet sent and without a window between check and use. */
#ifndef MR_ADDR_H
#define MR_ADDR_H

#include <stddef.h>
#include "mr_common.h"

typedef struct {
    int allow_loopback; /* 127.0.0.0/8, ::1 */
    int allow_private;  /* RFC 1918, 100.64/10, fc00::/7 */
} mr_addr_rule;

/* Whether a connection may go to addr under rule r. family is AF_INET or AF_INET6,
 * addr a struct in_addr or in6_addr; any other family is refused. Returns NULL when
 * allowed, else why not (a static string: "a link-local, multicast, unspecified or
 * reserved address", "a loopback address", "a private address"). */
const char *mr_addr_refusal(int family, const void *addr, const mr_addr_rule *r);

/* The address in a socket address of family (AF_INET: its struct in_addr; AF_INET6:
 * its struct in6_addr), as mr_addr_refusal takes it; NULL for any other family. */
const void *mr_addr_in(int family, const void *sockaddr);

/* Checks the host of url when it is an address literal (as libcurl reads it:
 * "2852039166" and "0251.0376.0251.0376" are 169.254.169.254, "[::ffff:a9fe:a9fe]"
 * too), so that a URL naming a refused address is refused where it is given. A
 * name is not resolved here: what it resolves to is checked at connect time.
 * Returns MR_OK (a name, or an allowed address), MR_EINVAL with why filled ("URL
 * is malformed", or "169.254.169.254 is a link-local, ... address"). */
mr_err mr_addr_check_url(const char *url, const mr_addr_rule *r, char *why, size_t whylen);

#endif
