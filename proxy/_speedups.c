/* proxy._speedups: HTTP/1.1 head parsing and rewriting for wakegate's hot path.
 *
 * The same API, results and ProtocolError statuses as proxy/_native.py, which is
 * the readable reference; input comes in through the buffer protocol without a
 * copy, and each parsed head keeps one bytes copy of itself plus field offsets.
 */
#include "_speedups.h"
#include <structmember.h>
#include <string.h>
#include <math.h>

static PyObject *ProtocolError; /* proxy.errors.ProtocolError */

/* ---- character classes (RFC 9110 section 5.6.2, 5.5; RFC 9112 section 3.2) ---- */

enum { C_TOKEN = 1, C_TARGET = 2, C_VALUE = 4, C_HOST = 8, C_DIGIT = 16 };
static unsigned char cls[256];
static unsigned char json_plain[256]; /* bytes a JSON string carries as they are (the access log's) */
static unsigned char lower[256];
static signed char hexval[256];

static void
init_tables(void)
{
    for (int c = 0x20; c < 0x7f; c++) json_plain[c] = c != '"' && c != '\\';
    const char *tchar = "!#$%&'*+-.^_`|~";
    const char *hostc = "-._~!$&'()*+,;=%:[]";
    for (int c = 0; c < 256; c++) {
        unsigned char k = 0;
        int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        if (alnum || (c && strchr(tchar, c))) k |= C_TOKEN;
        if (c >= 0x21 && c <= 0x7e) k |= C_TARGET | C_VALUE;
        if (c >= 0x80 || c == ' ' || c == '\t') k |= C_VALUE;
        if (alnum || (c && strchr(hostc, c))) k |= C_HOST;
        if (c >= '0' && c <= '9') k |= C_DIGIT;
        cls[c] = k;
        lower[c] = (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : (unsigned char)c;
        hexval[c] = (c >= '0' && c <= '9') ? c - '0'
                  : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                  : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
    }
}

static int
ieq(const unsigned char *s, Py_ssize_t n, const char *lit, Py_ssize_t litlen)
{
    if (n != litlen) return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (lower[s[i]] != (unsigned char)lit[i]) return 0;
    return 1;
}
#define IEQ(s, n, lit) ieq((s), (n), lit, (Py_ssize_t)sizeof(lit) - 1)

static PyObject *
fail(const char *message, int status)
{
    PyObject *exc = PyObject_CallFunction(ProtocolError, "si", message, status);
    if (exc) {
        PyErr_SetObject(ProtocolError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* ---- fields ---- */

/* How the rewrite treats a field: as it came, left out, merged into X-Forwarded-For, kept only on
 * a 101, or written with a canonical value (one clean framing field reaches the other side). */
enum { F_KEEP = 0, F_DROP = 1, F_FORWARDED_FOR = 2, F_UPGRADE = 3, F_LENGTH = 4, F_CHUNKED = 5 };

/* Connection options (RFC 9110 section 7.6.1), lower-cased on comparison. */
typedef struct {
    int count, close, keep_alive, upgrade;
    Span option[MAX_CONNECTION_OPTIONS];
} Options;

static int
is_ows(unsigned char c)
{
    return c == ' ' || c == '\t';
}

/* Add the comma-separated options of one Connection field. */
static int
add_options(Options *o, const unsigned char *raw, Py_ssize_t off, Py_ssize_t len)
{
    Py_ssize_t p = off, end = off + len;
    while (p <= end) {
        Py_ssize_t q = p;
        while (q < end && raw[q] != ',') q++;
        Py_ssize_t a = p, b = q;
        while (a < b && is_ows(raw[a])) a++;
        while (b > a && is_ows(raw[b - 1])) b--;
        if (b > a) {
            if (o->count == MAX_CONNECTION_OPTIONS) {
                fail("too many Connection options", 400);
                return -1;
            }
            o->option[o->count].off = a;
            o->option[o->count].len = b - a;
            o->count++;
            if (IEQ(raw + a, b - a, "close")) o->close = 1;
            else if (IEQ(raw + a, b - a, "keep-alive")) o->keep_alive = 1;
            else if (IEQ(raw + a, b - a, "upgrade")) o->upgrade = 1;
        }
        p = q + 1;
    }
    return 0;
}

static int
names_option(const Options *o, const unsigned char *raw, const Field *f)
{
    const unsigned char *name = raw + f->name;
    for (int i = 0; i < o->count; i++) {
        const Span *s = &o->option[i];
        if (s->len != f->name_len) continue;
        Py_ssize_t k = 0;
        while (k < s->len && lower[raw[s->off + k]] == lower[name[k]]) k++;
        if (k == s->len) return 1;
    }
    return 0;
}

static int
never_dropped(const unsigned char *name, Py_ssize_t n)
{
    return IEQ(name, n, "host") || IEQ(name, n, "content-length") || IEQ(name, n, "transfer-encoding");
}

/* Merge a Content-Length value (maybe a list of identical values) into *length. Repeats must be
 * the same digits, not just the same number ("05" and "5" differ): RFC 9112 section 6.3 lets a
 * recipient collapse identical values only, and h11 compares them so too. *digits holds the first
 * value's digit count (0: none yet). */
static int
merge_length(const unsigned char *raw, Py_ssize_t off, Py_ssize_t len, long long *length, Py_ssize_t *digits)
{
    Py_ssize_t p = off, end = off + len;
    while (p <= end) {
        Py_ssize_t q = p;
        while (q < end && raw[q] != ',') q++;
        Py_ssize_t a = p, b = q;
        while (a < b && is_ows(raw[a])) a++;
        while (b > a && is_ows(raw[b - 1])) b--;
        if (b == a || b - a > MAX_LENGTH_DIGITS) {
            fail("invalid Content-Length", 400);
            return -1;
        }
        long long n = 0;
        for (Py_ssize_t k = a; k < b; k++) {
            if (!(cls[raw[k]] & C_DIGIT)) {
                fail("invalid Content-Length", 400);
                return -1;
            }
            n = n * 10 + (raw[k] - '0');
        }
        if (*length >= 0 && (n != *length || b - a != *digits)) {
            fail("differing Content-Length values", 400);
            return -1;
        }
        *length = n;
        *digits = b - a;
        p = q + 1;
    }
    return 0;
}

/* Transfer-Encoding codings across all its fields: 1 if exactly "chunked",
 * 2 if chunked is last but not alone, 0 otherwise. */
typedef struct {
    int count, last_chunked;
} Codings;

static void
add_codings(Codings *c, const unsigned char *raw, Py_ssize_t off, Py_ssize_t len)
{
    Py_ssize_t p = off, end = off + len;
    while (p <= end) {
        Py_ssize_t q = p;
        while (q < end && raw[q] != ',') q++;
        Py_ssize_t a = p, b = q;
        while (a < b && is_ows(raw[a])) a++;
        while (b > a && is_ows(raw[b - 1])) b--;
        if (b > a) {
            c->count++;
            c->last_chunked = IEQ(raw + a, b - a, "chunked");
        }
        p = q + 1;
    }
}

/* ---- splitting a head out of the buffer ---- */

typedef struct {
    Py_ssize_t lead;  /* offset of the start line, after skipped empty lines */
    Py_ssize_t end;   /* offset just past the empty line */
    Py_ssize_t lines; /* number of lines, the empty one included */
} Split;

/* 1: found; 0: incomplete; -1: error set. Offsets are relative to buf. */
static int
split_head(const unsigned char *b, Py_ssize_t n, Py_ssize_t start, Py_ssize_t max_head, Split *out)
{
    Py_ssize_t i = start;
    while (i + 1 < n && b[i] == '\r' && b[i + 1] == '\n') i += 2;
    Py_ssize_t end = -1;
    if (!(i >= n || (b[i] == '\r' && i + 1 == n))) {
        Py_ssize_t j = i;
        for (;;) {
            const unsigned char *k = memchr(b + j, '\n', (size_t)(n - j));
            if (!k) break;
            Py_ssize_t x = k - b;
            if (x + 1 >= n) break;
            if (b[x + 1] == '\n') { end = x + 2; break; }
            if (b[x + 1] == '\r') {
                if (x + 2 >= n) break;
                if (b[x + 2] == '\n') { end = x + 3; break; }
            }
            j = x + 1;
        }
    }
    if (end < 0) {
        if (n - start > max_head) {
            fail("head too large", 431);
            return -1;
        }
        return 0;
    }
    if (end - start > max_head) {
        fail("head too large", 431);
        return -1;
    }
    Py_ssize_t lines = 0;
    for (Py_ssize_t p = i; p < end;) {
        const unsigned char *k = memchr(b + p, '\n', (size_t)(end - p));
        Py_ssize_t x = k - b;
        if (x == p || b[x - 1] != '\r') {
            fail("bare LF where CRLF is required", 400);
            return -1;
        }
        lines++;
        p = x + 1;
    }
    out->lead = i;
    out->end = end;
    out->lines = lines;
    return 1;
}

/* Validate the field lines after the start line; fill fields[]; offsets relative to base. */
static int
parse_fields(const unsigned char *b, Py_ssize_t p, Py_ssize_t end, Py_ssize_t base, Field *fields)
{
    int nf = 0;
    while (p < end) {
        const unsigned char *k = memchr(b + p, '\n', (size_t)(end - p));
        Py_ssize_t eol = (k - b) - 1; /* the CR */
        if (eol == p) break;          /* the empty line */
        if (is_ows(b[p])) {
            fail("obsolete line folding", 400);
            return -1;
        }
        Py_ssize_t c = p;
        while (c < eol && (cls[b[c]] & C_TOKEN)) c++;
        if (c == eol) {
            fail("header line without a colon", 400);
            return -1;
        }
        if (b[c] != ':') {
            fail(is_ows(b[c]) ? "whitespace before the colon" : "invalid character in header name", 400);
            return -1;
        }
        if (c == p) {
            fail("empty header name", 400);
            return -1;
        }
        Py_ssize_t v = c + 1, e = eol;
        while (v < e && is_ows(b[v])) v++;
        while (e > v && is_ows(b[e - 1])) e--;
        for (Py_ssize_t x = v; x < e; x++) {
            if (!(cls[b[x]] & C_VALUE)) {
                fail("invalid character in header value", 400);
                return -1;
            }
        }
        fields[nf].name = p - base;
        fields[nf].name_len = c - p;
        fields[nf].value = v - base;
        fields[nf].value_len = e - v;
        fields[nf].kind = F_KEEP;
        nf++;
        p = eol + 2;
    }
    return nf;
}

static int
parse_version(const unsigned char *v, Py_ssize_t len)
{
    if (len != 8 || memcmp(v, "HTTP/", 5) != 0 || v[6] != '.' || !(cls[v[5]] & C_DIGIT) ||
        !(cls[v[7]] & C_DIGIT)) {
        fail("malformed HTTP version", 400);
        return -1;
    }
    if (v[5] != '1') {
        fail("HTTP version not supported", 505);
        return -1;
    }
    return v[7] == '0' ? 0 : 1;
}

/* Host field or absolute-form authority -> lower-case host, no port. */
static int
host_key(const unsigned char *s, Py_ssize_t n, Span *host)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (!(cls[s[i]] & C_HOST)) goto bad;
    Py_ssize_t hlen;
    if (n && s[0] == '[') {
        const unsigned char *k = memchr(s, ']', (size_t)n);
        if (!k) goto bad;
        hlen = (k - s) + 1;
    } else {
        const unsigned char *k = memchr(s, ':', (size_t)n);
        hlen = k ? k - s : n;
    }
    if (hlen < n) {
        if (s[hlen] != ':') goto bad;
        for (Py_ssize_t i = hlen + 1; i < n; i++)
            if (!(cls[s[i]] & C_DIGIT)) goto bad;
    }
    for (Py_ssize_t i = 1; i < hlen; i++)
        if (s[i] == '[') goto bad;
    for (Py_ssize_t i = 0; i + 1 < hlen; i++)
        if (s[i] == ']') goto bad;
    host->len = hlen;
    return 0;
bad:
    fail("invalid Host", 400);
    return -1;
}

/* ---- parsed heads ---- */

/* Room for a head's fields: in the head itself when they are few (no allocation per head), else
   from the heap (lines: the head's lines, request or status line and the empty one included). */
static Field *
head_fields(Field *inline_fields, Py_ssize_t lines)
{
    Py_ssize_t n = lines > 2 ? lines - 2 : 1;
    return n <= WG_INLINE_FIELDS ? inline_fields : PyMem_Malloc(sizeof(Field) * (size_t)n);
}

/* The head's own bytes: the source object itself when it is exactly the head (a bytes object that
   holds nothing else: one copy less), else a copy. */
static PyObject *
head_bytes(PyObject *source, const unsigned char *raw, Py_ssize_t start, Py_ssize_t end)
{
    if (source && start == 0 && PyBytes_CheckExact(source) && PyBytes_GET_SIZE(source) == end)
        return Py_NewRef(source);
    return PyBytes_FromStringAndSize((const char *)raw, end - start);
}

/* ---- RequestHead ---- */

static void
request_dealloc(RequestHead *self)
{
    Py_XDECREF(self->raw);
    if (self->fields != self->inline_fields) PyMem_Free(self->fields);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static const char *
raw_of(PyObject *raw)
{
    return PyBytes_AS_STRING(raw);
}

static PyObject *
span_bytes(PyObject *raw, Span s)
{
    if (s.off < 0) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(raw_of(raw) + s.off, s.len);
}

static PyObject *
lower_bytes(PyObject *raw, Span s)
{
    if (s.off < 0) Py_RETURN_NONE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, s.len);
    if (!out) return NULL;
    const unsigned char *src = (const unsigned char *)raw_of(raw) + s.off;
    char *dst = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < s.len; i++) dst[i] = (char)lower[src[i]];
    return out;
}

static PyObject *
fields_list(PyObject *raw, const Field *fields, int n)
{
    PyObject *list = PyList_New(n);
    if (!list) return NULL;
    const char *r = raw_of(raw);
    for (int i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(y#y#)", r + fields[i].name, fields[i].name_len,
                                    r + fields[i].value, fields[i].value_len);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

static PyObject *
request_get_method(RequestHead *self, void *closure)
{
    return PyBytes_FromStringAndSize(raw_of(self->raw) + self->lead, self->method_len);
}

static PyObject *
request_get_target(RequestHead *self, void *closure)
{
    return span_bytes(self->raw, self->target);
}

static PyObject *
request_get_path(RequestHead *self, void *closure)
{
    if (self->path.off < 0) { /* absolute-form with an empty or query-only path */
        PyObject *rest = PyBytes_FromStringAndSize(raw_of(self->raw) + (-self->path.off - 1), self->path.len);
        if (!rest) return NULL;
        PyObject *slash = PyBytes_FromStringAndSize("/", 1);
        if (slash) PyBytes_ConcatAndDel(&slash, rest);
        else Py_DECREF(rest);
        return slash;
    }
    return span_bytes(self->raw, self->path);
}

static PyObject *
request_get_host(RequestHead *self, void *closure)
{
    return lower_bytes(self->raw, self->host);
}

PyObject *
wg_request_host(RequestHead *head)
{
    return lower_bytes(head->raw, head->host);
}

static PyObject *
request_get_upgrade(RequestHead *self, void *closure)
{
    return span_bytes(self->raw, self->upgrade);
}

static PyObject *
request_get_headers(RequestHead *self, void *closure)
{
    return fields_list(self->raw, self->fields, self->nfields);
}

static PyObject *
request_repr(RequestHead *self)
{
    PyObject *method = request_get_method(self, NULL);
    PyObject *target = request_get_target(self, NULL);
    PyObject *out = NULL;
    if (method && target)
        out = PyUnicode_FromFormat("<RequestHead %R %R HTTP/1.%d>", method, target, self->version);
    Py_XDECREF(method);
    Py_XDECREF(target);
    return out;
}

static PyMemberDef request_members[] = {
    {"raw", T_OBJECT_EX, offsetof(RequestHead, raw), READONLY, "the head's bytes"},
    {"length", T_PYSSIZET, offsetof(RequestHead, length), READONLY, "bytes consumed from the buffer"},
    {"body_length", T_PYSSIZET, offsetof(RequestHead, body_length), READONLY, "n, or CHUNKED"},
    {"version", T_INT, offsetof(RequestHead, version), READONLY, "minor version: 0 or 1"},
    {"keep_alive", T_BOOL, offsetof(RequestHead, keep_alive), READONLY, NULL},
    {"expect_continue", T_BOOL, offsetof(RequestHead, expect_continue), READONLY, NULL},
    {"is_head", T_BOOL, offsetof(RequestHead, is_head), READONLY, NULL},
    {NULL}};

static PyGetSetDef request_getset[] = {
    {"method", (getter)request_get_method, NULL, NULL, NULL},
    {"target", (getter)request_get_target, NULL, NULL, NULL},
    {"path", (getter)request_get_path, NULL, NULL, NULL},
    {"host", (getter)request_get_host, NULL, NULL, NULL},
    {"upgrade", (getter)request_get_upgrade, NULL, NULL, NULL},
    {"headers", (getter)request_get_headers, NULL, NULL, NULL},
    {NULL}};

PyTypeObject wg_RequestHeadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.RequestHead",
    .tp_basicsize = sizeof(RequestHead),
    .tp_dealloc = (destructor)request_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One parsed request head; raw holds its bytes.",
    .tp_members = request_members,
    .tp_getset = request_getset,
    .tp_repr = (reprfunc)request_repr,
};

/* ---- ResponseHead ---- */

static void
response_dealloc(ResponseHead *self)
{
    Py_XDECREF(self->raw);
    if (self->fields != self->inline_fields) PyMem_Free(self->fields);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
response_get_reason(ResponseHead *self, void *closure)
{
    return span_bytes(self->raw, self->reason);
}

static PyObject *
response_get_headers(ResponseHead *self, void *closure)
{
    return fields_list(self->raw, self->fields, self->nfields);
}

static PyObject *
response_repr(ResponseHead *self)
{
    return PyUnicode_FromFormat("<ResponseHead %d HTTP/1.%d>", self->status, self->version);
}

static PyMemberDef response_members[] = {
    {"raw", T_OBJECT_EX, offsetof(ResponseHead, raw), READONLY, "the head's bytes"},
    {"length", T_PYSSIZET, offsetof(ResponseHead, length), READONLY, "bytes consumed from the buffer"},
    {"body_length", T_PYSSIZET, offsetof(ResponseHead, body_length), READONLY, "n, CHUNKED or UNTIL_CLOSE"},
    {"version", T_INT, offsetof(ResponseHead, version), READONLY, "minor version: 0 or 1"},
    {"status", T_INT, offsetof(ResponseHead, status), READONLY, NULL},
    {"keep_alive", T_BOOL, offsetof(ResponseHead, keep_alive), READONLY, NULL},
    {NULL}};

static PyGetSetDef response_getset[] = {
    {"reason", (getter)response_get_reason, NULL, NULL, NULL},
    {"headers", (getter)response_get_headers, NULL, NULL, NULL},
    {NULL}};

PyTypeObject wg_ResponseHeadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.ResponseHead",
    .tp_basicsize = sizeof(ResponseHead),
    .tp_dealloc = (destructor)response_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One parsed response head; raw holds its bytes.",
    .tp_members = response_members,
    .tp_getset = response_getset,
    .tp_repr = (reprfunc)response_repr,
};

/* ---- argument helpers ---- */

/* Positional-or-keyword arguments for a METH_FASTCALL|METH_KEYWORDS function. */
static int
gather_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *const *names,
            int total, int required, PyObject **out)
{
    if (nargs > total) {
        PyErr_Format(PyExc_TypeError, "takes at most %d arguments", total);
        return -1;
    }
    for (int i = 0; i < total; i++) out[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        const char *key = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, k));
        if (!key) return -1;
        int i = 0;
        while (i < total && strcmp(names[i], key) != 0) i++;
        if (i == total || out[i]) {
            PyErr_Format(PyExc_TypeError, "unexpected or repeated argument '%s'", key);
            return -1;
        }
        out[i] = args[nargs + k];
    }
    for (int i = 0; i < required; i++) {
        if (!out[i]) {
            PyErr_Format(PyExc_TypeError, "missing argument '%s'", names[i]);
            return -1;
        }
    }
    return 0;
}

