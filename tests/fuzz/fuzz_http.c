/* libFuzzer harness: the request edge: CONTENT_LENGTH parsing, exact-length body
 * reads with short input, the Bearer header and query-string decoding.
 * fuzz-targets: lib/mr_http_parse.c */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "mr_http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct { const uint8_t *p; size_t n; } src;

static int reader(void *ctx, char *buf, int n)
{
    src *s = ctx;
    size_t k = s->n < (size_t)n ? s->n : (size_t)n;
    memcpy(buf, s->p, k);
    s->p += k;
    s->n -= k;
    return (int)k;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *str = malloc(size + 1);
    char out[256];
    size_t len;
    mr_err e;
    if (!str)
        return 0;
    memcpy(str, data, size);
    str[size] = '\0';

    if (mr_http_content_length(str, 65536, &len) == MR_OK) {
        src s = { data, size };
        char *body = mr_http_read_exact(reader, &s, len, &e);
        if (body && len > size)
            abort(); /* a body longer than the input cannot have been read fully */
        free(body);
    }
    (void)mr_http_bearer(str);
    (void)mr_http_query_param(str, "instance_id", out, sizeof out);
    (void)mr_http_query_param(str, "sweep", out, sizeof out);
    free(str);
    return 0;
}
