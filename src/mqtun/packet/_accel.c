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

/* ---- coalesce(): mqtun.packet.gro's rules, in one pass ----------------------------------
 *
 * The same joins as gro.coalesce's general path (the Python code is the reference and the
 * tests hold both to one oracle): a batch's in-order TCP segments and UDP datagrams of one
 * flow become one super-packet with a NEEDS_CSUM/GSO header, everything else passes through
 * as the caller's object. The kernel numbers come from mqtun._uapi through configure().
 */

struct rules {
    PyObject *zero_header, *header_type;
    long eth_p_ip, eth_p_ipv6, tpid_a, tpid_b, max_tags, eth_hlen;
    long p_tcp, p_udp, ack, psh, cwr, not_for_gro;
    long needs_csum, data_valid, gso_tcpv4, gso_tcpv6, gso_udp_l4, gso_ecn, tcp_csum, udp_csum;
};
static struct rules R; /* set once by configure(); zero_header NULL until then */

PyDoc_STRVAR(configure_doc,
"configure(zero_header, header_type, numbers) -> None\n\n"
"Give coalesce() the header objects it returns and the kernel's numbers, in this order:\n"
"ETH_P_IP, ETH_P_IPV6, the two VLAN TPIDs, the most VLAN tags, ETH_HLEN, IPPROTO_TCP,\n"
"IPPROTO_UDP, TCPHDR_ACK, TCPHDR_PSH, TCPHDR_CWR, the flags that keep a segment out\n"
"(SYN|FIN|RST|URG), VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_DATA_VALID, GSO_TCPV4,\n"
"GSO_TCPV6, GSO_UDP_L4, GSO_ECN,\n"
"the TCP and the UDP checksum offsets.");

static PyObject *configure(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *zero, *type;
    struct rules r;
    if (!PyArg_ParseTuple(args, "OO(llllllllllllllllllll)", &zero, &type, &r.eth_p_ip,
                          &r.eth_p_ipv6, &r.tpid_a, &r.tpid_b, &r.max_tags, &r.eth_hlen,
                          &r.p_tcp, &r.p_udp, &r.ack, &r.psh, &r.cwr, &r.not_for_gro,
                          &r.needs_csum, &r.data_valid, &r.gso_tcpv4, &r.gso_tcpv6,
                          &r.gso_udp_l4, &r.gso_ecn, &r.tcp_csum, &r.udp_csum))
        return NULL;
    if (r.max_tags < 0 || r.max_tags > 2 || r.eth_hlen != 14) { /* what KEY_MAX holds */
        PyErr_SetString(PyExc_ValueError, "configure: at most 2 VLAN tags, a 14-byte header");
        return NULL;
    }
    Py_INCREF(zero);
    Py_INCREF(type);
    Py_XDECREF(R.zero_header);
    Py_XDECREF(R.header_type);
    r.zero_header = zero;
    r.header_type = type;
    R = r;
    Py_RETURN_NONE;
}

static uint32_t be16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }
static uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

#define KEY_MAX 64 /* Ethernet header with two tags (22) + two IPv6 addresses + proto + ports */

struct group {
    Py_ssize_t first, last;   /* packet indexes; members chain through member_next */
    Py_ssize_t l3, l4, hlen, mss, size; /* size: the IP packet's length so far */
    uint32_t next_seq, ip_id;
    int id_step, n, v4, proto, is_open, psh, checked, key_len;
    uint8_t key[KEY_MAX];
};

struct batch {
    const uint8_t **data;
    Py_ssize_t *len, *member_next, *slot; /* slot: >= 0 a packet passed through, < 0 ~group */
    struct group *groups;
    Py_ssize_t *table; /* open addressing: group index + 1, 0 empty */
    Py_ssize_t mask, ngroups, nslots;
    /* coalesce_reads only (NULL for coalesce): per packet, -2 may not join (a super-packet,
     * an unknown header), -1 checksum complete, else csum_start << 16 | csum_offset of a
     * NEEDS_CSUM packet, whose partial checksum is the kernel's (trusted, not verified) */
    int32_t *partial;
};