static int
ssize_arg(PyObject *o, Py_ssize_t dflt, Py_ssize_t *out)
{
    if (!o) {
        *out = dflt;
        return 0;
    }
    *out = PyNumber_AsSsize_t(o, PyExc_OverflowError);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
open_buffer(PyObject *buf, Py_buffer *view, PyObject *start_obj, Py_ssize_t *start)
{
    if (ssize_arg(start_obj, 0, start) < 0) return -1;
    if (PyObject_GetBuffer(buf, view, PyBUF_SIMPLE) < 0) return -1;
    if (*start < 0 || *start > view->len) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "start is outside the buffer");
        return -1;
    }
    return 0;
}

/* ---- parse_request ---- */

static PyObject *
parse_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"buf", "start", "max_head"};
    PyObject *a[3];
    Py_ssize_t start, max_head;
    Py_buffer view;
    if (gather_args(args, nargs, kwnames, names, 3, 1, a) < 0) return NULL;
    if (ssize_arg(a[2], MAX_HEAD_BYTES, &max_head) < 0) return NULL;
    if (open_buffer(a[0], &view, a[1], &start) < 0) return NULL;
    PyObject *head = wg_parse_request(view.buf, view.len, start, max_head, a[0]);
    PyBuffer_Release(&view);
    return head;
}

