/* proxy._speedups, the warm path: a keep-alive request to an awake service over an idle pooled upstream
 * connection, and its response, handled in C from the read to the write, the metrics and the access
 * log line included. Whatever does not fit (a wake, a new connection, a body or a response that is
 * not whole in one read, an Upgrade, an error) goes to the Python protocol (proxy/server.py), which
 * finds the connection in the state its own code would have left it: the fields are the same ones.
 *
 * The types: ClientBase and UpstreamBase (the protocols' fields and their data_received), RouteBase
 * (a route's fields), RouterBase and PathsBase (the host and path table), WarmLease (a granted lease
 * that needs no object per request) and Histogram.
 * proxy/_native.py has their twins.
 */
#include "_speedups.h"
#include <structmember.h>
#include <string.h>
#include <time.h>

/* The client connection's states: proxy/server.py's S_* (it checks they agree). */
enum { S_HEAD = 0, S_BODY, S_HELD, S_CONNECTING, S_EXCHANGE, S_TUNNEL, S_CLOSED };

/* metrics.BUCKETS: 50 microseconds to 30 seconds (proxy/metrics.py checks they agree). */
static const double BUCKETS[] = {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0};
#define NBUCKETS ((int)(sizeof(BUCKETS) / sizeof(BUCKETS[0])))

/* Requests sent upstream and responses answered by the warm path in this process (warm_counts()). */
static unsigned long long warm_requests, warm_responses;

static double
now_seconds(void)
{
    /* CLOCK_MONOTONIC: what time.perf_counter() and the loop's time() read on Linux. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- Histogram ---- */

typedef struct {
    PyObject_HEAD
    unsigned long long counts[NBUCKETS + 1];
    double sum;
} Histogram;

static PyTypeObject HistogramType;

static inline void
histogram_add(Histogram *h, double v)
{
    int lo = 0, hi = NBUCKETS; /* bisect_left(BUCKETS, v) */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (BUCKETS[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    h->counts[lo]++;
    h->sum += v;
}

static PyObject *
histogram_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "Histogram() takes no arguments");
        return NULL;
    }
    return type->tp_alloc(type, 0);
}

static PyObject *
histogram_observe(Histogram *self, PyObject *value)
{
    double v = PyFloat_AsDouble(value);
    if (v == -1.0 && PyErr_Occurred()) return NULL;
    histogram_add(self, v);
    Py_RETURN_NONE;
}

static PyObject *
histogram_absorb(Histogram *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "absorb(counts, total)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "absorb(): counts must be a sequence");
    if (!seq) return NULL;
    if (PySequence_Fast_GET_SIZE(seq) != NBUCKETS + 1) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "absorb(): %d counts expected", NBUCKETS + 1);
        return NULL;
    }
    unsigned long long add[NBUCKETS + 1];
    for (int i = 0; i <= NBUCKETS; i++) {
        add[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (add[i] == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    double total = PyFloat_AsDouble(args[1]);
    if (total == -1.0 && PyErr_Occurred()) return NULL;
    for (int i = 0; i <= NBUCKETS; i++) self->counts[i] += add[i];
    self->sum += total;
    Py_RETURN_NONE;
}

static PyObject *
histogram_get_counts(Histogram *self, void *closure)
{
    PyObject *list = PyList_New(NBUCKETS + 1);
    if (!list) return NULL;
    for (int i = 0; i <= NBUCKETS; i++) {
        PyObject *n = PyLong_FromUnsignedLongLong(self->counts[i]);
        if (!n) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, n);
    }
    return list;
}

static PyObject *
histogram_get_count(Histogram *self, void *closure)
{
    unsigned long long total = 0;
    for (int i = 0; i <= NBUCKETS; i++) total += self->counts[i];
    return PyLong_FromUnsignedLongLong(total);
}

static PyObject *
histogram_cumulative(Histogram *self, PyObject *unused)
{
    PyObject *list = PyList_New(NBUCKETS + 1);
    if (!list) return NULL;
    unsigned long long total = 0;
    for (int i = 0; i <= NBUCKETS; i++) {
        total += self->counts[i];
        PyObject *bound = i < NBUCKETS ? PyObject_Repr(PyFloat_FromDouble(BUCKETS[i])) : PyUnicode_FromString("+Inf");
        PyObject *item = bound ? Py_BuildValue("(NK)", bound, total) : NULL;
        if (!item) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyMethodDef histogram_methods[] = {
    {"observe", (PyCFunction)histogram_observe, METH_O, "observe(value): one more observation"},
    {"absorb", (PyCFunction)(void (*)(void))histogram_absorb, METH_FASTCALL,
     "absorb(counts, total): add another process's histogram (the same buckets)"},
    {"cumulative", (PyCFunction)histogram_cumulative, METH_NOARGS, "[(upper bound, cumulated count)], +Inf last"},
    {NULL}};

static PyMemberDef histogram_members[] = {
    {"sum", T_DOUBLE, offsetof(Histogram, sum), 0, "the sum of every observation"},
    {NULL}};

static PyGetSetDef histogram_getset[] = {
    {"counts", (getter)histogram_get_counts, NULL, "counts per bucket (a copy), +Inf last", NULL},
    {"count", (getter)histogram_get_count, NULL, "observations", NULL},
    {NULL}};

static PyTypeObject HistogramType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.Histogram",
    .tp_basicsize = sizeof(Histogram),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Counts per bucket (metrics.BUCKETS, then +Inf) and the sum; cumulated only when exported.",
    .tp_new = histogram_new,
    .tp_methods = histogram_methods,
    .tp_members = histogram_members,
    .tp_getset = histogram_getset,
};

/* ---- StatusCounts: requests per status code, a mapping (ServiceStats.codes) counted in C ---- */

#define STATUS_MIN 100
#define STATUS_MAX 599 /* RFC 9110 section 15: three digits, 1xx to 5xx */
#define STATUS_INLINE 4 /* codes kept inside the object: most services answer with a handful */

/* The pairs are sorted by code, and a code is there only with a count above zero. A sparse table
   rather than an array of every code: 10,000 configured services would carry 40 MB of zeros. */
typedef struct {
    unsigned short code;
    unsigned long long count;
} CodeCount;

typedef struct {
    PyObject_HEAD
    Py_ssize_t used, capacity;
    CodeCount *pairs; /* inline_pairs, or a PyMem block when more codes were seen */
    CodeCount inline_pairs[STATUS_INLINE];
} StatusCounts;

static PyTypeObject StatusCountsType;

/* The code of a key, or -1 when it is an int outside 100-599 (missing_ok) or -2 with an error set. */
static int
status_code(PyObject *key, int missing_ok)
{
    long code = PyLong_Check(key) ? PyLong_AsLong(key) : -1;
    if (code == -1 && PyErr_Occurred()) return -2;
    if (code < STATUS_MIN || code > STATUS_MAX) {
        if (missing_ok) return -1;
        if (PyLong_Check(key)) PyErr_Format(PyExc_KeyError, "%ld is not a status code (100-599)", code);
        else PyErr_SetString(PyExc_TypeError, "status codes are int");
        return -2;
    }
    return (int)code;
}

/* Where code is in the pairs, or where it would go (*found says which). */
static Py_ssize_t
counts_find(StatusCounts *self, int code, int *found)
{
    Py_ssize_t i = 0;
    while (i < self->used && self->pairs[i].code < code) i++;
    *found = i < self->used && self->pairs[i].code == code;
    return i;
}

/* The count of code, made to exist with 0 if it did not; NULL (MemoryError) when it cannot grow. */
static unsigned long long *
counts_slot(StatusCounts *self, int code)
{
    int found;
    Py_ssize_t i = counts_find(self, code, &found);
    if (found) return &self->pairs[i].count;
    if (self->used == self->capacity) {
        Py_ssize_t capacity = self->capacity * 2;
        CodeCount *pairs = PyMem_Malloc(capacity * sizeof(CodeCount));
        if (!pairs) {
            PyErr_NoMemory();
            return NULL;
        }
        memcpy(pairs, self->pairs, self->used * sizeof(CodeCount));
        if (self->pairs != self->inline_pairs) PyMem_Free(self->pairs);
        self->pairs = pairs;
        self->capacity = capacity;
    }
    memmove(&self->pairs[i + 1], &self->pairs[i], (self->used - i) * sizeof(CodeCount));
    self->pairs[i].code = (unsigned short)code;
    self->pairs[i].count = 0;
    self->used++;
    return &self->pairs[i].count;
}

static void
counts_remove(StatusCounts *self, Py_ssize_t i)
{
    memmove(&self->pairs[i], &self->pairs[i + 1], (self->used - i - 1) * sizeof(CodeCount));
    self->used--;
}

/* The warm path's count of one response; a code outside 100-599 is not counted (the parser
   admits none). -1 with MemoryError when the table cannot grow. */
static int
counts_add_one(StatusCounts *self, int code)
{
    if (code < STATUS_MIN || code > STATUS_MAX) return 0;
    if (self->used && self->pairs[0].code == code) { /* the common case: one code, or 200 first */
        self->pairs[0].count++;
        return 0;
    }
    unsigned long long *count = counts_slot(self, code);
    if (!count) return -1;
    (*count)++;
    return 0;
}

static PyObject *
counts_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "StatusCounts() takes no arguments");
        return NULL;
    }
    StatusCounts *self = (StatusCounts *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->pairs = self->inline_pairs;
    self->capacity = STATUS_INLINE;
    return (PyObject *)self;
}

