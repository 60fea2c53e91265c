/* mqtun._reads: a drain's reads in one call, a route's drain and an I/O loop's turns in C
 * (RelayDrain, serve), and python-pytun's fd methods as C methods (optional; without it
 * mqtun.queue falls back to Python loops of os.read and os.write, runtime.loop.serve_ready to
 * its Python loop, and mqtun.compat.pytun to Python methods).
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
#include <sched.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Attribute and method names looked up on every call, made once (PyInit__reads). */
static PyObject *str_fd, *str_read_slow, *str_write_slow, *str_failed, *str_seconds,
    *str_slept;

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

static PyObject *read_drain(PyObject *self, PyObject *args) {
    (void)self;
    int fd, failed;
    Py_ssize_t size, limit, total;
    if (!PyArg_ParseTuple(args, "inn", &fd, &size, &limit))
        return NULL;
    if (size <= 0 || limit < 0) {
        PyErr_SetString(PyExc_ValueError, "read_drain: size must be > 0 and limit >= 0");
        return NULL;
    }
    PyObject *bufs = PyList_New(0);
    if (bufs == NULL || drain_into(fd, size, limit, bufs, &total, &failed) < 0) {
        Py_XDECREF(bufs);
        return NULL;
    }
    return Py_BuildValue("(Nni)", bufs, total, failed);
}

/* ---- RelayDrain: one drain of a route, read, counted and (small) relayed in C ----------------
 *
 * The drain of every route of an I/O loop starts here: read until EAGAIN or `limit` buffers
 * (read_round), count the reads in the route's counter slots, and when each buffer is a
 * plain packet (with `gso_at` >= 0: each is longer than that and has 0 there, the virtio-net
 * header's gso_type) or, given `supers`, a super-packet whose segments it can count
 * (wire_packets), and at most `relay_max` of them are plain (more are for Python to join),
 * write them to `out_fd` in order as the C forwarder writes, counted too. Request/response
 * traffic is such drains, and so is a TCP stream's drain of super-packets: called from
 * `serve`, a relayed drain runs no Python at all; given `join`, so does a drain of more plain
 * reads, joined first. Anything else (a drain to decode or hand to a handler, a read it
 * cannot count; a read or write that failed) goes to `rest(bufs, read_errno, sent, write_errno)`,
 * Python's, which does the rest of the drain and returns what the drain returns. A failed
 * write is not tried again (the kernel counted its drop once): `rest` counts it and writes the
 * buffers after it. */
/* A drain's reads go into bytes objects the RelayDrain keeps (its spares), with the GIL
 * released once for them and for the relay's writes: a relayed drain allocates nothing and
 * takes the GIL back once. A drain longer than this is read in rounds of the spares, each
 * read handed over (hand_over) before the next round. */
#define SPARE_MAX 8

enum { S_READ_PACKETS, S_READ_BYTES, S_READ_WIRE, S_WRITTEN_PACKETS, S_WRITTEN_BYTES,
       S_WRITTEN_WIRE, S_COUNT };

/* Where a read's super-packet is and the numbers that name its headers, for wire_packets:
 * `on` 0 when the route relays plain packets only. */
struct supers {
    int on, tap, little;
    Py_ssize_t packet_at, vnet_at;
    long eth_p_ip, eth_p_ipv6, p_tcp, p_udp, tunnel;
};

typedef struct {
    PyObject_HEAD
    int in_fd, out_fd;
    Py_ssize_t size, limit, relay_max, gso_at, read_header, written_header;
    struct supers sup;
    Py_buffer read_view, written_view; /* held while the object lives (buf NULL: not yet) */
    uint64_t *slot[S_COUNT];           /* where each counted figure is added */
    PyObject *rest, *join;             /* join NULL: a drain of many plain reads is rest's */
    PyObject *spare[SPARE_MAX];        /* bytes of `size` only this object holds (NULL: none) */
} RelayDrain;

static PyTypeObject RelayDrainType;

/* A writable, 8-byte aligned uint64 slot buffer into `view` (held): 0, or -1 with an error. */
static int slot_view(PyObject *obj, Py_buffer *view, const char *which) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (((uintptr_t)view->buf) % sizeof(uint64_t)) {
        PyBuffer_Release(view);
        view->buf = NULL;
        PyErr_Format(PyExc_ValueError, "RelayDrain: the %s slots are not 8-byte aligned", which);
        return -1;
    }
    return 0;
}

