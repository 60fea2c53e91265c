/* The C reference of bench_tunnel.py: `mqtun tunnel vxlan`'s design, written the way a C
 * programmer would, to measure what that design can reach on this machine at all.
 *
 *     c_vxlan TAP LOCAL REMOTE VNI QUEUES      (IPv4 underlay, port 4789)
 *
 * A TAP with a virtio-net header and TSO offloads (IFF_MULTI_QUEUE when QUEUES > 1), one thread
 * per queue, each with its own UDP socket in one SO_REUSEPORT group on LOCAL:4789 (UDP_GRO on).
 * Each thread polls its queue and its socket:
 * - TAP -> socket: a frame is read with its virtio-net header; a TCP TSO super-frame is split
 *   into wire frames (sequence numbers, flags, IPv4 length/id/checksum, TCP checksum) in one
 *   buffer, each behind the VXLAN header, and sent with UDP_SEGMENT (as many per sendmsg as
 *   one UDP datagram holds); a frame that needs its checksum gets it; anything else is sent
 *   as it is. The outer source port is the socket's own (4789).
 * - socket -> TAP: a UDP_GRO read is cut into its datagrams; each one from REMOTE with the
 *   VXLAN flag and VNI is written to the TAP (no coalescing: the bench's forward workloads only
 *   bring ACKs back).
 * No counters, no steering program, no GRO: the smallest C version of the same kernel calls.
 * Prints "READY queues=N dev=NAME" once serving; SIGTERM or SIGINT ends it (the TAP goes away
 * with its last fd). The bench sets the TAP's MTU and brings it up.
 * Built by bench_tunnel.py with the system compiler: cc -O2 -pthread.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <linux/udp.h>
#include <linux/virtio_net.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

#define MAX_QUEUES 64
#define BATCH 64
#define BUF_SIZE (65536 + 64)
#define OUT_SIZE (2 * 65536 + 8192)
#define MAX_UDP_PAYLOAD (65535 - 20 - 8)
#define MAX_SEGS_PER_SEND 64
#define VXLAN_PORT 4789
#define TAP_MTU 1450 /* the bench's: a 1500-byte underlay less the VXLAN overhead */
#define VNET_SIZE ((int)sizeof(struct virtio_net_hdr))

struct worker {
    int tap, sock;
    struct sockaddr_in remote;
};

static uint8_t vxlan_header[8];