PyObject *
wg_parse_request(const unsigned char *b, Py_ssize_t len, Py_ssize_t start, Py_ssize_t max_head, PyObject *source)
{
    Split sp;
    RequestHead *head = NULL;
    Field *fields = NULL;
    int r = split_head(b, len, start, max_head, &sp);
    if (r <= 0) {
        if (r == 0) Py_RETURN_NONE;
        return NULL;
    }

    /* request-line = method SP request-target SP HTTP-version (RFC 9112 section 3) */
    Py_ssize_t i = sp.lead;
    const unsigned char *nl = memchr(b + i, '\n', (size_t)(sp.end - i));
    Py_ssize_t eol = (nl - b) - 1;
    const unsigned char *s1 = memchr(b + i, ' ', (size_t)(eol - i));
    if (!s1) { fail("malformed request line", 400); goto error; }
    Py_ssize_t sp1 = s1 - b;
    if (sp1 == i) { fail("empty method", 400); goto error; }
    for (Py_ssize_t x = i; x < sp1; x++)
        if (!(cls[b[x]] & C_TOKEN)) { fail("invalid character in method", 400); goto error; }
    const unsigned char *s2 = memchr(b + sp1 + 1, ' ', (size_t)(eol - sp1 - 1));
    if (!s2) { fail("malformed request line", 400); goto error; }
    Py_ssize_t sp2 = s2 - b;
    if (sp2 == sp1 + 1) { fail("empty request target", 400); goto error; }
    for (Py_ssize_t x = sp1 + 1; x < sp2; x++)
        if (!(cls[b[x]] & C_TARGET)) { fail("invalid character in request target", 400); goto error; }
    int version = parse_version(b + sp2 + 1, eol - sp2 - 1);
    if (version < 0) goto error;
    /* RFC 9112 section 3.2.4: asterisk-form is only for a server-wide OPTIONS. */
    if (sp2 == sp1 + 2 && b[sp1 + 1] == '*' && !(sp1 - i == 7 && memcmp(b + i, "OPTIONS", 7) == 0)) {
        fail("asterisk-form target with a method other than OPTIONS", 400);
        goto error;
    }
    if (sp.lines - 2 > MAX_HEADERS) { fail("too many header fields", 431); goto error; }

    head = PyObject_New(RequestHead, &wg_RequestHeadType);
    if (!head) goto error;
    head->raw = NULL;
    head->fields = fields = head_fields(head->inline_fields, sp.lines);
    if (!fields) { PyErr_NoMemory(); goto error; }
    int nf = parse_fields(b, eol + 2, sp.end, start, fields);
    if (nf < 0) goto error;

    /* From here on, offsets are relative to raw (= buf[start:end]). */
    const unsigned char *raw = b + start;
    int hosts = 0, expect_continue = 0;
    long long length = -1;
    Py_ssize_t length_digits = 0;
    Span host_value = {-1, 0}, upgrade = {-1, 0};
    Codings codings = {0, 0};
    int has_codings = 0;
    Options options;
    options.count = options.close = options.keep_alive = options.upgrade = 0;
    for (int f = 0; f < nf; f++) {
        const unsigned char *name = raw + fields[f].name;
        Py_ssize_t nlen = fields[f].name_len, voff = fields[f].value, vlen = fields[f].value_len;
        switch (nlen) {
        case 4:
            if (IEQ(name, nlen, "host")) { hosts++; host_value.off = voff; host_value.len = vlen; }
            break;
        case 6:
            if (IEQ(name, nlen, "expect") && IEQ(raw + voff, vlen, "100-continue")) expect_continue = 1;
            break;
        case 7:
            if (IEQ(name, nlen, "upgrade")) { upgrade.off = voff; upgrade.len = vlen; }
            break;
        case 10:
            if (IEQ(name, nlen, "connection") && add_options(&options, raw, voff, vlen) < 0) goto error;
            break;
        case 14:
            if (IEQ(name, nlen, "content-length") && merge_length(raw, voff, vlen, &length, &length_digits) < 0) goto error;
            break;
        case 17:
            if (IEQ(name, nlen, "transfer-encoding")) { has_codings = 1; add_codings(&codings, raw, voff, vlen); }
            break;
        }
    }

    /* RFC 9112 section 6.3: framing of a request body. */
    Py_ssize_t body_length;
    if (has_codings) {
        if (length >= 0) { fail("both Content-Length and Transfer-Encoding", 400); goto error; }
        if (version == 0) { fail("Transfer-Encoding in an HTTP/1.0 request", 400); goto error; }
        if (!(codings.count == 1 && codings.last_chunked)) {
            if (codings.count && codings.last_chunked) fail("unsupported transfer coding", 501);
            else fail("invalid Transfer-Encoding", 400);
            goto error;
        }
        body_length = CHUNKED;
    } else {
        body_length = length >= 0 ? (Py_ssize_t)length : 0;
    }
    if (hosts > 1) { fail("more than one Host", 400); goto error; }
    if (hosts == 0 && version == 1) { fail("missing Host", 400); goto error; }

    Span host = {-1, 0};
    if (host_value.off >= 0) {
        if (host_key(raw + host_value.off, host_value.len, &host) < 0) goto error;
        host.off = host_value.off;
    }
    Span target = {sp1 + 1 - start, sp2 - sp1 - 1};
    Span path = target;
    const unsigned char *t = raw + target.off;
    Py_ssize_t scheme = 0;
    if (target.len >= 7 && IEQ(t, 7, "http://")) scheme = 7;
    else if (target.len >= 8 && IEQ(t, 8, "https://")) scheme = 8;
    if (scheme) {
        /* RFC 9112 section 3.2.2: the authority replaces the Host field. */
        Py_ssize_t a = scheme, e = scheme;
        while (e < target.len && t[e] != '/' && t[e] != '?' && t[e] != '#') e++;
        if (host_key(t + a, e - a, &host) < 0) goto error;
        host.off = target.off + a;
        if (e < target.len && t[e] == '/') {
            path.off = target.off + e;
            path.len = target.len - e;
        } else { /* encoded as -(off+1): the getter prepends "/" */
            path.off = -(target.off + e) - 1;
            path.len = target.len - e;
        }
    }

    int keep_alive = version == 1 ? !options.close : (options.keep_alive && !options.close);
    if (upgrade.off >= 0 && (version == 0 || !options.upgrade)) upgrade.off = -1;

    /* Mark what the rewrite leaves out (RFC 9110 section 7.6.1). The framing goes upstream as one
     * clean field: the first Content-Length or Transfer-Encoding is written with its canonical
     * value ("5, 5" as "5", ",chunked" as "chunked"), any repeat is left out (RFC 9112 section 6.3). */
    int seen_length = 0, seen_coding = 0;
    for (int f = 0; f < nf; f++) {
        const unsigned char *name = raw + fields[f].name;
        Py_ssize_t n = fields[f].name_len;
        if (IEQ(name, n, "content-length")) fields[f].kind = seen_length++ ? F_DROP : F_LENGTH;
        else if (IEQ(name, n, "transfer-encoding")) fields[f].kind = seen_coding++ ? F_DROP : F_CHUNKED;
        else if (IEQ(name, n, "x-forwarded-for")) fields[f].kind = F_FORWARDED_FOR;
        else if (IEQ(name, n, "connection") || IEQ(name, n, "keep-alive") || IEQ(name, n, "proxy-connection") ||
                 IEQ(name, n, "te") || IEQ(name, n, "upgrade") || IEQ(name, n, "x-forwarded-proto") ||
                 IEQ(name, n, "x-forwarded-host"))
            fields[f].kind = F_DROP;
        else if (options.count && !never_dropped(name, n) && names_option(&options, raw, &fields[f]))
            fields[f].kind = F_DROP;
    }

    head->raw = head_bytes(source, raw, start, sp.end);
    if (!head->raw) goto error;
    head->length = sp.end - start;
    head->body_length = body_length;
    head->content_length = length;
    head->version = version;
    head->keep_alive = (char)keep_alive;
    head->expect_continue = (char)expect_continue;
    head->lead = sp.lead - start;
    head->method_len = sp1 - sp.lead;
    head->is_head = head->method_len == 4 && memcmp(raw + head->lead, "HEAD", 4) == 0;
    head->target = target;
    head->path = path;
    head->host = host;
    head->host_value = host_value;
    head->upgrade = upgrade;
    head->nfields = nf;
    return (PyObject *)head;

error:
    Py_XDECREF(head); /* raw and fields may be NULL here; dealloc copes */
    return NULL;
}

/* ---- parse_response ---- */

