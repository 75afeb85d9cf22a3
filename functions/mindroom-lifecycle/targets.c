/* targets.c: which provisioner a step goes to.
 *
 * An instance placed on a provisioner target (public.provisioner_targets, chosen
 * by the placement rule in SQL) is worked on through that target's URL, with the
 * token its row names: "env:NAME" (a variable of the worker's environment) or
 * "file:/path" (a file the worker can read). The database holds only that
 * reference. An instance without a target, and every instance while no target
 * exists, goes to DOKKU_PROVISIONER_URL with DOKKU_PROVISIONER_TOKEN, as before.
 * A claimed step carries its target as the claim's transaction read it
 * (public.lifecycle_step_json, "target"). The claim never hands out work of a
 * disabled target; one disabled by then is refused here, and the step fails and
 * is retried like any outage. The teardown job of a deleted instance goes to the
 * target its teardown record kept (public.instance_teardowns_due gives it), the
 * same way.
 *
 * After each call to a target the worker compares whether it was answered
 * (targets_answers: its provisioner answered, and did not answer that its Dokku
 * host was out of reach) with what the target's row said ("answering") and
 * records a change (public.target_answered): new instances are placed on the
 * targets that answer first (public.target_choose), so a host that is down or
 * unreachable stops taking new customers once one call there went unanswered, and
 * takes them again once one is answered. Only a change costs a round trip. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "worker.h"

/* Reads a token file (at most TARGET_TOKEN_MAX - 1 bytes, one line, trailing
 * newline dropped). Like ssh with its keys, a file others could read or change is
 * refused: it must be a regular file of the worker's user or root, neither
 * group-writable nor open to other users (0600, or 0640 with the worker's group).
 * Returns MR_OK or MR_EINVAL with err naming the path only. */
static mr_err read_token_file(const char *path, char *out, size_t cap, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return mr_seterr(err, errlen, MR_EINVAL, "cannot read the token file %s (%s)", path,
                         strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return mr_seterr(err, errlen, MR_EINVAL, "the token file %s is not a regular file", path);
    }
    if ((st.st_mode & (S_IWGRP | S_IRWXO)) || (st.st_uid != geteuid() && st.st_uid != 0)) {
        close(fd);
        return mr_seterr(err, errlen, MR_EINVAL,
                         "the token file %s is open to other users (mode %04o, owner uid %u): "
                         "make it the worker's or root's, mode 0600",
                         path, (unsigned)(st.st_mode & 07777), (unsigned)st.st_uid);
    }
    ssize_t n = read(fd, out, cap - 1);
    int more = n > 0 && (size_t)n == cap - 1;
    close(fd);
    if (n <= 0 || more)
        return mr_seterr(err, errlen, MR_EINVAL, "the token file %s is empty or too long", path);
    out[n] = '\0';
    while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == '\r')) out[--n] = '\0';
    if (n < 16 || memchr(out, '\n', (size_t)n))
        return mr_seterr(err, errlen, MR_EINVAL, "the token file %s holds no token", path);
    return MR_OK;
}

/* Fills *t and p from a target object ({"target", "url", "token_ref", "enabled"}). */
static mr_err use_target(const cJSON *o, mr_provisioner *p, worker_target *t, char *err,
                         size_t errlen)
{
    const char *name = "", *url = "", *ref = "";
    if (mr_json_str(o, "target", &name) != MR_OK || mr_json_str(o, "url", &url) != MR_OK ||
        mr_json_str(o, "token_ref", &ref) != MR_OK || strlen(url) >= sizeof t->url ||
        strlen(name) >= sizeof t->name)
        return mr_seterr(err, errlen, MR_EINTERNAL, "unreadable provisioner target");
    snprintf(t->name, sizeof t->name, "%s", name);
    snprintf(t->url, sizeof t->url, "%s", url);
    t->answering = !cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(o, "answering"));
    if (!cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "enabled")))
        return mr_seterr(err, errlen, MR_ETRANSIENT, "provisioner target %s is disabled", t->name);
    mr_err e = MR_OK;
    if (strncmp(ref, "env:", 4) == 0) {
        const char *v = mr_config_getenv(ref + 4);
        if (!v || strlen(v) < 16 || strlen(v) >= sizeof t->token)
            e = mr_seterr(err, errlen, MR_EINVAL, "provisioner target %s: %s is not set to a token",
                          t->name, ref + 4);
        else
            snprintf(t->token, sizeof t->token, "%s", v);
    } else if (strncmp(ref, "file:", 5) == 0) {
        e = read_token_file(ref + 5, t->token, sizeof t->token, err, errlen);
    } else {
        e = mr_seterr(err, errlen, MR_EINVAL, "provisioner target %s: bad token reference",
                      t->name);
    }
    if (e != MR_OK) return e;
    p->url = t->url;
    p->token = t->token;
    t->chosen = 1;
    return MR_OK;
}

mr_err targets_use(const cJSON *target, mr_provisioner *p, worker_target *t, char *err,
                   size_t errlen)
{
    memset(t, 0, sizeof *t);
    if (!target || cJSON_IsNull(target)) return MR_OK;
    if (!cJSON_IsObject(target))
        return mr_seterr(err, errlen, MR_EINTERNAL, "unreadable provisioner target");
    return use_target(target, p, t, err, errlen);
}

mr_err targets_use_text(const char *target_json, mr_provisioner *p, worker_target *t, char *err,
                        size_t errlen)
{
    memset(t, 0, sizeof *t);
    if (!target_json || !*target_json) return MR_OK;
    cJSON *o = mr_json_parse(target_json, strlen(target_json));
    mr_err e = cJSON_IsObject(o) ? use_target(o, p, t, err, errlen)
                                 : mr_seterr(err, errlen, MR_EINTERNAL, "unreadable provisioner target");
    cJSON_Delete(o);
    return e;
}

void targets_forget(worker_target *t)
{
    OPENSSL_cleanse(t->token, sizeof t->token);
}

static const mr_db_stmt answered_stmt = {
    "mr_lc_target_answered", "SELECT public.target_answered($1, $2::boolean)::text", 2};

int targets_answers(const mr_provisioner_call *call)
{
    if (call->outcome == MR_HTTPC_NO_ANSWER ||
        (call->outcome == MR_HTTPC_ANSWERED && call->host_unreachable))
        return 0;
    return call->outcome == MR_HTTPC_ANSWERED ? 1 : -1;
}

void targets_note_answer(worker *w, worker_target *t, const mr_provisioner_call *call)
{
    int answered = targets_answers(call);
    if (!t->chosen || answered < 0 || answered == t->answering)
        return;
    const char *p[] = {t->name, answered ? "true" : "false"};
    char *out = NULL, err[200] = "";
    if (mr_db_call(w->db, &mr_service_identity, &answered_stmt, p, NULL, &out, err, sizeof err)
        != MR_OK) {
        mr_log(MR_LOG_WARN, "provisioner target %s: cannot record whether it answers: %s", t->name,
               err);
    } else if (out && strcmp(out, "true") == 0) { /* this call changed the record */
        if (answered)
            mr_log(MR_LOG_INFO, "provisioner target %s answers again: it takes new instances by "
                   "the placement rule", t->name);
        else
            mr_log(MR_LOG_WARN, "provisioner target %s does not answer (%s): new instances go to "
                   "targets that answer while any has room", t->name, call->error);
    }
    free(out);
    t->answering = answered;
}
