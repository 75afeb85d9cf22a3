/* state.c: the provisioner's state directory (PROVISIONER_STATE_DIR).
 *
 *   locks/instances     one lock per instance, an OFD lock on the byte at
 *                       its name's hash: one request at a time (prov_lock),
 *                       held until the request and every command it started
 *                       have ended (runner.c's keeper keeps a copy)
 *   apps/<xx>           fingerprints of what the last successful create/update
 *                       applied to each app (decide whether an unchanged image
 *                       needs a restart): 256 bucket files, a line
 *                       "<app> <fingerprint>" an app (prov_state_record)
 *   dry-run/<kind>/<xx> the simulated registry of dry-run mode (apps, storage,
 *                       networks): 256 bucket files a kind, a line
 *                       "<name> <state>" an entry (prov_state_record)
 *
 * The provisioner may run as root (local mode on the Dokku host), so this
 * directory must not let another local user steer a write: it is refused
 * unless it is a real directory owned by our user and not writable by group
 * or others, and every file in it is opened with O_NOFOLLOW (a planted symlink
 * fails instead of redirecting the write) and used only if it is a regular file
 * of ours. Files are rewritten in place under their lock, never through a
 * temporary name.
 *
 * Why a fixed set of files and no file an instance: on an ext4 without a
 * journal (this project's build and CI machines) the inode allocator skips
 * every inode freed in the last minutes one by one, reading each from the inode
 * table, so after a test or bench stack's directory is removed each new file
 * costs up to milliseconds, and the provisioner's workers spin on the
 * directory's lock meanwhile. A file a lock, a fingerprint and a dry-run entry
 * made eight new inodes an instance. Now the files are created once (256 a
 * kind at most, and the lock file) and an instance is lines and a lock range.
 * Fingerprints that older versions kept in apps/<app>.spec become records at
 * start-up (migrate_spec_files). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "prov.h"

static const char *const subdirs[] = {"locks", "apps", "dry-run", "dry-run/apps",
                                      "dry-run/storage", "dry-run/networks"};

static mr_err check_dir(const char *path, char *err, size_t errlen)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return mr_seterr(err, errlen, MR_EINVAL, "PROVISIONER_STATE_DIR: cannot stat %s: %s",
                         path, strerror(errno));
    if (S_ISLNK(st.st_mode) || !S_ISDIR(st.st_mode))
        return mr_seterr(err, errlen, MR_EINVAL,
                         "PROVISIONER_STATE_DIR: %s is not a directory (symlinks are refused)",
                         path);
    if (st.st_uid != geteuid())
        return mr_seterr(err, errlen, MR_EINVAL,
                         "PROVISIONER_STATE_DIR: %s is owned by uid %u, not by this user (uid %u)",
                         path, (unsigned)st.st_uid, (unsigned)geteuid());
    if (st.st_mode & (S_IWGRP | S_IWOTH))
        return mr_seterr(err, errlen, MR_EINVAL,
                         "PROVISIONER_STATE_DIR: %s is writable by group or others (mode %04o)",
                         path, (unsigned)(st.st_mode & 07777));
    return MR_OK;
}

static int path_of(const prov_config *cfg, const char *rel, char *out, size_t cap)
{
    int n = snprintf(out, cap, "%s/%s", cfg->state_dir, rel);
    return n > 0 && (size_t)n < cap;
}

/* Opens a file of ours: never through a symlink, only a regular file owned by us. */
static int open_own(const char *path, int flags)
{
    int fd = open(path, flags | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid()) {
        close(fd);
        errno = EPERM;
        return -1;
    }
    return fd;
}

/* Reads a small file of ours (rel under the state directory) into buf,
 * NUL-terminated: its length, or -1. */
static long read_small(const prov_config *cfg, const char *rel, char *buf, size_t cap)
{
    char path[1024];
    if (cap == 0 || !path_of(cfg, rel, path, sizeof path)) return -1;
    int fd = open_own(path, O_RDONLY);
    if (fd < 0) return -1;
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, cap - 1 - n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        n += (size_t)r;
    }
    close(fd);
    buf[n] = '\0';
    return (long)n;
}

#define RECORD_BUCKETS 256             /* bucket files a records directory */
#define RECORD_BUCKET_MAX (64 << 20)    /* a larger bucket is refused, not read */

/* FNV-1a, 64 bits: spreads names over buckets and lock bytes; not a defence
 * (names are ours, validated). */
static uint64_t name_hash(const char *name)
{
    uint64_t h = 14695981039346656037ull;
    for (const unsigned char *c = (const unsigned char *)name; *c; c++)
        h = (h ^ *c) * 1099511628211ull;
    return h;
}