static PyObject *
parse_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"buf", "start", "max_head", "head_request"};
    PyObject *a[4];
    Py_ssize_t start, max_head;
    Py_buffer view;
    if (gather_args(args, nargs, kwnames, names, 4, 1, a) < 0) return NULL;
    if (ssize_arg(a[2], MAX_HEAD_BYTES, &max_head) < 0) return NULL;
    int head_request = a[3] ? PyObject_IsTrue(a[3]) : 0;
    if (head_request < 0) return NULL;
    if (open_buffer(a[0], &view, a[1], &start) < 0) return NULL;
    PyObject *head = wg_parse_response(view.buf, view.len, start, max_head, head_request, a[0]);
    PyBuffer_Release(&view);
    return head;
}

PyObject *
wg_parse_response(const unsigned char *b, Py_ssize_t len, Py_ssize_t start, Py_ssize_t max_head, int head_request,
                  PyObject *source)
{
    Split sp;
    ResponseHead *head = NULL;
    Field *fields = NULL;
    int r = split_head(b, len, start, max_head, &sp);
    if (r <= 0) {
        if (r == 0) Py_RETURN_NONE;
        return NULL;
    }
    /* status-line = HTTP-version SP status-code SP [ reason-phrase ] */
    Py_ssize_t i = sp.lead;
    const unsigned char *nl = memchr(b + i, '\n', (size_t)(sp.end - i));
    Py_ssize_t eol = (nl - b) - 1, linelen = eol - i;
    const unsigned char *line = b + i;
    int version = parse_version(line, linelen < 8 ? linelen : 8);
    if (version < 0) goto error;
    if (linelen < 12 || line[8] != ' ' || !(cls[line[9]] & C_DIGIT) || !(cls[line[10]] & C_DIGIT) ||
        !(cls[line[11]] & C_DIGIT)) {
        fail("malformed status line", 400);
        goto error;
    }
    int status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
    Span reason = {i + 13 - start, 0};
    if (linelen > 12) {
        if (line[12] != ' ') { fail("malformed status line", 400); goto error; }
        reason.len = linelen - 13;
        for (Py_ssize_t x = 13; x < linelen; x++)
            if (!(cls[line[x]] & C_VALUE)) { fail("invalid character in reason phrase", 400); goto error; }
    } else {
        reason.off = i + 12 - start;
    }
    if (status < 100) { fail("malformed status line", 400); goto error; }
    if (sp.lines - 2 > MAX_HEADERS) { fail("too many header fields", 431); goto error; }

    head = PyObject_New(ResponseHead, &wg_ResponseHeadType);
    if (!head) goto error;
    head->raw = NULL;
    head->fields = fields = head_fields(head->inline_fields, sp.lines);
    if (!fields) { PyErr_NoMemory(); goto error; }
    int nf = parse_fields(b, eol + 2, sp.end, start, fields);
    if (nf < 0) goto error;

    const unsigned char *raw = b + start;
    long long length = -1;
    Py_ssize_t length_digits = 0;
    Codings codings = {0, 0};
    int has_codings = 0;
    Options options;
    options.count = options.close = options.keep_alive = options.upgrade = 0;
    for (int f = 0; f < nf; f++) {
        const unsigned char *name = raw + fields[f].name;
        Py_ssize_t nlen = fields[f].name_len, voff = fields[f].value, vlen = fields[f].value_len;
        if (nlen == 14 && IEQ(name, nlen, "content-length")) {
            if (merge_length(raw, voff, vlen, &length, &length_digits) < 0) goto error;
        } else if (nlen == 17 && IEQ(name, nlen, "transfer-encoding")) {
            has_codings = 1;
            add_codings(&codings, raw, voff, vlen);
        } else if (nlen == 10 && IEQ(name, nlen, "connection")) {
            if (add_options(&options, raw, voff, vlen) < 0) goto error;
        }
    }
    int keep_alive = version == 1 ? !options.close : (options.keep_alive && !options.close);

    /* RFC 9112 section 6.3: framing of a response body. */
    Py_ssize_t body_length;
    if (head_request || status < 200 || status == 204 || status == 304) {
        body_length = 0;
    } else if (has_codings) {
        body_length = (codings.count && codings.last_chunked) ? CHUNKED : UNTIL_CLOSE;
        if (length >= 0) keep_alive = 0;
    } else if (length >= 0) {
        body_length = (Py_ssize_t)length;
    } else {
        body_length = UNTIL_CLOSE;
    }
    if (body_length == UNTIL_CLOSE) keep_alive = 0;

    /* One clean Content-Length goes to the client, or none when Transfer-Encoding frames the body
     * (RFC 9112 section 6.3: a response with both is framed by the coding; CL must be removed). */
    int seen_length = 0;
    for (int f = 0; f < nf; f++) {
        const unsigned char *name = raw + fields[f].name;
        Py_ssize_t n = fields[f].name_len;
        if (IEQ(name, n, "content-length"))
            fields[f].kind = (has_codings || seen_length++) ? F_DROP : F_LENGTH;
        else if (IEQ(name, n, "connection") || IEQ(name, n, "keep-alive") || IEQ(name, n, "proxy-connection"))
            fields[f].kind = F_DROP;
        else if (IEQ(name, n, "upgrade")) /* kept on a 101 even though Connection names it */
            fields[f].kind = F_UPGRADE;
        else if (options.count && !never_dropped(name, n) && names_option(&options, raw, &fields[f]))
            fields[f].kind = F_DROP;
    }

    head->raw = head_bytes(source, raw, start, sp.end);
    if (!head->raw) goto error;
    head->length = sp.end - start;
    head->body_length = body_length;
    head->content_length = length;
    head->version = version;
    head->status = status;
    head->keep_alive = (char)keep_alive;
    head->reason = reason;
    head->nfields = nf;
    return (PyObject *)head;

error:
    Py_XDECREF(head);
    return NULL;
}

/* ---- building heads ---- */

/* Heads are written into a bytes object sized beforehand. Every write is checked against the end:
 * a size computed wrong gives SystemError, never a write past the object (NDEBUG keeps this). */
static char *
put(char *p, const char *end, const void *s, Py_ssize_t n)
{
    if (!p || n > end - p) return NULL;
    memcpy(p, s, (size_t)n);
    return p + n;
}
#define PUT(p, lit) put((p), end, lit, (Py_ssize_t)sizeof(lit) - 1)

/* Decimal digits of v >= 0. */
static Py_ssize_t
decimal_len(long long v)
{
    Py_ssize_t n = 1;
    while (v >= 10) { v /= 10; n++; }
    return n;
}

static char *
put_decimal(char *p, const char *end, long long v)
{
    char tmp[24];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v > 0);
    if (!p || n > end - p) return NULL;
    while (n) *p++ = tmp[--n];
    return p;
}

/* Bytes a field takes in the rewritten head ("Name: value\r\n"), 0 if it is not written. */
static Py_ssize_t
field_size(const Field *fd, long long content_length, int upgrading)
{
    switch (fd->kind) {
    case F_KEEP: return fd->name_len + fd->value_len + 4;
    case F_LENGTH: return fd->name_len + decimal_len(content_length) + 4;
    case F_CHUNKED: return fd->name_len + 7 + 4;
    case F_UPGRADE: return upgrading ? fd->name_len + fd->value_len + 4 : 0;
    default: return 0;
    }
}

static char *
put_field(char *p, const char *end, const char *raw, const Field *fd, long long content_length, int upgrading)
{
    if (fd->kind == F_DROP || fd->kind == F_FORWARDED_FOR || (fd->kind == F_UPGRADE && !upgrading)) return p;
    p = put(p, end, raw + fd->name, fd->name_len);
    p = PUT(p, ": ");
    if (fd->kind == F_LENGTH) p = put_decimal(p, end, content_length);
    else if (fd->kind == F_CHUNKED) p = PUT(p, "chunked");
    else p = put(p, end, raw + fd->value, fd->value_len);
    return PUT(p, "\r\n");
}

static PyObject *
finish_head(PyObject *out, const char *p, const char *end, const char *what)
{
    if (p != end) {
        Py_DECREF(out);
        PyErr_Format(PyExc_SystemError, "%s: the head's size was computed wrong", what);
        return NULL;
    }
    return out;
}

static int
bytes_arg(PyObject *o, const char *what, const char **s, Py_ssize_t *n)
{
    if (!o) {
        *s = "";
        *n = 0;
        return 0;
    }
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes", what);
        return -1;
    }
    *s = PyBytes_AS_STRING(o);
    *n = PyBytes_GET_SIZE(o);
    return 0;
}

Py_ssize_t
wg_request_size(const RequestHead *h, Py_ssize_t addr_len, Py_ssize_t proto_len, Py_ssize_t extra_len)
{
    Py_ssize_t size = h->method_len + 1 + h->target.len + 11;
    for (int f = 0; f < h->nfields; f++) {
        const Field *fd = &h->fields[f];
        if (fd->kind == F_FORWARDED_FOR) size += fd->value_len ? fd->value_len + 2 : 0;
        else size += field_size(fd, h->content_length, 0);
    }
    size += 17 + addr_len + 2;  /* X-Forwarded-For: */
    size += 19 + proto_len + 2; /* X-Forwarded-Proto: */
    if (h->host_value.off >= 0) size += 18 + h->host_value.len + 2;
    if (h->upgrade.off >= 0) size += 30 + h->upgrade.len + 2;
    else if (!h->version) size += 24;
    return size + extra_len + 2;
}

