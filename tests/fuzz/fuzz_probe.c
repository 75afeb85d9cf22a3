/* fuzz_probe.c: the health probe's URL rule (backend_url comes from the
 * database, which the provisioner and operators write), the address classes, and
 * the provisioners' URL rule (a target's URL, given by an operator).
 * fuzz-targets: lib/mr_probe.c lib/mr_addr.c */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "mr_addr.h"
#include "mr_probe.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const mr_probe_opts o[2] = {
        {.base_domain = "mindroom.chat", .concurrency = 1, .timeout_ms = 1, .max_body = 1},
        {.base_domain = ".Localhost.", .allow_loopback = 1, .allow_private = 1,
         .concurrency = 1, .timeout_ms = 1, .max_body = 1}};
    char *s = malloc(size + 1);
    char why[64];
    if (!s)
        return 0;
    memcpy(s, data, size);
    s[size] = '\0';
    static const mr_addr_rule provisioners = {.allow_loopback = 1, .allow_private = 1};
    why[0] = '\0';
    if (mr_addr_check_url(s, &provisioners, why, sizeof why) != MR_OK && why[0] == '\0')
        abort();
    for (int i = 0; i < 2; i++) {
        why[0] = '\0';
        if (mr_probe_check_url(s, &o[i], why, sizeof why) != MR_OK && why[0] == '\0')
            abort(); /* a refusal always says why */
        if (size >= 4)
            (void)mr_probe_addr_allowed(AF_INET, data, &o[i]);
        if (size >= 16)
            (void)mr_probe_addr_allowed(AF_INET6, data, &o[i]);
    }
    free(s);
    return 0;
}