static void
counts_dealloc(StatusCounts *self)
{
    if (self->pairs != self->inline_pairs) PyMem_Free(self->pairs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t
counts_len(StatusCounts *self)
{
    return self->used;
}

static PyObject *
counts_subscript(StatusCounts *self, PyObject *key)
{
    int code = status_code(key, 1), found = 0;
    if (code == -2) return NULL;
    Py_ssize_t i = code < 0 ? 0 : counts_find(self, code, &found);
    if (!found) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(self->pairs[i].count);
}

static int
counts_ass_subscript(StatusCounts *self, PyObject *key, PyObject *value)
{
    int code = status_code(key, 0), found;
    if (code < 0) return -1;
    Py_ssize_t i = counts_find(self, code, &found);
    if (!value) {
        if (!found) {
            PyErr_SetObject(PyExc_KeyError, key);
            return -1;
        }
        counts_remove(self, i);
        return 0;
    }
    unsigned long long n = PyLong_AsUnsignedLongLong(value);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (!n) { /* a count of 0 is no entry, as in the array this replaced */
        if (found) counts_remove(self, i);
        return 0;
    }
    unsigned long long *count = counts_slot(self, code);
    if (!count) return -1;
    *count = n;
    return 0;
}

static int
counts_contains(StatusCounts *self, PyObject *key)
{
    int code = status_code(key, 1), found = 0;
    if (code == -2) {
        PyErr_Clear();
        return 0;
    }
    if (code >= 0) counts_find(self, code, &found);
    return found;
}

/* 0: keys, 1: values, 2: items; codes ascending. */
static PyObject *
counts_list(StatusCounts *self, int what)
{
    PyObject *list = PyList_New(self->used);
    if (!list) return NULL;
    for (Py_ssize_t i = 0; i < self->used; i++) {
        CodeCount *pair = &self->pairs[i];
        PyObject *item = what == 0 ? PyLong_FromLong(pair->code)
                         : what == 1 ? PyLong_FromUnsignedLongLong(pair->count)
                         : Py_BuildValue("(lK)", (long)pair->code, pair->count);
        if (!item) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyObject *counts_keys(StatusCounts *self, PyObject *unused) { return counts_list(self, 0); }
static PyObject *counts_values(StatusCounts *self, PyObject *unused) { return counts_list(self, 1); }
static PyObject *counts_items(StatusCounts *self, PyObject *unused) { return counts_list(self, 2); }

static PyObject *
counts_iter(StatusCounts *self)
{
    PyObject *keys = counts_list(self, 0);
    if (!keys) return NULL;
    PyObject *it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

static PyObject *
counts_get(StatusCounts *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(code, default=None)");
        return NULL;
    }
    int code = status_code(args[0], 1), found = 0;
    if (code == -2) return NULL;
    Py_ssize_t i = code < 0 ? 0 : counts_find(self, code, &found);
    if (!found) return Py_NewRef(nargs == 2 ? args[1] : Py_None);
    return PyLong_FromUnsignedLongLong(self->pairs[i].count);
}

static PyObject *
counts_as_dict(StatusCounts *self)
{
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (Py_ssize_t i = 0; i < self->used; i++) {
        PyObject *k = PyLong_FromLong(self->pairs[i].code), *v = PyLong_FromUnsignedLongLong(self->pairs[i].count);
        int r = (k && v) ? PyDict_SetItem(d, k, v) : -1;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (r < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

static PyObject *
counts_richcompare(StatusCounts *self, PyObject *other, int op)
{
    if (op != Py_EQ && op != Py_NE) Py_RETURN_NOTIMPLEMENTED;
    PyObject *mine = counts_as_dict(self);
    if (!mine) return NULL;
    PyObject *theirs = PyObject_TypeCheck(other, &StatusCountsType) ? counts_as_dict((StatusCounts *)other)
                                                                     : Py_NewRef(other);
    PyObject *r = theirs ? PyObject_RichCompare(mine, theirs, op) : NULL;
    Py_DECREF(mine);
    Py_XDECREF(theirs);
    return r;
}

static PyObject *
counts_repr(StatusCounts *self)
{
    PyObject *d = counts_as_dict(self);
    if (!d) return NULL;
    PyObject *r = PyUnicode_FromFormat("StatusCounts(%R)", d);
    Py_DECREF(d);
    return r;
}

static PyMappingMethods counts_mapping = {
    .mp_length = (lenfunc)counts_len,
    .mp_subscript = (binaryfunc)counts_subscript,
    .mp_ass_subscript = (objobjargproc)counts_ass_subscript,
};

static PySequenceMethods counts_sequence = {
    .sq_contains = (objobjproc)counts_contains,
};

static PyMethodDef counts_methods[] = {
    {"get", (PyCFunction)(void (*)(void))counts_get, METH_FASTCALL, "get(code, default=None)"},
    {"keys", (PyCFunction)counts_keys, METH_NOARGS, "codes with a count, ascending"},
    {"values", (PyCFunction)counts_values, METH_NOARGS, "their counts"},
    {"items", (PyCFunction)counts_items, METH_NOARGS, "(code, count), codes ascending"},
    {NULL}};

static PyTypeObject StatusCountsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.StatusCounts",
    .tp_basicsize = sizeof(StatusCounts),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Requests per status code (100-599), a mapping as a dict of counts is, kept in a sorted C "
              "table of (code, count) pairs (the warm path counts a request with one increment).",
    .tp_new = counts_new,
    .tp_dealloc = (destructor)counts_dealloc,
    .tp_as_mapping = &counts_mapping,
    .tp_as_sequence = &counts_sequence,
    .tp_iter = (getiterfunc)counts_iter,
    .tp_methods = counts_methods,
    .tp_richcompare = (richcmpfunc)counts_richcompare,
    .tp_repr = (reprfunc)counts_repr,
};

/* ---- WarmLease: a granted lease on one gate's slot, shared by every request it admits ---- */

typedef struct {
    PyObject_HEAD
    BoardObject *board;
    Py_ssize_t slot, worker;
} WarmLease;

static PyTypeObject WarmLeaseType;

static PyObject *
warm_lease_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"board", "slot", "worker", NULL};
    PyObject *board;
    Py_ssize_t slot, worker;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!nn", kwlist, &wg_BoardType, &board, &slot, &worker))
        return NULL;
    if (!wg_board_in_range((BoardObject *)board, slot, worker)) {
        PyErr_Format(PyExc_IndexError, "board slot %zd or worker %zd out of range", slot, worker);
        return NULL;
    }
    WarmLease *self = (WarmLease *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    Py_INCREF(board);
    self->board = (BoardObject *)board;
    self->slot = slot;
    self->worker = worker;
    return (PyObject *)self;
}

static void
warm_lease_dealloc(WarmLease *self)
{
    Py_XDECREF(self->board);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
warm_lease_release(WarmLease *self, PyObject *unused)
{
    wg_board_leave(self->board, self->slot, self->worker, 0);
    Py_RETURN_NONE;
}

static PyObject *
warm_lease_open_tunnel(WarmLease *self, PyObject *unused)
{
    PyErr_SetString(PyExc_RuntimeError, "a warm lease is never a tunnel's: an Upgrade takes the Python path");
    return NULL;
}

static PyObject *
warm_lease_true(PyObject *self, void *closure)
{
    Py_RETURN_TRUE;
}

static PyObject *
warm_lease_false(PyObject *self, void *closure)
{
    Py_RETURN_FALSE;
}

static PyObject *
warm_lease_none(PyObject *self, void *closure)
{
    Py_RETURN_NONE;
}

static PyMethodDef warm_lease_methods[] = {
    {"release", (PyCFunction)warm_lease_release, METH_NOARGS, "the request is over (once per request)"},
    {"open_tunnel", (PyCFunction)warm_lease_open_tunnel, METH_NOARGS, "never: see the type's doc"},
    {NULL}};

static PyGetSetDef warm_lease_getset[] = {
    {"granted", (getter)warm_lease_true, NULL, NULL, NULL},
    {"held", (getter)warm_lease_false, NULL, NULL, NULL},
    {"tunnel", (getter)warm_lease_false, NULL, NULL, NULL},
    {"refused", (getter)warm_lease_none, NULL, NULL, NULL},
    {NULL}};

static PyMemberDef warm_lease_members[] = {
    {"slot", T_PYSSIZET, offsetof(WarmLease, slot), READONLY, NULL},
    {"worker", T_PYSSIZET, offsetof(WarmLease, worker), READONLY, NULL},
    {NULL}};

static PyTypeObject WarmLeaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.WarmLease",
    .tp_basicsize = sizeof(WarmLease),
    .tp_dealloc = (destructor)warm_lease_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "WarmLease(board, slot, worker): the lease of every request admitted at once to a READY service "
              "(proxy/gate.py's Lease, granted, without an object per request). release() once per request; "
              "never a tunnel.",
    .tp_new = warm_lease_new,
    .tp_methods = warm_lease_methods,
    .tp_getset = warm_lease_getset,
    .tp_members = warm_lease_members,
};

/* ---- RouteBase: what a request is routed to (proxy/server.py's ServiceRoute) ---- */

typedef struct {
    PyObject_HEAD
    PyObject *name, *name_bytes, *pool, *pool_key, *service, *no_wake, *stats, *wait_page_after;
    PyObject *warm;     /* the gate's WarmLease, taken when service is set; NULL: no warm path */
    PyObject *codes;    /* stats.codes and its histograms, taken when stats is set */
    PyObject *duration, *upstream, *queue, *connect;
    char access_text[ACCESS_SERVICE_TEXT]; /* `,"service":"NAME","method":"` for the access log, once (0 bytes: not yet) */
    Py_ssize_t access_text_len;
    PyObject *access_text_for; /* the name_bytes it was made from (compared, never dereferenced) */
} RouteBase;

static PyTypeObject RouteBaseType;

static PyObject *str_warm_lease, *str_codes, *str_duration, *str_upstream, *str_queue, *str_connect;

static int
route_traverse(RouteBase *self, visitproc visit, void *arg)
{
    Py_VISIT(self->name); Py_VISIT(self->name_bytes); Py_VISIT(self->pool); Py_VISIT(self->pool_key);
    Py_VISIT(self->service); Py_VISIT(self->no_wake); Py_VISIT(self->stats); Py_VISIT(self->wait_page_after);
    Py_VISIT(self->warm); Py_VISIT(self->codes); Py_VISIT(self->duration); Py_VISIT(self->upstream);
    Py_VISIT(self->queue); Py_VISIT(self->connect);
    return 0;
}

static int
route_clear(RouteBase *self)
{
    Py_CLEAR(self->name); Py_CLEAR(self->name_bytes); Py_CLEAR(self->pool); Py_CLEAR(self->pool_key);
    Py_CLEAR(self->service); Py_CLEAR(self->no_wake); Py_CLEAR(self->stats); Py_CLEAR(self->wait_page_after);
    Py_CLEAR(self->warm); Py_CLEAR(self->codes); Py_CLEAR(self->duration); Py_CLEAR(self->upstream);
    Py_CLEAR(self->queue); Py_CLEAR(self->connect);
    return 0;
}

static void
route_dealloc(RouteBase *self)
{
    PyObject_GC_UnTrack(self);
    route_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
route_get_service(RouteBase *self, void *closure)
{
    return Py_NewRef(self->service ? self->service : Py_None);
}

static int
route_set_service(RouteBase *self, PyObject *value, void *closure)
{
    PyObject *warm = NULL;
    if (value && value != Py_None) {
        if (_PyObject_LookupAttr(value, str_warm_lease, &warm) < 0) return -1;
        if (warm && !PyObject_TypeCheck(warm, &WarmLeaseType)) Py_CLEAR(warm);  /* a fake gate: no warm path */
    }
    Py_XSETREF(self->warm, warm);
    Py_XSETREF(self->service, Py_XNewRef(value));
    return 0;
}

static PyObject *
route_get_stats(RouteBase *self, void *closure)
{
    return Py_NewRef(self->stats ? self->stats : Py_None);
}

static int
route_set_stats(RouteBase *self, PyObject *value, void *closure)
{
    PyObject *codes = NULL, *h[4] = {NULL, NULL, NULL, NULL};
    PyObject *names[4] = {str_duration, str_upstream, str_queue, str_connect};
    if (value && value != Py_None) {
        int ok = _PyObject_LookupAttr(value, str_codes, &codes) >= 0;
        for (int i = 0; i < 4 && ok; i++) ok = _PyObject_LookupAttr(value, names[i], &h[i]) >= 0;
        if (!ok) {
            Py_XDECREF(codes);
            for (int i = 0; i < 4; i++) Py_XDECREF(h[i]);
            return -1;
        }
        int usable = codes && PyObject_TypeCheck(codes, &StatusCountsType);
        for (int i = 0; i < 4; i++) usable = usable && h[i] && PyObject_TypeCheck(h[i], &HistogramType);
        if (!usable) {  /* stats the warm path cannot write: it leaves this route to Python */
            Py_CLEAR(codes);
            for (int i = 0; i < 4; i++) Py_CLEAR(h[i]);
        }
    }
    Py_XSETREF(self->codes, codes);
    Py_XSETREF(self->duration, h[0]);
    Py_XSETREF(self->upstream, h[1]);
    Py_XSETREF(self->queue, h[2]);
    Py_XSETREF(self->connect, h[3]);
    Py_XSETREF(self->stats, Py_XNewRef(value));
    return 0;
}

static PyMemberDef route_members[] = {
    {"name", T_OBJECT, offsetof(RouteBase, name), 0, NULL},
    {"name_bytes", T_OBJECT, offsetof(RouteBase, name_bytes), 0, NULL},
    {"pool", T_OBJECT, offsetof(RouteBase, pool), 0, NULL},
    {"pool_key", T_OBJECT, offsetof(RouteBase, pool_key), 0, NULL},
    {"no_wake", T_OBJECT, offsetof(RouteBase, no_wake), 0, NULL},
    {"wait_page_after", T_OBJECT, offsetof(RouteBase, wait_page_after), 0, NULL},
    {NULL}};

static PyGetSetDef route_getset[] = {
    {"service", (getter)route_get_service, (setter)route_set_service, "the gate (the acquire/release seam)", NULL},
    {"stats", (getter)route_get_stats, (setter)route_set_stats, "the route's ServiceStats", NULL},
    {NULL}};

static PyTypeObject RouteBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.RouteBase",
    .tp_basicsize = sizeof(RouteBase),
    .tp_dealloc = (destructor)route_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A route's fields, for the warm path to read without a lookup.",
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)route_traverse,
    .tp_clear = (inquiry)route_clear,
    .tp_members = route_members,
    .tp_getset = route_getset,
};

/* ---- RouterBase and PathsBase: the host and path table (proxy/routing.py's Router and _Paths) ----
 *
 * exact maps a lower-case host to a target or to a PathsBase; wildcard does the same for the
 * suffixes of `*.suffix` hosts; default takes what neither matches. A PathsBase holds (prefix,
 * target) pairs, longest prefix first, and a fallback for the host's other paths. routing.py builds
 * and edits the tables; route() reads them here, for the warm path and the Python path alike. */

typedef struct {
    PyObject_HEAD
    PyObject *prefixes; /* a list of (bytes, target), longest prefix first */
    PyObject *fallback; /* the target for paths no prefix matches, or NULL */
} PathsBase;

typedef struct {
    PyObject_HEAD
    PyObject *exact, *wildcard; /* dicts, made with the object: bytes -> target or PathsBase */
    PyObject *fallback;         /* `default`: the target of every other host, or NULL */
} RouterBase;

static PyTypeObject PathsBaseType, RouterBaseType;

/* "/api" matches "/api", "/api/x" and "/api?q", but not "/apix" (routing.prefix_matches). */
static int
prefix_matches(const char *prefix, Py_ssize_t prefix_len, const char *path, Py_ssize_t path_len)
{
    if (path_len < prefix_len || memcmp(prefix, path, (size_t)prefix_len) != 0) return 0;
    if (path_len == prefix_len || (prefix_len && prefix[prefix_len - 1] == '/')) return 1;
    char next = path[prefix_len];
    return next == '/' || next == '?' || next == '#';
}

/* The target of path in one host's entry (a target, or a PathsBase): borrowed; NULL without an
 * exception when nothing matches. */
static PyObject *
entry_match(PyObject *entry, const char *path, Py_ssize_t path_len)
{
    if (!PyObject_TypeCheck(entry, &PathsBaseType)) return entry == Py_None ? NULL : entry;
    PathsBase *paths = (PathsBase *)entry;
    if (paths->prefixes) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(paths->prefixes); i++) {
            PyObject *pair = PyList_GET_ITEM(paths->prefixes, i);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0))) {
                PyErr_SetString(PyExc_TypeError, "a path table holds (bytes prefix, target) pairs");
                return NULL;
            }
            PyObject *prefix = PyTuple_GET_ITEM(pair, 0);
            if (prefix_matches(PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix), path, path_len))
                return PyTuple_GET_ITEM(pair, 1);
        }
    }
    return paths->fallback == Py_None ? NULL : paths->fallback;
}

