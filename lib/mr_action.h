/* mr_action.h: the one vocabulary of owed work.
 *
 * What an instance is owed is decided in SQL (public.lifecycle_owed_action, the
 * lifecycle_action domain, sql/migrations/040_owed_work.sql) and arrives in C as
 * text; it is parsed once, where it enters, into this enum, and written back out
 * with mr_action_name in logs and answers. A test holds this list against the
 * domain's CHECK constraint, so the two cannot drift apart. */
#ifndef MR_ACTION_H
#define MR_ACTION_H

#include "mr_common.h"

typedef enum {
    MR_ACTION_NONE = 0, /* nothing owed (SQL NULL) */
    MR_ACTION_CREATE,   /* deploy the app (first time, or again after a failure) */
    MR_ACTION_START,    /* start a stopped app */
    MR_ACTION_UPDATE,   /* apply changed limits or environment to a running app */
    MR_ACTION_STOP,     /* stop a running app (billing) */
    MR_ACTION_DESTROY,  /* remove the app */
    MR_ACTION_EMAIL,    /* send the welcome email */
    MR_ACTION_DESTROY_STORAGE, /* remove a destroyed instance's data (retention over, or purge) */
    MR_ACTION_RESTART,  /* restart both apps, as a tenant asked (the data stays) */
    MR_ACTION_COUNT
} mr_action;

/* The word for a (static string): "create", ...; "none" for MR_ACTION_NONE. */
const char *mr_action_name(mr_action a);

/* Parses s: NULL or "" is MR_ACTION_NONE; a word of the vocabulary its action;
 * anything else MR_EINVAL (and *out = MR_ACTION_NONE). */
mr_err mr_action_parse(const char *s, mr_action *out);

#endif