char *
wg_put_request(char *p, const char *end, const RequestHead *h, const char *addr, Py_ssize_t addr_len,
               const char *proto, Py_ssize_t proto_len, const char *extra, Py_ssize_t extra_len)
{
    const char *raw = raw_of(h->raw);
    p = put(p, end, raw + h->lead, h->method_len);
    p = PUT(p, " ");
    p = put(p, end, raw + h->target.off, h->target.len);
    p = h->version ? PUT(p, " HTTP/1.1\r\n") : PUT(p, " HTTP/1.0\r\n");
    for (int f = 0; f < h->nfields; f++)
        p = put_field(p, end, raw, &h->fields[f], h->content_length, 0);
    p = PUT(p, "X-Forwarded-For: ");
    for (int f = 0; f < h->nfields; f++) {
        const Field *fd = &h->fields[f];
        if (fd->kind != F_FORWARDED_FOR || !fd->value_len) continue;
        p = put(p, end, raw + fd->value, fd->value_len);
        p = PUT(p, ", ");
    }
    p = put(p, end, addr, addr_len);
    p = PUT(p, "\r\nX-Forwarded-Proto: ");
    p = put(p, end, proto, proto_len);
    p = PUT(p, "\r\n");
    if (h->host_value.off >= 0) {
        p = PUT(p, "X-Forwarded-Host: ");
        p = put(p, end, raw + h->host_value.off, h->host_value.len);
        p = PUT(p, "\r\n");
    }
    if (h->upgrade.off >= 0) {
        p = PUT(p, "Connection: upgrade\r\nUpgrade: ");
        p = put(p, end, raw + h->upgrade.off, h->upgrade.len);
        p = PUT(p, "\r\n");
    } else if (!h->version) {
        p = PUT(p, "Connection: keep-alive\r\n");
    }
    p = put(p, end, extra, extra_len);
    return PUT(p, "\r\n");
}

static PyObject *
build_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"head", "client_addr", "proto", "extra"};
    PyObject *a[4];
    const char *addr, *proto, *extra;
    Py_ssize_t addr_len, proto_len, extra_len;
    if (gather_args(args, nargs, kwnames, names, 4, 2, a) < 0) return NULL;
    if (!PyObject_TypeCheck(a[0], &wg_RequestHeadType)) {
        PyErr_SetString(PyExc_TypeError, "head must be a RequestHead");
        return NULL;
    }
    if (bytes_arg(a[1], "client_addr", &addr, &addr_len) < 0) return NULL;
    if (a[2]) {
        if (bytes_arg(a[2], "proto", &proto, &proto_len) < 0) return NULL;
    } else {
        proto = "http";
        proto_len = 4;
    }
    if (bytes_arg(a[3], "extra", &extra, &extra_len) < 0) return NULL;
    RequestHead *h = (RequestHead *)a[0];
    Py_ssize_t size = wg_request_size(h, addr_len, proto_len, extra_len);
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out) return NULL;
    char *p = PyBytes_AS_STRING(out);
    const char *end = p + size;
    p = wg_put_request(p, end, h, addr, addr_len, proto, proto_len, extra, extra_len);
    return finish_head(out, p, end, "build_request");
}

Py_ssize_t
wg_response_size(const ResponseHead *h, int keep_alive, int client_version, Py_ssize_t extra_len)
{
    int upgrading = h->status == 101;
    Py_ssize_t size = 13 + h->reason.len + 2;
    for (int f = 0; f < h->nfields; f++)
        size += field_size(&h->fields[f], h->content_length, upgrading);
    if (upgrading) size += 21;
    else if (!keep_alive) size += 19;
    else if (!client_version) size += 24;
    return size + extra_len + 2;
}

char *
wg_put_response(char *p, const char *end, const ResponseHead *h, int keep_alive, int client_version,
                const char *extra, Py_ssize_t extra_len)
{
    const char *raw = raw_of(h->raw);
    int upgrading = h->status == 101;
    char status[5] = {(char)('0' + h->status / 100), (char)('0' + h->status / 10 % 10),
                      (char)('0' + h->status % 10), ' ', 0};
    p = PUT(p, "HTTP/1.1 ");
    p = put(p, end, status, 4);
    p = put(p, end, raw + h->reason.off, h->reason.len);
    p = PUT(p, "\r\n");
    for (int f = 0; f < h->nfields; f++)
        p = put_field(p, end, raw, &h->fields[f], h->content_length, upgrading);
    if (upgrading) p = PUT(p, "Connection: upgrade\r\n");
    else if (!keep_alive) p = PUT(p, "Connection: close\r\n");
    else if (!client_version) p = PUT(p, "Connection: keep-alive\r\n");
    p = put(p, end, extra, extra_len);
    return PUT(p, "\r\n");
}

static PyObject *
build_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"head", "keep_alive", "client_version", "extra"};
    PyObject *a[4];
    const char *extra;
    Py_ssize_t extra_len, client_version;
    if (gather_args(args, nargs, kwnames, names, 4, 2, a) < 0) return NULL;
    if (!PyObject_TypeCheck(a[0], &wg_ResponseHeadType)) {
        PyErr_SetString(PyExc_TypeError, "head must be a ResponseHead");
        return NULL;
    }
    int keep_alive = PyObject_IsTrue(a[1]);
    if (keep_alive < 0) return NULL;
    if (ssize_arg(a[2], 1, &client_version) < 0) return NULL;
    if (bytes_arg(a[3], "extra", &extra, &extra_len) < 0) return NULL;
    ResponseHead *h = (ResponseHead *)a[0];
    Py_ssize_t size = wg_response_size(h, keep_alive, (int)client_version, extra_len);
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out) return NULL;
    char *p = PyBytes_AS_STRING(out);
    const char *end = p + size;
    p = wg_put_response(p, end, h, keep_alive, (int)client_version, extra, extra_len);
    return finish_head(out, p, end, "build_response");
}

/* ---- ChunkedScanner (RFC 9112 section 7.1) ---- */

/* chunk = chunk-size [ ";" chunk-ext ] CRLF chunk-data CRLF; last-chunk = 1*"0" [ chunk-ext ] CRLF;
 * then trailer field lines (name ":" value CRLF) and an empty line. The size is hex digits and
 * nothing else: "5 6", "5 x" and "a " are refused, so only clean framing reaches the other side. */
enum {
    S_SIZE, S_EXT, S_SIZE_LF, S_DATA, S_DATA_CR, S_DATA_LF,
    S_TRAILER, S_TRAILER_NAME, S_TRAILER_VALUE, S_TRAILER_LF, S_END_LF, S_DONE
};

typedef struct {
    PyObject_HEAD
    ChunkState st;
} ChunkedScanner;

void
wg_chunk_init(ChunkState *st)
{
    memset(st, 0, sizeof(*st));
    st->state = S_SIZE;
}

static PyObject *
scanner_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "ChunkedScanner() takes no arguments");
        return NULL;
    }
    ChunkedScanner *self = (ChunkedScanner *)type->tp_alloc(type, 0);
    if (self) wg_chunk_init(&self->st);
    return (PyObject *)self;
}

Py_ssize_t
wg_chunk_scan(ChunkState *st, const unsigned char *b, Py_ssize_t n, Py_ssize_t i, const char **err, int *err_status)
{
    Py_ssize_t start = i;
    *err = NULL;
    *err_status = 400;
    int state = st->state;
    while (i < n && state != S_DONE) {
        if (state == S_DATA) {
            unsigned long long avail = (unsigned long long)(n - i);
            unsigned long long take = st->remaining < avail ? st->remaining : avail;
            i += (Py_ssize_t)take;
            st->remaining -= take;
            if (!st->remaining) state = S_DATA_CR;
            continue;
        }
        unsigned char c = b[i++];
        if (state >= S_TRAILER && ++st->trailer > MAX_TRAILER_BYTES) {
            *err = "trailer section too large";
            *err_status = 431;
            goto done;
        }
        switch (state) {
        case S_SIZE:
            if (hexval[c] >= 0) {
                if (st->digits == 16) { *err = "chunk size too large"; goto done; }
                st->remaining = st->remaining * 16 + (unsigned long long)hexval[c];
                st->digits++;
                break;
            }
            if (!st->digits) { *err = "invalid chunk size"; goto done; }
            if (c == '\r') state = S_SIZE_LF;
            else if (c == ';') { st->line = st->digits + 1; state = S_EXT; }
            else { *err = "invalid chunk size"; goto done; }
            break;
        case S_EXT:
            if (++st->line > MAX_CHUNK_LINE_BYTES) { *err = "chunk extension too long"; goto done; }
            if (c == '\r') state = S_SIZE_LF;
            else if (!(cls[c] & C_VALUE)) { *err = "invalid chunk extension"; goto done; }
            break;
        case S_SIZE_LF:
            if (c != '\n') { *err = "bare CR in chunk size line"; goto done; }
            st->digits = 0;
            st->line = 0;
            state = st->remaining ? S_DATA : S_TRAILER;
            break;
        case S_DATA_CR:
            if (c != '\r') { *err = "chunk data not followed by CRLF"; goto done; }
            state = S_DATA_LF;
            break;
        case S_DATA_LF:
            if (c != '\n') { *err = "chunk data not followed by CRLF"; goto done; }
            state = S_SIZE;
            break;
        case S_TRAILER: /* the start of a trailer line, or the empty line that ends the body */
            if (c == '\r') state = S_END_LF;
            else if (cls[c] & C_TOKEN) { st->name[0] = lower[c]; st->name_len = 1; state = S_TRAILER_NAME; }
            else { *err = "invalid trailer field"; goto done; }
            break;
        case S_TRAILER_NAME:
            if (c == ':') {
                /* RFC 9110 section 6.5.1: framing cannot come after the content; a trailer that
                   names it is refused, never relayed to a parser that might merge it. */
                if (IEQ(st->name, st->name_len, "content-length") ||
                    IEQ(st->name, st->name_len, "transfer-encoding")) {
                    *err = "framing field in a trailer";
                    goto done;
                }
                state = S_TRAILER_VALUE;
            }
            else if (!(cls[c] & C_TOKEN)) { *err = "trailer field without a colon"; goto done; }
            else if (st->name_len < TRAILER_NAME_KEPT) st->name[st->name_len++] = lower[c];
            else st->name_len = TRAILER_NAME_KEPT + 1; /* longer than any name we look for */
            break;
        case S_TRAILER_VALUE:
            if (c == '\r') state = S_TRAILER_LF;
            else if (!(cls[c] & C_VALUE)) { *err = "invalid character in trailer"; goto done; }
            break;
        case S_TRAILER_LF:
            if (c != '\n') { *err = "bare CR in trailer"; goto done; }
            state = S_TRAILER;
            break;
        case S_END_LF:
            if (c != '\n') { *err = "bare CR in trailer"; goto done; }
            state = S_DONE;
            break;
        }
    }
done:
    st->state = state;
    return i - start;
}