/* The target for (host, path), or the default: borrowed; NULL without an exception for none. host is
 * lower-case bytes without the port, or None. */
static PyObject *
router_lookup(RouterBase *r, PyObject *host, const char *path, Py_ssize_t path_len)
{
    if (host != Py_None && PyBytes_Check(host)) {
        PyObject *entry = PyDict_GetItemWithError(r->exact, host), *found;
        if (entry) {
            found = entry_match(entry, path, path_len);
            if (found || PyErr_Occurred()) return found;
        } else if (PyErr_Occurred())
            return NULL;
        Py_ssize_t n = PyBytes_GET_SIZE(host);
        const char *name = PyBytes_AS_STRING(host);
        if (PyDict_GET_SIZE(r->wildcard) && n) {
            for (const char *dot = memchr(name, '.', (size_t)n); dot; dot = memchr(dot + 1, '.', (size_t)(name + n - dot - 1))) {
                PyObject *suffix = PyBytes_FromStringAndSize(dot + 1, name + n - dot - 1);
                if (!suffix) return NULL;
                entry = PyDict_GetItemWithError(r->wildcard, suffix);
                Py_DECREF(suffix);
                if (entry) {
                    found = entry_match(entry, path, path_len);
                    if (found || PyErr_Occurred()) return found;
                } else if (PyErr_Occurred())
                    return NULL;
            }
        }
    }
    return r->fallback == Py_None ? NULL : r->fallback;
}

