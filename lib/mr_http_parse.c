/* mr_http_parse.c: the pure parsers behind mr_http (no FastCGI), so unit tests
 * and fuzzers can drive them directly. */
#include "mr_http.h"

#include <ctype.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

const char *mr_http_bearer(const char *authorization)
{
    if (!authorization)
        return NULL;
    const char *p = authorization;
    while (*p == ' ' || *p == '\t')
        p++;
    if (strncasecmp(p, "Bearer", 6) != 0 || (p[6] != ' ' && p[6] != '\t'))
        return NULL;
    p += 6;
    while (*p == ' ' || *p == '\t')
        p++;
    return *p ? p : NULL;
}

mr_err mr_http_content_length(const char *value, size_t max, size_t *len)
{
    *len = 0;
    if (!value || !*value)
        return MR_OK;
    /* Digits only: no sign, no spaces, no hex; strtoul would accept all of those. */
    for (const char *p = value; *p; p++)
        if (*p < '0' || *p > '9')
            return MR_EINVAL;
    size_t v = 0;
    for (const char *p = value; *p; p++) {
        size_t d = (size_t)(*p - '0');
        if (d > max || v > (max - d) / 10)
            return MR_ETOOBIG; /* v * 10 + d > max, checked without overflowing */
        v = v * 10 + d;
    }
    *len = v;
    return MR_OK;
}

char *mr_http_read_exact(int (*reader)(void *ctx, char *buf, int n), void *ctx,
                         size_t len, mr_err *e)
{
    char *buf = malloc(len + 1);
    if (!buf) {
        *e = MR_EINTERNAL;
        return NULL;
    }
    size_t got = 0;
    while (got < len) {
        size_t want = len - got;
        if (want > INT_MAX)
            want = INT_MAX;
        int n = reader(ctx, buf + got, (int)want);
        if (n <= 0) {
            /* The client promised len bytes and sent fewer: never hand a
             * handler a truncated body it would take for the whole one. */
            free(buf);
            *e = MR_EINVAL;
            return NULL;
        }
        got += (size_t)n;
    }
    buf[len] = '\0';
    *e = MR_OK;
    return buf;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes [s, s+n) into out[cap] (NUL-terminated). -1 on a bad escape, an
 * encoded NUL (it would silently truncate), or overflow. */
static int form_decode(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '+') {
            c = ' ';
        } else if (c == '%') {
            if (n - i < 3)
                return -1;
            int h = hexval(s[i + 1]), l = hexval(s[i + 2]);
            if (h < 0 || l < 0 || (h == 0 && l == 0))
                return -1;
            c = (char)(h << 4 | l);
            i += 2;
        }
        if (o + 1 >= cap)
            return -1;
        out[o++] = c;
    }
    if (cap == 0)
        return -1;
    out[o] = '\0';
    return 0;
}

mr_err mr_http_query_param(const char *query, const char *key, char *out, size_t cap)
{
    if (!query || !key || !out || cap == 0)
        return MR_ENOTFOUND;
    char name[256];
    const char *p = query;
    mr_err found = MR_ENOTFOUND;
    while (*p) {
        const char *amp = strchr(p, '&');
        size_t n = amp ? (size_t)(amp - p) : strlen(p);
        const char *eq = memchr(p, '=', n);
        size_t klen = eq ? (size_t)(eq - p) : n;
        if (klen > 0 && form_decode(p, klen, name, sizeof(name)) == 0 && strcmp(name, key) == 0) {
            /* Given twice, it is ambiguous (readers differ on which one wins). */
            if (found != MR_ENOTFOUND)
                return MR_EINVAL;
            const char *v = eq ? eq + 1 : p + n;
            size_t vlen = eq ? n - klen - 1 : 0;
            found = form_decode(v, vlen, out, cap) == 0 ? MR_OK : MR_EINVAL;
        }
        p += n;
        if (*p == '&')
            p++;
    }
    return found;
}
