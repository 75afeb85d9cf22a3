/* bare: a FastCGI responder with nothing but libfcgi, as libfcgi's examples
 * write one. `make bench` runs it next to noop as the reference: noop adds the
 * runtime's work (method/auth dispatch, request id, access log line, signal
 * discipline) and saves libfcgi's draining close (lib/mr_http.c, serve()), so
 * the difference shows what each costs. MR_SOCKET, MR_WORKERS (default 2). */
#include <fcgiapp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
    const char *path = getenv("MR_SOCKET");
    const char *w = getenv("MR_WORKERS");
    int workers = w ? atoi(w) : 2;
    if (!path || workers < 1) {
        fprintf(stderr, "bare: MR_SOCKET and MR_WORKERS >= 1 required\n");
        return 2;
    }
    unlink(path);
    if (FCGX_Init() != 0)
        return 1;
    /* FCGX_Init catches SIGTERM (it only sets a flag): back to the default, so
     * the harness's SIGTERM ends the master and its workers at once. */
    signal(SIGTERM, SIG_DFL);
    int fd = FCGX_OpenSocket(path, 1024);
    if (fd < 0)
        return 1;
    for (int i = 0; i < workers; i++) {
        if (fork() == 0) {
            FCGX_Request rq;
            FCGX_InitRequest(&rq, fd, 0);
            while (FCGX_Accept_r(&rq) >= 0)
                FCGX_PutS("Status: 200 OK\r\nContent-Type: application/json\r\n\r\n{\"ok\":true}",
                          rq.out);
            _exit(0);
        }
    }
    /* Until SIGTERM (default action), which the harness sends to the group. */
    for (;;)
        pause();
}
