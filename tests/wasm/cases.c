/* The test suite's handler (tests/test_wasm.py): what it does is chosen by PATH_INFO.
 *   /echo       the CGI environment, one VAR=value per line, then "body:" and stdin, streamed back
 *   /big?n=N    N bytes of 'x'
 *   /spin       never returns (max_time)
 *   /hog        allocates without bound (max_memory)
 *   /flood      writes without end (max_response)
 *   /trap       a trap after part of the header block
 *   /malformed  a response without a header block
 *   /badstatus  a Status that is not one
 *   /exit       exits with status 3 after a valid response head
 *   /sleep?ms=N waits N ms (a slow handler beside fast ones) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int main(void) {
    const char *path = getenv("PATH_INFO");
    const char *query = getenv("QUERY_STRING");
    if (!path) path = "/";
    if (!strcmp(path, "/echo")) {
        size_t n = 0;
        while (environ[n]) n++;
        qsort(environ, n, sizeof *environ, cmp);
        printf("Status: 201 Created\r\nContent-Type: text/plain\r\nX-Handler: cases\r\n\r\n");
        for (size_t i = 0; i < n; i++) printf("%s\n", environ[i]);
        printf("body:");
        char buf[65536];
        size_t got;
        while ((got = fread(buf, 1, sizeof buf, stdin)) > 0) fwrite(buf, 1, got, stdout);
    } else if (!strcmp(path, "/big")) {
        long n = query ? atol(query + 2) : 0;
        printf("Content-Type: application/octet-stream\r\n\r\n");
        static char chunk[65536];
        memset(chunk, 'x', sizeof chunk);
        while (n > 0) {
            long k = n < (long)sizeof chunk ? n : (long)sizeof chunk;
            fwrite(chunk, 1, (size_t)k, stdout);
            n -= k;
        }
    } else if (!strcmp(path, "/spin")) {
        volatile unsigned long i = 0;
        for (;;) i++;
    } else if (!strcmp(path, "/hog")) {
        static char *volatile kept[100000];
        for (size_t i = 0;; i++) {
            char *p = malloc(1 << 20);
            if (!p) {
                fprintf(stderr, "out of memory after %zu MiB\n", i);
                __builtin_trap();
            }
            memset(p, 1, 1 << 20);
            kept[i % 100000] = p;
        }
    } else if (!strcmp(path, "/flood")) {
        printf("Content-Type: text/plain\r\n\r\n");
        static char chunk[65536];
        memset(chunk, 'f', sizeof chunk);
        for (;;)
            if (fwrite(chunk, 1, sizeof chunk, stdout) < sizeof chunk) return 1;
    } else if (!strcmp(path, "/trap")) {
        printf("Content-Type: text/plain\r\n");
        fflush(stdout);
        __builtin_trap();
    } else if (!strcmp(path, "/malformed")) {
        printf("this is not a CGI response");
    } else if (!strcmp(path, "/badstatus")) {
        printf("Status: great\r\n\r\nbody");
    } else if (!strcmp(path, "/exit")) {
        printf("Content-Type: text/plain\r\n\r\nabout to fail\n");
        return 3;
    } else if (!strcmp(path, "/sleep")) {
        long ms = query ? atol(query + 3) : 0;
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
        nanosleep(&ts, NULL);
        printf("Content-Type: text/plain\r\n\r\nslept %ld\n", ms);
    } else {
        printf("Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nno case %s\n", path);
    }
    return 0;
}