static uint32_t key_hash(const uint8_t *k, int n) {
    uint32_t h = 2166136261u;
    for (int i = 0; i < n; i++)
        h = (h ^ k[i]) * 16777619u;
    return h;
}

/* The table's slot for `key`: where its group is, or the empty slot it would go in. */
static Py_ssize_t find(const struct batch *b, const uint8_t *key, int n) {
    Py_ssize_t at = (Py_ssize_t)(key_hash(key, n) & (uint32_t)b->mask);
    for (;;) {
        Py_ssize_t e = b->table[at];
        if (e == 0)
            return at;
        const struct group *g = &b->groups[e - 1];
        if (g->key_len == n && memcmp(g->key, key, (size_t)n) == 0)
            return at;
        at = (at + 1) & b->mask;
    }
}

/* Whether a packet's checksums hold: on IPv4 the header's and the transport's in one sum
 * (gro._verify_first's test), on IPv6 the transport's. */
static int intact(const uint8_t *p, Py_ssize_t n, Py_ssize_t l3, Py_ssize_t l4, int v4,
                  long proto) {
    uint32_t r;
    if (v4)
        r = big_endian_residue(native_sum(p + l3, n - l3, 0)) +
            big_endian_residue(native_sum(p + l3 + 12, 8, 0));
    else
        r = big_endian_residue(native_sum(p + l3 + 8, n - l3 - 8, 0));
    return (r + (uint32_t)proto + (uint32_t)(n - l4)) % 0xFFFFu == 0;
}

/* A NEEDS_CSUM read's checksum is partial: nothing to verify, the kernel made it. */
static int trusted(const struct batch *b, Py_ssize_t i) {
    return b->partial != NULL && b->partial[i] >= 0;
}

/* Whether packet p may follow the group's first packet f: what gro's `sig` holds. */
static int same_signature(const struct group *g, const uint8_t *f, const uint8_t *p) {
    Py_ssize_t l3 = g->l3, l4 = g->l4;
    if (g->v4) {
        if (f[l3 + 1] != p[l3 + 1] || f[l3 + 8] != p[l3 + 8] || memcmp(f + l3 + 6, p + l3 + 6, 2))
            return 0; /* TOS, TTL, the fragment field (DF) */
    } else if (memcmp(f + l3, p + l3, 4) || f[l3 + 7] != p[l3 + 7]) {
        return 0; /* version/class/flow label, hop limit */
    }
    if (g->proto != R.p_tcp)
        return 1;
    /* ack, data offset byte, flags but PSH and CWR, window, urgent pointer, options */
    return memcmp(f + l4 + 8, p + l4 + 8, 5) == 0 &&
           ((f[l4 + 13] ^ p[l4 + 13]) & ~(R.psh | R.cwr)) == 0 &&
           memcmp(f + l4 + 14, p + l4 + 14, 2) == 0 && memcmp(f + l4 + 18, p + l4 + 18, 2) == 0 &&
           memcmp(f + l4 + 20, p + l4 + 20, (size_t)(g->hlen - l4 - 20)) == 0;
}

