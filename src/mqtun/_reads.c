/* mqtun._reads: a drain's reads in one call, and python-pytun's fd methods as C methods
 * (optional; mqtun.queue.read_drain falls back to a Python loop of os.read without it, and
 * mqtun.compat.pytun to Python methods).
 *
 * A drain reads a queue until it is empty or `limit` buffers were read. In Python each read
 * is a call, and the last one (the queue empty) raises BlockingIOError: about 1.2 us for the
 * exception alone, paid by every drain and every turn of the spin. This is the same loop
 * with the same buffers (one bytes object of `size` per read, shrunk to what was read) and
 * no exception at the end. The GIL is released around each read, as os.read releases it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <sys/uio.h>
#include <unistd.h>

PyDoc_STRVAR(read_drain_doc,
"read_drain(fd, size, limit) -> (list[bytes], int, int)\n\n"
"Read `fd` (non-blocking) until it has nothing more (EAGAIN) or `limit` buffers were read,\n"
"each read into a bytes object of at most `size`: (the buffers, their total length, 0), or\n"
"the errno of a read that failed otherwise in place of 0 (the buffers read before it are\n"
"returned all the same). An interrupted read (EINTR) ends the drain like EAGAIN.");

/* Read `fd` into `bufs` until EAGAIN or `limit` buffers: 0, or -1 with a Python error set.
 * `*total` gets their length, `*failed` the errno of a read that failed otherwise. */
static int drain_into(int fd, Py_ssize_t size, Py_ssize_t limit, PyObject *bufs,
                      Py_ssize_t *total, int *failed) {
    *total = 0;
    *failed = 0;
    for (Py_ssize_t i = 0; i < limit; i++) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, size);
        if (b == NULL)
            return -1;
        ssize_t got;
        Py_BEGIN_ALLOW_THREADS
        got = read(fd, PyBytes_AS_STRING(b), (size_t)size);
        Py_END_ALLOW_THREADS
        if (got < 0) {
            int e = errno;
            Py_DECREF(b);
            if (e != EAGAIN && e != EWOULDBLOCK && e != EINTR)
                *failed = e;
            return 0;
        }
        if (got != size && _PyBytes_Resize(&b, got) < 0)
            return -1;
        if (PyList_Append(bufs, b) < 0) {
            Py_DECREF(b);
            return -1;
        }
        Py_DECREF(b);
        *total += got;
    }
    return 0;
}

/* A drain's buffers as a new list (NULL with a Python error set): `who` names the caller in
 * the message for a bad size or limit. */
static PyObject *drain(const char *who, int fd, Py_ssize_t size, Py_ssize_t limit,
                       Py_ssize_t *total, int *failed) {
    if (size <= 0 || limit < 0) {
        PyErr_Format(PyExc_ValueError, "%s: size must be > 0 and limit >= 0", who);
        return NULL;
    }
    PyObject *bufs = PyList_New(0);
    if (bufs != NULL && drain_into(fd, size, limit, bufs, total, failed) < 0)
        Py_CLEAR(bufs);
    return bufs;
}

static PyObject *read_drain(PyObject *self, PyObject *args) {
    (void)self;
    int fd, failed;
    Py_ssize_t size, limit, total;
    if (!PyArg_ParseTuple(args, "inn", &fd, &size, &limit))
        return NULL;
    PyObject *bufs = drain("read_drain", fd, size, limit, &total, &failed);
    return bufs == NULL ? NULL : Py_BuildValue("(Nni)", bufs, total, failed);
}

/* Write fast[start:] (a PySequence_Fast of bytes-like objects) to `fd` in order, one write
 * each, until one fails: the index it stopped at (the length when none failed), or -1 with
 * a Python error set. `*nbytes` gets the bytes written, `*err` the failed write's errno or 0.
 * The one write loop of a drain: read_relay's and write_each's. */
static Py_ssize_t write_from(int fd, PyObject *fast, Py_ssize_t start, Py_ssize_t *nbytes,
                             int *err) {
    Py_ssize_t i = start < 0 ? 0 : start;
    *nbytes = 0;
    *err = 0;
    for (; i < PySequence_Fast_GET_SIZE(fast); i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &view, PyBUF_SIMPLE) < 0)
            return -1;
        ssize_t put;
        Py_BEGIN_ALLOW_THREADS
        put = write(fd, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&view);
        if (put < 0) {
            *err = errno; /* not retried: the kernel counted it, and so must the caller */
            break;
        }
        *nbytes += put;
    }
    return i;
}

