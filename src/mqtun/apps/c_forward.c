/* The C baseline of `mqtun bench`: the minimal forwarder a C programmer writes.
 *
 *     c_forward DEV_A DEV_B QUEUES OFFLOADS CPUS
 *
 * Two TUN devices (IFF_MULTI_QUEUE when QUEUES > 1), one thread per queue pair, each thread:
 * poll() both queues, read() every packet a readable queue holds (up to BATCH), write() each
 * one to the other device. No copies beyond read/write, no coalescing, no counters of its own
 * (the kernel's link statistics count what it moves).
 *
 * OFFLOADS is "none" (no virtio-net header, like `mqtun forward --no-offload`) or a comma list
 * of TUNSETOFFLOAD masks, best first: the bench passes mqtun forward's own ladder, so both
 * forwarders end up with the same offloads; the first mask both devices accept is kept.
 * CPUS is "auto" (thread i on CPU i modulo the CPU count, like --cpus auto) or "none".
 *
 * Same contract as `mqtun forward` for the bench's sake: "READY queues=N" on stdout once every
 * queue is open, SIGTERM or SIGINT ends it (the devices go away with their last fd).
 * Built by `mqtun bench` with the system compiler: cc -O2 -pthread.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MAX_QUEUES 256
#define BATCH 64
#define BUF_SIZE (65536 + 64) /* a 64 KB TSO super-packet and its virtio-net header */

struct pair {
    int a, b, cpu;
};

static void die(const char *what) {
    fprintf(stderr, "c_forward: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int open_queue(const char *name, int flags) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("open /dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    ifr.ifr_flags = (short)flags;
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die(name);
    if (fcntl(fd, F_SETFL, O_NONBLOCK) < 0)
        die("O_NONBLOCK");
    return fd;
}

/* The first mask of the comma list both devices accept (0 when none is accepted). */
static unsigned long set_offloads(int a, int b, const char *ladder) {
    char *copy = strdup(ladder), *save = NULL;
    unsigned long got = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        unsigned long mask = strtoul(tok, NULL, 0);
        if (ioctl(a, TUNSETOFFLOAD, mask) == 0 && ioctl(b, TUNSETOFFLOAD, mask) == 0) {
            got = mask;
            break;
        }
    }
    free(copy);
    return got;
}

/* Move every packet `from` holds (at most BATCH) to `to`; a failed write is a drop. */
static void drain(int from, int to, char *buf) {
    for (int n = 0; n < BATCH; n++) {
        ssize_t len = read(from, buf, BUF_SIZE);
        if (len < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            die("read");
        }
        if (write(to, buf, (size_t)len) < 0 && errno != EAGAIN && errno != ENOBUFS &&
            errno != EINVAL && errno != EIO)
            die("write");
    }
}

static void *serve(void *arg) {
    struct pair *p = arg;
    if (p->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(p->cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    }
    char *buf = malloc(BUF_SIZE);
    if (!buf)
        die("malloc");
    struct pollfd fds[2] = {{.fd = p->a, .events = POLLIN}, {.fd = p->b, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        for (int i = 0; i < 2; i++) {
            if (fds[i].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                fprintf(stderr, "c_forward: a device went away\n");
                exit(1);
            }
            if (fds[i].revents & POLLIN)
                drain(fds[i].fd, fds[1 - i].fd, buf);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: c_forward DEV_A DEV_B QUEUES none|MASK,MASK... auto|none\n");
        return 2;
    }
    int queues = atoi(argv[3]);
    int offload = strcmp(argv[4], "none") != 0;
    int pin = strcmp(argv[5], "auto") == 0;
    if (queues < 1 || queues > MAX_QUEUES) {
        fprintf(stderr, "c_forward: QUEUES must be 1..%d\n", MAX_QUEUES);
        return 2;
    }
    int flags = IFF_TUN | IFF_NO_PI | (queues > 1 ? IFF_MULTI_QUEUE : 0) |
                (offload ? IFF_VNET_HDR : 0);
    static struct pair pairs[MAX_QUEUES];
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    for (int i = 0; i < queues; i++) {
        pairs[i].a = open_queue(argv[1], flags);
        pairs[i].b = open_queue(argv[2], flags);
        pairs[i].cpu = pin && ncpu > 0 ? (int)(i % ncpu) : -1;
    }
    if (offload)
        set_offloads(pairs[0].a, pairs[0].b, argv[4]);

    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop, NULL); /* the threads inherit it: main takes them */
    for (int i = 0; i < queues; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, serve, &pairs[i]) != 0)
            die("pthread_create");
    }
    printf("READY queues=%d\n", queues);
    fflush(stdout);
    int sig;
    sigwait(&stop, &sig);
    return 0;
}