/* Whether a read of `len` bytes is a plain packet, no super-packet: with gso_at >= 0 it is
 * longer than that and has 0 there (the virtio-net header's gso_type). No Python API. */
static int is_plain(const char *data, Py_ssize_t len, Py_ssize_t gso_at) {
    return gso_at < 0 || (len > gso_at && data[gso_at] == 0);
}

/* `obj` (None or the tuple RelayDrain's doc names) into `s`: 0, or -1 with an error. */
static int supers_of(PyObject *obj, struct supers *s) {
    memset(s, 0, sizeof *s);
    if (obj == Py_None)
        return 0;
    if (!PyArg_ParseTuple(obj, "nnpplllll;supers: (packet_at, vnet_at, tap, little, 5 numbers)",
                          &s->packet_at, &s->vnet_at, &s->tap, &s->little, &s->eth_p_ip,
                          &s->eth_p_ipv6, &s->p_tcp, &s->p_udp, &s->tunnel))
        return -1;
    if (s->vnet_at < 0 || s->packet_at < s->vnet_at + 10) {
        PyErr_SetString(PyExc_ValueError, "supers: the virtio-net header (10 bytes or more) "
                        "starts at vnet_at >= 0 and ends by packet_at");
        return -1;
    }
    s->on = 1;
    return 0;
}

static uint32_t be16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }

/* How many wire packets a read is: 1 for a plain packet (is_plain); for a super-packet of the
 * common shape (an IPv4 header without fragmentation or IPv6 without extension headers, in an
 * untagged Ethernet frame on TAP, then TCP or UDP) what gso.segment_count returns for it; -1
 * for any other read, which Python counts (gso.segment_count, the one parser: this is its
 * twin for that shape, held to it by the tests). No Python API. */
static Py_ssize_t wire_packets(const struct supers *s, Py_ssize_t gso_at, const uint8_t *p,
                               Py_ssize_t len) {
    if (is_plain((const char *)p, len, gso_at))
        return 1;
    if (!s->on || len <= s->packet_at)
        return -1;
    const uint8_t *v = p + s->vnet_at; /* flags, gso_type, hdr_len, gso_size, ... */
    Py_ssize_t size = s->little ? (Py_ssize_t)(v[4] | v[5] << 8) : (Py_ssize_t)be16(v + 4);
    if (size == 0)
        return 1;
    if (v[1] & s->tunnel)
        return -1;
    p += s->packet_at;
    len -= s->packet_at;
    Py_ssize_t l3 = 0, l4, start;
    int want = 0; /* the IP version the ethertype names */
    if (s->tap) {
        if (len < 14)
            return -1;
        long etype = (long)be16(p + 12);
        want = etype == s->eth_p_ip ? 4 : etype == s->eth_p_ipv6 ? 6 : 0;
        if (!want)
            return -1;
        l3 = 14;
    }
    if (len <= l3)
        return -1;
    int version = p[l3] >> 4;
    long proto;
    if (want && version != want)
        return -1;
    if (version == 4) {
        Py_ssize_t ihl = (p[l3] & 0x0F) * 4;
        if (len < l3 + 20 || ihl < 20 || len < l3 + ihl || (be16(p + l3 + 6) & 0x3FFF))
            return -1;
        proto = p[l3 + 9];
        l4 = l3 + ihl;
    } else if (version == 6) {
        if (len < l3 + 40)
            return -1;
        proto = p[l3 + 6];
        l4 = l3 + 40;
    } else {
        return -1;
    }
    if (proto == s->p_tcp) {
        if (len < l4 + 20)
            return -1;
        Py_ssize_t th = (p[l4 + 12] >> 4) * 4;
        if (th < 20 || len < l4 + th)
            return -1;
        start = l4 + th;
    } else if (proto == s->p_udp) {
        if (len < l4 + 8)
            return -1;
        start = l4 + 8;
    } else {
        return -1;
    }
    Py_ssize_t count = (len - start + size - 1) / size;
    return count < 1 ? 1 : count;
}

PyDoc_STRVAR(count_segments_doc,
"count_segments(buf, gso_at, supers) -> int\n\n"
"The wire packets RelayDrain counts for one read `buf`: 1 for a plain packet, a\n"
"super-packet's segments (gso.segment_count's answer), or -1 where it leaves the read to\n"
"Python. `gso_at` and `supers` as RelayDrain's.");

