/* mr_json.h: typed, case-sensitive getters on cJSON.
 *
 * Every getter checks the type before reading and returns MR_OK, MR_ENOTFOUND
 * (key absent or JSON null) or MR_EINVAL (present with the wrong type or out of
 * range). Returned strings point into the cJSON tree: valid until it is deleted. */
#ifndef MR_JSON_H
#define MR_JSON_H

#include <cjson/cJSON.h>
#include <stdint.h>
#include "mr_common.h"

/* Parses exactly `len` bytes (need not be NUL-terminated). Returns a tree the
 * caller frees with cJSON_Delete, or NULL on malformed input or trailing junk.
 * A NUL byte anywhere is malformed (JSON has none outside strings and none raw
 * inside them): cJSON would copy it into a string, which C then reads as ending
 * there. (The escape \u0000 is each caller's to refuse where it matters:
 * mr_json_has_nul_escape.) */
cJSON *mr_json_parse(const char *buf, size_t len);

/* Walks a dotted path of object keys ("data.object.customer"). NULL if absent. */
const cJSON *mr_json_path(const cJSON *root, const char *dotted);

mr_err mr_json_str(const cJSON *obj, const char *key, const char **out);
mr_err mr_json_bool(const cJSON *obj, const char *key, int *out);
/* Integers are read from valuedouble: must be integral and within
 * [-(2^53-1), 2^53-1] (JavaScript's safe integers: 2^53 itself is refused
 * because 2^53+1 parses to the same double), then within [min, max]. */
mr_err mr_json_i64(const cJSON *obj, const char *key, int64_t min, int64_t max, int64_t *out);

/* Returns 1 when some object in the tree (at any depth) holds the same key
 * twice, else 0. cJSON keeps both members and its getters return the first,
 * while another reader (PostgreSQL's jsonb keeps the last) may see the other:
 * signed claims must mean one thing to every reader. */
int mr_json_has_duplicate_keys(const cJSON *item);

/* Returns 1 when the JSON text holds the escape \u0000: cJSON ends the string
 * there, so C reads a shorter value than the one sent (or signed). */
int mr_json_has_nul_escape(const char *buf, size_t len);

/* A request body's members: obj is a JSON object whose every member is named in
 * `names` (NULL-terminated, at most 16), each once (a misspelt option must not be
 * ignored, nor a repeated one read as either). A null member reads as absent with
 * the getters above: where absent means "the default one" (an instance id), the
 * caller refuses null itself. MR_OK, or MR_EINVAL with err saying which member and
 * why. */
mr_err mr_json_members(const cJSON *obj, const char *const names[], char *err, size_t errlen);

/* Serializes without whitespace. Returns malloc'd text the caller frees with free(). */
char *mr_json_print(const cJSON *item);

/* mr_json_print for a document that holds secrets: cJSON_PrintUnformatted grows its
 * buffer by reallocating it and frees each smaller copy as it was, so the secrets
 * would stay readable in freed memory. This prints into buffers of its own
 * (cJSON_PrintPreallocated never allocates), doubling from 4 KiB up to 16 MiB, and
 * wipes each one too small before freeing it. The caller wipes the text and frees
 * it with free(). NULL when out of memory or over 16 MiB. */
char *mr_json_print_wiped(const cJSON *item);

#endif