static PyObject *
scanner_feed(ChunkedScanner *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"buf", "start"};
    PyObject *a[2];
    Py_ssize_t start;
    Py_buffer view;
    if (gather_args(args, nargs, kwnames, names, 2, 1, a) < 0) return NULL;
    if (open_buffer(a[0], &view, a[1], &start) < 0) return NULL;
    const char *err;
    int err_status;
    Py_ssize_t k = wg_chunk_scan(&self->st, view.buf, view.len, start, &err, &err_status);
    PyBuffer_Release(&view);
    if (err) return fail(err, err_status);
    return PyLong_FromSsize_t(k);
}

static PyObject *
scanner_get_done(ChunkedScanner *self, void *closure)
{
    return PyBool_FromLong(self->st.state == S_DONE);
}

static PyMethodDef scanner_methods[] = {
    {"feed", (PyCFunction)(void (*)(void))scanner_feed, METH_FASTCALL | METH_KEYWORDS,
     "feed(buf, start=0) -> how many bytes from start belong to the body"},
    {NULL}};

static PyGetSetDef scanner_getset[] = {
    {"done", (getter)scanner_get_done, NULL, "the last chunk and trailers are through", NULL},
    {NULL}};

static PyTypeObject ChunkedScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.ChunkedScanner",
    .tp_basicsize = sizeof(ChunkedScanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Finds where a chunked body ends without copying it.",
    .tp_new = scanner_new,
    .tp_methods = scanner_methods,
    .tp_getset = scanner_getset,
};

/* ---- access log lines ---- */

/* A JSON string's body: quote and backslash escaped, control bytes and bytes from 0x7f as
   \u00XX, so a line is valid JSON whatever bytes it is given. Writes at most 6 * n bytes. */
static char *
json_escape(char *out, const unsigned char *s, Py_ssize_t n)
{
    static const char hex[] = "0123456789abcdef";
    Py_ssize_t plain = 0; /* the bytes before the first one that needs escaping go as they are */
    while (plain < n && json_plain[s[plain]]) out[plain] = (char)s[plain], plain++;
    out += plain;
    for (Py_ssize_t i = plain; i < n; i++) {
        unsigned char c = s[i];
        if (c == '"' || c == '\\') {
            *out++ = '\\';
            *out++ = (char)c;
        }
        else if (c < 0x20 || c >= 0x7f) {
            memcpy(out, "\\u00", 4);
            out[4] = hex[c >> 4];
            out[5] = hex[c & 15];
            out += 6;
        }
        else
            *out++ = (char)c;
    }
    return out;
}

/* Numbers outside [0, ACCESS_NUMBER_MAX) are written as 0: durations and times are never
   negative, and a bounded number bounds the line (the twin does the same). Numbers are written
   from whole microseconds with integer arithmetic: glibc's printf("%.3f") costs thousands of
   instructions per number, which made up most of a line's cost. */
#define ACCESS_NUMBER_MAX 1e12

static double
access_number(PyObject *o, int *error)
{
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
        *error = 1;
        return 0.0;
    }
    return (v >= 0.0 && v < ACCESS_NUMBER_MAX) ? v : 0.0;
}

/* Whole microseconds, rounded half up (the twin computes floor(v * 1e6 + 0.5) the same way). */
static unsigned long long
access_micros(double seconds)
{
    return (unsigned long long)(seconds * 1e6 + 0.5); /* seconds >= 0: truncation is floor (no libm call) */
}

/* Numbers are written straight into the line, two digits per step from a table, after counting
   them (no division per digit, no copy): callgrind counted ~29 instructions per digit for the
   digit-at-a-time loop with a copy, most of an access line's cost. */
static const char DIGIT_PAIRS[201] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

static int
count_digits(unsigned long long v)
{
    int n = 1;
    for (;;) {
        if (v < 10) return n;
        if (v < 100) return n + 1;
        if (v < 1000) return n + 2;
        if (v < 10000) return n + 3;
        v /= 10000;
        n += 4;
    }
}

/* v in decimal, at least width digits (zeros in front). */
static char *
write_digits(char *out, unsigned long long v, int width)
{
    int n = count_digits(v);
    if (n < width) {
        memset(out, '0', (size_t)(width - n));
        out += width - n;
    }
    char *q = out + n;
    while (v >= 100) {
        unsigned pair = (unsigned)(v % 100);
        v /= 100;
        q -= 2;
        q[0] = DIGIT_PAIRS[2 * pair];
        q[1] = DIGIT_PAIRS[2 * pair + 1];
    }
    if (v >= 10) {
        q[-2] = DIGIT_PAIRS[2 * v];
        q[-1] = DIGIT_PAIRS[2 * v + 1];
    } else {
        q[-1] = (char)('0' + v);
    }
    return out + n;
}

/* v < 1000 as exactly three digits. */
static char *
write3(char *out, unsigned v)
{
    unsigned rest = v % 100;
    out[0] = (char)('0' + v / 100);
    out[1] = DIGIT_PAIRS[2 * rest];
    out[2] = DIGIT_PAIRS[2 * rest + 1];
    return out + 3;
}

/* v < 1000000 as exactly six digits. */
static char *
write6(char *out, unsigned v)
{
    out = write3(out, v / 1000);
    return write3(out, v % 1000);
}

/* Seconds as milliseconds with three decimals, inlined into the line's writer: it runs for every
   duration of every line, and under ten milliseconds (the usual case) it is a digit, a point and
   three more. */
static inline __attribute__((always_inline)) char *
write_ms(char *out, double seconds)
{
    unsigned long long us = access_micros(seconds > 0.0 && seconds < ACCESS_NUMBER_MAX ? seconds : 0.0);
    unsigned long long whole = us / 1000;
    if (whole < 10) *out++ = (char)('0' + whole);
    else out = write_digits(out, whole, 1);
    *out++ = '.';
    return write3(out, (unsigned)(us % 1000));
}

/* The line, written in one pass. One check of the room first, against a bound that every piece
   keeps by construction: the template's text (under 200 bytes), 8 numbers of at most 24 bytes each
   (clamped below ACCESS_NUMBER_MAX: at most 13 digits, a point and 6 decimals; a long long: at most
   20 digits and a sign), and every string escaped to at most 6 bytes per byte. So a wrong bound gives
   NULL (the caller's SystemError), never a write past the buffer; and the per-piece checks that
   cost a third of a line are gone. */
char *
wg_access_format(char *p, const char *limit, const AccessLine *l)
{
    if (wg_access_room(l) > limit - p) return NULL;
    return wg_access_format_fitted(p, l);
}

char *
wg_access_format_fitted(char *p, const AccessLine *l)
{
#define TEXT(literal) (memcpy(p, literal, sizeof(literal) - 1), p += sizeof(literal) - 1)
#define STRING(s, n) (p = json_escape(p, (const unsigned char *)(s), (n)))
#define INT(v) (p = ((v) < 0 ? (*p++ = '-', write_digits(p, 0ULL - (unsigned long long)(v), 1)) \
                             : write_digits(p, (unsigned long long)(v), 1)))
#define MS(v) ((v) == 0.0 ? (void)TEXT("0.000") : (void)(p = write_ms(p, (v))))
/* A string that needs no escaping, copied as it is. */
#define PLAIN(s, n) (memcpy(p, (s), (size_t)(n)), p += (n))
    double when = (l->when >= 0.0 && l->when < ACCESS_NUMBER_MAX) ? l->when : 0.0;
    TEXT("{\"time\":");
    {
        /* The seconds change once a second: their digits are kept, only the microseconds are new. */
        static unsigned long long second = ~0ULL;
        static char digits[24];
        static int ndigits;
        unsigned long long us = access_micros(when);
        if (us / 1000000ULL != second) {
            second = us / 1000000ULL;
            ndigits = (int)(write_digits(digits, second, 1) - digits);
        }
        memcpy(p, digits, 16); /* a fixed-size copy (inlined); only ndigits of it count */
        p += ndigits;
        *p++ = '.';
        p = write6(p, (unsigned)(us % 1000000ULL));
    }
    if (l->service_text) {
        memcpy(p, l->service_text, ACCESS_SERVICE_TEXT);
        p += l->service_text_len;
    } else {
        TEXT(",\"service\":\"");
        if (l->plain) PLAIN(l->service, l->service_len);
        else STRING(l->service, l->service_len);
        TEXT("\",\"method\":\"");
    }
    if (l->plain && l->method_len <= ACCESS_METHOD_COPY && l->method_room >= ACCESS_METHOD_COPY) {
        memcpy(p, l->method, ACCESS_METHOD_COPY); /* a method is a token (RFC 9110 5.6.2): never escaped */
        p += l->method_len;
    } else if (l->plain) {
        PLAIN(l->method, l->method_len);
    } else {
        STRING(l->method, l->method_len);
    }
    TEXT("\",\"path\":\"");
    { /* the plain bytes in front inline (a path usually is all plain), the rest through json_escape */
        const unsigned char *s = (const unsigned char *)l->target;
        Py_ssize_t i = 0, n = l->target_len;
        while (i < n && json_plain[s[i]]) p[i] = (char)s[i], i++;
        p += i;
        if (i < n) STRING(s + i, n - i);
    }
    TEXT("\",\"status\":");
    if (l->status >= 100 && l->status <= 999) p = write3(p, (unsigned)l->status);
    else INT(l->status);
    if (l->bytes_in == 0) { /* a request without a body */
        TEXT(",\"bytes_in\":0");
    } else {
        TEXT(",\"bytes_in\":");
        INT(l->bytes_in);
    }
    TEXT(",\"bytes_out\":");
    INT(l->bytes_out);
    TEXT(",\"ms\":{\"total\":");
    MS(l->total);
    if (l->queue == 0.0 && l->connect == 0.0) { /* no wake, a pooled connection: the usual request */
        TEXT(",\"queue\":0.000,\"connect\":0.000");
    } else {
        TEXT(",\"queue\":");
        MS(l->queue);
        TEXT(",\"connect\":");
        MS(l->connect);
    }
    TEXT(",\"upstream\":");
    MS(l->upstream);
    if (l->woke)
        TEXT("},\"woke\":true");
    else
        TEXT("},\"woke\":false");
    if (l->client_text) {
        memcpy(p, l->client_text, ACCESS_CLIENT_TEXT);
        p += l->client_text_len;
    } else {
        TEXT(",\"client\":\"");
        if (l->plain) PLAIN(l->client, l->client_len);
        else STRING(l->client, l->client_len);
        TEXT("\"}\n");
    }
