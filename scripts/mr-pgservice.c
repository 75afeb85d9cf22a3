/* mr-pgservice: turns the libpq connection string in an environment variable
 * (default DATABASE_URL; a URL or key=value words) into a connection service file
 * section on stdout, so that a script can run `psql service=NAME` with
 * PGSERVICEFILE pointing at a private file instead of putting the string (and its
 * password) on psql's command line, where `ps` and /proc/<pid>/cmdline show it.
 *
 *   mr-pgservice [--var NAME] [--service NAME]     (service name default "mindroom")
 *
 * libpq's own parser (PQconninfoParse) reads the string, so a URL is understood
 * exactly as psql would understand it. Exit 2 when the variable is unset or not a
 * valid connection string (the message never repeats it); a value a service file
 * cannot carry (a line break, trailing white space, which libpq strips from each
 * line) is refused likewise. A string that names a service itself (service=NAME,
 * the usual way to keep a password off command lines) cannot be written as another
 * service, since a service file cannot name one: exit 3, nothing on stdout, and the
 * caller passes the string to psql as it is, with the caller's PGSERVICEFILE; it
 * holds no secret, since one that also holds a password is refused (exit 2). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "mr_version.h"

int main(int argc, char **argv)
{
    const char *var = "DATABASE_URL", *service = "mindroom";
    if (mr_version_arg("mr-pgservice", argc, argv))
        return 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--var") && i + 1 < argc) {
            var = argv[++i];
        } else if (!strcmp(argv[i], "--service") && i + 1 < argc) {
            service = argv[++i];
        } else {
            fprintf(stderr, "usage: mr-pgservice [--var NAME] [--service NAME] | --version\n");
            return 2;
        }
    }
    if (strspn(service, "abcdefghijklmnopqrstuvwxyz0123456789_-") != strlen(service) || !*service) {
        fprintf(stderr, "mr-pgservice: a service name is [a-z0-9_-]\n");
        return 2;
    }
    const char *conninfo = getenv(var);
    if (!conninfo || !*conninfo) {
        fprintf(stderr, "mr-pgservice: %s is not set\n", var);
        return 2;
    }
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &perr);
    if (!opts) {
        /* libpq's message may quote the string, password included: not shown. */
        fprintf(stderr, "mr-pgservice: %s is not a valid libpq connection string\n", var);
        PQfreemem(perr);
        return 2;
    }
    int rc = 0, named = 0, password = 0;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        size_t n = o->val ? strlen(o->val) : 0;
        if (n && (strpbrk(o->val, "\r\n") || strchr(" \t\f\v", o->val[n - 1])))
            rc = 2;
        if (n && !strcmp(o->keyword, "service"))
            named = 1;
        if (n && !strcmp(o->keyword, "password"))
            password = 1;
    }
    if (named) {
        if (password)
            fprintf(stderr, "mr-pgservice: %s names a service and holds a password: keep the "
                    "password in the service file (or ~/.pgpass)\n", var);
        rc = password ? 2 : 3;
    } else if (rc) {
        fprintf(stderr, "mr-pgservice: a value in %s has a line break or trailing white space, "
                "which a service file cannot carry\n", var);
    } else {
        printf("[%s]\n", service);
        for (PQconninfoOption *o = opts; o->keyword; o++)
            if (o->val && *o->val)
                printf("%s=%s\n", o->keyword, o->val);
    }
    PQconninfoFree(opts);
    return rc;
}