static PyObject *count_segments(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer b;
    Py_ssize_t gso_at;
    PyObject *sup;
    struct supers s;
    if (!PyArg_ParseTuple(args, "y*nO", &b, &gso_at, &sup))
        return NULL;
    if (supers_of(sup, &s) < 0) {
        PyBuffer_Release(&b);
        return NULL;
    }
    Py_ssize_t n = wire_packets(&s, gso_at, b.buf, b.len);
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(n);
}

static int rd_init(RelayDrain *self, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"in_fd", "size", "limit", "out_fd", "relay_max", "gso_at",
                         "read_slots", "written_slots", "slots", "read_header",
                         "written_header", "rest", "supers", "join", NULL};
    PyObject *rs, *ws, *idx, *rest, *sup = Py_None, *join = Py_None;
    if (self->rest != NULL || self->read_view.buf != NULL) { /* (a failed init holds views) */
        PyErr_SetString(PyExc_TypeError, "RelayDrain: already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "inninnOOO!nnO|$OO", kw, &self->in_fd,
                                     &self->size, &self->limit, &self->out_fd, &self->relay_max,
                                     &self->gso_at, &rs, &ws, &PyTuple_Type, &idx,
                                     &self->read_header, &self->written_header, &rest, &sup, &join))
        return -1;
    if (supers_of(sup, &self->sup) < 0)
        return -1;
    if (self->sup.on && self->gso_at != self->sup.vnet_at + 1) {
        PyErr_SetString(PyExc_ValueError, "RelayDrain: gso_at must be supers' vnet_at + 1");
        return -1;
    }
    if (self->size <= 0 || self->limit < 0) {
        PyErr_SetString(PyExc_ValueError, "RelayDrain: size must be > 0 and limit >= 0");
        return -1;
    }
    if (PyTuple_GET_SIZE(idx) != S_COUNT) {
        PyErr_Format(PyExc_ValueError, "RelayDrain: slots must name %d slots", S_COUNT);
        return -1;
    }
    if (!PyCallable_Check(rest)) {
        PyErr_SetString(PyExc_TypeError, "RelayDrain: rest must be callable");
        return -1;
    }
    if (slot_view(rs, &self->read_view, "read") < 0 || slot_view(ws, &self->written_view,
                                                                  "written") < 0)
        return -1;
    for (int i = 0; i < S_COUNT; i++) {
        Py_ssize_t at = PyLong_AsSsize_t(PyTuple_GET_ITEM(idx, i));
        Py_buffer *v = i < S_WRITTEN_PACKETS ? &self->read_view : &self->written_view;
        if (at == -1 && PyErr_Occurred())
            return -1;
        if (at < 0 || (at + 1) * (Py_ssize_t)sizeof(uint64_t) > v->len) {
            PyErr_Format(PyExc_ValueError, "RelayDrain: slot %zd is outside its buffer", at);
            return -1;
        }
        self->slot[i] = (uint64_t *)v->buf + at;
    }
    if (join != Py_None && !PyCallable_Check(join)) {
        PyErr_SetString(PyExc_TypeError, "RelayDrain: join must be callable or None");
        return -1;
    }
    Py_INCREF(rest);
    self->rest = rest;
    if (join != Py_None) {
        Py_INCREF(join);
        self->join = join;
    }
    return 0;
}

/* The wire packets of a drain of `n` buffers (of `got` bytes each), each a plain packet or a
 * super-packet wire_packets counts: their sum (each read's in `wire`, the plain reads' number
 * in `*plain`), or -1 when one is neither (Python counts the drain). No Python API. */
static Py_ssize_t drain_wire(const RelayDrain *self, char *const *buf, const Py_ssize_t *got,
                             Py_ssize_t n, Py_ssize_t *wire, Py_ssize_t *plain) {
    Py_ssize_t total = 0;
    *plain = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (is_plain(buf[i], got[i], self->gso_at)) {
            wire[i] = 1;
            ++*plain;
        } else if ((wire[i] = wire_packets(&self->sup, self->gso_at, (const uint8_t *)buf[i],
                                           got[i])) < 0) {
            return -1;
        }
        total += wire[i];
    }
    return total;
}

