/* libFuzzer harness: JSON parsing with an explicit length and the typed getters
 * the webhook uses to pull fields out of a Stripe event. 
 * fuzz-targets: lib/mr_json.c */
#include <stdint.h>
#include <stdlib.h>
#include "mr_json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cJSON *root = mr_json_parse((const char *)data, size);
    const char *s;
    int64_t n;
    int b;
    if (!root)
        return 0;
    (void)mr_json_str(root, "id", &s);
    (void)mr_json_str(root, "type", &s);
    (void)mr_json_i64(root, "created", 0, INT64_MAX, &n);
    (void)mr_json_bool(root, "livemode", &b);
    const cJSON *obj = mr_json_path(root, "data.object");
    if (obj) {
        (void)mr_json_str(obj, "customer", &s);
        (void)mr_json_i64(obj, "current_period_end", INT64_MIN, INT64_MAX, &n);
        (void)mr_json_path(obj, "metadata.account_id");
        (void)mr_json_path(obj, "items.data");
    }
    char *out = mr_json_print(root);
    free(out);
    cJSON_Delete(root);
    return 0;
}