PyDoc_STRVAR(read_relay_doc,
"read_relay(fd, size, limit, out_fd, relay_max, gso_at)\n"
"    -> (list[bytes], int, int, int, int, int)\n\n"
"read_drain(fd, size, limit), then, when the drain holds 1 to `relay_max` buffers and none is\n"
"a super-packet (with `gso_at` >= 0: each is longer than that and has 0 there, the\n"
"virtio-net header's gso_type), write them to `out_fd` in order, one write each, until one\n"
"fails: (the buffers, their total length, the read errno or 0, how many were written, their\n"
"bytes, the errno of the write that failed or 0). That write is not tried again (the kernel\n"
"counted its drop once); the caller counts it and writes the buffers after it its own way.\n"
"Nothing is written when the drain is not relayed (then 0 written and errno 0).");

static PyObject *read_relay(PyObject *self, PyObject *args) {
    (void)self;
    int fd, out_fd;
    Py_ssize_t size, limit, relay_max, gso_at;
    if (!PyArg_ParseTuple(args, "inninn", &fd, &size, &limit, &out_fd, &relay_max, &gso_at))
        return NULL;
    Py_ssize_t total, sent = 0, sent_bytes = 0;
    int failed, werr = 0;
    PyObject *bufs = drain("read_relay", fd, size, limit, &total, &failed);
    if (bufs == NULL)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(bufs);
    int relay = n > 0 && n <= relay_max;
    for (Py_ssize_t i = 0; relay && gso_at >= 0 && i < n; i++) {
        PyObject *b = PyList_GET_ITEM(bufs, i);
        relay = PyBytes_GET_SIZE(b) > gso_at && PyBytes_AS_STRING(b)[gso_at] == 0;
    }
    if (relay && (sent = write_from(out_fd, bufs, 0, &sent_bytes, &werr)) < 0) {
        Py_DECREF(bufs);
        return NULL;
    }
    return Py_BuildValue("(Ninnni)", bufs, total, failed, sent, sent_bytes, werr);
}

PyDoc_STRVAR(write_each_doc,
"write_each(fd, bufs, start) -> (int, int, int)\n\n"
"Write bufs[start:] to `fd` in order, one write each, until one fails: (the index it stopped\n"
"at, len(bufs) when none failed; the bytes written; the errno of the failed write or 0). A\n"
"drain's writes in one call: the caller counts the failed one and goes on after it.");

static PyObject *write_each(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    PyObject *seq;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "iOn", &fd, &seq, &start))
        return NULL;
    PyObject *bufs = PySequence_Fast(seq, "write_each: bufs must be a sequence");
    if (bufs == NULL)
        return NULL;
    Py_ssize_t nbytes;
    int failed;
    Py_ssize_t i = write_from(fd, bufs, start, &nbytes, &failed);
    Py_DECREF(bufs);
    return i < 0 ? NULL : Py_BuildValue("(nni)", i, nbytes, failed);
}

/* ---- QueueFile: fileno/read/write of one queue, as python-pytun's C methods are ------------
 *
 * A select() loop written for python-pytun calls fileno() twice per select and read() and
 * write() once per packet. As Python methods those were four frames per packet that
 * python-pytun does not pay (11.5 us of CPU per packet against its 10.5 on one TCP flow).
 * Here each is one C call doing the common case: read a queued packet (preadv2 RWF_NOWAIT,
 * into a bytes object of `size` shrunk to the packet, as python-pytun's read does), write one
 * bytes object. Everything else (a wait on a blocking fd, an argument to convert, an error to
 * translate) goes to the subclass's Python methods `_read_slow(size)`, `_write_slow(data)`
 * and `_failed(errno)`, which stay the one place of that behaviour. A failed syscall is
 * never retried: a read the kernel refused (EINVAL: a buffer shorter than the packet info)
 * has already dropped its packet. The fd is read from
 * the queue's `fd` on every call, so a queue closed by any path (-1) is never a stale number.
 */
typedef struct {
    PyObject_HEAD
    PyObject *queue; /* the mqtun Queue, or NULL/None before construction finishes */
    PyObject *held;  /* the slow path's kept read buffer: the subclass's, C does not use it */
} QueueFile;

static PyObject *str_fd, *str_read_slow, *str_write_slow, *str_failed;
static int nowait_refused; /* the kernel refused RWF_NOWAIT once: every read takes the slow path */

#define READ_FAST_MAX (1 << 20) /* larger asks go to the slow path's own handling */

/* The queue's fd: -1 without a queue, -2 with a Python error set. */
static int queue_fd(QueueFile *self) {
    if (self->queue == NULL || self->queue == Py_None)
        return -1;
    PyObject *v = PyObject_GetAttr(self->queue, str_fd);
    if (v == NULL)
        return -2;
    long fd = PyLong_AsLong(v);
    Py_DECREF(v);
    if (fd == -1 && PyErr_Occurred())
        return -2;
    return fd < 0 || fd > INT_MAX ? -1 : (int)fd;
}

static PyObject *qf_fileno(QueueFile *self, PyObject *unused) {
    (void)unused;
    int fd = queue_fd(self);
    return fd == -2 ? NULL : PyLong_FromLong(fd);
}