static void die(const char *what) {
    fprintf(stderr, "c_vxlan: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* One's-complement sum of `len` bytes (network order words), not folded. */
static uint64_t sum_bytes(const uint8_t *p, size_t len, uint64_t acc) {
    while (len >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        acc += w;
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        uint16_t w;
        memcpy(&w, p, 2);
        acc += w;
        p += 2;
        len -= 2;
    }
    if (len)
        acc += *p; /* little-endian host: a trailing byte is the high byte of its word */
    return acc;
}

static uint16_t fold(uint64_t acc) {
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
    return (uint16_t)acc;
}

/* The IPv4 or IPv6 pseudo header of a TCP segment of `l4len` bytes (host-summed words). */
static uint64_t pseudo(const uint8_t *ip, int v4, uint32_t l4len) {
    uint64_t acc = 0;
    if (v4)
        acc = sum_bytes(ip + 12, 8, 0);
    else
        acc = sum_bytes(ip + 8, 32, 0);
    acc += htons(IPPROTO_TCP);
    acc += htons((uint16_t)(l4len >> 16)) + htons((uint16_t)l4len);
    return acc;
}

/* Send `count` datagrams of `size` bytes (the last may be shorter: `last`) from `buf`. */
static void send_train(struct worker *w, uint8_t *buf, int size, int count, int last) {
    int per = MAX_UDP_PAYLOAD / size;
    if (per > MAX_SEGS_PER_SEND)
        per = MAX_SEGS_PER_SEND;
    int i = 0;
    while (i < count) {
        int k = count - i < per ? count - i : per;
        size_t bytes = (size_t)k * size;
        if (i + k == count)
            bytes = (size_t)(k - 1) * size + last;
        struct iovec iov = {.iov_base = buf + (size_t)i * size, .iov_len = bytes};
        union {
            char buf[CMSG_SPACE(sizeof(uint16_t))];
            struct cmsghdr align;
        } ctl;
        struct msghdr msg = {.msg_name = &w->remote, .msg_namelen = sizeof w->remote,
                             .msg_iov = &iov, .msg_iovlen = 1};
        if (k > 1) {
            msg.msg_control = ctl.buf;
            msg.msg_controllen = sizeof ctl.buf;
            struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t seg = (uint16_t)size;
            memcpy(CMSG_DATA(cm), &seg, sizeof seg);
        }
        sendmsg(w->sock, &msg, 0); /* a failed send is a drop, as for the kernel */
        i += k;
    }
}

/* A TCP TSO super-frame (Ethernet, IPv4 or IPv6 without extension headers): its segments,
 * each behind the VXLAN header, in `out`, sent as one train. 0, or -1 if it is not one. */
static int split_tcp(struct worker *w, const struct virtio_net_hdr *h, uint8_t *frame,
                     size_t len, uint8_t *out) {
    if (len < 14 + 20)
        return -1;
    uint16_t eth_type = (uint16_t)(frame[12] << 8 | frame[13]);
    uint8_t *ip = frame + 14;
    int v4 = eth_type == 0x0800;
    size_t iphl;
    if (v4) {
        iphl = (size_t)(ip[0] & 15) * 4;
        if (ip[9] != IPPROTO_TCP)
            return -1;
    } else if (eth_type == 0x86DD) {
        iphl = 40;
        if (ip[6] != IPPROTO_TCP)
            return -1;
    } else {
        return -1;
    }
    uint8_t *tcp = ip + iphl;
    if ((size_t)(tcp - frame) + 20 > len)
        return -1;
    size_t thl = (size_t)(tcp[12] >> 4) * 4;
    size_t hlen = 14 + iphl + thl;
    size_t mss = h->gso_size;
    if (hlen > len || mss == 0)
        return -1;
    size_t payload = len - hlen;
    int count = (int)((payload + mss - 1) / mss);
    if (count == 0)
        count = 1;
    size_t size = 8 + hlen + mss;
    if ((size_t)count * size > OUT_SIZE)
        return -1;
    uint32_t seq0 = ntohl(*(uint32_t *)(tcp + 4));
    uint8_t flags0 = tcp[13];
    uint16_t id0 = v4 ? ntohs(*(uint16_t *)(ip + 4)) : 0;
    size_t last = size;
    for (int i = 0; i < count; i++) {
        size_t off = (size_t)i * mss;
        size_t seg = payload - off < mss ? payload - off : mss;
        uint8_t *d = out + (size_t)i * size;
        memcpy(d, vxlan_header, 8);
        memcpy(d + 8, frame, hlen);
        memcpy(d + 8 + hlen, frame + hlen + off, seg);
        uint8_t *dip = d + 8 + 14, *dtcp = dip + iphl;
        uint32_t l4len = (uint32_t)(thl + seg);
        if (v4) {
            *(uint16_t *)(dip + 2) = htons((uint16_t)(iphl + l4len));
            *(uint16_t *)(dip + 4) = htons((uint16_t)(id0 + i));
            *(uint16_t *)(dip + 10) = 0;
            *(uint16_t *)(dip + 10) = (uint16_t)~fold(sum_bytes(dip, iphl, 0));
        } else {
            *(uint16_t *)(dip + 4) = htons((uint16_t)l4len);
        }
        *(uint32_t *)(dtcp + 4) = htonl(seq0 + (uint32_t)off);
        uint8_t fl = flags0;
        if (i > 0)
            fl &= (uint8_t)~0x80; /* CWR on the first segment only */
        if (i < count - 1)
            fl &= (uint8_t)~0x09; /* FIN and PSH on the last only */
        dtcp[13] = fl;
        *(uint16_t *)(dtcp + 16) = 0;
        uint64_t acc = pseudo(dip, v4, l4len);
        acc = sum_bytes(dtcp, l4len, acc);
        *(uint16_t *)(dtcp + 16) = (uint16_t)~fold(acc);
        last = 8 + hlen + seg;
    }
    send_train(w, out, (int)size, count, (int)last);
    return 0;
}

static void from_tap(struct worker *w, uint8_t *buf, uint8_t *out) {
    for (int n = 0; n < BATCH; n++) {
        ssize_t got = read(w->tap, buf, BUF_SIZE);
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            die("read");
        }
        if (got <= VNET_SIZE)
            continue;
        struct virtio_net_hdr *h = (struct virtio_net_hdr *)buf;
        uint8_t *frame = buf + VNET_SIZE;
        size_t len = (size_t)got - VNET_SIZE;
        int gso = h->gso_type & ~VIRTIO_NET_HDR_GSO_ECN;
        if (gso == VIRTIO_NET_HDR_GSO_TCPV4 || gso == VIRTIO_NET_HDR_GSO_TCPV6) {
            split_tcp(w, h, frame, len, out);
            continue;
        }
        if (gso != VIRTIO_NET_HDR_GSO_NONE)
            continue; /* not made by this bench */
        if (h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM && h->csum_start + h->csum_offset + 2u <= len) {
            /* the field holds the pseudo header's sum: summed with the rest */
            uint8_t *at = frame + h->csum_start + h->csum_offset;
            uint16_t c = (uint16_t)~fold(sum_bytes(frame + h->csum_start, len - h->csum_start, 0));
            memcpy(at, &c, 2);
        }
        memcpy(out, vxlan_header, 8);
        memcpy(out + 8, frame, len);
        send_train(w, out, (int)(8 + len), 1, (int)(8 + len));
    }
}

/* How to write a received frame to the TAP: a kernel peer on a veth leaves the inner TCP/UDP
 * checksum to "hardware" (only the pseudo header's sum is there): NEEDS_CSUM, as mqtun does;
 * a frame over the MTU is a TSO super-frame the peer handed over whole. */
static struct virtio_net_hdr receive_header(const uint8_t *f, size_t len) {
    struct virtio_net_hdr h = {0};
    if (len < 14 + 20)
        return h;
    uint16_t type = (uint16_t)(f[12] << 8 | f[13]);
    const uint8_t *ip = f + 14;
    size_t iphl;
    int proto, v4 = type == 0x0800;
    if (v4) {
        iphl = (size_t)(ip[0] & 15) * 4;
        proto = ip[9];
    } else if (type == 0x86DD) {
        iphl = 40;
        proto = ip[6];
    } else {
        return h;
    }
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return h;
    h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h.csum_start = (uint16_t)(14 + iphl);
    h.csum_offset = proto == IPPROTO_TCP ? 16 : 6;
    if (proto == IPPROTO_TCP && len > TAP_MTU + 14 && 14 + iphl + 20 <= len) {
        size_t thl = (size_t)(ip[iphl + 12] >> 4) * 4;
        h.gso_type = v4 ? VIRTIO_NET_HDR_GSO_TCPV4 : VIRTIO_NET_HDR_GSO_TCPV6;
        h.gso_size = (uint16_t)(TAP_MTU - iphl - thl);
        h.hdr_len = (uint16_t)(14 + iphl + thl);
    }
    return h;
}

static void from_socket(struct worker *w, uint8_t *buf) {
    for (int n = 0; n < BATCH; n++) {
        struct sockaddr_in from;
        struct iovec iov = {.iov_base = buf, .iov_len = BUF_SIZE};
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } ctl;
        struct msghdr msg = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = &iov,
                             .msg_iovlen = 1, .msg_control = ctl.buf,
                             .msg_controllen = sizeof ctl.buf};
        ssize_t got = recvmsg(w->sock, &msg, MSG_DONTWAIT);
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            die("recvmsg");
        }
        if (from.sin_addr.s_addr != w->remote.sin_addr.s_addr)
            continue;
        int seg = (int)got;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm))
            if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO)
                memcpy(&seg, CMSG_DATA(cm), sizeof seg);
        if (seg <= 0)
            seg = (int)got;
        for (ssize_t off = 0; off < got; off += seg) {
            size_t dlen = (size_t)(got - off < seg ? got - off : seg);
            uint8_t *d = buf + off;
            if (dlen < 8 + 14 || !(d[0] & 0x08) || memcmp(d + 4, vxlan_header + 4, 3) != 0)
                continue;
            struct virtio_net_hdr h = receive_header(d + 8, dlen - 8);
            struct iovec out[2] = {{.iov_base = &h, .iov_len = VNET_SIZE},
                                   {.iov_base = d + 8, .iov_len = dlen - 8}};
            writev(w->tap, out, 2); /* a refused write is a drop */
        }
    }
}

