/* mqtun.packet._accel: the one loop of the offload codecs that Python cannot make cheap.
 *
 * tcp_rows() builds the segments of a TCP super-packet as the rows of one buffer: what
 * mqtun.packet.gso's numpy path (_tcp_rows) and its per-segment loop build, the same bytes,
 * in one pass with no per-column array operations. A 64 KB super-packet's 47 segments take
 * about 8 us, a fifth of the numpy path's time. It is optional: without a C compiler the package builds without it and
 * gso uses numpy (or the pure-Python loop), which the tests hold to the same oracle.
 *
 * Every check (parsing, sizes, refusals) stays in Python; this only fills rows it is told
 * how to fill.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* One's-complement sum of `len` bytes as native 32-bit loads (not folded). */
static uint64_t native_sum(const uint8_t *p, Py_ssize_t len, uint64_t acc) {
    while (len >= 8) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        acc += (uint64_t)a + b;
        p += 8;
        len -= 8;
    }
    while (len >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        acc += w;
        p += 2;
        len -= 2;
    }
    if (len) {
        uint16_t w = 0;
        memcpy(&w, p, 1); /* a trailing byte is the first byte of a zero-padded word */
        acc += w;
    }
    return acc;
}

/* The sum as a value of big-endian 16-bit words, modulo 0xFFFF. */
static uint32_t big_endian_residue(uint64_t acc) {
    acc = (acc & 0xFFFFFFFFu) + (acc >> 32);
    acc = (acc & 0xFFFFu) + (acc >> 16);
    acc = (acc & 0xFFFFu) + (acc >> 16);
    acc = (acc & 0xFFFFu) + (acc >> 16);
    uint16_t v = (uint16_t)acc;
    uint32_t host = 1;
    if (*(uint8_t *)&host) /* little-endian: the words were loaded swapped */
        v = (uint16_t)((v >> 8) | (v << 8));
    return v % 0xFFFFu;
}

static void store16(uint8_t *at, uint32_t v) {
    at[0] = (uint8_t)(v >> 8);
    at[1] = (uint8_t)v;
}

/* A checksum field for the residue r of everything it covers: 0xFFFF - r, 0 for r == 0 (as
 * mqtun.packet's Python paths write it). */
static uint32_t field(uint32_t r) {
    r %= 0xFFFFu;
    return r ? 0xFFFFu - r : 0;
}

PyDoc_STRVAR(tcp_rows_doc,
"tcp_rows(template, payload, mss, l3, l4, v4, ip_id0, seq0, first_flags, mid_flags,\n"
"         last_flags, pseudo, as_list=False) -> bytearray | list[bytes]\n\n"
"The segments of a TCP super-packet's payload, back to back: len(payload) // mss rows of\n"
"len(template) + mss bytes, then (if mss does not divide the payload) one shorter row. Each\n"
"is the template (any prefix, then the headers with the IP length of a full segment, the\n"
"middle flags and zero seq/checksums) and its payload slice, with the TCP sequence number\n"
"seq0 + offset, the flags (first, middle, last), the TCP checksum (pseudo: the pseudo\n"
"header's residue without its length), for IPv4 the id ip_id0 + i and the header checksum,\n"
"and the short row's IP length. l3 and l4 are offsets into a row. With as_list, a list of\n"
"one bytes object per segment instead (split()'s form, no buffer to slice).");

struct cut {
    const uint8_t *tmpl, *payload;
    Py_ssize_t hlen, mss, l3, l4, full, rest, count;
    int v4, first_flags, mid_flags, last_flags;
    uint32_t ip_id0, seq0, pseudo;
};

/* Segment i of the cut into `row` (len(template) + its payload bytes). */
static void fill_row(const struct cut *c, Py_ssize_t i, uint8_t *row) {
    Py_ssize_t seg = i < c->full ? c->mss : c->rest;
    Py_ssize_t l3 = c->l3, l4 = c->l4;
    uint8_t *ip = row + l3, *tcp = row + l4;
    memcpy(row, c->tmpl, (size_t)c->hlen);
    memcpy(row + c->hlen, c->payload + i * c->mss, (size_t)seg);
    uint32_t l4len = (uint32_t)(c->hlen - l4 + seg);
    if (seg != c->mss) /* the short last row: its own IP length */
        store16(c->v4 ? ip + 2 : ip + 4, (uint32_t)(l4 - l3 - (c->v4 ? 0 : 40)) + l4len);
    if (c->v4) {
        store16(ip + 4, (c->ip_id0 + (uint32_t)i) & 0xFFFFu);
        store16(ip + 10, field(big_endian_residue(native_sum(ip, l4 - l3, 0))));
    }
    uint32_t seq = c->seq0 + (uint32_t)(i * c->mss);
    tcp[4] = (uint8_t)(seq >> 24);
    tcp[5] = (uint8_t)(seq >> 16);
    tcp[6] = (uint8_t)(seq >> 8);
    tcp[7] = (uint8_t)seq;
    tcp[13] = (uint8_t)(i == 0 ? c->first_flags : i == c->count - 1 ? c->last_flags
                                                                   : c->mid_flags);
    uint32_t r = big_endian_residue(native_sum(tcp, (Py_ssize_t)l4len, 0));
    store16(tcp + 16, field(r + c->pseudo % 0xFFFFu + l4len % 0xFFFFu));
}

