/* mr_json.c: typed getters on cJSON with explicit lengths and range checks. */
#include "mr_json.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

/* 2^53 - 1: above it doubles stop being exact, and 2^53 + 1 parses to 2^53,
 * so 2^53 itself cannot be told apart from a rounded larger number. */
#define MR_JSON_MAX_SAFE 9007199254740991.0

cJSON *mr_json_parse(const char *buf, size_t len)
{
    if (!buf || memchr(buf, '\0', len))
        return NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(buf, len, &end, 0);
    if (!root)
        return NULL;
    /* cJSON stops after the first value; anything but whitespace after it
     * (a second document, a NUL, junk) makes the input malformed. */
    for (size_t i = (size_t)(end - buf); i < len; i++) {
        char c = buf[i];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            cJSON_Delete(root);
            return NULL;
        }
    }
    return root;
}

const cJSON *mr_json_path(const cJSON *root, const char *dotted)
{
    const cJSON *cur = root;
    const char *p = dotted;
    char key[256];
    while (cur && p && *p) {
        const char *dot = strchr(p, '.');
        size_t n = dot ? (size_t)(dot - p) : strlen(p);
        if (n == 0 || n >= sizeof(key) || !cJSON_IsObject(cur))
            return NULL;
        memcpy(key, p, n);
        key[n] = '\0';
        cur = cJSON_GetObjectItemCaseSensitive(cur, key);
        if (dot && dot[1] == '\0')
            return NULL; /* "a." names no key */
        p = dot ? dot + 1 : NULL;
    }
    return cur;
}

/* Common lookup: absent or null is MR_ENOTFOUND. */
static mr_err lookup(const cJSON *obj, const char *key, const cJSON **item)
{
    if (!obj || !cJSON_IsObject(obj))
        return MR_ENOTFOUND;
    *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!*item || cJSON_IsNull(*item))
        return MR_ENOTFOUND;
    return MR_OK;
}

mr_err mr_json_str(const cJSON *obj, const char *key, const char **out)
{
    const cJSON *it;
    mr_err e = lookup(obj, key, &it);
    if (e != MR_OK)
        return e;
    if (!cJSON_IsString(it) || !it->valuestring)
        return MR_EINVAL;
    *out = it->valuestring;
    return MR_OK;
}

mr_err mr_json_bool(const cJSON *obj, const char *key, int *out)
{
    const cJSON *it;
    mr_err e = lookup(obj, key, &it);
    if (e != MR_OK)
        return e;
    if (!cJSON_IsBool(it))
        return MR_EINVAL;
    *out = cJSON_IsTrue(it) ? 1 : 0;
    return MR_OK;
}

mr_err mr_json_i64(const cJSON *obj, const char *key, int64_t min, int64_t max, int64_t *out)
{
    const cJSON *it;
    mr_err e = lookup(obj, key, &it);
    if (e != MR_OK)
        return e;
    if (!cJSON_IsNumber(it))
        return MR_EINVAL;
    /* valueint saturates at INT_MAX; the double is the real value. */
    double d = it->valuedouble;
    if (!isfinite(d) || d != trunc(d) || d > MR_JSON_MAX_SAFE || d < -MR_JSON_MAX_SAFE)
        return MR_EINVAL;
    int64_t v = (int64_t)d;
    if (v < min || v > max)
        return MR_EINVAL;
    *out = v;
    return MR_OK;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sorts the object's names and compares neighbours: n log n, so that a body of
 * thousands of members (an unauthenticated request's, before its caller is known)
 * costs no more than its parse. Objects of up to 32 members (a token's) need no
 * allocation. */
static int object_names_repeat(const cJSON *obj)
{
    const char *small[32], **names = small;
    size_t n = 0;
    for (const cJSON *m = obj->child; m; m = m->next)
        n++;
    if (n > MR_ARRAY_LEN(small) && !(names = malloc(n * sizeof *names)))
        return 1; /* unchecked is refused */
    size_t k = 0;
    for (const cJSON *m = obj->child; m; m = m->next)
        if (m->string)
            names[k++] = m->string;
    qsort(names, k, sizeof *names, cmp_names);
    int dup = 0;
    for (size_t i = 1; i < k && !dup; i++)
        dup = strcmp(names[i - 1], names[i]) == 0;
    if (names != small)
        free(names);
    return dup;
}

int mr_json_has_duplicate_keys(const cJSON *item)
{
    if (!item)
        return 0;
    if (cJSON_IsObject(item) && object_names_repeat(item))
        return 1;
    for (const cJSON *a = item->child; a; a = a->next)
        if (mr_json_has_duplicate_keys(a))
            return 1;
    return 0;
}

int mr_json_has_nul_escape(const char *buf, size_t len)
{
    /* In well-formed JSON a backslash appears only in a string, as an escape:
     * each is read with the character it escapes, so "\\u0000" is not one. */
    for (size_t i = 0; i + 1 < len; i++) {
        if (buf[i] != '\\')
            continue;
        if (buf[i + 1] == 'u' && len - i >= 6 && memcmp(buf + i + 2, "0000", 4) == 0)
            return 1;
        i++;
    }
    return 0;
}

mr_err mr_json_members(const cJSON *obj, const char *const names[], char *err, size_t errlen)
{
    if (!cJSON_IsObject(obj))
        return mr_seterr(err, errlen, MR_EINVAL, "body must be a JSON object");
    unsigned seen = 0;
    for (const cJSON *m = obj->child; m; m = m->next) {
        size_t i = 0;
        while (names[i] && strcmp(names[i], m->string) != 0)
            i++;
        if (!names[i]) {
            char list[160] = "";
            size_t o = 0;
            for (size_t k = 0; names[k] && o < sizeof list; k++)
                o += (size_t)snprintf(list + o, sizeof list - o, "%s\"%s\"",
                                      k == 0 ? "" : names[k + 1] ? ", " : " and ", names[k]);
            return mr_seterr(err, errlen, MR_EINVAL, "unknown member \"%.40s\": the body has only %s",
                             m->string, list);
        }
        if (seen & (1u << i))
            return mr_seterr(err, errlen, MR_EINVAL, "\"%s\" is given twice", names[i]);
        seen |= 1u << i;
    }
    return MR_OK;
}

char *mr_json_print(const cJSON *item)
{
    return item ? cJSON_PrintUnformatted(item) : NULL;
}

char *mr_json_print_wiped(const cJSON *item)
{
    if (!item)
        return NULL;
    /* cJSON's allocator (malloc unless hooks are installed), so that whoever
     * installs hooks sees these buffers as it sees cJSON's own. */
    for (size_t cap = 4096; cap <= (size_t)16 << 20; cap *= 2) {
        char *buf = cJSON_malloc(cap);
        if (!buf)
            return NULL;
        if (cJSON_PrintPreallocated((cJSON *)item, buf, (int)cap, 0))
            return buf;
        OPENSSL_cleanse(buf, cap); /* the part that fitted */
        cJSON_free(buf);
    }
    return NULL;
}
