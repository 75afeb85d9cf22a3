/* report.c: see report.h. */
#include "report.h"

#include <string.h>

#include "mr_json.h"

static int name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '_' || c == '.' || c == ':' || c == '@';
}

/* Copies member key of obj into out ("" when absent or null). */
static mr_err name_member(const cJSON *obj, const char *key, char out[TU_NAME_MAX + 1], char *err,
                          size_t errlen)
{
    const char *s = NULL;
    out[0] = '\0';
    mr_err e = mr_json_str(obj, key, &s);
    if (e == MR_ENOTFOUND)
        return MR_OK;
    size_t n = e == MR_OK ? strlen(s) : 0;
    int ok = e == MR_OK && n >= 1 && n <= TU_NAME_MAX;
    for (size_t i = 0; ok && i < n; i++)
        ok = name_char(s[i]);
    if (!ok)
        return mr_seterr(err, errlen, MR_EINVAL,
                         "%s must be 1 to %d characters of letters, digits and - _ . : @", key,
                         TU_NAME_MAX);
    memcpy(out, s, n + 1);
    return MR_OK;
}

mr_err tu_report_parse(const char *body, size_t len, tu_report *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (len == 0)
        return MR_OK;
    /* Names need no escapes, and JSON's \u0000 would cut a name short in C (cJSON
     * ends the string there): a report with any backslash is refused whole. (A raw
     * NUL is malformed JSON: mr_json_parse refuses it.) */
    if (memchr(body, '\\', len))
        return mr_seterr(err, errlen, MR_EINVAL,
                         "agent and tool must be 1 to %d characters of letters, digits and - _ . : @",
                         TU_NAME_MAX);
    static const char *const members[] = {"agent", "tool", NULL};
    cJSON *j = mr_json_parse(body, len);
    mr_err e = MR_OK;
    if (!cJSON_IsObject(j)) {
        e = mr_seterr(err, errlen, MR_EINVAL, "body must be empty or a JSON object");
    } else if ((e = mr_json_members(j, members, err, errlen)) == MR_OK) {
        e = name_member(j, "agent", out->agent, err, errlen);
        if (e == MR_OK)
            e = name_member(j, "tool", out->tool, err, errlen);
    }
    cJSON_Delete(j);
    if (e != MR_OK)
        memset(out, 0, sizeof *out);
    return e;
}