static void *serve(void *arg) {
    struct worker *w = arg;
    uint8_t *buf = malloc(BUF_SIZE), *out = malloc(OUT_SIZE);
    if (!buf || !out)
        die("malloc");
    struct pollfd fds[2] = {{.fd = w->tap, .events = POLLIN}, {.fd = w->sock, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            fprintf(stderr, "c_vxlan: the TAP went away\n");
            exit(1);
        }
        if (fds[0].revents & POLLIN)
            from_tap(w, buf, out);
        if (fds[1].revents & POLLIN)
            from_socket(w, buf);
    }
    return NULL;
}

static int open_queue(char *name, int multi) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("open /dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    ifr.ifr_flags = (short)(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (multi ? IFF_MULTI_QUEUE : 0));
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die(name);
    strcpy(name, ifr.ifr_name);
    if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0)
        die("O_NONBLOCK");
    return fd;
}

static int open_socket(const char *local) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), one = 1, big = 8 << 20;
    if (s < 0)
        die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(VXLAN_PORT)};
    if (inet_pton(AF_INET, local, &a.sin_addr) != 1) {
        fprintf(stderr, "c_vxlan: LOCAL must be an IPv4 address\n");
        exit(2);
    }
    setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    if (setsockopt(s, SOL_UDP, UDP_GRO, &one, sizeof one) < 0)
        die("UDP_GRO");
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
    return s;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: c_vxlan TAP LOCAL REMOTE VNI QUEUES\n");
        return 2;
    }
    char name[IFNAMSIZ];
    strncpy(name, argv[1], IFNAMSIZ - 1);
    name[IFNAMSIZ - 1] = 0;
    unsigned long vni = strtoul(argv[4], NULL, 0);
    int queues = atoi(argv[5]);
    if (queues < 1 || queues > MAX_QUEUES || vni > 0xFFFFFF) {
        fprintf(stderr, "c_vxlan: QUEUES must be 1..%d and VNI 0..16777215\n", MAX_QUEUES);
        return 2;
    }
    vxlan_header[0] = 0x08;
    vxlan_header[4] = (uint8_t)(vni >> 16);
    vxlan_header[5] = (uint8_t)(vni >> 8);
    vxlan_header[6] = (uint8_t)vni;
    static struct worker workers[MAX_QUEUES];
    for (int i = 0; i < queues; i++) {
        workers[i].tap = open_queue(name, queues > 1);
        workers[i].sock = open_socket(argv[2]);
        workers[i].remote.sin_family = AF_INET;
        workers[i].remote.sin_port = htons(VXLAN_PORT);
        if (inet_pton(AF_INET, argv[3], &workers[i].remote.sin_addr) != 1) {
            fprintf(stderr, "c_vxlan: REMOTE must be an IPv4 address\n");
            return 2;
        }
    }
    unsigned long offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
    if (ioctl(workers[0].tap, TUNSETOFFLOAD, offloads) < 0)
        die("TUNSETOFFLOAD");

    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop, NULL); /* the threads inherit it: main takes them */
    for (int i = 0; i < queues; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, serve, &workers[i]) != 0)
            die("pthread_create");
    }
    printf("READY queues=%d dev=%s\n", queues, name);
    fflush(stdout);
    int sig;
    sigwait(&stop, &sig);
    return 0;
}