/* Write the first `n` buffers to `fd` in order until one fails (no Python API): how many
 * were written; `*nbytes` their bytes, `*err` the failed write's errno or 0. */
static Py_ssize_t write_raw(int fd, char *const *buf, const Py_ssize_t *got, Py_ssize_t n,
                            Py_ssize_t *nbytes, int *err) {
    Py_ssize_t i = 0;
    for (*nbytes = 0, *err = 0; i < n; i++) {
        ssize_t put = write(fd, buf[i], (size_t)got[i]);
        if (put < 0) {
            *err = errno; /* not retried: the kernel counted it, and so must the caller */
            break;
        }
        *nbytes += put;
    }
    return i;
}

/* Write fast[start:] (a PySequence_Fast of bytes-like objects) to `fd` in order, one write
 * each, until one fails (write_raw, with the GIL released once): the index it stopped at (the
 * length when none failed), or -1 with a Python error set. `*nbytes` gets the bytes written,
 * `*err` the failed write's errno or 0. */
static Py_ssize_t write_from(int fd, PyObject *fast, Py_ssize_t start, Py_ssize_t *nbytes,
                             int *err) {
    Py_ssize_t first = start < 0 ? 0 : start, size = PySequence_Fast_GET_SIZE(fast);
    Py_ssize_t n = size > first ? size - first : 0, held = 0, sent = 0;
    *nbytes = 0;
    *err = 0;
    if (n == 0)
        return first;
    Py_buffer *views = PyMem_Malloc((size_t)n * sizeof(Py_buffer));
    char **at = PyMem_Malloc((size_t)n * (sizeof(char *) + sizeof(Py_ssize_t)));
    if (views == NULL || at == NULL) {
        PyMem_Free(views);
        PyMem_Free(at);
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t *len = (Py_ssize_t *)(at + n);
    for (; held < n; held++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, first + held), &views[held],
                               PyBUF_SIMPLE) < 0)
            break;
        at[held] = views[held].buf;
        len[held] = views[held].len;
    }
    if (held == n) {
        Py_BEGIN_ALLOW_THREADS
        sent = write_raw(fd, at, len, n, nbytes, err);
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(at);
    return held == n ? first + sent : -1;
}

/* Count `n` reads of `nbytes` (with their headers) in the route's slots. */
static void count_reads(RelayDrain *self, Py_ssize_t n, Py_ssize_t nbytes) {
    *self->slot[S_READ_PACKETS] += (uint64_t)n;
    *self->slot[S_READ_BYTES] += (uint64_t)(nbytes - self->read_header * n);
}

/* Count a relay of reads holding `wire` wire packets, `sent` of them written with `nbytes`
 * (with headers), holding `wire_sent`. */
static void count_relay(RelayDrain *self, Py_ssize_t wire, Py_ssize_t sent, Py_ssize_t nbytes,
                        Py_ssize_t wire_sent) {
    *self->slot[S_READ_WIRE] += (uint64_t)wire;
    *self->slot[S_WRITTEN_PACKETS] += (uint64_t)sent;
    *self->slot[S_WRITTEN_BYTES] += (uint64_t)(nbytes - self->written_header * sent);
    *self->slot[S_WRITTEN_WIRE] += (uint64_t)wire_sent;
}

/* Write a joined drain, `join`'s (buffers, counts): each buffer holds counts[i] reads, or is
 * a read as it came (0). The buffers written in `*sent`, their bytes in `*nbytes`, their wire
 * packets in `*wire`, the failed write's errno in `*err`: 0, or -1 with a Python error set. */
static int write_joined(RelayDrain *self, PyObject *out, PyObject *counts, Py_ssize_t *sent,
                        Py_ssize_t *nbytes, Py_ssize_t *wire, int *err) {
    if (!PyList_CheckExact(out) || !PyList_CheckExact(counts)
        || PyList_GET_SIZE(out) != PyList_GET_SIZE(counts)) {
        PyErr_SetString(PyExc_TypeError, "RelayDrain: join must return (list, list or None)");
        return -1;
    }
    if ((*sent = write_from(self->out_fd, out, 0, nbytes, err)) < 0)
        return -1;
    *wire = 0;
    for (Py_ssize_t i = 0; i < *sent; i++) {
        Py_ssize_t c = PyLong_AsSsize_t(PyList_GET_ITEM(counts, i));
        if (c < 0 && PyErr_Occurred())
            return -1;
        if (c <= 0) { /* a read as it came: counted as RelayDrain counted it read */
            PyObject *b = PyList_GET_ITEM(out, i);
            Py_buffer v;
            if (PyObject_GetBuffer(b, &v, PyBUF_SIMPLE) < 0)
                return -1;
            c = wire_packets(&self->sup, self->gso_at, v.buf, v.len);
            PyBuffer_Release(&v);
        }
        *wire += c < 1 ? 1 : c;
    }
    return 0;
}

