/* mr-jwt: prints a short-lived HS256 token signed with $MINDROOM_INTERNAL_SECRET
 * (accepted in every SUPABASE_AUTH_MODE), or with $SUPABASE_JWT_SECRET when the
 * internal secret is not set (accepted in modes legacy and both).
 *
 *   mr-jwt [--role R] [--sub UUID] [--exp SECONDS] [--claim k=v]...
 *
 * Defaults: role service_role, exp one hour from now; --exp at most 86400 (the
 * functions refuse internal tokens that live longer). --claim values are
 * strings. Used by `make run`, mindroomctl and the tests. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mindroom.h"
#include "mr_auth.h"
#include "mr_version.h"

static int usage(void)
{
    fprintf(stderr, "usage: mr-jwt [--role R] [--sub UUID] [--exp SECONDS] [--claim k=v]...\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (mr_version_arg("mr-jwt", argc, argv))
        return 0;
    const char *role = "service_role", *sub = NULL;
    int64_t exp_in = 3600;
    time_t now = time(NULL);
    cJSON *claims = cJSON_CreateObject();
    int rc = 0;
    for (int i = 1; i < argc && rc == 0; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char err[128];
        if (!v) {
            rc = usage();
        } else if (!strcmp(a, "--role")) {
            role = v;
        } else if (!strcmp(a, "--sub")) {
            sub = v;
        } else if (!strcmp(a, "--exp")) {
            if (mr_config_parse_int("--exp", v, 0, -MR_AUTH_INTERNAL_MAX_S, MR_AUTH_INTERNAL_MAX_S,
                                    &exp_in, err, sizeof(err)) != MR_OK) {
                fprintf(stderr, "mr-jwt: %s\n", err);
                rc = 2;
            }
        } else if (!strcmp(a, "--claim")) {
            const char *eq = strchr(v, '=');
            if (!eq || eq == v) {
                rc = usage();
            } else {
                char *k = strndup(v, (size_t)(eq - v));
                cJSON_DeleteItemFromObjectCaseSensitive(claims, k);
                cJSON_AddStringToObject(claims, k, eq + 1);
                free(k);
            }
        } else {
            rc = usage();
        }
        i++;
    }
    if (rc != 0) {
        cJSON_Delete(claims);
        return rc;
    }
    const char *secret = mr_config_secret("MINDROOM_INTERNAL_SECRET", "", 32);
    if (!*secret)
        secret = mr_config_secret("SUPABASE_JWT_SECRET", NULL, 32);

    /* Standard claims last, so --claim cannot silently override them. */
    const char *std[] = {"role", "sub", "iat", "exp", "iss"};
    for (size_t i = 0; i < MR_ARRAY_LEN(std); i++)
        cJSON_DeleteItemFromObjectCaseSensitive(claims, std[i]);
    cJSON_AddStringToObject(claims, "iss", "supabase");
    cJSON_AddStringToObject(claims, "role", role);
    if (sub)
        cJSON_AddStringToObject(claims, "sub", sub);
    cJSON_AddNumberToObject(claims, "iat", (double)now);
    cJSON_AddNumberToObject(claims, "exp", (double)(now + exp_in));
    char *payload = mr_json_print(claims);
    cJSON_Delete(claims);
    char *tok = payload ? mr_jwt_sign(payload, (const unsigned char *)secret, strlen(secret)) : NULL;
    free(payload);
    if (!tok) {
        fprintf(stderr, "mr-jwt: out of memory\n");
        return 1;
    }
    printf("%s\n", tok);
    free(tok);
    return 0;
}
