/* A small JSON API as a WASI command (CGI-style, see hello.c):
 *   GET  /items       the list of items
 *   GET  /items/N     one item, or 404
 *   POST /sum         the sum and count of the whitespace-separated integers in the body
 * anything else: 404 or 405, as JSON. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *ITEMS[] = {"apple", "pear", "plum"};
#define N_ITEMS (sizeof ITEMS / sizeof ITEMS[0])

static void reply(int status, const char *body) {
    printf("Status: %d\r\nContent-Type: application/json\r\n\r\n%s\n", status, body);
}

int main(void) {
    const char *method = getenv("REQUEST_METHOD");
    const char *path = getenv("PATH_INFO");
    char out[512];
    if (!method || !path) {
        reply(500, "{\"error\":\"not run as a CGI handler\"}");
        return 0;
    }
    if (strcmp(path, "/items") == 0) {
        if (strcmp(method, "GET") != 0) { reply(405, "{\"error\":\"GET only\"}"); return 0; }
        size_t n = (size_t)snprintf(out, sizeof out, "[");
        for (size_t i = 0; i < N_ITEMS; i++)
            n += (size_t)snprintf(out + n, sizeof out - n, "%s{\"id\":%zu,\"name\":\"%s\"}", i ? "," : "", i + 1, ITEMS[i]);
        snprintf(out + n, sizeof out - n, "]");
        reply(200, out);
    } else if (strncmp(path, "/items/", 7) == 0) {
        char *end;
        long id = strtol(path + 7, &end, 10);
        if (*end || id < 1 || (size_t)id > N_ITEMS) {
            snprintf(out, sizeof out, "{\"error\":\"no item %.40s\"}", path + 7);
            reply(404, out);
        } else {
            snprintf(out, sizeof out, "{\"id\":%ld,\"name\":\"%s\"}", id, ITEMS[id - 1]);
            reply(200, out);
        }
    } else if (strcmp(path, "/sum") == 0) {
        if (strcmp(method, "POST") != 0) { reply(405, "{\"error\":\"POST only\"}"); return 0; }
        long long sum = 0, count = 0, x;
        while (scanf("%lld", &x) == 1) { sum += x; count++; }
        snprintf(out, sizeof out, "{\"sum\":%lld,\"count\":%lld}", sum, count);
        reply(200, out);
    } else {
        reply(404, "{\"error\":\"no such endpoint\"}");
    }
    return 0;
}