/* A read this long or shorter is copied out of its spare into a bytes object of its size
 * (the spare kept for the next read); a longer one (a super-packet) is handed over in its
 * spare. A UDP flood's drain then allocates small objects, never a 64 KiB buffer a read. */
#define COPY_MAX 4096

/* The first `k` spares, made where missing, their bytes in `buf`: 0, or -1 with an error. */
static int spares(RelayDrain *self, char **buf, Py_ssize_t k) {
    for (Py_ssize_t i = 0; i < k; i++) {
        if (self->spare[i] == NULL
            && (self->spare[i] = PyBytes_FromStringAndSize(NULL, self->size)) == NULL)
            return -1;
        buf[i] = PyBytes_AS_STRING(self->spare[i]);
    }
    return 0;
}

/* Read `fd` into buf[0..k) (of `size` bytes each) until EAGAIN: how many were read, their
 * lengths in `got`, added up in `*total`; a read's errno other than EAGAIN/EINTR in
 * `*failed`. No Python API. */
static Py_ssize_t read_round(int fd, char *const *buf, Py_ssize_t *got, Py_ssize_t k,
                             Py_ssize_t size, Py_ssize_t *total, int *failed) {
    Py_ssize_t n = 0;
    for (; n < k; n++) {
        ssize_t r = read(fd, buf[n], (size_t)size);
        if (r < 0) {
            int e = errno;
            if (e != EAGAIN && e != EWOULDBLOCK && e != EINTR)
                *failed = e;
            break;
        }
        got[n] = r;
        *total += r;
    }
    return n;
}

/* Append the first `n` spares' reads (of `got` bytes) to `bufs`: a short one copied (the
 * spare kept), a long one in its spare, shrunk (the spare given away): 0, or -1. */
static int hand_over(RelayDrain *self, PyObject *bufs, const Py_ssize_t *got, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b;
        if (got[i] <= COPY_MAX) {
            b = PyBytes_FromStringAndSize(PyBytes_AS_STRING(self->spare[i]), got[i]);
        } else {
            b = self->spare[i];
            self->spare[i] = NULL;
            if (got[i] != self->size && _PyBytes_Resize(&b, got[i]) < 0)
                return -1;
        }
        if (b == NULL || PyList_Append(bufs, b) < 0) {
            Py_XDECREF(b);
            return -1;
        }
        Py_DECREF(b);
    }
    return 0;
}

