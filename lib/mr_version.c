/* mr_version.c: see mr_version.h. MR_VERSION and MR_SCHEMA_VERSIONS come from the
 * Makefile; this file alone is rebuilt when they change. */
#include "mr_version.h"

#include <stdio.h>
#include <string.h>

#ifndef MR_VERSION
#define MR_VERSION "unknown"
#endif
#ifndef MR_SCHEMA_VERSIONS
#define MR_SCHEMA_VERSIONS ""
#endif

const char *mr_version(void)
{
    return MR_VERSION;
}

const char *mr_schema_versions(void)
{
    return MR_SCHEMA_VERSIONS;
}

int mr_version_arg(const char *name, int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--version") != 0)
        return 0;
    printf("%s %s\n", name, MR_VERSION);
    return 1;
}
