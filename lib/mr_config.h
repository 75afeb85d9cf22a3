/* mr_config.h: configuration from the environment, read once at start-up.
 *
 * Fail fast: a missing required variable or a malformed value prints one clear
 * line naming the variable (never its value when it is a secret) and exits 2,
 * so a misconfigured function never starts serving. */
#ifndef MR_CONFIG_H
#define MR_CONFIG_H

#include <stddef.h>
#include <stdint.h>

/* Returns the value of `name`, or `def` when unset or empty. With def == NULL
 * the variable is required: missing -> message and exit(2). The pointer is
 * the environment's own; do not free. */
const char *mr_config_str(const char *name, const char *def);

/* Like mr_config_str for secrets: also exits when the value has leading or
 * trailing whitespace or is shorter than min_len; the message never shows it. */
const char *mr_config_secret(const char *name, const char *def, size_t min_len);

/* Integer in [min, max]; unset -> def; malformed or out of range -> exit(2). */
int64_t mr_config_int(const char *name, int64_t def, int64_t min, int64_t max);

/* An absolute http:// or https:// URL with a host, at most 2048 characters, no
 * whitespace or control characters; unset -> def (NULL: required). Exits 2
 * otherwise. The pointer is the environment's own (or def). */
const char *mr_config_url(const char *name, const char *def);

/* "1/true/yes/on" or "0/false/no/off"; unset -> def; anything else -> exit(2). */
int mr_config_bool(const char *name, int def);

/* ---- secrets in the environment ----------------------------------------------
 * Every process of an install is given the same environment file. Each keeps only
 * the secret settings it read while starting: the others are wiped before it
 * serves, so a process taken over holds no secret another one needs. */

/* getenv(name), recording that this process reads the setting. Read every
 * secret this way (the mr_config_* readers do), before mr_config_seal(). */
const char *mr_config_getenv(const char *name);

/* Wipes the variable's value (its bytes, where /proc/PID/environ reads them)
 * and removes it from the environment. */
void mr_config_forget(const char *name);

/* Once a process has read its configuration, before it serves or forks: forgets
 * every secret setting it did not read and every *_TOKEN variable (a provisioner
 * target's token; kept with MR_CONFIG_KEEP_TOKENS by the worker, which reads
 * them as it meets the targets), and makes the process non-dumpable (no core
 * file; its memory and /proc/PID/environ are root's alone, not readable by the
 * other processes of its user). Exits 2 if that cannot be done. */
#define MR_CONFIG_KEEP_TOKENS 1u
void mr_config_seal(unsigned keep);

/* Testable core of the above: parse `value` (may be NULL) for variable
 * `name`. Returns MR_OK and fills *out, or MR_EINVAL with err filled. */
#include "mr_common.h"
mr_err mr_config_parse_int(const char *name, const char *value, int64_t def,
                           int64_t min, int64_t max, int64_t *out,
                           char *err, size_t errlen);
mr_err mr_config_parse_bool(const char *name, const char *value, int def,
                            int *out, char *err, size_t errlen);
mr_err mr_config_check_url(const char *name, const char *value, char *err, size_t errlen);
mr_err mr_config_check_secret(const char *name, const char *value, size_t min_len,
                              char *err, size_t errlen);

#endif