/* The drain (see the type's comment): its result, or NULL with a Python error set. */
static PyObject *rd_run(RelayDrain *self) {
    if (self->rest == NULL) {
        PyErr_SetString(PyExc_TypeError, "RelayDrain: not initialised");
        return NULL;
    }
    /* one more than a relay holds: the drain is longer; a drain of super-packets may be
     * relayed whatever its length (its plain reads are what relay_max bounds) */
    Py_ssize_t k = self->sup.on ? SPARE_MAX : self->relay_max + 1;
    if (k > self->limit)
        k = self->limit;
    if (k > SPARE_MAX)
        k = SPARE_MAX;
    char *buf[SPARE_MAX];
    Py_ssize_t got[SPARE_MAX];
    if (spares(self, buf, k) < 0)
        return NULL;
    Py_ssize_t wire[SPARE_MAX];
    Py_ssize_t n = 0, total = 0, sent = 0, sent_bytes = 0, wire_in = -1, wire_out = 0, plain;
    int failed = 0, werr = 0, complete, relayed = 0;
    Py_BEGIN_ALLOW_THREADS
    n = read_round(self->in_fd, buf, got, k, self->size, &total, &failed);
    complete = failed || n < k || n == self->limit;
    if (complete && n > 0 && (wire_in = drain_wire(self, buf, got, n, wire, &plain)) >= 0
        && plain <= self->relay_max) {
        relayed = 1;
        sent = write_raw(self->out_fd, buf, got, n, &sent_bytes, &werr);
        for (Py_ssize_t i = 0; i < sent; i++)
            wire_out += wire[i];
    }
    Py_END_ALLOW_THREADS
    count_reads(self, n, total);
    if (relayed)
        count_relay(self, wire_in, sent, sent_bytes, wire_out);
    if (!failed && sent == n)
        return PyLong_FromSsize_t(n); /* relayed, or nothing read: the spares are kept */
    /* the rest is Python's: the drain's buffers, read in rounds of the spares (the GIL
     * released once a round) until the queue is empty or `limit` were read */
    PyObject *bufs = PyList_New(0);
    if (bufs == NULL)
        return NULL;
    for (Py_ssize_t nread = n;;) {
        if (hand_over(self, bufs, got, nread) < 0) {
            Py_DECREF(bufs);
            return NULL;
        }
        if (complete)
            break;
        k = self->limit - n < SPARE_MAX ? self->limit - n : SPARE_MAX;
        if (spares(self, buf, k) < 0) {
            Py_DECREF(bufs);
            return NULL;
        }
        total = 0;
        Py_BEGIN_ALLOW_THREADS
        nread = read_round(self->in_fd, buf, got, k, self->size, &total, &failed);
        Py_END_ALLOW_THREADS
        count_reads(self, nread, total);
        n += nread;
        complete = failed || nread < k || n == self->limit;
    }
    if (!relayed && n > 0) { /* relayed as a whole, or joined first (`join`), if it may be */
        char **all = PyMem_Malloc((size_t)n * (sizeof(char *) + 2 * sizeof(Py_ssize_t)));
        if (all == NULL) {
            Py_DECREF(bufs);
            return PyErr_NoMemory();
        }
        Py_ssize_t *len = (Py_ssize_t *)(all + n), *counts = len + n;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *b = PyList_GET_ITEM(bufs, i);
            all[i] = PyBytes_AS_STRING(b);
            len[i] = PyBytes_GET_SIZE(b);
        }
        wire_in = drain_wire(self, all, len, n, counts, &plain);
        PyObject *joined = NULL;
        if (wire_in >= 0 && plain > self->relay_max && self->join != NULL) {
            if ((joined = PyObject_CallOneArg(self->join, bufs)) == NULL) {
                PyMem_Free(all);
                Py_DECREF(bufs);
                return NULL;
            }
            PyObject *jc = PyTuple_Check(joined) && PyTuple_GET_SIZE(joined) == 2
                ? PyTuple_GET_ITEM(joined, 1) : NULL;
            if (jc == Py_None) { /* nothing joined: relayed as read */
                Py_CLEAR(joined);
                plain = 0;
            } else if (jc == NULL || write_joined(self, PyTuple_GET_ITEM(joined, 0), jc, &sent,
                                                  &sent_bytes, &wire_out, &werr) < 0) {
                if (jc == NULL)
                    PyErr_SetString(PyExc_TypeError, "RelayDrain: join must return a pair");
                Py_DECREF(joined);
                PyMem_Free(all);
                Py_DECREF(bufs);
                return NULL;
            } else {
                relayed = 1;
                count_relay(self, wire_in, sent, sent_bytes, wire_out);
            }
        }
        if (!relayed && wire_in >= 0 && plain <= self->relay_max) {
            relayed = 1;
            Py_BEGIN_ALLOW_THREADS
            sent = write_raw(self->out_fd, all, len, n, &sent_bytes, &werr);
            Py_END_ALLOW_THREADS
            for (Py_ssize_t i = 0; i < sent; i++)
                wire_out += counts[i];
            count_relay(self, wire_in, sent, sent_bytes, wire_out);
        }
        PyMem_Free(all);
        if (joined != NULL) { /* written as joined: a failure is `rest`'s with those buffers */
            Py_ssize_t written = PyList_GET_SIZE(PyTuple_GET_ITEM(joined, 0));
            if (!failed && sent == written) {
                Py_DECREF(joined);
                Py_DECREF(bufs);
                return PyLong_FromSsize_t(n);
            }
            PyObject *out = PyTuple_GET_ITEM(joined, 0);
            Py_INCREF(out);
            Py_DECREF(joined);
            Py_DECREF(bufs);
            PyObject *r = PyObject_CallFunction(self->rest, "Nini", out, failed, sent, werr);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
            return PyLong_FromSsize_t(n);
        }
        if (relayed && !failed && sent == n) {
            Py_DECREF(bufs);
            return PyLong_FromSsize_t(n);
        }
    }
    return PyObject_CallFunction(self->rest, "Nini", bufs, failed, sent, werr);
}

