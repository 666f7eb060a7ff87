/* proxy._speedups, the access log: JSON lines formatted into a batch in memory, handed every
 * ACCESS_FLUSH_BYTES (or when asked) to a writer thread of its own that writes them without the GIL,
 * so the event loop neither waits on the disk nor trades the GIL with a Python thread for it.
 *
 * AccessLogBase is proxy/metrics.py's AccessLog's base (it opens the file and flushes on a timer);
 * proxy/_native.py has its twin, a Python thread doing the same.
 */
#include "_speedups.h"
#include <structmember.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <time.h>
#include <string.h>
#include <unistd.h>

#define ACCESS_FIRST_CAPACITY (32 * 1024)
#define ACCESS_POLL_MS 100 /* a writer waiting on a pipe looks this often whether it was let go */
#define ACCESS_DEALLOC_WAIT 5.0 /* a log dropped without close(): seconds its writer gets to finish */

typedef struct Batch {
    struct Batch *next;
    char *data;
    Py_ssize_t len, lines;
} Batch;

typedef struct {
    PyObject_HEAD
    int fd;
    Py_ssize_t piece;      /* 0: a file (one write per batch); else writes end at a line's end within it */
    double wall_offset;    /* perf_counter() + wall_offset = the wall clock */
    char *buf;             /* the batch being filled */
    Py_ssize_t len, cap, lines;
    long long max_pending; /* lines waiting for the writer beyond this are dropped (and counted) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    Batch *head, *tail;
    long long queued_lines;
    unsigned long long dropped, write_errors;
    int last_errno, started, stopping;
    int abandon;           /* close() waited long enough: what is still queued is dropped (and counted) */
    int finished;          /* the writer is through; `done` is signalled */
    pthread_cond_t done;
    pthread_t thread;
} AccessLogBase;

static long long
count_lines(const char *p, const char *end)
{
    long long n = 0;
    while ((p = memchr(p, '\n', (size_t)(end - p)))) n++, p++;
    return n;
}

/* Whether fd takes a write now, waiting for it (a pipe or socket whose reader is slow) until it
 * does, or until close() lets the writer go (0). Asked only of pipes and sockets: a file's write
 * does not wait on a reader. */
static int
wait_writable(AccessLogBase *self)
{
    struct pollfd pfd = {.fd = self->fd, .events = POLLOUT};
    for (;;) {
        int n = poll(&pfd, 1, ACCESS_POLL_MS);
        if (n > 0) return 1; /* writable, or an error the write will report */
        if (n < 0 && errno != EINTR) return 1;
        pthread_mutex_lock(&self->mu);
        int abandon = self->abandon;
        pthread_mutex_unlock(&self->mu);
        if (abandon) return 0;
    }
}

/* The writer: batches in order, each write ending at a line's end on a pipe (writes up to PIPE_BUF
 * stay whole there), a short write finished so that the next line starts clean. */
static void
write_batch(AccessLogBase *self, Batch *b)
{
    const char *p = b->data, *end = b->data + b->len;
    while (p < end) {
        const char *stop = end;
        if (self->piece && end - p > self->piece) {
            const char *cut = p + self->piece;
            while (cut > p && cut[-1] != '\n') cut--;
            stop = cut > p ? cut : end; /* a line longer than a pipe's atom goes alone */
        }
        if (self->piece && !wait_writable(self)) {
            long long lost = count_lines(p, end);
            pthread_mutex_lock(&self->mu);
            self->dropped += (unsigned long long)lost;
            pthread_mutex_unlock(&self->mu);
            return; /* let go by close(): the rest of the batch is dropped, counted */
        }
        while (p < stop) {
            ssize_t n = write(self->fd, p, (size_t)(stop - p));
            if (n < 0) {
                if (errno == EINTR) continue;
                pthread_mutex_lock(&self->mu);
                self->write_errors++;
                self->last_errno = errno;
                pthread_mutex_unlock(&self->mu);
                return; /* a full disk must not take the proxy down: this batch is lost, counted */
            }
            p += n;
        }
    }
}

