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

#define WG_INLINE_FIELDS 8 /* a head's fields kept in the head itself (more are allocated) */

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
    Field inline_fields[WG_INLINE_FIELDS];
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
    Field inline_fields[WG_INLINE_FIELDS];
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

/* parse_request / parse_response on memory: a head, Py_None (incomplete), or NULL with ProtocolError.
 * source: the object b is the buffer of, or NULL; a bytes object that is exactly the head becomes its raw. */
PyObject *wg_parse_request(const unsigned char *b, Py_ssize_t len, Py_ssize_t start, Py_ssize_t max_head,
                           PyObject *source);
PyObject *wg_parse_response(const unsigned char *b, Py_ssize_t len, Py_ssize_t start, Py_ssize_t max_head,
                            int head_request, PyObject *source);
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

/* One access log line: what it says (times in seconds; durations are written in milliseconds). */
typedef struct {
    double when, total, queue, connect, upstream;
    const char *service, *method, *target, *client;
    Py_ssize_t service_len, method_len, target_len, client_len;
    long long status, bytes_in, bytes_out;
    int woke;
    int plain; /* service and client need no escaping (a validated name, an address): copied as they are */
    Py_ssize_t method_room; /* bytes that can be read from method (0: its length): from ACCESS_METHOD_COPY
                               up, a short method is copied as that many bytes (a few moves, no call) */
    /* optional, made once by the caller: `,"service":"NAME","method":"` and `,"client":"ADDR"}\n`, in
       buffers of ACCESS_SERVICE_TEXT and ACCESS_CLIENT_TEXT bytes, copied whole (a fixed-size copy
       is a few moves; a call to memcpy for the length costs more than the bytes) */
    const char *service_text, *client_text;
    Py_ssize_t service_text_len, client_text_len;
} AccessLine;

#define ACCESS_FLUSH_BYTES (16 * 1024) /* a batch goes to the writer thread at this size: it stays in the CPU's cache */
#define ACCESS_METHOD_COPY 16 /* a method this long or shorter is copied as 16 bytes (see method_room) */
#define ACCESS_SERVICE_TEXT 96 /* the buffers of AccessLine's service_text and client_text */
#define ACCESS_CLIENT_TEXT 64
/* a line's template and numbers (under 400 bytes), and the whole-buffer copies of the texts; its
   strings are added to this */
#define ACCESS_FIXED_BYTES (512 + ACCESS_METHOD_COPY + ACCESS_SERVICE_TEXT + ACCESS_CLIENT_TEXT)

/* The most bytes a line takes, then the line written from p (NULL: it outgrew that: a bug). */
static inline Py_ssize_t
wg_access_room(const AccessLine *l)
{
    return ACCESS_FIXED_BYTES + 6 * (l->service_len + l->method_len + l->target_len + l->client_len);
}
char *wg_access_format(char *p, const char *limit, const AccessLine *l);
/* The same, where the caller made sure of wg_access_room(l) bytes from p. */
char *wg_access_format_fitted(char *p, const AccessLine *l);
/* The line appended to a bytearray; its new length, or -1 with an exception. */
Py_ssize_t wg_access_line(PyObject *buffer, const AccessLine *l);

/* _access.c: a line appended to an AccessLogBase (0, or -1 with an exception); whether o is one. */
extern PyTypeObject wg_AccessLogType;
int wg_access_append(PyObject *log, const AccessLine *line);
int wg_access_log_check(PyObject *o);
double wg_access_wall_offset(PyObject *log); /* perf_counter() + it = the wall clock */

/* The board's warm-path operations (slot and worker already known to be in range). */
int wg_board_admit(BoardObject *board, Py_ssize_t slot, Py_ssize_t worker);
void wg_board_leave(BoardObject *board, Py_ssize_t slot, Py_ssize_t worker, int tunnel);
int wg_board_in_range(BoardObject *board, Py_ssize_t slot, Py_ssize_t worker);

/* _warm.c: adds its types to the module; warm_counts() -> (requests, responses) it handled. */
int wg_warm_exec(PyObject *module);
PyObject *wg_warm_counts(PyObject *module, PyObject *unused);

#endif
