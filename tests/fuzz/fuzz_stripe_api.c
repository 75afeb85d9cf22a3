/* libFuzzer harness: what the Stripe API client reads and writes. The input is
 * read both as an answer from Stripe (its error body: mr_stripe_api_parse_error)
 * and as parameters to form-encode (any JSON object, however nested).
 * fuzz-targets: lib/mr_stripe_api.c */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "mr_json.h"
#include "mr_stripe_api.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mr_stripe_api_result res;
    char msg[128];
    memset(&res, 0, sizeof res);
    (void)mr_stripe_api_parse_error((const char *)data, size, &res, msg, sizeof msg);
    if (strlen(res.error_type) >= sizeof res.error_type || strlen(msg) >= sizeof msg)
        abort();
    cJSON *params = mr_json_parse((const char *)data, size);
    char *form = mr_stripe_api_form(params);
    /* Whatever came in, what goes out is one line of form text: no raw
     * separators or control bytes inside a key or a value. */
    for (const char *p = form; p && *p; p++)
        if ((unsigned char)*p <= ' ' || *p == '+' || *p == '#')
            abort();
    free(form);
    cJSON_Delete(params);
    return 0;
}
