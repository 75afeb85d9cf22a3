/* state.c: the provisioner's state directory (PROVISIONER_STATE_DIR).
 *
 *   locks/<app>.lock    one flock per instance: one request at a time
 *   apps/<app>.spec     fingerprint of what the last successful create/update
 *                       applied to an app (decides whether an unchanged image
 *                       needs a restart)
 *   dry-run/...         the simulated registry of dry-run mode
 *
 * The provisioner may run as root (local mode on the Dokku host), so this
 * directory must not let another local user steer a write: it is refused
 * unless it is a real directory owned by our user and not writable by group
 * or others, every file in it is opened with O_NOFOLLOW (a planted symlink
 * fails instead of redirecting the write), and new files are made with
 * mkstemp and renamed into place, never by a predictable temporary name (the
 * dry-run registry's records are written in place: prov_state_overwrite). */
#include <errno.h>
#include <fcntl.h>
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
    return e;
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

long prov_state_read(const prov_config *cfg, const char *rel, char *buf, size_t cap)
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

mr_err prov_state_write(const prov_config *cfg, const char *rel, const char *text)
{
    char path[1024], tmp[1100];
    if (!path_of(cfg, rel, path, sizeof path)) return MR_EINTERNAL;
    /* The temporary lives next to its target (same directory, so rename is
     * atomic) under a name mkstemp picks and creates with O_EXCL. */
    const char *slash = strrchr(path, '/');
    int n = snprintf(tmp, sizeof tmp, "%.*s/.tmp.XXXXXX", (int)(slash - path), path);
    if (n < 0 || (size_t)n >= sizeof tmp) return MR_EINTERNAL;
    int fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0) return MR_EINTERNAL;
    size_t len = strlen(text), off = 0;
    while (off < len) {
        ssize_t w = write(fd, text + off, len - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        off += (size_t)w;
    }
    int ok = off == len && close(fd) == 0;
    /* rename replaces whatever is at path, a symlink included, without following it. */
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return MR_EINTERNAL;
    }
    return MR_OK;
}

mr_err prov_state_overwrite(const prov_config *cfg, const char *rel, const char *text)
{
    char path[1024];
    if (!path_of(cfg, rel, path, sizeof path)) return MR_EINTERNAL;
    int fd = open_own(path, O_WRONLY | O_CREAT);
    if (fd < 0) return MR_EINTERNAL;
    size_t len = strlen(text);
    ssize_t w;
    do w = pwrite(fd, text, len, 0);
    while (w < 0 && errno == EINTR);
    int ok = w == (ssize_t)len && ftruncate(fd, (off_t)len) == 0;
    return close(fd) == 0 && ok ? MR_OK : MR_EINTERNAL;
}

void prov_state_remove(const prov_config *cfg, const char *rel)
{
    char path[1024];
    if (path_of(cfg, rel, path, sizeof path)) unlink(path);
}

mr_err prov_lock(const prov_config *cfg, const char *app, int *fd, char *err, size_t errlen)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/locks/%s.lock", cfg->state_dir, app);
    *fd = open_own(path, O_RDWR | O_CREAT);
    if (*fd < 0)
        return mr_seterr(err, errlen, MR_EINTERNAL, "cannot open the app's lock file safely");
    int64_t until = mr_now_ms() + cfg->app_lock_wait_ms;
    while (flock(*fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK && errno != EINTR) break;
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
    if (fd >= 0) close(fd); /* closing releases the flock */
}