/* gro.coalesce's general path over the batch: fills slots and groups. */
static void join_all(struct batch *b, Py_ssize_t count, int tap, Py_ssize_t max_size, int tcp,
                     int udp, int verify) {
    for (Py_ssize_t i = 0; i < count; i++) {
        const uint8_t *p = b->data[i];
        Py_ssize_t n = b->len[i], l3 = 0, l4 = 0;
        b->member_next[i] = -1;
        if (tap) { /* headers.parse_ethernet: up to max_tags VLAN tags */
            long etype = 0;
            if (n >= R.eth_hlen) {
                Py_ssize_t off = 12;
                etype = (long)be16(p + off);
                int tags = 0;
                while (etype == R.tpid_a || etype == R.tpid_b) {
                    if (++tags > R.max_tags || n < off + 6) {
                        etype = 0;
                        break;
                    }
                    off += 4;
                    etype = (long)be16(p + off);
                }
                l3 = off + 2;
            }
            if (etype != R.eth_p_ip && etype != R.eth_p_ipv6) {
                b->slot[b->nslots++] = i;
                continue;
            }
        }
        int vb = n > l3 ? p[l3] : 0, v4 = vb == 0x45;
        long proto = -1;
        if (v4) {
            if (n >= l3 + 28)
                proto = p[l3 + 9];
            l4 = l3 + 20;
        } else if (vb >> 4 == 6) {
            if (n >= l3 + 48)
                proto = p[l3 + 6];
            l4 = l3 + 40;
        }
        int candidate = 0, psh = 0, cwr = 0, has_group = 0;
        uint32_t seq = 0, ip_id = 0, frag = 0;
        Py_ssize_t hlen = 0, size = 0, at = 0;
        uint8_t key[KEY_MAX];
        int key_len = 0;
        int is_tcp = proto == R.p_tcp && tcp && n >= l4 + 20;
        int is_udp = !is_tcp && proto == R.p_udp && udp && n >= l4 + 8;
        if (is_tcp || is_udp) {
            int ok;
            if (v4) {
                ip_id = be16(p + l3 + 4);
                frag = be16(p + l3 + 6);
                ok = be16(p + l3 + 2) == (uint32_t)(n - l3) && !(frag & 0x3FFF);
            } else {
                ok = be16(p + l3 + 4) == (uint32_t)(n - l4);
            }
            /* the flow: Ethernet header, addresses, protocol, ports */
            memcpy(key, p, (size_t)l3);
            key_len = (int)l3;
            Py_ssize_t a = v4 ? l3 + 12 : l3 + 8, alen = v4 ? 8 : 32;
            memcpy(key + key_len, p + a, (size_t)alen);
            key_len += (int)alen;
            key[key_len++] = (uint8_t)proto;
            memcpy(key + key_len, p + l4, 4);
            key_len += 4;
            at = find(b, key, key_len);
            has_group = b->table[at] != 0;
            if (is_tcp) {
                hlen = l4 + (p[l4 + 12] >> 4) * 4;
                size = n - hlen;
                long flags = p[l4 + 13];
                if (ok && hlen >= l4 + 20 && size > 0 && (flags & R.ack) &&
                    !(flags & R.not_for_gro)) {
                    candidate = 1;
                    psh = (flags & R.psh) != 0;
                    cwr = (flags & R.cwr) != 0;
                    seq = be32(p + l4 + 4);
                }
            } else {
                hlen = l4 + 8;
                size = n - hlen;
                candidate = ok && be16(p + l4 + 4) == (uint32_t)(n - l4) &&
                            be16(p + l4 + 6) != 0 && size > 0;
            }
        }
        int32_t partial = b->partial ? b->partial[i] : -1;
        if (candidate && partial != -1) /* a NEEDS_CSUM packet joins with its offsets right */
            candidate = partial >= 0 && (Py_ssize_t)(partial >> 16) == l4 &&
                        (partial & 0xFFFF) == (is_tcp ? R.tcp_csum : R.udp_csum);
        struct group *g = has_group ? &b->groups[b->table[at] - 1] : NULL;
        if (!candidate) {
            if (g != NULL) /* the flow's packet cannot join: keep the flow in order */
                g->is_open = 0;
            b->slot[b->nslots++] = i;
            continue;
        }
        if (g != NULL && g->is_open) {
            const uint8_t *f = b->data[g->first];
            int join = same_signature(g, f, p) && size <= g->mss && g->size + size <= max_size &&
                       (proto == R.p_udp || (seq == g->next_seq && !cwr));
            /* a UDP datagram with DF: its id is not compared (gro's module doc) */
            if (join && v4 && !(proto == R.p_udp && (frag & 0x4000))) {
                if (g->id_step >= 0) {
                    join = ip_id == ((g->ip_id + (uint32_t)(g->id_step * g->n)) & 0xFFFFu);
                } else if (ip_id == ((g->ip_id + 1) & 0xFFFFu)) {
                    g->id_step = 1;
                } else if (ip_id == g->ip_id && (frag & 0x4000)) {
                    g->id_step = 0;
                } else {
                    join = 0;
                }
            }
            if (join && verify) {
                if (!g->checked) {
                    g->checked = 1;
                    if (!trusted(b, g->first) &&
                        !intact(f, b->len[g->first], g->l3, g->l4, g->v4, g->proto))
                        join = 0;
                }
                join = join && (trusted(b, i) || intact(p, n, l3, l4, v4, proto));
            }
            if (join) {
                b->member_next[g->last] = i;
                g->last = i;
                g->n++;
                g->size += size;
                g->next_seq = seq + (uint32_t)size;
                if (psh || size < g->mss) {
                    g->psh = psh;
                    g->is_open = 0;
                }
                continue;
            }
        }
        if (g != NULL)
            g->is_open = 0;
        Py_ssize_t gi = b->ngroups++;
        g = &b->groups[gi];
        *g = (struct group){.first = i, .last = i, .l3 = l3, .l4 = l4, .hlen = hlen, .mss = size,
                            .size = hlen - l3 + size, .next_seq = seq + (uint32_t)size,
                            .ip_id = ip_id, .id_step = -1, .n = 1, .v4 = v4, .proto = (int)proto,
                            .is_open = !psh, .psh = psh, .key_len = key_len};
        memcpy(g->key, key, (size_t)key_len);
        b->table[at] = gi + 1;
        b->slot[b->nslots++] = ~gi;
    }
}

