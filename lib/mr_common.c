/* mr_common.c: error names, status mapping, constant-time compare, clocks. */
#include "mr_common.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

static const struct {
    const char *name;
    int status;
} err_table[] = {
    [MR_OK] = {"ok", 200},
    [MR_EINVAL] = {"invalid", 400},
    [MR_EAUTH] = {"unauthorized", 401},
    [MR_EFORBIDDEN] = {"forbidden", 403},
    [MR_ENOTFOUND] = {"not_found", 404},
    [MR_ECONFLICT] = {"conflict", 409},
    [MR_ETOOBIG] = {"too_big", 413},
    [MR_ETRANSIENT] = {"transient", 503},
    [MR_EINTERNAL] = {"internal", 500},
};

const char *mr_err_name(mr_err e)
{
    if ((unsigned)e >= MR_ARRAY_LEN(err_table))
        return "internal";
    return err_table[e].name;
}

int mr_err_status(mr_err e)
{
    if ((unsigned)e >= MR_ARRAY_LEN(err_table))
        return 500;
    return err_table[e].status;
}

mr_err mr_seterr(char *err, size_t errlen, mr_err e, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return e;
}

int mr_ct_equal(const void *a, size_t alen, const void *b, size_t blen)
{
    const volatile unsigned char *pa = a, *pb = b;
    /* Walk all of a whatever b holds, so the loop's length never depends on
     * where the first difference is; a length mismatch is folded in at the end. */
    unsigned char diff = 0;
    for (size_t i = 0; i < alen; i++)
        diff |= (unsigned char)(pa[i] ^ (i < blen ? pb[i] : 0));
    return (diff == 0) & (alen == blen);
}

int64_t mr_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t mr_now_ms(void)
{
    return mr_now_ns() / 1000000;
}

void mr_hex(const void *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    const unsigned char *b = in;
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = '\0';
}

int mr_is_uuid(const char *s)
{
    if (!s)
        return 0;
    for (int k = 0; k < 36; k++) {
        if (k == 8 || k == 13 || k == 18 || k == 23) {
            if (s[k] != '-')
                return 0;
        } else if (!isxdigit((unsigned char)s[k])) {
            return 0;
        }
    }
    return s[36] == '\0';
}

const mr_identity mr_service_identity = {
    .role = "service_role", .sub = "", .claims_json = (char *)"{\"role\":\"service_role\"}"};