#undef TEXT
#undef STRING
#undef INT
#undef MS
#undef PLAIN
    return p;
}

Py_ssize_t
wg_access_line(PyObject *buffer, const AccessLine *l)
{
    Py_ssize_t old = PyByteArray_GET_SIZE(buffer);
    Py_ssize_t strings = l->service_len + l->method_len + l->target_len + l->client_len;
    if (strings > (PY_SSIZE_T_MAX - ACCESS_FIXED_BYTES - old) / 6) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t room = wg_access_room(l);
    if (PyByteArray_Resize(buffer, old + room) < 0)
        return -1;
    char *start = PyByteArray_AS_STRING(buffer) + old;
    char *p = wg_access_format(start, start + room, l);
    if (!p) {
        PyByteArray_Resize(buffer, old); /* shrinking cannot fail */
        PyErr_SetString(PyExc_SystemError, "append_access_line(): the line outgrew its room");
        return -1;
    }
    if (PyByteArray_Resize(buffer, old + (p - start)) < 0)
        return -1;
    return old + (p - start);
}

static PyObject *
append_access_line(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 14) {
        PyErr_Format(PyExc_TypeError, "append_access_line() takes 14 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *buffer = args[0];
    if (!PyByteArray_Check(buffer)) {
        PyErr_SetString(PyExc_TypeError, "append_access_line(): buffer must be a bytearray");
        return NULL;
    }
    static const int string_args[4] = {2, 3, 4, 13}; /* service, method, target, client */
    for (int i = 0; i < 4; i++) {
        if (!PyBytes_Check(args[string_args[i]])) {
            PyErr_SetString(PyExc_TypeError, "append_access_line(): service, method, target and client are bytes");
            return NULL;
        }
    }
    /* Each conversion stops at the first failure: no C API call is made with an exception set. */
    int error = 0;
    double when = access_number(args[1], &error);
    if (error) return NULL;
    double ms[4];
    for (int i = 0; i < 4; i++) {
        ms[i] = access_number(args[8 + i], &error);
        if (error) return NULL;
    }
    long long ints[3];
    for (int i = 0; i < 3; i++) {
        ints[i] = PyLong_AsLongLong(args[5 + i]);
        if (ints[i] == -1 && PyErr_Occurred()) return NULL;
    }
    int woke = PyObject_IsTrue(args[12]);
    if (woke < 0) return NULL;
    AccessLine line = {.when = when, .total = ms[0], .queue = ms[1], .connect = ms[2], .upstream = ms[3],
                       .service = PyBytes_AS_STRING(args[2]), .service_len = PyBytes_GET_SIZE(args[2]),
                       .method = PyBytes_AS_STRING(args[3]), .method_len = PyBytes_GET_SIZE(args[3]),
                       .target = PyBytes_AS_STRING(args[4]), .target_len = PyBytes_GET_SIZE(args[4]),
                       .client = PyBytes_AS_STRING(args[13]), .client_len = PyBytes_GET_SIZE(args[13]),
                       .status = ints[0], .bytes_in = ints[1], .bytes_out = ints[2], .woke = woke};
    Py_ssize_t length = wg_access_line(buffer, &line);
    return length < 0 ? NULL : PyLong_FromSsize_t(length);
}

/* ---- Board: per-service state and per-worker counters in shared memory (proxy/board.py) ----
 *
 * Layout and the ordering protocol are described in proxy/board.py, the twin. Every access here is
 * a sequentially consistent atomic, so a worker's admit (add in_flight, then read state) and the
 * controller's sleep (store state, then read in_flight) cannot both miss each other (Dekker).
 */

#include <time.h>

#define BOARD_WORDS 8          /* one 64-byte line per slot header and per worker column */
#define B_STATE 0
#define B_FAILED_UNTIL 1
#define B_HELD_TOTAL 2
#define C_IN_FLIGHT 0
#define C_TUNNELS 1
#define C_LAST_NS 2
#define C_HELD 3
#define STATE_READY 2


static int64_t *
board_slot(BoardObject *self, Py_ssize_t slot)
{
    if (slot < 0 || slot >= self->slots) {
        PyErr_Format(PyExc_IndexError, "board slot %zd out of range (0..%zd)", slot, self->slots - 1);
        return NULL;
    }
    return self->words + BOARD_WORDS + slot * BOARD_WORDS * (1 + self->workers);
}

static int64_t *
board_column(BoardObject *self, Py_ssize_t slot, Py_ssize_t worker)
{
    int64_t *s = board_slot(self, slot);
    if (!s) return NULL;
    if (worker < 0 || worker >= self->workers) {
        PyErr_Format(PyExc_IndexError, "board worker %zd out of range (0..%zd)", worker, self->workers - 1);
        return NULL;
    }
    return s + BOARD_WORDS * (1 + worker);
}

static int64_t
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#define LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define ADD(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)

static Py_ssize_t
board_bytes(Py_ssize_t slots, Py_ssize_t workers)
{
    return (Py_ssize_t)sizeof(int64_t) * BOARD_WORDS * (1 + slots * (1 + workers));
}

static PyObject *
board_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"buffer", "slots", "workers", "lock_fd", NULL};
    PyObject *buffer;
    Py_ssize_t slots, workers;
    int lock_fd = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Onn|i", kwlist, &buffer, &slots, &workers, &lock_fd))
        return NULL;
    if (slots < 1 || workers < 1) {
        PyErr_SetString(PyExc_ValueError, "a board needs at least one slot and one worker");
        return NULL;
    }
    BoardObject *self = (BoardObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    if (self->view.len < board_bytes(slots, workers) || ((uintptr_t)self->view.buf % 64) != 0) {
        PyErr_Format(PyExc_ValueError, "board buffer: %zd bytes (needs %zd, 64-byte aligned)", self->view.len,
                     board_bytes(slots, workers));
        PyBuffer_Release(&self->view);
        self->view.obj = NULL;
        Py_DECREF(self);
        return NULL;
    }
    self->words = (int64_t *)self->view.buf;
    self->slots = slots;
    self->workers = workers;
    return (PyObject *)self;
}

