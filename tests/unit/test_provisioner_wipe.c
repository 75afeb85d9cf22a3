/* test_provisioner_wipe.c: an instance's secrets (its API keys, its control-plane
 * token, the homeserver's keys) pass through the provisioner's memory on every
 * create/update: in the request, in the JSON parsed from it, and in Dokku's output
 * (config:import echoes the values it sets). A worker serves many instances for
 * days; memory it frees still holding them is readable in a core dump, by a
 * debugger, or by the next bug that reads past a buffer. Each block freed after a
 * request must no longer hold any of them. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SECRET "sk-wipe-me-7f3a9c2e5b1d"

/* Blocks freed while still holding SECRET. */
static int held;

static void checked_free(void *p)
{
    if (p && memmem(p, malloc_usable_size(p), SECRET, strlen(SECRET)))
        held++;
    free(p);
}

/* The modules under test are part of the function's binary, not of libmindroom:
 * every free() in them is checked. */
#define free(p) checked_free(p)
#define env_cmp validate_env_cmp
#include "../../functions/dokku-provisioner/validate.c"
#undef env_cmp
#include "../../functions/dokku-provisioner/files.c"
#include "../../functions/dokku-provisioner/state.c"
#define listed runner_listed
#include "../../functions/dokku-provisioner/runner.c"
#undef listed
#include "../../functions/dokku-provisioner/ops.c"
#undef free

static char dir[64], bin[128];
static prov_config c;

static int setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/mr-prov-wipe-XXXXXX");
    if (!mkdtemp(dir)) return -1;
    /* A Dokku that echoes its stdin, as config:import echoes what it sets. */
    snprintf(bin, sizeof bin, "%s/dokku", dir);
    FILE *f = fopen(bin, "w");
    if (!f) return -1;
    fputs("#!/bin/sh\n"
          "case \"$1\" in\n"
          "  config:get) exit 1 ;;\n"
          "  ps:report) echo true ;;\n"
          "  *) cat ;;\n"
          "esac\n", f);
    fclose(f);
    chmod(bin, 0700);
    memset(&c, 0, sizeof c);
    c.mode = PROV_MODE_LOCAL;
    c.token = "test-token";
    c.dokku_bin = bin;
    c.app_prefix = "mindroom-";
    c.image = "mindroom@sha256:0000000000000000000000000000000000000000000000000000000000000000";
    c.base_domain = "mr.test";
    c.tls = PROV_TLS_OFF;
    c.mindroom_port = 8765;
    c.mindroom_data_dir = "/mindroom_data";
    c.mindroom_uid = 1000;
    c.child_env = "";
    c.min_memory_mb = 128;
    c.max_memory_mb = 8192;
    c.max_cpu_milli = 4000;
    c.max_storage_gb = 100;
    c.command_timeout_ms = c.deploy_timeout_ms = 10000;
    c.lock_backoff_ms = 10;
    c.app_lock_wait_ms = 1000;
    c.request_timeout_ms = 30000;
    c.state_dir = dir;
    c.matrix_host_tpl = "{subdomain}-matrix";
    char err[256];
    return prov_state_init(&c, err, sizeof err) == MR_OK ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void *hook_malloc(size_t n)
{
    return malloc(n);
}

static void test_a_create_leaves_no_secret_in_freed_memory(void **state)
{
    (void)state;
    cJSON_Hooks hooks = {hook_malloc, checked_free};
    cJSON_InitHooks(&hooks);
    static const char body[] =
        "{\"app\": \"mindroom-abc\", \"subdomain\": \"abc\", \"memory_mb\": 512, \"cpu\": 0.5,"
        " \"env\": {\"OPENAI_API_KEY\": \"" SECRET "\", \"MINDROOM_TIER\": \"starter\"}}";
    cJSON *tree = NULL;
    prov_spec *spec = calloc(1, sizeof *spec);
    prov_outcome o;
    char err[256] = "";
    assert_int_equal(prov_parse_spec(body, strlen(body), &c, &tree, spec, err, sizeof err), MR_OK);
    mr_err e = prov_apply(&c, spec, &o, err, sizeof err);
    assert_int_equal(e, MR_OK);
    prov_spec_free(tree);
    free(spec);
    cJSON_InitHooks(NULL);
    assert_int_equal(held, 0);
}

int main(void)
{
    mr_log_init("test", MR_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_a_create_leaves_no_secret_in_freed_memory, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
