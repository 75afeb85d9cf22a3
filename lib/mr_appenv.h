/* mr_appenv.h: the names in a MindRoom app's environment, as the provisioner
 * accepts them (POST /apps "env") and as an operator sets them for an instance
 * (mindroomctl env set): one rule for both. */
#ifndef MR_APPENV_H
#define MR_APPENV_H

#include <stddef.h>

/* What the control plane itself puts in MindRoom's environment to be reached by
 * it (docs/instance.md): its base URL, and the instance's own credential (a
 * secret; also the name of its sealed row in instance_secrets, kind
 * control_plane). They win over an operator's variable of the same name. */
#define MR_APPENV_CONTROL_PLANE_URL "MINDROOM_CONTROL_PLANE_URL"
#define MR_APPENV_CONTROL_PLANE_TOKEN "MINDROOM_CONTROL_PLANE_TOKEN"

/* What the provisioner itself puts in MindRoom's environment: the names of every
 * variable it set there (comma-separated), so that a later create/update unsets
 * the ones it no longer sets (docs/provisioner.md). */
#define MR_APPENV_MANAGED "MINDROOM_MANAGED_ENV"

/* 1 when s is an environment key: ^[A-Z_][A-Z0-9_]*$, at most 255 characters. */
int mr_appenv_valid_key(const char *s);

/* 1 when key is set by Dokku or the provisioner itself (DOKKU_*, PORT,
 * MATRIX_HOMESERVER, MR_APPENV_MANAGED, ...), or is one the container's own
 * processes run by (PATH, HOME, LD_*, ...): a request may not set it. */
int mr_appenv_reserved_key(const char *key);

/* 1 when an operator may set key on an instance (mindroomctl env set): a valid
 * key, not reserved, and not one the control plane itself sets (its address and
 * the instance's token, MINDROOM_INSTANCE_ID, MINDROOM_TIER, MAX_AGENTS, ...).
 * The lifecycle worker sends no stored variable that fails it. */
int mr_appenv_operator_key(const char *key);

/* 1 when s is a value an app's environment can carry: UTF-8 text (no overlong
 * forms, surrogates or code points above U+10FFFF). Dokku reads the environment as
 * JSON (config:import) and would replace a byte that is not UTF-8 with U+FFFD: the
 * app would get another value. mindroomctl env set refuses such a value before it
 * is stored, the provisioner before any command. */
int mr_appenv_valid_value(const char *s);

/* What an operator may set on one instance, in all (mindroomctl env set): at most
 * MR_APPENV_OPERATOR_MAX_VARS variables and MR_APPENV_OPERATOR_MAX_BYTES of them as
 * a create or update carries them to the provisioner (mr_appenv_json_size each).
 * Twice that (an instance that takes over a destroyed one's kept storage gets its
 * variables too), the control plane's own variables, the homeserver's keys and the
 * rest of the request fit in the provisioner's request body (MR_MAX_BODY, 64 KiB)
 * and its PROV_MAX_ENV keys: a value env set takes can always be deployed. */
#define MR_APPENV_OPERATOR_MAX_VARS 100
#define MR_APPENV_OPERATOR_MAX_BYTES (24 * 1024)

/* The bytes "key":"value", takes in a JSON object as cJSON prints it: '"', '\\'
 * and \b \f \n \r \t escaped in two bytes, the other control characters in six
 * (\u00XX), every other byte as it is. */
size_t mr_appenv_json_size(const char *key, const char *value);

#endif