/* A group's super-packet into `out` (l3 + g->size bytes), as gro._finish builds it; its GSO
 * type and checksum offset in *gso_type and *csum_offset. */
static void build(const struct batch *b, const struct group *g, uint8_t *out, long *gso_type,
                  long *csum_offset) {
    Py_ssize_t l3 = g->l3, l4 = g->l4, hlen = g->hlen;
    uint8_t *w = out + hlen;
    memcpy(out, b->data[g->first], (size_t)hlen);
    for (Py_ssize_t m = g->first; m >= 0; m = b->member_next[m]) {
        memcpy(w, b->data[m] + hlen, (size_t)(b->len[m] - hlen));
        w += b->len[m] - hlen;
    }
    uint8_t *ip = out + l3, *th = out + l4;
    uint32_t l4_len = (uint32_t)(g->size - (l4 - l3));
    Py_ssize_t a = g->v4 ? 12 : 8, alen = g->v4 ? 8 : 32;
    if (g->v4) {
        store16(ip + 2, (uint32_t)g->size);
        store16(ip + 10, 0);
        store16(ip + 10, field(big_endian_residue(native_sum(ip, l4 - l3, 0))));
    } else {
        store16(ip + 4, (uint32_t)g->size - 40);
    }
    uint32_t seed = (big_endian_residue(native_sum(ip + a, alen, 0)) + (uint32_t)g->proto +
                     l4_len) % 0xFFFFu;
    seed = seed ? seed : 0xFFFFu;
    if (g->proto == R.p_tcp) {
        *gso_type = g->v4 ? R.gso_tcpv4 : R.gso_tcpv6;
        if (th[13] & R.cwr)
            *gso_type |= R.gso_ecn;
        if (g->psh)
            th[13] |= (uint8_t)R.psh;
        *csum_offset = R.tcp_csum;
    } else {
        store16(th + 4, l4_len);
        *gso_type = R.gso_udp_l4;
        *csum_offset = R.udp_csum;
    }
    store16(th + *csum_offset, seed);
}