static PyObject *tcp_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer tmpl, payload;
    Py_ssize_t mss, l3, l4;
    int v4, first_flags, mid_flags, last_flags, as_list = 0;
    unsigned int ip_id0, seq0, pseudo;
    if (!PyArg_ParseTuple(args, "y*y*nnnpIIiiiI|p", &tmpl, &payload, &mss, &l3, &l4, &v4,
                          &ip_id0, &seq0, &first_flags, &mid_flags, &last_flags, &pseudo,
                          &as_list))
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t hlen = tmpl.len, size = hlen + mss;
    if (mss < 1 || l3 < 0 || l4 < l3 + (v4 ? 20 : 40) || l4 + 20 > hlen) {
        PyErr_SetString(PyExc_ValueError, "tcp_rows: the offsets do not fit the template");
        goto done;
    }
    struct cut c = {.tmpl = tmpl.buf, .payload = payload.buf, .hlen = hlen, .mss = mss, .l3 = l3,
                    .l4 = l4, .full = payload.len / mss, .rest = payload.len % mss, .v4 = v4,
                    .first_flags = first_flags, .mid_flags = mid_flags,
                    .last_flags = last_flags, .ip_id0 = ip_id0, .seq0 = seq0,
                    .pseudo = pseudo};
    c.count = c.full + (c.rest > 0);
    if (c.count < 1 || c.full > (PY_SSIZE_T_MAX - size) / size) {
        PyErr_SetString(PyExc_ValueError, "tcp_rows: no segment to cut");
        goto done;
    }
    if (as_list) { /* split()'s form: a bytes object per segment, filled where it lives */
        out = PyList_New(c.count);
        if (out == NULL)
            goto done;
        for (Py_ssize_t i = 0; i < c.count; i++) {
            PyObject *b = PyBytes_FromStringAndSize(NULL, hlen + (i < c.full ? mss : c.rest));
            if (b == NULL) {
                Py_CLEAR(out);
                goto done;
            }
            fill_row(&c, i, (uint8_t *)PyBytes_AS_STRING(b));
            PyList_SET_ITEM(out, i, b);
        }
        goto done;
    }
    out = PyByteArray_FromStringAndSize(NULL, c.full * size + (c.rest ? hlen + c.rest : 0));
    if (out == NULL)
        goto done;
    uint8_t *rows = (uint8_t *)PyByteArray_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < c.count; i++)
        fill_row(&c, i, rows + i * size);
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&tmpl);
    PyBuffer_Release(&payload);
    return out;
}

PyDoc_STRVAR(completed_doc,
"completed(packet, csum_start, at) -> bytes\n\n"
"A copy of a NEEDS_CSUM packet with its checksum finished: 0xFFFF less the residue of\n"
"packet[csum_start:] stored big-endian at `at` (mqtun.packet.checksum.completed checks the\n"
"offsets first).");

static PyObject *completed(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer pkt;
    Py_ssize_t start, at;
    if (!PyArg_ParseTuple(args, "y*nn", &pkt, &start, &at))
        return NULL;
    PyObject *out = NULL;
    if (start < 0 || at < start || at + 2 > pkt.len) {
        PyErr_SetString(PyExc_ValueError, "completed: the offsets do not fit the packet");
        goto done;
    }
    out = PyBytes_FromStringAndSize(pkt.buf, pkt.len);
    if (out == NULL)
        goto done;
    const uint8_t *p = (const uint8_t *)pkt.buf;
    store16((uint8_t *)PyBytes_AS_STRING(out) + at,
            0xFFFFu - big_endian_residue(native_sum(p + start, pkt.len - start, 0)));
done:
    PyBuffer_Release(&pkt);
    return out;
}

static PyMethodDef methods[] = {
    {"tcp_rows", tcp_rows, METH_VARARGS, tcp_rows_doc},
    {"completed", completed, METH_VARARGS, completed_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mqtun.packet._accel",
    "The C loop of mqtun.packet.gso (optional; see mqtun.packet.accel).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__accel(void) { return PyModule_Create(&module); }
