/* report.h: what an instance's usage report may say (track-usage's body).
 *
 * The body is empty (one message, no names) or a JSON object with at most the
 * members "agent" and "tool", each absent, null, or a name of 1 to
 * TU_NAME_MAX characters of letters, digits and - _ . : @ (the agent's and the
 * tool's names as MindRoom's configuration spells them). Anything else is
 * refused with a message saying what, so nothing is counted for a report the
 * instance did not mean. A body with an escape sequence (a backslash) is refused:
 * names need none. */
#ifndef TU_REPORT_H
#define TU_REPORT_H

#include <stddef.h>
#include "mr_common.h"

#define TU_NAME_MAX 64

typedef struct {
    char agent[TU_NAME_MAX + 1]; /* "" when not given */
    char tool[TU_NAME_MAX + 1];
} tu_report;

/* Parses len bytes of body (need not be NUL-terminated). Returns MR_OK with *out
 * filled, or MR_EINVAL with err saying what is wrong (never echoing more than a
 * member's name). */
mr_err tu_report_parse(const char *body, size_t len, tu_report *out, char *err, size_t errlen);

#endif
