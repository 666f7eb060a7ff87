/* The hello handler: a wakegate wasm service answers every request with a fresh instance of this
 * WASI command. CGI-style: the request comes in the environment (REQUEST_METHOD, PATH_INFO, ...),
 * the response goes to stdout: headers, a blank line, the body. */
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    const char *path = getenv("PATH_INFO");
    printf("Content-Type: text/plain\r\n\r\nhello from wasm: %s\n", path ? path : "/");
    return 0;
}
