/* libFuzzer harness: the dokku-provisioner's POST /apps body parser and the
 * checks that decide what may reach a `dokku` command line. Whatever it
 * accepts must be made only of the alphabets the runner allows over ssh.
 * validate.c is #included, so it is instrumented with the harness; the
 * homeserver's secrets go through mr_homeserver.c's checks.
 * fuzz-targets: lib/mr_json.c lib/mr_homeserver.c lib/mr_b64.c */
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
    c.app_prefix = "mindroom-";
    c.matrix_host_tpl = "{subdomain}-matrix";
    c.min_memory_mb = 128;
    c.max_memory_mb = 8192;
    c.max_cpu_milli = 4000;
    c.max_storage_gb = 100;
    cJSON *tree = NULL;
    char err[256];
    if (prov_parse_spec((const char *)data, size, &c, &tree, &spec, err, sizeof err) == MR_OK) {
        if (!prov_valid_app(&c, spec.app) || !prov_valid_name(spec.subdomain)) abort();
        if (spec.lim.memory_mb < 128 || spec.lim.memory_mb > 8192) abort();
        if (spec.lim.cpu_milli < 1 || spec.lim.cpu_milli > 4000) abort();
        if (spec.lim.storage_gb < 0 || spec.lim.storage_gb > 100) abort();
        char host[PROV_HOST_MAX + 1];
        if (prov_matrix_host(&c, spec.app, spec.subdomain, host, sizeof host) != MR_OK) abort();
        if (spec.hs.present) {
            /* What reaches homeserver.yaml and the secret files: no quote, no
             * newline, no space (YAML and Synapse's file reads stay exact). */
            const char *v[] = {spec.hs.server_name, spec.hs.registration_shared_secret,
                               spec.hs.macaroon_secret_key, spec.hs.form_secret};
            for (size_t i = 1; i < 4; i++)
                if (strpbrk(v[i], "\"'\n\r :#")) abort();
            if (!prov_valid_host(spec.hs.server_name)) abort();
            if (strchr(spec.hs.signing_key, '\n')) abort();
        }
        for (size_t i = 0; i < spec.n_env; i++) {
            if (!mr_appenv_valid_key(spec.env[i].key) || mr_appenv_reserved_key(spec.env[i].key))
                abort();
            if (i && strcmp(spec.env[i - 1].key, spec.env[i].key) >= 0) abort();
        }
        char cpu[32], url[256];
        prov_format_cpu(spec.lim.cpu_milli, cpu, sizeof cpu);
        (void)prov_expand_url("{scheme}://{subdomain}.{domain}/{app}", spec.app, spec.subdomain,
                              &c, url, sizeof url);
    } else if (!err[0]) {
        abort();
    }
    cJSON_Delete(tree);
    return 0;
}