/* (VnetHeader, bytes) of a group, for coalesce. */
static PyObject *finish(const struct batch *b, const struct group *g) {
    PyObject *data = PyBytes_FromStringAndSize(NULL, g->l3 + g->size);
    if (data == NULL)
        return NULL;
    long gso_type, csum_offset;
    build(b, g, (uint8_t *)PyBytes_AS_STRING(data), &gso_type, &csum_offset);
    PyObject *hdr = PyObject_CallFunction(R.header_type, "llnnnl", R.needs_csum, gso_type,
                                          g->hlen, g->mss, g->l4, csum_offset);
    if (hdr == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, hdr, data);
    Py_DECREF(hdr);
    Py_DECREF(data);
    return pair;
}

PyDoc_STRVAR(coalesce_doc,
"coalesce(packets, tap, max_size, tcp, udp, verify) -> list[tuple[VnetHeader, Buffer]]\n\n"
"mqtun.packet.gro.coalesce in C (see its doc for the rules): a list of (header, data), a\n"
"joined group as a new bytes object, every other packet as the caller's own object.");

/* The buffers of one call, held until it returns, and the batch's arrays (one block). */
struct held {
    PyObject *fast; /* a tuple */
    PyObject **items;
    Py_ssize_t count, got; /* got: views taken so far */
    Py_buffer *views;
    char *block, *taken;
};

/* Take the packets' buffers (each from `prefix` on) and lay the batch out; -1 with an error. */
static int batch_open(struct batch *b, struct held *h, PyObject *seq_obj, Py_ssize_t prefix,
                      int with_partial) {
    memset(b, 0, sizeof(*b));
    memset(h, 0, sizeof(*h));
    if (R.zero_header == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "mqtun.packet._accel: configure() was not called");
        return -1;
    }
    /* a tuple of our own: the buffers stay alive even if Python code run meanwhile (a
     * VnetHeader built, a garbage collection) changed the caller's list */
    h->fast = PySequence_Tuple(seq_obj);
    if (h->fast == NULL)
        return -1;
    Py_ssize_t count = h->count = PySequence_Fast_GET_SIZE(h->fast);
    h->items = PySequence_Fast_ITEMS(h->fast);
    Py_ssize_t tsize = 16;
    while (tsize < 2 * count)
        tsize <<= 1;
    size_t n = (size_t)count;
    size_t need = n * (sizeof(struct group) + sizeof(Py_buffer) + sizeof(uint8_t *) +
                       3 * sizeof(Py_ssize_t) + sizeof(int32_t) + 1) +
                  (size_t)tsize * sizeof(Py_ssize_t);
    char *cur = h->block = PyMem_Malloc(need ? need : 1);
    if (cur == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->groups = (struct group *)cur;
    cur += n * sizeof(struct group);
    h->views = (Py_buffer *)cur;
    cur += n * sizeof(Py_buffer);
    b->data = (const uint8_t **)cur;
    cur += n * sizeof(uint8_t *);
    b->len = (Py_ssize_t *)cur;
    cur += n * sizeof(Py_ssize_t);
    b->member_next = (Py_ssize_t *)cur;
    cur += n * sizeof(Py_ssize_t);
    b->slot = (Py_ssize_t *)cur;
    cur += n * sizeof(Py_ssize_t);
    b->table = (Py_ssize_t *)cur;
    cur += (size_t)tsize * sizeof(Py_ssize_t);
    int32_t *partial = (int32_t *)cur;
    cur += n * sizeof(int32_t);
    h->taken = cur;
    memset(b->table, 0, (size_t)tsize * sizeof(Py_ssize_t));
    memset(h->taken, 0, n);
    b->mask = tsize - 1;
    b->partial = with_partial ? partial : NULL;
    for (Py_ssize_t i = 0; i < count; i++, h->got++) {
        PyObject *o = h->items[i];
        const uint8_t *p;
        Py_ssize_t len;
        if (PyBytes_CheckExact(o)) {
            p = (const uint8_t *)PyBytes_AS_STRING(o);
            len = PyBytes_GET_SIZE(o);
        } else {
            if (PyObject_GetBuffer(o, &h->views[i], PyBUF_SIMPLE) < 0)
                return -1;
            h->taken[i] = 1;
            p = h->views[i].buf;
            len = h->views[i].len;
        }
        b->data[i] = p + (len > prefix ? prefix : len);
        b->len[i] = len > prefix ? len - prefix : 0;
    }
    return 0;
}

