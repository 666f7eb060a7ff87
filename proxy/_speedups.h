/* What the C files of proxy._speedups share: the parsed heads, the board, and the entry points the
 * warm path (_warm.c) calls without going through Python. _speedups.c defines them. */
#ifndef WAKEGATE_SPEEDUPS_H
#define WAKEGATE_SPEEDUPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MAX_HEAD_BYTES (16 * 1024)     /* h11 and node: 16 KiB; longer heads get 431 */
#define MAX_HEADERS 100                /* Apache LimitRequestFields: 100 fields; more get 431 */
#define MAX_CHUNK_LINE_BYTES 4096      /* chunk-size line with extensions; Go net/http allows 4 KiB */
#define MAX_TRAILER_BYTES (16 * 1024)  /* trailers get the same budget as a head */
#define MAX_LENGTH_DIGITS 18           /* Content-Length fits in int64, as in llhttp */
#define MAX_CONNECTION_OPTIONS 32      /* Connection tokens kept to strip named fields */

#define CHUNKED (-1)
#define UNTIL_CLOSE (-2)

typedef struct {
    Py_ssize_t name, name_len, value, value_len; /* offsets into raw */
    int kind;                                    /* F_* for the rewrite */
} Field;

typedef struct {
    Py_ssize_t off, len;
} Span;

typedef struct {
    PyObject_HEAD
    PyObject *raw;
    Py_ssize_t length;
    Py_ssize_t body_length;
    int version;
    char keep_alive, expect_continue, is_head;
    Py_ssize_t method_len;  /* method = raw[lead:lead+method_len] */
    Py_ssize_t lead;
    Span target, path;
    Span host;              /* off -1: no host; host bytes are lower-cased on access */
    Span host_value;        /* off -1: no Host field */
    Span upgrade;           /* off -1: not an upgrade */
    long long content_length; /* the merged Content-Length, written for an F_LENGTH field */
    int nfields;
    Field *fields;
} RequestHead;

typedef struct {
    PyObject_HEAD
    PyObject *raw;
    Py_ssize_t length;
    Py_ssize_t body_length;
    int version;
    int status;
    char keep_alive;
    Span reason;
    long long content_length; /* the merged Content-Length, written for an F_LENGTH field */
    int nfields;
    Field *fields;
} ResponseHead;

#define TRAILER_NAME_KEPT 17 /* enough to recognise "transfer-encoding" and "content-length" */

/* Where a chunked body's scan is (RFC 9112 section 7.1). */
typedef struct {
    int state;
    unsigned long long remaining;
    int digits;
    Py_ssize_t line;
    Py_ssize_t trailer;
    Py_ssize_t name_len;                    /* the trailer field name so far */
    unsigned char name[TRAILER_NAME_KEPT];  /* its first bytes, lower-cased */
} ChunkState;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int64_t *words;
    Py_ssize_t slots, workers;
} BoardObject;

extern PyTypeObject wg_RequestHeadType, wg_ResponseHeadType, wg_BoardType;

/* parse_request / parse_response on memory: a head, Py_None (incomplete), or NULL with ProtocolError. */
PyObject *wg_parse_request(const unsigned char *b, Py_ssize_t len, Py_ssize_t start, Py_ssize_t max_head);
PyObject *wg_parse_response(const unsigned char *b, Py_ssize_t len, Py_ssize_t start, Py_ssize_t max_head,
                            int head_request);
PyObject *wg_request_host(RequestHead *head); /* the lower-cased host key, or Py_None */

/* The rewritten heads: the size first, then the bytes written from p (NULL: it did not fit). */
Py_ssize_t wg_request_size(const RequestHead *h, Py_ssize_t addr_len, Py_ssize_t proto_len, Py_ssize_t extra_len);
char *wg_put_request(char *p, const char *end, const RequestHead *h, const char *addr, Py_ssize_t addr_len,
                     const char *proto, Py_ssize_t proto_len, const char *extra, Py_ssize_t extra_len);
Py_ssize_t wg_response_size(const ResponseHead *h, int keep_alive, int client_version, Py_ssize_t extra_len);
char *wg_put_response(char *p, const char *end, const ResponseHead *h, int keep_alive, int client_version,
                      const char *extra, Py_ssize_t extra_len);

/* A chunked body from b[i:n]: how many bytes belong to it; *err set (with a status) when it is not
 * clean framing. st->state == CHUNK_DONE once the body is through. */
#define CHUNK_DONE 11
void wg_chunk_init(ChunkState *st);
Py_ssize_t wg_chunk_scan(ChunkState *st, const unsigned char *b, Py_ssize_t n, Py_ssize_t i, const char **err,
                         int *err_status);

/* One access log line appended to a bytearray; its new length, or -1 with an exception. */
Py_ssize_t wg_access_line(PyObject *buffer, double when, const char *service, Py_ssize_t service_len,
                          const char *method, Py_ssize_t method_len, const char *target, Py_ssize_t target_len,
                          long long status, long long bytes_in, long long bytes_out, double total, double queue,
                          double connect, double upstream, int woke, const char *client, Py_ssize_t client_len);

/* The board's warm-path operations (slot and worker already known to be in range). */
int wg_board_admit(BoardObject *board, Py_ssize_t slot, Py_ssize_t worker);
void wg_board_leave(BoardObject *board, Py_ssize_t slot, Py_ssize_t worker, int tunnel);
int wg_board_in_range(BoardObject *board, Py_ssize_t slot, Py_ssize_t worker);

/* _warm.c: adds its types to the module; warm_counts() -> (requests, responses) it handled. */
int wg_warm_exec(PyObject *module);
PyObject *wg_warm_counts(PyObject *module, PyObject *unused);

#endif