static void *
writer(void *arg)
{
    AccessLogBase *self = arg;
    for (;;) {
        pthread_mutex_lock(&self->mu);
        while (!self->head && !self->stopping)
            pthread_cond_wait(&self->cv, &self->mu);
        Batch *b = self->head;
        if (!b) {
            self->finished = 1; /* stopping, and nothing left */
            pthread_cond_broadcast(&self->done);
            pthread_mutex_unlock(&self->mu);
            return NULL;
        }
        self->head = b->next;
        if (!self->head) self->tail = NULL;
        int abandon = self->abandon;
        if (abandon) self->dropped += (unsigned long long)b->lines;
        pthread_mutex_unlock(&self->mu);
        if (!abandon) write_batch(self, b);
        pthread_mutex_lock(&self->mu);
        self->queued_lines -= b->lines;
        pthread_mutex_unlock(&self->mu);
        PyMem_RawFree(b->data);
        PyMem_RawFree(b);
    }
}

/* The batch being filled goes to the writer (or is dropped when the writer is too far behind). */
static int
hand_over(AccessLogBase *self)
{
    if (!self->lines) return 0;
    Batch *b = PyMem_RawMalloc(sizeof(Batch));
    char *fresh = PyMem_RawMalloc((size_t)self->cap);
    if (!b || !fresh) {
        PyMem_RawFree(b);
        PyMem_RawFree(fresh);
        PyErr_NoMemory();
        return -1;
    }
    b->next = NULL;
    b->data = self->buf;
    b->len = self->len;
    b->lines = self->lines;
    self->buf = fresh;
    self->len = self->lines = 0;
    pthread_mutex_lock(&self->mu);
    if (!self->started || self->queued_lines > self->max_pending) {
        self->dropped += (unsigned long long)b->lines;
        pthread_mutex_unlock(&self->mu);
        PyMem_RawFree(b->data);
        PyMem_RawFree(b);
        return 0;
    }
    self->queued_lines += b->lines;
    if (self->tail) self->tail->next = b;
    else self->head = b;
    self->tail = b;
    pthread_cond_signal(&self->cv);
    pthread_mutex_unlock(&self->mu);
    return 0;
}

int
wg_access_append(PyObject *log, const AccessLine *line)
{
    AccessLogBase *self = (AccessLogBase *)log;
    Py_ssize_t room = wg_access_room(line);
    if (self->len + room > self->cap) {
        Py_ssize_t cap = self->cap;
        while (self->len + room > cap) cap *= 2;
        char *grown = PyMem_RawRealloc(self->buf, (size_t)cap);
        if (!grown) {
            PyErr_NoMemory();
            return -1;
        }
        self->buf = grown;
        self->cap = cap;
    }
    self->len = wg_access_format_fitted(self->buf + self->len, line) - self->buf;
    self->lines++;
    return self->len > ACCESS_FLUSH_BYTES ? hand_over(self) : 0;
}

int
wg_access_log_check(PyObject *o)
{
    return PyObject_TypeCheck(o, &wg_AccessLogType);
}

double
wg_access_wall_offset(PyObject *log)
{
    return ((AccessLogBase *)log)->wall_offset;
}

/* ---- the Python side ---- */

static PyObject *
access_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    AccessLogBase *self = (AccessLogBase *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->fd = -1;
    self->cap = ACCESS_FIRST_CAPACITY;
    self->buf = PyMem_RawMalloc((size_t)self->cap);
    if (!self->buf) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    pthread_mutex_init(&self->mu, NULL);
    pthread_cond_init(&self->cv, NULL);
    pthread_cond_init(&self->done, NULL);
    return (PyObject *)self;
}

/* The writer told to stop once the queue is written; after `wait` seconds (below 0: no limit) it is
 * let go: what it has not written is dropped and counted, and a wait on a reader that stopped
 * reading ends within ACCESS_POLL_MS. (A write() to a file on a disk that hangs cannot be cut short.) */