static PyObject *
router_route(RouterBase *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || (args[0] != Py_None && !PyBytes_Check(args[0])) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "route(host, path): host is bytes or None, path is bytes");
        return NULL;
    }
    PyObject *found = router_lookup(self, args[0], PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1]));
    if (!found && PyErr_Occurred()) return NULL;
    return Py_NewRef(found ? found : Py_None);
}

static PyObject *
paths_match(PathsBase *self, PyObject *path)
{
    if (!PyBytes_Check(path)) {
        PyErr_SetString(PyExc_TypeError, "match(path): path is bytes");
        return NULL;
    }
    PyObject *found = entry_match((PyObject *)self, PyBytes_AS_STRING(path), PyBytes_GET_SIZE(path));
    if (!found && PyErr_Occurred()) return NULL;
    return Py_NewRef(found ? found : Py_None);
}

static PyObject *
router_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    RouterBase *self = (RouterBase *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->exact = PyDict_New();
    self->wildcard = PyDict_New();
    if (!self->exact || !self->wildcard) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *
paths_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    PathsBase *self = (PathsBase *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->prefixes = PyList_New(0);
    if (!self->prefixes) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
router_traverse(RouterBase *self, visitproc visit, void *arg)
{
    Py_VISIT(self->exact); Py_VISIT(self->wildcard); Py_VISIT(self->fallback);
    return 0;
}

static int
router_clear(RouterBase *self)
{
    Py_CLEAR(self->exact); Py_CLEAR(self->wildcard); Py_CLEAR(self->fallback);
    return 0;
}

static void
router_dealloc(RouterBase *self)
{
    PyObject_GC_UnTrack(self);
    router_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
paths_traverse(PathsBase *self, visitproc visit, void *arg)
{
    Py_VISIT(self->prefixes); Py_VISIT(self->fallback);
    return 0;
}

static int
paths_clear(PathsBase *self)
{
    Py_CLEAR(self->prefixes); Py_CLEAR(self->fallback);
    return 0;
}

static void
paths_dealloc(PathsBase *self)
{
    PyObject_GC_UnTrack(self);
    paths_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
router_get_default(RouterBase *self, void *closure)
{
    return Py_NewRef(self->fallback ? self->fallback : Py_None);
}

static int
router_set_default(RouterBase *self, PyObject *value, void *closure)
{
    Py_XSETREF(self->fallback, value == Py_None ? NULL : Py_XNewRef(value));
    return 0;
}

static PyObject *
paths_get_fallback(PathsBase *self, void *closure)
{
    return Py_NewRef(self->fallback ? self->fallback : Py_None);
}

static int
paths_set_fallback(PathsBase *self, PyObject *value, void *closure)
{
    Py_XSETREF(self->fallback, value == Py_None ? NULL : Py_XNewRef(value));
    return 0;
}

static PyObject *
paths_get_prefixes(PathsBase *self, void *closure)
{
    return Py_NewRef(self->prefixes);
}

static int
paths_set_prefixes(PathsBase *self, PyObject *value, void *closure)
{
    if (!value || !PyList_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "prefixes is a list of (bytes prefix, target) pairs");
        return -1;
    }
    Py_SETREF(self->prefixes, Py_NewRef(value));
    return 0;
}

static PyMethodDef router_methods[] = {
    {"route", (PyCFunction)(void (*)(void))router_route, METH_FASTCALL,
     "route(host, path): the target for this request, the default, or None"},
    {NULL}};

static PyMemberDef router_members[] = {
    {"exact", T_OBJECT, offsetof(RouterBase, exact), READONLY, "host -> target, or -> a path table"},
    {"wildcard", T_OBJECT, offsetof(RouterBase, wildcard), READONLY, "suffix of *.suffix -> target or path table"},
    {NULL}};

static PyGetSetDef router_getset[] = {
    {"default", (getter)router_get_default, (setter)router_set_default, "the target of every other host", NULL},
    {NULL}};

static PyTypeObject RouterBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.RouterBase",
    .tp_basicsize = sizeof(RouterBase),
    .tp_dealloc = (destructor)router_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The host and path table and its lookup; proxy/routing.py's Router fills it.",
    .tp_new = router_new,
    .tp_traverse = (traverseproc)router_traverse,
    .tp_clear = (inquiry)router_clear,
    .tp_methods = router_methods,
    .tp_members = router_members,
    .tp_getset = router_getset,
};

static PyMethodDef paths_methods[] = {
    {"match", (PyCFunction)paths_match, METH_O, "match(path): the longest matching prefix's target, or the fallback"},
    {NULL}};

static PyGetSetDef paths_getset[] = {
    {"prefixes", (getter)paths_get_prefixes, (setter)paths_set_prefixes, "(prefix, target), longest first", NULL},
    {"fallback", (getter)paths_get_fallback, (setter)paths_set_fallback, "the target of the host's other paths", NULL},
    {NULL}};

static PyTypeObject PathsBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.PathsBase",
    .tp_basicsize = sizeof(PathsBase),
    .tp_dealloc = (destructor)paths_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One host's services by path prefix; proxy/routing.py's _Paths fills it.",
    .tp_new = paths_new,
    .tp_traverse = (traverseproc)paths_traverse,
    .tp_clear = (inquiry)paths_clear,
    .tp_methods = paths_methods,
    .tp_getset = paths_getset,
};

/* ---- ServerBase and PoolBase: the fields of proxy/server.py's ProxyServer and proxy/upstream.py's
 * UpstreamPool that the warm path reads ---- */

typedef struct {
    PyObject_HEAD
    int draining, measure, server_timing, warm;
    PyObject *router; /* the host and path table: a RouterBase (a reload puts a new one here) */
    PyObject *access_log;
    int access_in_c;  /* access_log is an AccessLogBase: lines go to it without a Python call */
} ServerBase;

static PyTypeObject ServerBaseType;

static int
server_traverse(ServerBase *self, visitproc visit, void *arg)
{
    Py_VISIT(self->router);
    Py_VISIT(self->access_log);
    return 0;
}

static int
server_clear(ServerBase *self)
{
    Py_CLEAR(self->router);
    Py_CLEAR(self->access_log);
    return 0;
}

static void
server_dealloc(ServerBase *self)
{
    PyObject_GC_UnTrack(self);
    server_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef server_members[] = {
    {"draining", T_INT, offsetof(ServerBase, draining), 0, "no new connections; busy ones close after their response"},
    {"measure", T_INT, offsetof(ServerBase, measure), 0, "[metrics] enabled"},
    {"server_timing", T_INT, offsetof(ServerBase, server_timing), 0, "a Server-Timing header on responses"},
    {"warm", T_INT, offsetof(ServerBase, warm), 0, "new connections may take the warm path"},
    {"router", T_OBJECT, offsetof(ServerBase, router), 0, "the host and path table (proxy/routing.py's Router)"},
    {NULL}};

static PyObject *
server_get_access_log(ServerBase *self, void *closure)
{
    return Py_NewRef(self->access_log ? self->access_log : Py_None);
}

static int
server_set_access_log(ServerBase *self, PyObject *value, void *closure)
{
    Py_XSETREF(self->access_log, Py_XNewRef(value));
    self->access_in_c = value && value != Py_None && wg_access_log_check(value);
    return 0;
}

static PyGetSetDef server_getset[] = {
    {"access_log", (getter)server_get_access_log, (setter)server_set_access_log, "an AccessLog, or None", NULL},
    {NULL}};

static PyTypeObject ServerBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.ServerBase",
    .tp_basicsize = sizeof(ServerBase),
    .tp_dealloc = (destructor)server_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The proxy server's fields that every warm exchange reads.",
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)server_traverse,
    .tp_clear = (inquiry)server_clear,
    .tp_members = server_members,
    .tp_getset = server_getset,
};

typedef struct {
    PyObject_HEAD
    PyObject *idle, *waiters;
    Py_ssize_t max_idle;
} PoolBase;

static PyTypeObject PoolBaseType;

static int
pool_traverse(PoolBase *self, visitproc visit, void *arg)
{
    Py_VISIT(self->idle);
    Py_VISIT(self->waiters);
    return 0;
}

static int
pool_clear(PoolBase *self)
{
    Py_CLEAR(self->idle);
    Py_CLEAR(self->waiters);
    return 0;
}

static void
pool_dealloc(PoolBase *self)
{
    PyObject_GC_UnTrack(self);
    pool_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef pool_members[] = {
    {"idle", T_OBJECT, offsetof(PoolBase, idle), 0, "idle connections, the warmest last"},
    {"waiters", T_OBJECT, offsetof(PoolBase, waiters), 0, "exchanges waiting for a connection"},
    {"max_idle", T_PYSSIZET, offsetof(PoolBase, max_idle), 0, "idle connections kept at most"},
    {NULL}};

static PyTypeObject PoolBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.PoolBase",
    .tp_basicsize = sizeof(PoolBase),
    .tp_dealloc = (destructor)pool_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An upstream pool's fields that the warm path takes connections from and gives them back to.",
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)pool_traverse,
    .tp_clear = (inquiry)pool_clear,
    .tp_members = pool_members,
};