static void
board_dealloc(BoardObject *self)
{
    if (self->view.obj) PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
board_args(BoardObject *self, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, Py_ssize_t *out)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < want; i++) {
        out[i] = PyLong_AsSsize_t(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

int
wg_board_in_range(BoardObject *board, Py_ssize_t slot, Py_ssize_t worker)
{
    return slot >= 0 && slot < board->slots && worker >= 0 && worker < board->workers;
}

int
wg_board_admit(BoardObject *board, Py_ssize_t slot, Py_ssize_t worker)
{
    int64_t *s = board->words + BOARD_WORDS + slot * BOARD_WORDS * (1 + board->workers);
    int64_t *c = s + BOARD_WORDS * (1 + worker);
    ADD(c + C_IN_FLIGHT, 1);
    if (LOAD(s + B_STATE) == STATE_READY) return 1;
    ADD(c + C_IN_FLIGHT, -1);
    return 0;
}

void
wg_board_leave(BoardObject *board, Py_ssize_t slot, Py_ssize_t worker, int tunnel)
{
    int64_t *c = board->words + BOARD_WORDS + slot * BOARD_WORDS * (1 + board->workers) + BOARD_WORDS * (1 + worker);
    STORE(c + C_LAST_NS, monotonic_ns());  /* before the count drops: idle is never seen without it */
    if (tunnel) ADD(c + C_TUNNELS, -1);
    ADD(c + C_IN_FLIGHT, -1);
}

static PyObject *
board_admit(BoardObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t a[2];
    if (board_args(self, args, nargs, 2, a) < 0) return NULL;
    int64_t *s = board_slot(self, a[0]), *c = board_column(self, a[0], a[1]);
    if (!c) return NULL;
    ADD(c + C_IN_FLIGHT, 1);
    if (LOAD(s + B_STATE) == STATE_READY) Py_RETURN_TRUE;
    ADD(c + C_IN_FLIGHT, -1);
    Py_RETURN_FALSE;
}

static PyObject *
board_leave(BoardObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t a[3];
    if (board_args(self, args, nargs, 3, a) < 0) return NULL;
    int64_t *c = board_column(self, a[0], a[1]);
    if (!c) return NULL;
    STORE(c + C_LAST_NS, monotonic_ns());  /* before the count drops: idle is never seen without it */
    if (a[2]) ADD(c + C_TUNNELS, -1);
    ADD(c + C_IN_FLIGHT, -1);
    Py_RETURN_NONE;
}

static PyObject *
board_open_tunnel(BoardObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t a[2];
    if (board_args(self, args, nargs, 2, a) < 0) return NULL;
    int64_t *c = board_column(self, a[0], a[1]);
    if (!c) return NULL;
    ADD(c + C_TUNNELS, 1);
    Py_RETURN_NONE;
}

static PyObject *
board_hold(BoardObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t a[3];
    if (board_args(self, args, nargs, 3, a) < 0) return NULL;
    int64_t *s = board_slot(self, a[0]), *c = board_column(self, a[0], a[1]);
    if (!c) return NULL;
    if (ADD(s + B_HELD_TOTAL, 1) > a[2]) {
        ADD(s + B_HELD_TOTAL, -1);
        Py_RETURN_FALSE;
    }
    ADD(c + C_HELD, 1);
    Py_RETURN_TRUE;
}

static PyObject *
board_unhold(BoardObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t a[2];
    if (board_args(self, args, nargs, 2, a) < 0) return NULL;
    int64_t *s = board_slot(self, a[0]), *c = board_column(self, a[0], a[1]);
    if (!c) return NULL;
    ADD(c + C_HELD, -1);
    ADD(s + B_HELD_TOTAL, -1);
    Py_RETURN_NONE;
}

static PyObject *
board_publish(BoardObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t a[3];
    if (board_args(self, args, nargs, 3, a) < 0) return NULL;
    int64_t *s = board_slot(self, a[0]);
    if (!s) return NULL;
    STORE(s + B_FAILED_UNTIL, (int64_t)a[2]);
    STORE(s + B_STATE, (int64_t)a[1]);
    Py_RETURN_NONE;
}

static PyObject *
board_state(BoardObject *self, PyObject *slot)
{
    Py_ssize_t i = PyLong_AsSsize_t(slot);
    if (i == -1 && PyErr_Occurred()) return NULL;
    int64_t *s = board_slot(self, i);
    if (!s) return NULL;
    return PyLong_FromLongLong(LOAD(s + B_STATE));
}

static PyObject *
board_failed_until(BoardObject *self, PyObject *slot)
{
    Py_ssize_t i = PyLong_AsSsize_t(slot);
    if (i == -1 && PyErr_Occurred()) return NULL;
    int64_t *s = board_slot(self, i);
    if (!s) return NULL;
    return PyLong_FromLongLong(LOAD(s + B_FAILED_UNTIL));
}

static PyObject *
board_column_tuple(int64_t *c)
{
    return Py_BuildValue("(LLLL)", (long long)LOAD(c + C_IN_FLIGHT), (long long)LOAD(c + C_TUNNELS),
                         (long long)LOAD(c + C_HELD), (long long)LOAD(c + C_LAST_NS));
}

static PyObject *
board_totals(BoardObject *self, PyObject *slot)
{
    Py_ssize_t i = PyLong_AsSsize_t(slot);
    if (i == -1 && PyErr_Occurred()) return NULL;
    int64_t *s = board_slot(self, i);
    if (!s) return NULL;
    long long in_flight = 0, tunnels = 0, last = 0;
    for (Py_ssize_t w = 0; w < self->workers; w++) {
        int64_t *c = s + BOARD_WORDS * (1 + w);
        in_flight += LOAD(c + C_IN_FLIGHT);
        tunnels += LOAD(c + C_TUNNELS);
        long long l = LOAD(c + C_LAST_NS);
        if (l > last) last = l;
    }
    return Py_BuildValue("(LLLL)", in_flight, tunnels, (long long)LOAD(s + B_HELD_TOTAL), last);
}

static PyObject *
board_column_meth(BoardObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t a[2];
    if (board_args(self, args, nargs, 2, a) < 0) return NULL;
    int64_t *c = board_column(self, a[0], a[1]);
    if (!c) return NULL;
    return board_column_tuple(c);
}

static PyObject *
board_reclaim(BoardObject *self, PyObject *worker)
{
    Py_ssize_t w = PyLong_AsSsize_t(worker);
    if (w == -1 && PyErr_Occurred()) return NULL;
    for (Py_ssize_t i = 0; i < self->slots; i++) {
        int64_t *s = board_slot(self, i), *c = board_column(self, i, w);
        if (!c) return NULL;
        int64_t held = __atomic_exchange_n(c + C_HELD, 0, __ATOMIC_SEQ_CST);
        if (held) ADD(s + B_HELD_TOTAL, -held);
        STORE(c + C_TUNNELS, 0);
        STORE(c + C_IN_FLIGHT, 0);
    }
    Py_RETURN_NONE;
}

static PyObject *
board_clear(BoardObject *self, PyObject *slot)
{
    Py_ssize_t i = PyLong_AsSsize_t(slot);
    if (i == -1 && PyErr_Occurred()) return NULL;
    int64_t *s = board_slot(self, i);
    if (!s) return NULL;
    for (Py_ssize_t k = 0; k < BOARD_WORDS * (1 + self->workers); k++) STORE(s + k, 0);
    Py_RETURN_NONE;
}

static PyObject *
board_size(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t a[2];
    if (board_args(NULL, args, nargs, 2, a) < 0) return NULL;
    return PyLong_FromSsize_t(board_bytes(a[0], a[1]));
}

static PyMethodDef board_methods[] = {
    {"admit", (PyCFunction)(void (*)(void))board_admit, METH_FASTCALL, "admit(slot, worker) -> bool"},
    {"leave", (PyCFunction)(void (*)(void))board_leave, METH_FASTCALL, "leave(slot, worker, tunnel)"},
    {"open_tunnel", (PyCFunction)(void (*)(void))board_open_tunnel, METH_FASTCALL, "open_tunnel(slot, worker)"},
    {"hold", (PyCFunction)(void (*)(void))board_hold, METH_FASTCALL, "hold(slot, worker, max_queue) -> bool"},
    {"unhold", (PyCFunction)(void (*)(void))board_unhold, METH_FASTCALL, "unhold(slot, worker)"},
    {"publish", (PyCFunction)(void (*)(void))board_publish, METH_FASTCALL, "publish(slot, state, failed_until_ns)"},
    {"state", (PyCFunction)board_state, METH_O, "state(slot) -> int"},
    {"failed_until", (PyCFunction)board_failed_until, METH_O, "failed_until(slot) -> monotonic ns"},
    {"totals", (PyCFunction)board_totals, METH_O, "totals(slot) -> (in_flight, tunnels, held, last_ns)"},
    {"column", (PyCFunction)(void (*)(void))board_column_meth, METH_FASTCALL,
     "column(slot, worker) -> (in_flight, tunnels, held, last_ns)"},
    {"reclaim", (PyCFunction)board_reclaim, METH_O, "reclaim(worker): a dead worker's counts are zeroed"},
    {"clear", (PyCFunction)board_clear, METH_O, "clear(slot): a slot taken by another service starts at zero"},
    {"size", (PyCFunction)(void (*)(void))board_size, METH_FASTCALL | METH_CLASS, "size(slots, workers) -> bytes"},
    {NULL}};

static PyMemberDef board_members[] = {
    {"slots", T_PYSSIZET, offsetof(BoardObject, slots), READONLY, "service slots"},
    {"workers", T_PYSSIZET, offsetof(BoardObject, workers), READONLY, "worker columns"},
    {NULL}};

PyTypeObject wg_BoardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.Board",
    .tp_basicsize = sizeof(BoardObject),
    .tp_dealloc = (destructor)board_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Board(buffer, slots, workers, lock_fd=-1): services' state and workers' counts in shared memory.",
    .tp_methods = board_methods,
    .tp_members = board_members,
    .tp_new = board_new,
};

/* ---- module ---- */

static PyMethodDef module_methods[] = {
    {"parse_request", (PyCFunction)(void (*)(void))parse_request, METH_FASTCALL | METH_KEYWORDS,
     "parse_request(buf, start=0, max_head=MAX_HEAD_BYTES) -> RequestHead or None"},
    {"parse_response", (PyCFunction)(void (*)(void))parse_response, METH_FASTCALL | METH_KEYWORDS,
     "parse_response(buf, start=0, max_head=MAX_HEAD_BYTES, head_request=False) -> ResponseHead or None"},
    {"build_request", (PyCFunction)(void (*)(void))build_request, METH_FASTCALL | METH_KEYWORDS,
     "build_request(head, client_addr, proto=b'http', extra=b'') -> bytes"},
    {"build_response", (PyCFunction)(void (*)(void))build_response, METH_FASTCALL | METH_KEYWORDS,
     "build_response(head, keep_alive, client_version=1, extra=b'') -> bytes"},
    {"append_access_line", (PyCFunction)(void (*)(void))append_access_line, METH_FASTCALL,
     "append_access_line(buffer, time, service, method, target, status, bytes_in, bytes_out, total, queue, "
     "connect, upstream, woke, client) -> new length of buffer"},
    {"warm_counts", wg_warm_counts, METH_NOARGS,
     "warm_counts() -> (requests, responses) the warm path handled in this process"},
    {NULL}};

static int
module_exec(PyObject *m)
{
    init_tables();
    if (PyType_Ready(&wg_RequestHeadType) < 0 || PyType_Ready(&wg_ResponseHeadType) < 0 ||
        PyType_Ready(&ChunkedScannerType) < 0 || PyType_Ready(&wg_BoardType) < 0 ||
        PyType_Ready(&wg_AccessLogType) < 0)
        return -1;
    if (!ProtocolError) {
        PyObject *errors = PyImport_ImportModule("proxy.errors");
        if (!errors) return -1;
        ProtocolError = PyObject_GetAttrString(errors, "ProtocolError");
        Py_DECREF(errors);
        if (!ProtocolError) return -1;
    }
    if (PyModule_AddObjectRef(m, "RequestHead", (PyObject *)&wg_RequestHeadType) < 0 ||
        PyModule_AddObjectRef(m, "ResponseHead", (PyObject *)&wg_ResponseHeadType) < 0 ||
        PyModule_AddObjectRef(m, "ChunkedScanner", (PyObject *)&ChunkedScannerType) < 0 ||
        PyModule_AddObjectRef(m, "Board", (PyObject *)&wg_BoardType) < 0 ||
        PyModule_AddObjectRef(m, "AccessLogBase", (PyObject *)&wg_AccessLogType) < 0 ||
        PyModule_AddObjectRef(m, "ProtocolError", ProtocolError) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HEAD_BYTES", MAX_HEAD_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HEADERS", MAX_HEADERS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_CHUNK_LINE_BYTES", MAX_CHUNK_LINE_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_TRAILER_BYTES", MAX_TRAILER_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_LENGTH_DIGITS", MAX_LENGTH_DIGITS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_CONNECTION_OPTIONS", MAX_CONNECTION_OPTIONS) < 0 ||
        PyModule_AddIntConstant(m, "CHUNKED", CHUNKED) < 0 ||
        PyModule_AddIntConstant(m, "UNTIL_CLOSE", UNTIL_CLOSE) < 0 ||
        PyModule_AddStringConstant(m, "IMPLEMENTATION", "c") < 0)
        return -1;
    return wg_warm_exec(m);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "proxy._speedups",
    .m_doc = "HTTP/1.1 head parsing and rewriting in C; proxy/_native.py is its twin.",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = module_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&module_def);
}