static void batch_close(struct held *h) {
    for (Py_ssize_t k = 0; k < h->got; k++)
        if (h->taken[k])
            PyBuffer_Release(&h->views[k]);
    PyMem_Free(h->block);
    Py_XDECREF(h->fast);
}

static PyObject *coalesce(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *seq_obj;
    int tap, tcp, udp, verify;
    Py_ssize_t max_size;
    if (!PyArg_ParseTuple(args, "Opnppp", &seq_obj, &tap, &max_size, &tcp, &udp, &verify))
        return NULL;
    struct batch b;
    struct held h;
    PyObject *out = NULL;
    if (batch_open(&b, &h, seq_obj, 0, 0) < 0)
        goto done;
    join_all(&b, h.count, tap, max_size, tcp, udp, verify);
    out = PyList_New(b.nslots);
    if (out == NULL)
        goto done;
    for (Py_ssize_t s = 0; s < b.nslots; s++) {
        Py_ssize_t v = b.slot[s];
        PyObject *pair;
        if (v < 0 && b.groups[~v].n > 1)
            pair = finish(&b, &b.groups[~v]);
        else
            pair = PyTuple_Pack(2, R.zero_header, h.items[v < 0 ? b.groups[~v].first : v]);
        if (pair == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, s, pair);
    }
done:
    batch_close(&h);
    return out;
}

static uint32_t load16(const uint8_t *p, int little) {
    return little ? ((uint32_t)p[1] << 8) | p[0] : be16(p);
}

static void put16(uint8_t *p, uint32_t v, int little) {
    if (little) {
        p[0] = (uint8_t)v;
        p[1] = (uint8_t)(v >> 8);
    } else {
        store16(p, v);
    }
}

PyDoc_STRVAR(coalesce_reads_doc,
"coalesce_reads(prefix, vnet_at, vnet_size, little_endian, tap, max_size, tcp, udp, verify,\n"
"               reads) -> (list[bytes-like], list[int] | None)\n\n"
"One drain's reads from a virtio-net-header queue, joined for a writer of the same layout:\n"
"each read is [PI] virtio-net header packet (`prefix` bytes before the packet, the header at\n"
"`vnet_at`, `vnet_size` long, fields little-endian or big). The plain packets (gso_type 0,\n"
"checksum complete or NEEDS_CSUM at the transport header) are joined by gro.coalesce's rules\n"
"(a NEEDS_CSUM packet's partial checksum is the kernel's: not verified); each group becomes one\n"
"buffer of the same layout (the first read's PI, a GSO header, the super-packet), in the place\n"
"of its first read. Every other read comes back as the caller's object, in order. With the\n"
"buffers, how many reads each joined one holds (0: a read as it came); (reads, None) when\n"
"nothing was joined.");

