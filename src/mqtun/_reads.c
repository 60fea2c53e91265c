/* mqtun._reads: a drain's reads in one call (optional; mqtun.queue.read_drain falls back to
 * a Python loop of os.read without it).
 *
 * A drain reads a queue until it is empty or `limit` buffers were read. In Python each read
 * is a call, and the last one (the queue empty) raises BlockingIOError: about 1.2 us for the
 * exception alone, paid by every drain and every turn of the spin. This is the same loop
 * with the same buffers (one bytes object of `size` per read, shrunk to what was read) and
 * no exception at the end. The GIL is released around each read, as os.read releases it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <unistd.h>

PyDoc_STRVAR(read_drain_doc,
"read_drain(fd, size, limit) -> (list[bytes], int, int)\n\n"
"Read `fd` (non-blocking) until it has nothing more (EAGAIN) or `limit` buffers were read,\n"
"each read into a bytes object of at most `size`: (the buffers, their total length, 0), or\n"
"the errno of a read that failed otherwise in place of 0 (the buffers read before it are\n"
"returned all the same). An interrupted read (EINTR) ends the drain like EAGAIN.");

static PyObject *read_drain(PyObject *self, PyObject *args) {
    (void)self;
    int fd;
    Py_ssize_t size, limit;
    if (!PyArg_ParseTuple(args, "inn", &fd, &size, &limit))
        return NULL;
    if (size <= 0 || limit < 0) {
        PyErr_SetString(PyExc_ValueError, "read_drain: size must be > 0 and limit >= 0");
        return NULL;
    }
    PyObject *bufs = PyList_New(0);
    if (bufs == NULL)
        return NULL;
    Py_ssize_t total = 0;
    int failed = 0;
    for (Py_ssize_t i = 0; i < limit; i++) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, size);
        if (b == NULL)
            goto error;
        ssize_t got;
        Py_BEGIN_ALLOW_THREADS
        got = read(fd, PyBytes_AS_STRING(b), (size_t)size);
        Py_END_ALLOW_THREADS
        if (got < 0) {
            int e = errno;
            Py_DECREF(b);
            if (e != EAGAIN && e != EWOULDBLOCK && e != EINTR)
                failed = e;
            break;
        }
        if (got != size && _PyBytes_Resize(&b, got) < 0)
            goto error;
        if (PyList_Append(bufs, b) < 0) {
            Py_DECREF(b);
            goto error;
        }
        Py_DECREF(b);
        total += got;
    }
    return Py_BuildValue("(Nni)", bufs, total, failed);
error:
    Py_DECREF(bufs);
    return NULL;
}

static PyMethodDef methods[] = {
    {"read_drain", read_drain, METH_VARARGS, read_drain_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mqtun._reads",
    "A drain's reads in one call (optional; see mqtun.queue.read_drain).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__reads(void) { return PyModule_Create(&module); }