int prov_state_record(const prov_config *cfg, const char *dir, const char *name,
                      const char *set, char *state, size_t cap)
{
    char rel[512], path[1024];
    size_t nlen = strlen(name);
    if (cap) state[0] = '\0';
    if (nlen == 0 || strpbrk(name, " \n") || (set && strpbrk(set, " \n")))
        return -1;
    snprintf(rel, sizeof rel, "%s/%02x", dir, (unsigned)(name_hash(name) % RECORD_BUCKETS));
    if (!path_of(cfg, rel, path, sizeof path)) return -1;
    /* Only a value to set makes the bucket: reading or removing from a missing
     * one finds nothing. */
    int adding = set && set[0];
    int fd = open_own(path, adding ? O_RDWR | O_CREAT : set ? O_RDWR : O_RDONLY);
    if (fd < 0) return !adding && errno == ENOENT ? 0 : -1;
    int rc = -1;
    char *buf = NULL;
    struct stat st;
    while (flock(fd, set ? LOCK_EX : LOCK_SH) != 0)
        if (errno != EINTR) goto out;
    if (fstat(fd, &st) != 0 || st.st_size > RECORD_BUCKET_MAX) goto out;
    size_t len = (size_t)st.st_size, got = 0;
    /* Room for the bucket, a newline it may lack, a new line and a NUL. */
    size_t room = len + nlen + (set ? strlen(set) : 0) + 4;
    if (!(buf = malloc(room))) goto out;
    while (got < len) {
        ssize_t r = pread(fd, buf + got, len - got, (off_t)got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) goto out;
        got += (size_t)r;
    }
    buf[len] = '\0';
    /* The entry's line, if any: "<name> <state>\n" at a line's start. */
    size_t at = 0, end = 0;
    int found = 0, same = 0;
    while (at < len) {
        char *nl = memchr(buf + at, '\n', len - at);
        end = nl ? (size_t)(nl - buf) + 1 : len;
        if (end - at > nlen && memcmp(buf + at, name, nlen) == 0 && buf[at + nlen] == ' ') {
            found = 1;
            size_t vlen = end - at - nlen - 1 - (nl ? 1 : 0);
            const char *v = buf + at + nlen + 1;
            if (cap) snprintf(state, cap, "%.*s", (int)vlen, v);
            same = nl && set && vlen == strlen(set) && memcmp(v, set, vlen) == 0;
            break;
        }
        at = end;
    }
    rc = found;
    if (!set || same || (!found && !adding)) goto out;
    /* The bucket without the entry's line, then its new line (none to remove it);
     * written back from the first byte that changed. */
    size_t from = found ? at : len;
    if (found) {
        memmove(buf + at, buf + end, len - end);
        len -= end - at;
    }
    if (adding) {
        if (len > 0 && buf[len - 1] != '\n') buf[len++] = '\n'; /* a line cut short */
        len += (size_t)sprintf(buf + len, "%s %s\n", name, set);
    }
    size_t off = from;
    while (off < len) {
        ssize_t w = pwrite(fd, buf + off, len - off, (off_t)off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) { rc = -1; goto out; }
        off += (size_t)w;
    }
    if ((off_t)len < st.st_size && ftruncate(fd, (off_t)len) != 0) rc = -1;
out:
    free(buf);
    close(fd); /* releases the flock */
    return rc;
}

/* Fingerprints that older versions kept in a file each, apps/<app>.spec, become
 * records once, at start-up (the file goes when its record is written), so that
 * upgrading restarts no app and nothing after start-up looks for such files. A
 * file that is not ours, a link, or not a fingerprint is left where it is. */
static void migrate_spec_files(const prov_config *cfg)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/apps", cfg->state_dir);
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (n <= 5 || n > 200 || strcmp(e->d_name + n - 5, ".spec") != 0) continue;
        char app[256], rel[272], fp[80];
        snprintf(app, sizeof app, "%.*s", (int)(n - 5), e->d_name);
        snprintf(rel, sizeof rel, "apps/%s", e->d_name);
        if (read_small(cfg, rel, fp, sizeof fp) < 64 || strspn(fp, "0123456789abcdef") != 64)
            continue;
        fp[64] = '\0';
        if (prov_state_record(cfg, "apps", app, fp, NULL, 0) >= 0 && path_of(cfg, rel, path, sizeof path))
            unlink(path);
    }
    closedir(d);
}

mr_err prov_state_init(const prov_config *cfg, char *err, size_t errlen)
{
    if (cfg->state_dir[0] != '/')
        return mr_seterr(err, errlen, MR_EINVAL, "PROVISIONER_STATE_DIR must be an absolute path");
    if (mkdir(cfg->state_dir, 0700) != 0 && errno != EEXIST)
        return mr_seterr(err, errlen, MR_EINVAL, "PROVISIONER_STATE_DIR: cannot create %s: %s",
                         cfg->state_dir, strerror(errno));
    mr_err e = check_dir(cfg->state_dir, err, errlen);
    for (size_t i = 0; e == MR_OK && i < MR_ARRAY_LEN(subdirs); i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", cfg->state_dir, subdirs[i]);
        if (mkdir(path, 0700) != 0 && errno != EEXIST)
            return mr_seterr(err, errlen, MR_EINVAL, "PROVISIONER_STATE_DIR: cannot create %s: %s",
                             path, strerror(errno));
        e = check_dir(path, err, errlen);
    }
    if (e == MR_OK) migrate_spec_files(cfg);
    return e;
}

mr_err prov_lock(const prov_config *cfg, const char *app, int *fd, char *err, size_t errlen)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/locks/instances", cfg->state_dir);
    *fd = open_own(path, O_RDWR | O_CREAT);
    if (*fd < 0)
        return mr_seterr(err, errlen, MR_EINTERNAL, "cannot open the lock file safely");
    /* The app's byte: 62 bits of its hash, so that no two apps share one in
     * practice and start + length stays within off_t. */
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET,
                       .l_start = (off_t)(name_hash(app) >> 2), .l_len = 1};
    int64_t until = mr_now_ms() + cfg->app_lock_wait_ms;
    while (fcntl(*fd, F_OFD_SETLK, &fl) != 0) {
        if (errno != EAGAIN && errno != EACCES && errno != EINTR) {
            int why = errno;
            close(*fd);
            *fd = -1;
            return mr_seterr(err, errlen, MR_EINTERNAL, "cannot take the app's lock: %s",
                             strerror(why));
        }
        if (mr_now_ms() >= until) {
            close(*fd);
            *fd = -1;
            return mr_seterr(err, errlen, MR_ETRANSIENT,
                             "another request is working on this app; retry later");
        }
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return MR_OK;
}

void prov_unlock(int fd)
{
    /* Closing releases the lock, unless a command's keeper still holds it. */
    if (fd >= 0) close(fd);
}