/* The subclass's translation of an errno into the exception python-pytun raises. */
static PyObject *failed(QueueFile *self, int e) {
    PyObject *err = PyLong_FromLong(e);
    if (err == NULL)
        return NULL;
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, str_failed, err);
    Py_DECREF(err);
    return r;
}

static PyObject *qf_read(QueueFile *self, PyObject *arg) {
    if (nowait_refused || !PyLong_CheckExact(arg))
        goto slow;
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        goto slow;
    }
    if (n <= 0 || n > READ_FAST_MAX)
        goto slow;
    int fd = queue_fd(self);
    if (fd == -2)
        return NULL;
    if (fd < 0)
        goto slow;
    PyObject *b = PyBytes_FromStringAndSize(NULL, n);
    if (b == NULL)
        return NULL;
    struct iovec iov = {PyBytes_AS_STRING(b), (size_t)n};
    ssize_t got;
    Py_BEGIN_ALLOW_THREADS
    got = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
    Py_END_ALLOW_THREADS
    if (got < 0) {
        int e = errno;
        Py_DECREF(b);
        if (e == EOPNOTSUPP)
            nowait_refused = 1;
        if (e == EAGAIN || e == EWOULDBLOCK || e == EINTR || e == EOPNOTSUPP)
            goto slow; /* nothing queued (or no RWF_NOWAIT): the Python path waits or says so */
        return failed(self, e); /* not retried: the kernel may have dropped the packet (EINVAL) */
    }
    if (got != n && _PyBytes_Resize(&b, got) < 0)
        return NULL;
    return b;
slow:
    return PyObject_CallMethodOneArg((PyObject *)self, str_read_slow, arg);
}

static PyObject *qf_write(QueueFile *self, PyObject *arg) {
    if (!PyBytes_CheckExact(arg))
        return PyObject_CallMethodOneArg((PyObject *)self, str_write_slow, arg);
    int fd = queue_fd(self);
    if (fd == -2)
        return NULL;
    for (;;) {
        ssize_t put;
        Py_BEGIN_ALLOW_THREADS
        put = write(fd, PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg));
        Py_END_ALLOW_THREADS
        if (put >= 0)
            return PyLong_FromSsize_t(put);
        int e = errno;
        if (e == EINTR) { /* as os.write (PEP 475): run the signal handlers, then retry */
            if (PyErr_CheckSignals() < 0)
                return NULL;
            continue;
        }
        return failed(self, e);
    }
}

static int qf_traverse(QueueFile *self, visitproc visit, void *arg) {
    Py_VISIT(self->queue);
    Py_VISIT(self->held);
    return 0;
}

static int qf_clear(QueueFile *self) {
    Py_CLEAR(self->queue);
    Py_CLEAR(self->held);
    return 0;
}

static void qf_dealloc(QueueFile *self) {
    PyObject_GC_UnTrack(self);
    qf_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef qf_methods[] = {
    {"fileno", (PyCFunction)qf_fileno, METH_NOARGS, "The queue's fd; -1 without one (closed)."},
    {"read", (PyCFunction)qf_read, METH_O, "read(size) -> one packet, at most size bytes."},
    {"write", (PyCFunction)qf_write, METH_O, "write(data) -> bytes written: one packet."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef qf_members[] = {
    {"_queue", T_OBJECT, offsetof(QueueFile, queue), 0, "the mqtun Queue (None: none yet)"},
    {"_held", T_OBJECT, offsetof(QueueFile, held), 0, "the slow path's kept read buffer"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject QueueFileType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mqtun._reads.QueueFile",
    .tp_doc = "fileno/read/write of one queue in C; a base class (see mqtun.compat.pytun).",
    .tp_basicsize = sizeof(QueueFile),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)qf_traverse,
    .tp_clear = (inquiry)qf_clear,
    .tp_dealloc = (destructor)qf_dealloc,
    .tp_methods = qf_methods,
    .tp_members = qf_members,
};

static PyMethodDef methods[] = {
    {"read_drain", read_drain, METH_VARARGS, read_drain_doc},
    {"read_relay", read_relay, METH_VARARGS, read_relay_doc},
    {"write_each", write_each, METH_VARARGS, write_each_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mqtun._reads",
    "A drain's reads in one call, and QueueFile (optional: see mqtun.queue, mqtun.compat.pytun).",
    -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__reads(void) {
    if ((str_fd = PyUnicode_InternFromString("fd")) == NULL
        || (str_read_slow = PyUnicode_InternFromString("_read_slow")) == NULL
        || (str_write_slow = PyUnicode_InternFromString("_write_slow")) == NULL
        || (str_failed = PyUnicode_InternFromString("_failed")) == NULL
        || PyType_Ready(&QueueFileType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&QueueFileType);
    if (PyModule_AddObject(m, "QueueFile", (PyObject *)&QueueFileType) < 0) {
        Py_DECREF(&QueueFileType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