/* ---- UpstreamBase and ClientBase: the protocols' fields ---- */

typedef struct {
    PyObject_HEAD
    PyObject *pool, *transport, *owner;
    int reused, closed, reading_paused;
    PyObject *write, *write_for;  /* transport.write, bound once (write_to) */
} UpstreamBase;

typedef struct {
    PyObject_HEAD
    /* the connection */
    PyObject *server, *proto, *limits, *loop, *port_router, *transport, *client_addr, *client_host;
    int state;
    PyObject *buf;
    double deadline, body_deadline;
    int read_paused, write_paused;
    /* the exchange under way */
    PyObject *req, *route;
    long long req_left;
    PyObject *req_scanner;
    int req_body_done;
    long long req_body_seen;
    double body_attached_at;
    long long body_seen_at_attach;
    PyObject *up_head, *pending;
    long long pending_size;
    PyObject *upstream, *lease, *connect_task, *pool_of_task;
    int waiting_for_pool, retried;
    PyObject *resp, *rbuf;
    long long resp_left;
    PyObject *resp_scanner;
    int interim, responded, keep, client_eof, idle;
    /* the timeline (perf_counter seconds; 0: not yet) */
    double t0, t_held, t_connect, t_sent, t_first, queue_s, connect_s;
    int status_sent;
    long long bytes_out;
    PyObject *write, *write_for;  /* transport.write, bound once (write_to) */
    char access_text[ACCESS_CLIENT_TEXT]; /* `,"client":"ADDR"}\n` for the access log, once (0 bytes: not yet) */
    Py_ssize_t access_text_len;
    PyObject *access_text_for; /* the client_addr it was made from (compared, never dereferenced) */
    /* the limits the warm path reads, copied by _warm_limits() from limits */
    Py_ssize_t max_head_size, max_body_size;
    double upstream_timeout, keepalive_timeout, send_timeout;
    int warm;  /* 0: this connection takes the Python path only (set by _warm_limits) */
} ClientBase;

static PyTypeObject ClientBaseType, UpstreamBaseType;

#define CLIENT_OBJECTS(X) X(server) X(proto) X(limits) X(loop) X(port_router) X(transport) \
    X(client_addr) X(client_host) X(buf) X(req) X(route) X(req_scanner) X(up_head) X(pending) X(upstream) \
    X(lease) X(connect_task) X(pool_of_task) X(resp) X(rbuf) X(resp_scanner) X(write)

static int
client_traverse(ClientBase *self, visitproc visit, void *arg)
{
#define VISIT(f) Py_VISIT(self->f);
    CLIENT_OBJECTS(VISIT)
#undef VISIT
    return 0;
}

static int
client_clear(ClientBase *self)
{
#define CLEAR(f) Py_CLEAR(self->f);
    CLIENT_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}

static void
client_dealloc(ClientBase *self)
{
    PyObject_GC_UnTrack(self);
    client_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
upstream_traverse(UpstreamBase *self, visitproc visit, void *arg)
{
    Py_VISIT(self->pool);
    Py_VISIT(self->transport);
    Py_VISIT(self->owner);
    Py_VISIT(self->write);
    return 0;
}

static int
upstream_clear(UpstreamBase *self)
{
    Py_CLEAR(self->pool);
    Py_CLEAR(self->transport);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->write);
    return 0;
}

static void
upstream_dealloc(UpstreamBase *self)
{
    PyObject_GC_UnTrack(self);
    upstream_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Interned names. */
static PyObject *str_write, *str_slow, *str_upstream_data, *str_close, *str_give_back, *str_release, *str_flush,
    *str_buffer, *str_lines, *str_wall_offset, *str_after_response, *str_route, *str_max_head_size,
    *str_max_body_size, *str_upstream_timeout, *str_keepalive_timeout, *str_send_timeout;

/* transport.write, bound once per connection: *cache holds it, *cached_for the transport it was
 * bound to (compared, never dereferenced: a connection keeps its transport for its life). */
static int
write_to(PyObject *transport, PyObject **cache, PyObject **cached_for, PyObject *data)
{
    if (!*cache || *cached_for != transport) {
        Py_XSETREF(*cache, PyObject_GetAttr(transport, str_write));
        if (!*cache) return -1;
        *cached_for = transport;
    }
    PyObject *res = PyObject_CallOneArg(*cache, data);
    if (!res) return -1;
    Py_DECREF(res);
    return 0;
}

/* ---- the request: client bytes to the upstream write ---- */

/* 1: the request went upstream; 0: the Python path takes data (*head: what was parsed of it, or
 * NULL); -1: an exception. */
static int
warm_request(ClientBase *self, PyObject *data, PyObject **head_out)
{
    *head_out = NULL;
    if (!self->warm || self->state != S_HEAD || self->write_paused || !PyBytes_CheckExact(data) ||
        (self->buf && PyByteArray_Check(self->buf) && PyByteArray_GET_SIZE(self->buf)))
        return 0;
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    double now = now_seconds();
    self->t0 = now;
    PyObject *parsed = wg_parse_request(b, n, 0, self->max_head_size, data);
    if (!parsed) {  /* a bad head: the Python path parses it again and answers its 4xx */
        PyErr_Clear();
        return 0;
    }
    if (parsed == Py_None) {
        Py_DECREF(parsed);
        return 0;
    }
    RequestHead *h = (RequestHead *)parsed;
    *head_out = parsed;  /* from here on, every refusal hands the parsed head to the Python path */
    Py_ssize_t body = h->body_length;
    if (body < 0 || h->length + body != n || h->expect_continue || h->upgrade.off >= 0 || h->path.off < 0 ||
        PyBytes_AS_STRING(h->raw)[h->path.off] != '/' || (self->max_body_size && body > self->max_body_size))
        return 0;

    /* route: the host and path table, or the service's own listener */
    PyObject *route;
    PyObject *host = wg_request_host(h);
    if (!host) return -1;
    if (self->port_router && self->port_router != Py_None) {
        route = PyObject_CallMethodObjArgs(self->port_router, str_route, host, Py_None, NULL);  /* PortRouter: path unused */
        Py_DECREF(host);
        if (!route) return -1;
    } else {
        PyObject *router = ((ServerBase *)self->server)->router;
        if (!router || !PyObject_TypeCheck(router, &RouterBaseType)) {
            Py_DECREF(host);
            return 0;
        }
        route = router_lookup((RouterBase *)router, host, PyBytes_AS_STRING(h->raw) + h->path.off, h->path.len);
        Py_DECREF(host);
        if (!route) return PyErr_Occurred() ? -1 : 0;  /* no service: the Python path answers */
        Py_INCREF(route);
    }
    if (!PyObject_TypeCheck(route, &RouteBaseType)) {
        Py_DECREF(route);
        return 0;
    }
    RouteBase *r = (RouteBase *)route;
    WarmLease *lease = (WarmLease *)r->warm;
    if (!lease || !r->pool || !PyObject_TypeCheck(r->pool, &PoolBaseType) || !r->codes ||
        (r->wait_page_after && r->wait_page_after != Py_None) || !((PoolBase *)r->pool)->idle) {
        Py_DECREF(route);
        return 0;
    }
    /* an idle pooled connection, looked at before the admission so that a miss costs nothing */
    PyObject *idle = Py_NewRef(((PoolBase *)r->pool)->idle);
    UpstreamBase *conn = NULL;
    if (PyList_CheckExact(idle)) {
        while (PyList_GET_SIZE(idle)) {
            PyObject *last = PyList_GET_ITEM(idle, PyList_GET_SIZE(idle) - 1);
            if (PyObject_TypeCheck(last, &UpstreamBaseType) && !((UpstreamBase *)last)->closed &&
                !((UpstreamBase *)last)->reading_paused) {
                conn = (UpstreamBase *)last;
                break;
            }
            if (!PyObject_TypeCheck(last, &UpstreamBaseType) || ((UpstreamBase *)last)->reading_paused) break;
            /* closed: drop it, as pool.take() does */
            if (PyList_SetSlice(idle, PyList_GET_SIZE(idle) - 1, PyList_GET_SIZE(idle), NULL) < 0) {
                Py_DECREF(idle);
                Py_DECREF(route);
                return -1;
            }
        }
    }
    if (!conn || !conn->transport || !wg_board_admit(lease->board, lease->slot, lease->worker)) {
        Py_DECREF(idle);
        Py_DECREF(route);
        return 0;  /* no connection to reuse, or not READY: the Python path connects or holds */
    }
    Py_INCREF(conn);
    if (PyList_SetSlice(idle, PyList_GET_SIZE(idle) - 1, PyList_GET_SIZE(idle), NULL) < 0) {
        wg_board_leave(lease->board, lease->slot, lease->worker, 0);
        Py_DECREF(conn);
        Py_DECREF(idle);
        Py_DECREF(route);
        return -1;
    }
    Py_DECREF(idle);

    /* the head rewritten for the service, the body (if any) after it: one write */
    const char *addr = "", *proto = "http";
    Py_ssize_t addr_len = 0, proto_len = 4;
    if (self->client_addr && PyBytes_Check(self->client_addr)) {
        addr = PyBytes_AS_STRING(self->client_addr);
        addr_len = PyBytes_GET_SIZE(self->client_addr);
    }
    if (self->proto && PyBytes_Check(self->proto)) {
        proto = PyBytes_AS_STRING(self->proto);
        proto_len = PyBytes_GET_SIZE(self->proto);
    }
    Py_ssize_t head_size = wg_request_size(h, addr_len, proto_len, 0);
    PyObject *out = PyBytes_FromStringAndSize(NULL, head_size + body);
    if (!out) goto fail_conn;
    char *p = PyBytes_AS_STRING(out), *end = p + head_size;
    p = wg_put_request(p, end, h, addr, addr_len, proto, proto_len, "", 0);
    if (p != end) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_SystemError, "warm path: the request head's size was computed wrong");
        goto fail_conn;
    }
    if (body) memcpy(p, b + h->length, (size_t)body);

    /* the exchange's fields, as _begin, _go_upstream and _attach leave them */
    Py_XSETREF(self->req, parsed);
    *head_out = NULL;
    Py_XSETREF(self->route, route);
    Py_XSETREF(self->lease, Py_NewRef((PyObject *)lease));
    Py_XSETREF(self->up_head, Py_NewRef(out));
    Py_XSETREF(conn->owner, Py_NewRef((PyObject *)self));
    conn->reused = 1;
    Py_XSETREF(self->upstream, (PyObject *)conn);
    self->idle = 0;
    self->t_held = self->t_connect = self->t_first = self->queue_s = self->connect_s = 0.0;
    self->t_sent = now;
    self->status_sent = 0;
    self->interim = 0;
    self->responded = 0;
    self->retried = 0;
    self->req_body_seen = body;
    self->req_left = 0;
    self->req_body_done = 1;
    self->state = S_EXCHANGE;
    self->deadline = now + self->upstream_timeout;
    int wrote = write_to(conn->transport, &conn->write, &conn->write_for, out);
    Py_DECREF(out);
    if (wrote < 0) return -1;
    warm_requests++;
    return 1;

