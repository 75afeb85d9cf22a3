/* libFuzzer harness: the dokku-provisioner's POST /apps body parser and the
 * checks that decide what may reach a `dokku` command line. Whatever it
 * accepts must be made only of the alphabets the runner allows over ssh.
 * validate.c is #included, so it is instrumented with the harness.
 * fuzz-targets: lib/mr_json.c */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../functions/dokku-provisioner/validate.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static prov_spec spec;
    prov_config c;
    memset(&c, 0, sizeof c);
    c.base_domain = "mr.test";
    c.min_memory_mb = 128;
    c.max_memory_mb = 8192;
    c.max_cpu_milli = 4000;
    cJSON *tree = NULL;
    char err[256];
    if (prov_parse_spec((const char *)data, size, &c, &tree, &spec, err, sizeof err) == MR_OK) {
        if (!prov_valid_name(spec.app) || !prov_valid_name(spec.subdomain)) abort();
        if (spec.memory_mb < 128 || spec.memory_mb > 8192) abort();
        if (spec.cpu_milli < 1 || spec.cpu_milli > 4000) abort();
        for (size_t i = 0; i < spec.n_env; i++) {
            if (!prov_valid_env_key(spec.env[i].key)) abort();
            if (i && strcmp(spec.env[i - 1].key, spec.env[i].key) >= 0) abort();
        }
        char cpu[32], url[256];
        prov_format_cpu(spec.cpu_milli, cpu, sizeof cpu);
        (void)prov_expand_url("{scheme}://{subdomain}.{domain}/{app}", spec.app, spec.subdomain,
                              &c, url, sizeof url);
    } else if (!err[0]) {
        abort();
    }
    cJSON_Delete(tree);
    return 0;
}