static PyObject *rd_call(RelayDrain *self, PyObject *args, PyObject *kwds) {
    if (PyTuple_GET_SIZE(args) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "RelayDrain() takes no arguments");
        return NULL;
    }
    return rd_run(self);
}

static int rd_traverse(RelayDrain *self, visitproc visit, void *arg) {
    Py_VISIT(self->rest);
    Py_VISIT(self->join);
    Py_VISIT(self->read_view.obj);
    Py_VISIT(self->written_view.obj);
    return 0;
}

static int rd_clear(RelayDrain *self) {
    Py_CLEAR(self->rest);
    Py_CLEAR(self->join);
    for (int i = 0; i < SPARE_MAX; i++)
        Py_CLEAR(self->spare[i]);
    return 0;
}

static void rd_dealloc(RelayDrain *self) {
    PyObject_GC_UnTrack(self);
    rd_clear(self);
    if (self->read_view.buf != NULL)
        PyBuffer_Release(&self->read_view);
    if (self->written_view.buf != NULL)
        PyBuffer_Release(&self->written_view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(rd_doc,
"RelayDrain(in_fd, size, limit, out_fd, relay_max, gso_at, read_slots, written_slots, slots,\n"
"           read_header, written_header, rest, *, supers=None, join=None)\n\n"
"One drain of a route, called with no arguments: read `in_fd` (read_drain), count the reads\n"
"in `read_slots` (a writable uint64 buffer), and when each buffer is a plain packet\n"
"(`gso_at` >= 0: a buffer longer than that with 0 there) or a super-packet count_segments\n"
"counts (given `supers`), at most `relay_max` of them plain, write them to `out_fd` in\n"
"order, counted in `written_slots`. `slots` names the six slots:\n"
"(read packets, read bytes, read wire packets, written packets, written bytes, written wire\n"
"packets); the header bytes of each buffer are not counted as bytes. Returns the number read\n"
"when all were relayed (or none was read) and no read failed, else\n"
"rest(bufs, read_errno, sent, write_errno): the rest of the drain is Python's.\n\n"
"`supers`: None (plain packets only), or (packet_at, vnet_at, tap, little_endian, ETH_P_IP,\n"
"ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, the gso_type bits of a UDP tunnel): where a read's\n"
"packet and its virtio-net header start, whether it is an Ethernet frame, the header's byte\n"
"order and the kernel's numbers. `join`: None, or a function that joins a drain of more than\n"
"`relay_max` plain reads (a forwarder's reads_joiner): (buffers, counts) written in the same\n"
"call, each counted as the reads it holds; after a failed write `rest` gets those buffers.");

static PyTypeObject RelayDrainType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mqtun._reads.RelayDrain",
    .tp_doc = rd_doc,
    .tp_basicsize = sizeof(RelayDrain),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)rd_init,
    .tp_call = (ternaryfunc)rd_call,
    .tp_traverse = (traverseproc)rd_traverse,
    .tp_clear = (inquiry)rd_clear,
    .tp_dealloc = (destructor)rd_dealloc,
};

/* ---- serve: an I/O loop's turns in C ---------------------------------------------------------
 *
 * The loop of mqtun.runtime.loop.serve_ready, whose docstring is its specification: the
 * Python loop paid about 1.6 us per request/response packet in frames of its own (the ask, the
 * dict look-up, the drain's closure, the counting) on top of the syscalls. The spin's policy
 * stays in Python (SpinWindow): it is asked for its window when a spin starts and told how
 * long the wait was after each sleep, both rare next to the turns. */
#define SERVE_EVENTS 64

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* epoll_wait: the count, or -1 with errno. The GIL is released for a wait that may sleep
 * (`timeout` != 0) and, with `yield_gil`, for an ask that does not: a busy loop never
 * sleeps nor yields, and another thread must still get its turn. */
static int wait_ready(int epfd, struct epoll_event *evs, int timeout, int yield_gil) {
    if (timeout == 0 && !yield_gil)
        return epoll_wait(epfd, evs, SERVE_EVENTS, 0);
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = epoll_wait(epfd, evs, SERVE_EVENTS, timeout);
    Py_END_ALLOW_THREADS
    return n;
}