fail_conn:
    wg_board_leave(lease->board, lease->slot, lease->worker, 0);
    Py_DECREF(conn);
    Py_DECREF(route);
    return -1;
}

static PyObject *
client_data_received(ClientBase *self, PyObject *data)
{
    PyObject *head;
    int r = warm_request(self, data, &head);
    if (r < 0) {
        Py_XDECREF(head);
        return NULL;
    }
    if (r > 0) Py_RETURN_NONE;
    PyObject *res = PyObject_CallMethodObjArgs((PyObject *)self, str_slow, data, head ? head : Py_None, NULL);
    Py_XDECREF(head);
    return res;
}

/* ---- the response: upstream bytes to the client write, then the record ---- */

/* Give a connection whose response ended cleanly back to its pool, as UpstreamPool.give_back does
 * when nobody waits (a waiter, or a full pool, is the pool's own business: it is asked). */
static int
give_back(UpstreamBase *conn)
{
    Py_CLEAR(conn->owner);
    if (conn->closed) return 0;
    PyObject *pool = conn->pool;
    if (pool && PyObject_TypeCheck(pool, &PoolBaseType) && !conn->reading_paused) {
        PoolBase *p = (PoolBase *)pool;
        Py_ssize_t waiting = p->waiters ? PyObject_Length(p->waiters) : 0;
        if (waiting < 0) return -1;
        if (!waiting && p->idle && PyList_CheckExact(p->idle) && PyList_GET_SIZE(p->idle) < p->max_idle)
            return PyList_Append(p->idle, (PyObject *)conn);
    }
    PyObject *res = PyObject_CallMethodOneArg(pool, str_give_back, (PyObject *)conn);
    if (!res) return -1;
    Py_DECREF(res);
    return 0;
}

/* _record: the metrics, then the access log line. */
static int
record(ClientBase *self, RouteBase *route, RequestHead *req, double end)
{
    ServerBase *server = (ServerBase *)self->server;  /* a ServerBase: _warm_limits made sure */
    int status = self->status_sent ? self->status_sent : 502;
    double total = self->t0 ? end - self->t0 : 0.0;
    double upstream = (self->t_first && self->t_sent) ? self->t_first - self->t_sent : 0.0;
    if (server->measure) {
        if (counts_add_one((StatusCounts *)route->codes, status) < 0) return -1;
        histogram_add((Histogram *)route->duration, total);
        if (upstream) histogram_add((Histogram *)route->upstream, upstream);
        if (self->t_held) histogram_add((Histogram *)route->queue, self->queue_s);
        if (self->connect_s) histogram_add((Histogram *)route->connect, self->connect_s);
    }
    PyObject *access = server->access_log;
    if (!access || access == Py_None) return 0;
    const char *raw = PyBytes_AS_STRING(req->raw);
    AccessLine line = {.total = total, .queue = self->queue_s, .connect = self->connect_s, .upstream = upstream,
                       .method = raw + req->lead, .method_len = req->method_len,
                       .method_room = PyBytes_GET_SIZE(req->raw) - req->lead,
                       .target = raw + req->target.off, .target_len = req->target.len,
                       .client = "", .client_len = 0, .status = status,
                       .bytes_in = req->length + self->req_body_seen, .bytes_out = self->bytes_out,
                       .woke = self->t_held != 0.0, .plain = 1};
    if (self->client_addr && PyBytes_Check(self->client_addr)) {
        line.client = PyBytes_AS_STRING(self->client_addr);
        line.client_len = PyBytes_GET_SIZE(self->client_addr);
    }
    if (route->name_bytes && PyBytes_Check(route->name_bytes)) {
        line.service = PyBytes_AS_STRING(route->name_bytes);
        line.service_len = PyBytes_GET_SIZE(route->name_bytes);
    } else {
        line.service = "";
        line.service_len = 0;
    }
    /* The parts of the line that are the route's and the connection's, made once (a name and an
       address need no escaping: copied between fixed text). */
    if (route->access_text_for != route->name_bytes) {
        static const char a[] = ",\"service\":\"", b[] = "\",\"method\":\"";
        Py_ssize_t n = (Py_ssize_t)sizeof(a) - 1 + line.service_len + (Py_ssize_t)sizeof(b) - 1;
        route->access_text_len = 0;
        if (n <= (Py_ssize_t)sizeof(route->access_text)) {
            memcpy(route->access_text, a, sizeof(a) - 1);
            memcpy(route->access_text + sizeof(a) - 1, line.service, (size_t)line.service_len);
            memcpy(route->access_text + sizeof(a) - 1 + line.service_len, b, sizeof(b) - 1);
            route->access_text_len = n;
        }
        route->access_text_for = route->name_bytes;
    }
    if (self->access_text_for != self->client_addr) {
        static const char a[] = ",\"client\":\"", b[] = "\"}\n";
        Py_ssize_t n = (Py_ssize_t)sizeof(a) - 1 + line.client_len + (Py_ssize_t)sizeof(b) - 1;
        self->access_text_len = 0;
        if (n <= (Py_ssize_t)sizeof(self->access_text)) {
            memcpy(self->access_text, a, sizeof(a) - 1);
            memcpy(self->access_text + sizeof(a) - 1, line.client, (size_t)line.client_len);
            memcpy(self->access_text + sizeof(a) - 1 + line.client_len, b, sizeof(b) - 1);
            self->access_text_len = n;
        }
        self->access_text_for = self->client_addr;
    }
    if (route->access_text_len) {
        line.service_text = route->access_text;
        line.service_text_len = route->access_text_len;
    }
    if (self->access_text_len) {
        line.client_text = self->access_text;
        line.client_text_len = self->access_text_len;
    }
    if (server->access_in_c) {
        line.when = end + wg_access_wall_offset(access);
        return wg_access_append(access, &line);
    }
    /* another kind of log (the twin's, in a test): its own append, through Python */
    PyObject *offset = PyObject_GetAttr(access, str_wall_offset);
    double wall = offset ? PyFloat_AsDouble(offset) : -1.0;
    Py_XDECREF(offset);
    if (wall == -1.0 && PyErr_Occurred()) return -1;
    PyObject *res = PyObject_CallMethod(access, "append", "dOy#y#LLLddddiO", end + wall, route->name_bytes,
                                        line.method, line.method_len, line.target, line.target_len, line.status,
                                        line.bytes_in, line.bytes_out, total, self->queue_s, self->connect_s,
                                        upstream, line.woke, self->client_addr);
    if (!res) return -1;
    Py_DECREF(res);
    return 0;
}

/* _finish: the response is through. Record it, give the connection back (give: its response ended
 * cleanly and it may be reused) or close it, release the lease, then wait for the next request or
 * close. 1, or -1 with an exception. */