static PyObject *coalesce_reads(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *seq_obj;
    Py_ssize_t prefix, vnet_at, vnet_size, max_size;
    int little, tap, tcp, udp, verify;
    if (!PyArg_ParseTuple(args, "nnnppnpppO", &prefix, &vnet_at, &vnet_size, &little, &tap,
                          &max_size, &tcp, &udp, &verify, &seq_obj))
        return NULL;
    if (vnet_at < 0 || vnet_size < 10 || vnet_at + vnet_size != prefix) {
        PyErr_SetString(PyExc_ValueError, "coalesce_reads: the header does not end at prefix");
        return NULL;
    }
    struct batch b;
    struct held h;
    PyObject *out = NULL;
    if (batch_open(&b, &h, seq_obj, prefix, 1) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < h.count; i++) { /* what each read's header allows */
        const uint8_t *hdr = b.len[i] > 0 ? b.data[i] - prefix + vnet_at : NULL;
        int32_t mark = -2; /* a short read, or a super-packet: as it came */
        if (hdr != NULL && hdr[1] == 0) {
            if (hdr[0] == 0 || hdr[0] == R.data_valid) { /* complete (verified when joined) */
                mark = -1;
            } else if (hdr[0] == R.needs_csum) {
                uint32_t start = load16(hdr + 6, little), off = load16(hdr + 8, little);
                if (start <= 0x7FFF)
                    mark = (int32_t)(start << 16 | off);
            }
        }
        b.partial[i] = mark;
    }
    join_all(&b, h.count, tap, max_size, tcp, udp, verify);
    if (b.nslots == h.count) { /* nothing joined: the reads as they came */
        out = PyTuple_Pack(2, seq_obj, Py_None);
        goto done;
    }
    PyObject *bufs = PyList_New(b.nslots), *counts = PyList_New(b.nslots);
    if (bufs == NULL || counts == NULL) {
        Py_XDECREF(bufs);
        Py_XDECREF(counts);
        goto done;
    }
    out = PyTuple_Pack(2, bufs, counts);
    Py_DECREF(bufs);
    Py_DECREF(counts);
    if (out == NULL)
        goto done;
    for (Py_ssize_t s = 0; s < b.nslots; s++) {
        Py_ssize_t v = b.slot[s];
        PyObject *o;
        long joined = 0;
        if (v < 0 && b.groups[~v].n > 1) {
            joined = b.groups[~v].n;
            const struct group *g = &b.groups[~v];
            o = PyBytes_FromStringAndSize(NULL, prefix + g->l3 + g->size);
            if (o != NULL) {
                uint8_t *w = (uint8_t *)PyBytes_AS_STRING(o);
                long gso_type, csum_offset;
                memcpy(w, b.data[g->first] - prefix, (size_t)vnet_at); /* the PI, if any */
                memset(w + vnet_at, 0, (size_t)vnet_size);
                build(&b, g, w + prefix, &gso_type, &csum_offset);
                uint8_t *hd = w + vnet_at;
                hd[0] = (uint8_t)R.needs_csum;
                hd[1] = (uint8_t)gso_type;
                put16(hd + 2, (uint32_t)g->hlen, little);
                put16(hd + 4, (uint32_t)g->mss, little);
                put16(hd + 6, (uint32_t)g->l4, little);
                put16(hd + 8, (uint32_t)csum_offset, little);
            }
        } else {
            o = h.items[v < 0 ? b.groups[~v].first : v];
            Py_INCREF(o);
        }
        PyObject *c = o == NULL ? NULL : PyLong_FromLong(joined);
        if (c == NULL) {
            Py_XDECREF(o);
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(bufs, s, o);
        PyList_SET_ITEM(counts, s, c);
    }
done:
    batch_close(&h);
    return out;
}

PyDoc_STRVAR(decode_plain_doc,
"decode_plain(prefix, pi_strip, vnet_at, little_endian, fast_mtu, views, reads)\n"
"             -> list[bytes | memoryview] | None\n\n"
"The wire packet of each read of a drain where every read is one plain packet: a bytes\n"
"object of [PI] [virtio-net header] packet (`prefix` bytes before the packet, the header at\n"
"`vnet_at`, or vnet_at < 0 for none), its PI flags without `pi_strip` (native order), the\n"
"header's gso_type 0, a NEEDS_CSUM packet's offsets inside it, at most `fast_mtu` bytes. The\n"
"packet after the prefix, its checksum finished where NEEDS_CSUM says (a copy, as\n"
"completed() makes it); with `views` each as a read-only memoryview (a slice of the read, or\n"
"of the completed copy), else as bytes. None when any read is not such a packet: then the\n"
"caller decodes the drain itself (runtime.path's rules, which count and drop).");

static PyObject *decode_plain(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *reads;
    Py_ssize_t prefix, vnet_at, fast_mtu;
    unsigned int pi_strip;
    int little, views;
    if (!PyArg_ParseTuple(args, "nInpnpO!", &prefix, &pi_strip, &vnet_at, &little, &fast_mtu,
                          &views, &PyList_Type, &reads))
        return NULL;
    if (R.zero_header == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "decode_plain: configure() was not called");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(reads);
    for (Py_ssize_t i = 0; i < n; i++) { /* every read plain, or the caller decodes them all */
        PyObject *o = PyList_GET_ITEM(reads, i);
        if (!PyBytes_CheckExact(o))
            Py_RETURN_NONE;
        const uint8_t *b = (const uint8_t *)PyBytes_AS_STRING(o);
        Py_ssize_t len = PyBytes_GET_SIZE(o);
        if (len <= prefix || len - prefix > fast_mtu)
            Py_RETURN_NONE;
        if (pi_strip) {
            uint16_t flags;
            memcpy(&flags, b, 2);
            if (flags & pi_strip)
                Py_RETURN_NONE;
        }
        if (vnet_at >= 0) {
            const uint8_t *hdr = b + vnet_at;
            if (hdr[1] != 0)
                Py_RETURN_NONE; /* a super-packet (or an offload to refuse) */
            if (hdr[0] & R.needs_csum) {
                Py_ssize_t start = load16(hdr + 6, little), off = load16(hdr + 8, little);
                if (start + off + 2 > len - prefix)
                    Py_RETURN_NONE;
            }
        }
    }
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyList_GET_ITEM(reads, i), *pkt;
        const uint8_t *b = (const uint8_t *)PyBytes_AS_STRING(o);
        Py_ssize_t len = PyBytes_GET_SIZE(o) - prefix;
        const uint8_t *hdr = vnet_at >= 0 ? b + vnet_at : NULL;
        if (hdr != NULL && (hdr[0] & R.needs_csum)) {
            Py_ssize_t start = load16(hdr + 6, little), at = start + load16(hdr + 8, little);
            PyObject *c = PyBytes_FromStringAndSize((const char *)b + prefix, len);
            if (c != NULL)
                store16((uint8_t *)PyBytes_AS_STRING(c) + at,
                        0xFFFFu - big_endian_residue(native_sum(b + prefix + start,
                                                                len - start, 0)));
            pkt = c == NULL || !views ? c : PyMemoryView_FromObject(c);
            if (views)
                Py_XDECREF(c);
        } else if (prefix == 0) { /* the read is the packet (runtime.path hands it on) */
            Py_INCREF(o);
            pkt = o;
        } else if (views) {
            PyObject *whole = PyMemoryView_FromObject(o);
            pkt = whole == NULL ? NULL : PySequence_GetSlice(whole, prefix, prefix + len);
            Py_XDECREF(whole);
        } else {
            pkt = PyBytes_FromStringAndSize((const char *)b + prefix, len);
        }
        if (pkt == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, pkt);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"tcp_rows", tcp_rows, METH_VARARGS, tcp_rows_doc},
    {"completed", completed, METH_VARARGS, completed_doc},
    {"configure", configure, METH_VARARGS, configure_doc},
    {"coalesce", coalesce, METH_VARARGS, coalesce_doc},
    {"coalesce_reads", coalesce_reads, METH_VARARGS, coalesce_reads_doc},
    {"decode_plain", decode_plain, METH_VARARGS, decode_plain_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mqtun.packet._accel",
    "The C loop of mqtun.packet.gso (optional; see mqtun.packet.accel).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__accel(void) { return PyModule_Create(&module); }