PyDoc_STRVAR(serve_doc,
"serve(epfd, on, stopping, spin, busy) -> None\n\n"
"Until stopping() is true: ask the epoll `epfd` which fds are ready and call on[fd]() for each\n"
"(a RelayDrain without a Python call); when none is, ask again without waiting, yielding the\n"
"CPU between asks, for `spin.seconds` (a SpinWindow; None: no spin), then sleep in the ask\n"
"and tell `spin.slept(seconds)` how long that took. `busy` never sleeps. Signals are checked\n"
"every turn: a handler's exception ends the loop, as does any callback's.");

static PyObject *serve(PyObject *self, PyObject *args) {
    (void)self;
    int epfd, busy;
    PyObject *on, *stopping, *spin;
    if (!PyArg_ParseTuple(args, "iO!OOp", &epfd, &PyDict_Type, &on, &stopping, &spin, &busy))
        return NULL;
    int spins = spin != Py_None;
    int first = busy || spins ? 0 : -1; /* no spin: the one ask that also sleeps */
    double start = 0.0, until = 0.0;    /* the current spin's start and end (0: not spinning) */
    struct epoll_event evs[SERVE_EVENTS];
    for (;;) {
        if (PyErr_CheckSignals() < 0)
            return NULL;
        PyObject *flag = PyObject_CallNoArgs(stopping);
        if (flag == NULL)
            return NULL;
        int stop = PyObject_IsTrue(flag);
        Py_DECREF(flag);
        if (stop)
            return stop < 0 ? NULL : Py_NewRef(Py_None);
        int n = wait_ready(epfd, evs, first, busy);
        if (n == 0 && !busy) {
            if (spins) {
                double now = monotonic();
                if (until == 0.0) {
                    PyObject *w = PyObject_GetAttr(spin, str_seconds);
                    double seconds = w == NULL ? -1.0 : PyFloat_AsDouble(w);
                    Py_XDECREF(w);
                    if (seconds == -1.0 && PyErr_Occurred())
                        return NULL;
                    start = now;
                    until = now + seconds;
                }
                if (now < until) {
                    Py_BEGIN_ALLOW_THREADS
                    sched_yield();
                    Py_END_ALLOW_THREADS
                    continue;
                }
            }
            n = wait_ready(epfd, evs, -1, 1); /* nothing ready: sleep until something is */
            if (n < 0 && errno == EINTR)
                continue; /* the signals are checked, the spin's start kept */
            if (spins) {
                PyObject *waited = PyFloat_FromDouble(monotonic() - start);
                PyObject *r = waited == NULL ? NULL
                                             : PyObject_CallMethodOneArg(spin, str_slept, waited);
                Py_XDECREF(waited);
                if (r == NULL)
                    return NULL;
                Py_DECREF(r);
            }
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        until = 0.0;
        for (int i = 0; i < n; i++) {
            PyObject *key = PyLong_FromLong(evs[i].data.fd);
            if (key == NULL)
                return NULL;
            PyObject *call = PyDict_GetItemWithError(on, key);
            if (call == NULL) {
                if (!PyErr_Occurred())
                    PyErr_SetObject(PyExc_KeyError, key);
                Py_DECREF(key);
                return NULL;
            }
            Py_DECREF(key);
            Py_INCREF(call); /* a callback may change `on` */
            PyObject *r = Py_IS_TYPE(call, &RelayDrainType) ? rd_run((RelayDrain *)call)
                                                             : PyObject_CallNoArgs(call);
            Py_DECREF(call);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
    }
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
    {"count_segments", count_segments, METH_VARARGS, count_segments_doc},
    {"read_drain", read_drain, METH_VARARGS, read_drain_doc},
    {"serve", serve, METH_VARARGS, serve_doc},
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
        || (str_seconds = PyUnicode_InternFromString("seconds")) == NULL
        || (str_slept = PyUnicode_InternFromString("slept")) == NULL
        || PyType_Ready(&QueueFileType) < 0 || PyType_Ready(&RelayDrainType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "QueueFile", (PyObject *)&QueueFileType) < 0
        || PyModule_AddObjectRef(m, "RelayDrain", (PyObject *)&RelayDrainType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