static int
warm_finish(UpstreamBase *conn, ClientBase *c, RequestHead *req, RouteBase *route, int give, double now)
{
    Py_INCREF(c);  /* the client may be let go of by what is called below */
    Py_INCREF(conn);
    warm_responses++;
    int failed = record(c, route, req, now) < 0;
    Py_CLEAR(c->upstream);
    if (!failed) {
        if (give) failed = give_back(conn) < 0;
        else {
            PyObject *r = PyObject_CallMethodNoArgs((PyObject *)conn, str_close);
            if (r) Py_DECREF(r);
            else failed = 1;
        }
    }
    Py_DECREF(conn);
    Py_CLEAR(c->req);
    Py_CLEAR(c->resp);
    Py_CLEAR(c->resp_scanner);
    Py_CLEAR(c->route);
    c->body_deadline = 0.0;
    PyObject *lease = c->lease;
    c->lease = NULL;
    if (lease) {
        if (Py_IS_TYPE(lease, &WarmLeaseType))
            wg_board_leave(((WarmLease *)lease)->board, ((WarmLease *)lease)->slot, ((WarmLease *)lease)->worker, 0);
        else if (!failed) {
            PyObject *r = PyObject_CallMethodNoArgs(lease, str_release);
            if (r) Py_DECREF(r);
            else failed = 1;
        }
        Py_DECREF(lease);
    }
    int draining = ((ServerBase *)c->server)->draining;
    if (failed) {
        Py_DECREF(c);
        return -1;
    }
    PyObject *next = NULL;
    if (!c->keep || draining || c->client_eof || !c->req_body_done) {
        next = PyObject_CallMethodNoArgs((PyObject *)c, str_close);
    } else {
        c->state = S_HEAD;
        c->idle = 1;
        c->deadline = now + c->keepalive_timeout;
        if (c->buf && PyByteArray_Check(c->buf) && PyByteArray_GET_SIZE(c->buf))
            next = PyObject_CallMethodNoArgs((PyObject *)c, str_after_response);  /* pipelined requests */
        else
            next = Py_NewRef(Py_None);
    }
    Py_DECREF(c);
    if (!next) return -1;
    Py_DECREF(next);
    return 1;
}

/* The exchange's request and route, when the warm path can finish what it is in. */
static int
warm_exchange(UpstreamBase *conn, ClientBase *c, RequestHead **req, RouteBase **route)
{
    if (c->state != S_EXCHANGE || (PyObject *)conn != c->upstream || !c->req_body_done || !c->transport ||
        (c->rbuf && PyByteArray_Check(c->rbuf) && PyByteArray_GET_SIZE(c->rbuf)) ||
        !c->req || !Py_IS_TYPE(c->req, &wg_RequestHeadType) || !c->route || !PyObject_TypeCheck(c->route, &RouteBaseType))
        return 0;
    *req = (RequestHead *)c->req;
    *route = (RouteBase *)c->route;
    return (*route)->codes != NULL;
}

static int
client_write(ClientBase *c, PyObject *out)
{
    return write_to(c->transport, &c->write, &c->write_for, out);
}

/* A response head (and body) in data: 1 handled (written; finished when its body is whole), 0 not the
 * warm case (nothing done), -1 an exception. */
static int
warm_response(UpstreamBase *conn, ClientBase *c, PyObject *data)
{
    RequestHead *req;
    RouteBase *route;
    if ((c->resp && c->resp != Py_None) || !warm_exchange(conn, c, &req, &route)) return 0;
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    double now = now_seconds();
    PyObject *parsed = wg_parse_response(b, n, 0, c->max_head_size, req->is_head, data);
    if (!parsed) {
        PyErr_Clear();
        return 0;
    }
    if (parsed == Py_None) {
        Py_DECREF(parsed);
        return 0;
    }
    ResponseHead *resp = (ResponseHead *)parsed;
    Py_ssize_t body_end, left = 0;
    if (resp->status < 200 || resp->status == 101 || resp->body_length == UNTIL_CLOSE) goto not_warm;
    if (resp->body_length == CHUNKED) {
        ChunkState st;
        const char *err;
        int err_status;
        wg_chunk_init(&st);
        Py_ssize_t k = wg_chunk_scan(&st, b, n, resp->length, &err, &err_status);
        if (err || st.state != CHUNK_DONE) goto not_warm;  /* streamed, or broken: the Python path */
        body_end = resp->length + k;
        if (body_end != n) goto not_warm;
    } else {
        body_end = resp->length + resp->body_length;
        if (body_end > n) {  /* the rest of the body comes in later reads: warm_body */
            left = body_end - n;
            body_end = n;
        } else if (body_end != n) goto not_warm;  /* bytes after the body: the service broke framing */
    }

    c->t_first = now;
    int draining = ((ServerBase *)c->server)->draining;
    int timing = ((ServerBase *)c->server)->server_timing;
    int keep = req->keep_alive && !draining;
    char extra[160];
    int extra_len = 0;
    if (timing) {
        double upstream = (c->t_first - c->t_sent) * 1e3;
        extra_len = snprintf(extra, sizeof(extra), "Server-Timing: queue;dur=%.3f, connect;dur=%.3f, "
                             "upstream;dur=%.3f\r\n", c->queue_s * 1e3, c->connect_s * 1e3, upstream);
        if (extra_len < 0 || extra_len >= (int)sizeof(extra)) extra_len = 0;
    }
    Py_ssize_t head_size = wg_response_size(resp, keep, req->version, extra_len);
    Py_ssize_t body = body_end - resp->length;
    PyObject *out = PyBytes_FromStringAndSize(NULL, head_size + body);
    if (!out) {
        Py_DECREF(parsed);
        return -1;
    }
    char *p = PyBytes_AS_STRING(out), *end = p + head_size;
    p = wg_put_response(p, end, resp, keep, req->version, extra, extra_len);
    if (p != end) {
        Py_DECREF(out);
        Py_DECREF(parsed);
        PyErr_SetString(PyExc_SystemError, "warm path: the response head's size was computed wrong");
        return -1;
    }
    memcpy(p, b + resp->length, (size_t)body);
    c->responded = 1;
    c->status_sent = resp->status;
    c->keep = keep;
    c->bytes_out = head_size + body;
    int upstream_keeps = resp->keep_alive;
    int r = client_write(c, out);
    Py_DECREF(out);
    if (r < 0) {
        Py_DECREF(parsed);
        return -1;
    }
    if (left) {  /* as _response_head leaves it: the response under way, its body's rest to come */
        Py_XSETREF(c->resp, parsed);
        c->resp_left = left;
        c->deadline = now + (c->write_paused ? c->send_timeout : c->upstream_timeout);
        return 1;
    }
    Py_DECREF(parsed);
    return warm_finish(conn, c, req, route, upstream_keeps, now);

not_warm:
    Py_DECREF(parsed);
    return 0;
}

/* More of a Content-Length body under way: 1 handled, 0 not the warm case, -1 an exception. */
static int
warm_body(UpstreamBase *conn, ClientBase *c, PyObject *data)
{
    RequestHead *req;
    RouteBase *route;
    if (!c->resp || !Py_IS_TYPE(c->resp, &wg_ResponseHeadType) || ((ResponseHead *)c->resp)->body_length <= 0 ||
        c->resp_left <= 0 || !warm_exchange(conn, c, &req, &route))
        return 0;
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    Py_ssize_t take = c->resp_left < n ? (Py_ssize_t)c->resp_left : n;
    double now = now_seconds();
    PyObject *out = take == n ? Py_NewRef(data) : PyBytes_FromStringAndSize(PyBytes_AS_STRING(data), take);
    if (!out) return -1;
    int r = client_write(c, out);
    Py_DECREF(out);
    if (r < 0) return -1;
    c->bytes_out += take;
    c->resp_left -= take;
    if (c->resp_left) {
        c->deadline = now + (c->write_paused ? c->send_timeout : c->upstream_timeout);
        return 1;
    }
    /* clean: nothing came after the body (else the connection is not reused) */
    int give = take == n && ((ResponseHead *)c->resp)->keep_alive;
    return warm_finish(conn, c, req, route, give, now);
}

static PyObject *
upstream_data_received(UpstreamBase *self, PyObject *data)
{
    PyObject *owner = self->owner;
    if (!owner || owner == Py_None)  /* bytes on an idle connection: the service broke framing */
        return PyObject_CallMethodNoArgs((PyObject *)self, str_close);
    if (PyObject_TypeCheck(owner, &ClientBaseType) && ((ClientBase *)owner)->warm && PyBytes_CheckExact(data)) {
        ClientBase *c = (ClientBase *)owner;
        int r = (c->resp && c->resp != Py_None) ? warm_body(self, c, data) : warm_response(self, c, data);
        if (r < 0) return NULL;
        if (r > 0) Py_RETURN_NONE;
    }
    return PyObject_CallMethodOneArg(owner, str_upstream_data, data);
}

/* The limits the warm path reads, copied from self.limits (called by the Python protocol when it
 * sets them); warm=False leaves the connection to the Python path. */