static void
stop_writer(AccessLogBase *self, double wait)
{
    if (!self->started) return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->mu);
    self->stopping = 1;
    pthread_cond_signal(&self->cv);
    if (wait >= 0) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += (time_t)wait;
        until.tv_nsec += (long)((wait - (double)(time_t)wait) * 1e9);
        if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
        while (!self->finished)
            if (pthread_cond_timedwait(&self->done, &self->mu, &until) == ETIMEDOUT) break;
        if (!self->finished) {
            self->abandon = 1;
            pthread_cond_signal(&self->cv);
        }
    }
    pthread_mutex_unlock(&self->mu);
    pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    self->started = 0;
}

static void
access_dealloc(AccessLogBase *self)
{
    stop_writer(self, ACCESS_DEALLOC_WAIT);
    while (self->head) {
        Batch *b = self->head;
        self->head = b->next;
        PyMem_RawFree(b->data);
        PyMem_RawFree(b);
    }
    PyMem_RawFree(self->buf);
    pthread_mutex_destroy(&self->mu);
    pthread_cond_destroy(&self->cv);
    pthread_cond_destroy(&self->done);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
access_open(AccessLogBase *self, PyObject *args)
{
    int fd;
    Py_ssize_t piece;
    double wall_offset;
    long long max_pending;
    if (!PyArg_ParseTuple(args, "indL:_open", &fd, &piece, &wall_offset, &max_pending)) return NULL;
    if (self->started) {
        PyErr_SetString(PyExc_RuntimeError, "the access log's writer is already running");
        return NULL;
    }
    self->fd = fd;
    self->piece = piece;
    self->wall_offset = wall_offset;
    self->max_pending = max_pending;
    self->stopping = self->abandon = self->finished = 0;
    int err = pthread_create(&self->thread, NULL, writer, self);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->started = 1;
    Py_RETURN_NONE;
}

static PyObject *
access_append(AccessLogBase *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 13) {
        PyErr_Format(PyExc_TypeError, "append() takes 13 arguments (%zd given)", nargs);
        return NULL;
    }
    static const int strings[4] = {1, 2, 3, 12}; /* service, method, target, client */
    for (int i = 0; i < 4; i++)
        if (!PyBytes_Check(args[strings[i]])) {
            PyErr_SetString(PyExc_TypeError, "append(): service, method, target and client are bytes");
            return NULL;
        }
    double d[5];
    static const int doubles[5] = {0, 7, 8, 9, 10}; /* when, total, queue, connect, upstream */
    for (int i = 0; i < 5; i++) {
        d[i] = PyFloat_AsDouble(args[doubles[i]]);
        if (d[i] == -1.0 && PyErr_Occurred()) return NULL;
    }
    long long ints[3];
    for (int i = 0; i < 3; i++) {
        ints[i] = PyLong_AsLongLong(args[4 + i]);
        if (ints[i] == -1 && PyErr_Occurred()) return NULL;
    }
    int woke = PyObject_IsTrue(args[11]);
    if (woke < 0) return NULL;
    AccessLine line = {.when = d[0], .total = d[1], .queue = d[2], .connect = d[3], .upstream = d[4],
                       .service = PyBytes_AS_STRING(args[1]), .service_len = PyBytes_GET_SIZE(args[1]),
                       .method = PyBytes_AS_STRING(args[2]), .method_len = PyBytes_GET_SIZE(args[2]),
                       .target = PyBytes_AS_STRING(args[3]), .target_len = PyBytes_GET_SIZE(args[3]),
                       .client = PyBytes_AS_STRING(args[12]), .client_len = PyBytes_GET_SIZE(args[12]),
                       .status = ints[0], .bytes_in = ints[1], .bytes_out = ints[2], .woke = woke};
    if (wg_access_append((PyObject *)self, &line) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
access_flush(AccessLogBase *self, PyObject *unused)
{
    if (hand_over(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
access_close(AccessLogBase *self, PyObject *args)
{
    PyObject *wait_arg = Py_None;
    if (!PyArg_ParseTuple(args, "|O:close", &wait_arg)) return NULL;
    double wait = -1.0;
    if (wait_arg != Py_None) {
        wait = PyFloat_AsDouble(wait_arg);
        if (wait == -1.0 && PyErr_Occurred()) return NULL;
        if (!(wait >= 0.0 && wait < 1e9)) {
            PyErr_SetString(PyExc_ValueError, "close(wait): seconds, at least 0");
            return NULL;
        }
    }
    if (hand_over(self) < 0) return NULL;
    stop_writer(self, wait);
    Py_RETURN_NONE;
}

static PyObject *
access_take_dropped(AccessLogBase *self, PyObject *unused)
{
    pthread_mutex_lock(&self->mu);
    unsigned long long n = self->dropped;
    self->dropped = 0;
    pthread_mutex_unlock(&self->mu);
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *
access_take_errors(AccessLogBase *self, PyObject *unused)
{
    pthread_mutex_lock(&self->mu);
    unsigned long long n = self->write_errors;
    int last = self->last_errno;
    self->write_errors = 0;
    pthread_mutex_unlock(&self->mu);
    return Py_BuildValue("(Ki)", n, last);
}

static PyObject *
access_get_queued(AccessLogBase *self, void *closure)
{
    pthread_mutex_lock(&self->mu);
    long long n = self->queued_lines;
    pthread_mutex_unlock(&self->mu);
    return PyLong_FromLongLong(n);
}

static PyMethodDef access_methods[] = {
    {"_open", (PyCFunction)access_open, METH_VARARGS,
     "_open(fd, piece, wall_offset, max_pending): start the writer on fd (piece: 0 for a file, PIPE_BUF for a pipe)"},
    {"append", (PyCFunction)(void (*)(void))access_append, METH_FASTCALL,
     "append(when, service, method, target, status, bytes_in, bytes_out, total, queue, connect, upstream, woke, "
     "client): one line"},
    {"flush", (PyCFunction)access_flush, METH_NOARGS, "hand the lines so far to the writer"},
    {"close", (PyCFunction)access_close, METH_VARARGS,
     "close(wait=None): flush, then wait for the writer to write everything and stop; after `wait` seconds, "
     "what is not written yet is dropped (and counted)"},
    {"take_dropped", (PyCFunction)access_take_dropped, METH_NOARGS, "lines dropped since the last call"},
    {"take_errors", (PyCFunction)access_take_errors, METH_NOARGS, "(failed writes since the last call, last errno)"},
    {NULL}};

static PyMemberDef access_members[] = {
    {"lines", T_PYSSIZET, offsetof(AccessLogBase, lines), READONLY, "lines in the batch being filled"},
    {"wall_offset", T_DOUBLE, offsetof(AccessLogBase, wall_offset), READONLY, "perf_counter() + it = time.time()"},
    {NULL}};

static PyObject *
access_get_trouble(AccessLogBase *self, void *closure)
{
    pthread_mutex_lock(&self->mu);
    int trouble = self->dropped || self->write_errors;
    pthread_mutex_unlock(&self->mu);
    return PyBool_FromLong(trouble);
}

static PyGetSetDef access_getset[] = {
    {"queued_lines", (getter)access_get_queued, NULL, "lines handed to the writer and not written yet", NULL},
    {"trouble", (getter)access_get_trouble, NULL, "lines were dropped or writes failed since the last take_*()", NULL},
    {NULL}};

PyTypeObject wg_AccessLogType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._speedups.AccessLogBase",
    .tp_basicsize = sizeof(AccessLogBase),
    .tp_dealloc = (destructor)access_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "JSON access lines batched in memory and written by a writer thread of its own, without the GIL.",
    .tp_new = access_new,
    .tp_methods = access_methods,
    .tp_members = access_members,
    .tp_getset = access_getset,
};
