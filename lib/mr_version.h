/* mr_version.h: what was built, compiled in once (lib/mr_version.c; the Makefile
 * passes scripts/version.sh's answer and the migrations' versions). */
#ifndef MR_VERSION_H
#define MR_VERSION_H

/* The build's version ("0.1.0+r412.g2a635a9d1e2f"); static storage. */
const char *mr_version(void);

/* The versions of the migrations in sql/migrations at build time, oldest first,
 * comma-separated ("000,001,...,090"): the schema these binaries expect the
 * database to have; static storage. */
const char *mr_schema_versions(void);

/* When argv[1] is "--version": prints "<name> <version>" on stdout and returns 1
 * (the caller exits 0); otherwise 0. */
int mr_version_arg(const char *name, int argc, char **argv);

#endif