static PyObject *
client_warm_limits(ClientBase *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "_warm_limits(warm)");
        return NULL;
    }
    int warm = PyObject_IsTrue(args[0]);
    if (warm < 0) return NULL;
    if (!self->server || !PyObject_TypeCheck(self->server, &ServerBaseType)) warm = 0;  /* not our server */
    PyObject *limits = self->limits;
    if (!limits) {
        PyErr_SetString(PyExc_AttributeError, "_warm_limits(): set limits first");
        return NULL;
    }
    PyObject *v[5] = {PyObject_GetAttr(limits, str_max_head_size), PyObject_GetAttr(limits, str_max_body_size),
                      PyObject_GetAttr(limits, str_upstream_timeout), PyObject_GetAttr(limits, str_keepalive_timeout),
                      PyObject_GetAttr(limits, str_send_timeout)};
    int ok = v[0] && v[1] && v[2] && v[3] && v[4];
    if (ok) {
        self->max_head_size = PyLong_AsSsize_t(v[0]);
        self->max_body_size = PyLong_AsSsize_t(v[1]);
        self->upstream_timeout = PyFloat_AsDouble(v[2]);
        self->keepalive_timeout = PyFloat_AsDouble(v[3]);
        self->send_timeout = PyFloat_AsDouble(v[4]);
        ok = !PyErr_Occurred();
    }
    for (int i = 0; i < 5; i++) Py_XDECREF(v[i]);
    if (!ok) return NULL;
    self->warm = warm;
    Py_RETURN_NONE;
}

static PyMethodDef client_methods[] = {
    {"data_received", (PyCFunction)client_data_received, METH_O,
     "the warm path, or _data_received_slow(data, head)"},
    {"_warm_limits", (PyCFunction)(void (*)(void))client_warm_limits, METH_FASTCALL,
     "_warm_limits(warm): copy the limits the warm path reads; warm=False keeps it off"},
    {NULL}};

#define OBJ(name) {#name, T_OBJECT, offsetof(ClientBase, name), 0, NULL},
#define INT(name) {#name, T_INT, offsetof(ClientBase, name), 0, NULL},
#define DBL(name) {#name, T_DOUBLE, offsetof(ClientBase, name), 0, NULL},
#define LL(name) {#name, T_LONGLONG, offsetof(ClientBase, name), 0, NULL},
static PyMemberDef client_members[] = {
    OBJ(server) OBJ(proto) OBJ(limits) OBJ(loop) OBJ(port_router) OBJ(transport) OBJ(client_addr)
    OBJ(client_host) INT(state) OBJ(buf) DBL(deadline) DBL(body_deadline) INT(read_paused) INT(write_paused)
    OBJ(req) OBJ(route) LL(req_left) OBJ(req_scanner) INT(req_body_done) LL(req_body_seen) DBL(body_attached_at)
    LL(body_seen_at_attach) OBJ(up_head) OBJ(pending) LL(pending_size) OBJ(upstream) OBJ(lease) OBJ(connect_task)
    {"_pool_of_task", T_OBJECT, offsetof(ClientBase, pool_of_task), 0, NULL},
    INT(waiting_for_pool) INT(retried) OBJ(resp) OBJ(rbuf) LL(resp_left) OBJ(resp_scanner) INT(interim)
    INT(responded) INT(keep) INT(client_eof) INT(idle) DBL(t0) DBL(t_held) DBL(t_connect) DBL(t_sent) DBL(t_first)
    DBL(queue_s) DBL(connect_s) INT(status_sent) LL(bytes_out)
    {"warm", T_INT, offsetof(ClientBase, warm), READONLY, "whether the warm path may take this connection's requests"},
    {NULL}};
#undef OBJ
#undef INT
#undef DBL
#undef LL

static PyTypeObject ClientBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.ClientBase",
    .tp_basicsize = sizeof(ClientBase),
    .tp_dealloc = (destructor)client_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A client connection's fields and its data_received: the warm path in C, the rest in Python.",
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)client_traverse,
    .tp_clear = (inquiry)client_clear,
    .tp_methods = client_methods,
    .tp_members = client_members,
};

static PyMethodDef upstream_methods[] = {
    {"data_received", (PyCFunction)upstream_data_received, METH_O,
     "the warm path's response, or owner.upstream_data(data)"},
    {NULL}};

static PyMemberDef upstream_members[] = {
    {"pool", T_OBJECT, offsetof(UpstreamBase, pool), 0, NULL},
    {"transport", T_OBJECT, offsetof(UpstreamBase, transport), 0, NULL},
    {"owner", T_OBJECT, offsetof(UpstreamBase, owner), 0, NULL},
    {"reused", T_INT, offsetof(UpstreamBase, reused), 0, NULL},
    {"closed", T_INT, offsetof(UpstreamBase, closed), 0, NULL},
    {"reading_paused", T_INT, offsetof(UpstreamBase, reading_paused), 0, NULL},
    {NULL}};

static PyTypeObject UpstreamBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.UpstreamBase",
    .tp_basicsize = sizeof(UpstreamBase),
    .tp_dealloc = (destructor)upstream_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An upstream connection's fields and its data_received: a warm response in C, the rest in Python.",
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)upstream_traverse,
    .tp_clear = (inquiry)upstream_clear,
    .tp_methods = upstream_methods,
    .tp_members = upstream_members,
};

/* ---- module ---- */

PyObject *
wg_warm_counts(PyObject *module, PyObject *unused)
{
    return Py_BuildValue("(KK)", warm_requests, warm_responses);
}

static int
intern(PyObject **slot, const char *name)
{
    *slot = PyUnicode_InternFromString(name);
    return *slot ? 0 : -1;
}

int
wg_warm_exec(PyObject *m)
{
    if (!str_write) {
        struct { PyObject **slot; const char *name; } names[] = {
            {&str_write, "write"}, {&str_slow, "_data_received_slow"}, {&str_upstream_data, "upstream_data"},
            {&str_close, "close"}, {&str_give_back, "give_back"}, {&str_release, "release"}, {&str_flush, "flush"},
            {&str_buffer, "buffer"}, {&str_lines, "lines"}, {&str_wall_offset, "wall_offset"},
            {&str_after_response, "_after_response"}, {&str_route, "route"},
            {&str_max_head_size, "max_head_size"}, {&str_max_body_size, "max_body_size"},
            {&str_upstream_timeout, "upstream_timeout"}, {&str_keepalive_timeout, "keepalive_timeout"},
            {&str_send_timeout, "send_timeout"}, {&str_warm_lease, "warm_lease"}, {&str_codes, "codes"},
            {&str_duration, "duration"}, {&str_upstream, "upstream"}, {&str_queue, "queue"},
            {&str_connect, "connect"}};
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
            if (intern(names[i].slot, names[i].name) < 0) return -1;
    }
    if (PyType_Ready(&HistogramType) < 0 || PyType_Ready(&WarmLeaseType) < 0 || PyType_Ready(&RouteBaseType) < 0 ||
        PyType_Ready(&StatusCountsType) < 0 ||
        PyType_Ready(&ServerBaseType) < 0 || PyType_Ready(&RouterBaseType) < 0 || PyType_Ready(&PathsBaseType) < 0 || PyType_Ready(&PoolBaseType) < 0 ||
        PyType_Ready(&ClientBaseType) < 0 || PyType_Ready(&UpstreamBaseType) < 0)
        return -1;
    PyObject *buckets = PyTuple_New(NBUCKETS);
    if (!buckets) return -1;
    for (int i = 0; i < NBUCKETS; i++) {
        PyObject *f = PyFloat_FromDouble(BUCKETS[i]);
        if (!f) {
            Py_DECREF(buckets);
            return -1;
        }
        PyTuple_SET_ITEM(buckets, i, f);
    }
    PyObject *states = Py_BuildValue("(iiiiiii)", S_HEAD, S_BODY, S_HELD, S_CONNECTING, S_EXCHANGE, S_TUNNEL, S_CLOSED);
    int added = states && PyModule_AddObjectRef(m, "BUCKETS", buckets) == 0 &&
                PyModule_AddObjectRef(m, "CLIENT_STATES", states) == 0;
    Py_DECREF(buckets);
    Py_XDECREF(states);
    if (!added ||
        PyModule_AddObjectRef(m, "Histogram", (PyObject *)&HistogramType) < 0 ||
        PyModule_AddObjectRef(m, "StatusCounts", (PyObject *)&StatusCountsType) < 0 ||
        PyModule_AddObjectRef(m, "WarmLease", (PyObject *)&WarmLeaseType) < 0 ||
        PyModule_AddObjectRef(m, "RouteBase", (PyObject *)&RouteBaseType) < 0 ||
        PyModule_AddObjectRef(m, "ServerBase", (PyObject *)&ServerBaseType) < 0 ||
        PyModule_AddObjectRef(m, "RouterBase", (PyObject *)&RouterBaseType) < 0 ||
        PyModule_AddObjectRef(m, "PathsBase", (PyObject *)&PathsBaseType) < 0 ||
        PyModule_AddObjectRef(m, "PoolBase", (PyObject *)&PoolBaseType) < 0 ||
        PyModule_AddObjectRef(m, "ClientBase", (PyObject *)&ClientBaseType) < 0 ||
        PyModule_AddObjectRef(m, "UpstreamBase", (PyObject *)&UpstreamBaseType) < 0 ||
        PyModule_AddIntConstant(m, "ACCESS_FLUSH_BYTES", ACCESS_FLUSH_BYTES) < 0 ||
        PyModule_AddStringConstant(m, "WARM_PATH", "c") < 0)
        return -1;
    return 0;
}
