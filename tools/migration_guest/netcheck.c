/* netcheck: the migration test's guest traffic program (static, runs as the guest's only program).
 *
 * Sends raw Ethernet frames on one interface, one stream per sender thread, and receives them back
 * through a loopback device (vdpa-svq's soft:net, or QEMU's own backend looped to itself). Every byte
 * of a frame derives from its stream and sequence number, so the receiver can tell, frame by frame:
 *
 *   ok       the frame came back whole, in order;
 *   corrupt  a byte differs from what its sequence number says (a device write the destination never
 *            got: a missed dirty page shows up here);
 *   missing  a gap in a stream's sequence (a buffer lost), plus what never came back at the end;
 *   dup      a sequence number at or below one already seen (a buffer used twice, or reordered).
 *
 * The receiver reads in bursts, RX_HOLD_MS apart: between two, the frames received sit in the socket's
 * queue, in buffers only the device wrote, so whenever the VM stops for its migration some frames are
 * there, and the destination must have got every page the device wrote into them (with a receiver
 * that keeps up, the guest has read, and so dirtied, nearly everything by then, and a broken dirty
 * log would go unnoticed). A stream's sender keeps at most WINDOW frames in flight, so nothing is lost
 * to the guest's own socket buffers; after STALL_MS without progress it sends on anyway (and counts a stall): a lost frame must
 * not stop the stream. Each sender thread is pinned to one CPU, so with multiqueue (XPS maps queue i to
 * CPU i) each stream stays on one queue pair and its order is the device's FIFO order.
 *
 * Every PERIOD_MS one line "NETCHECK {json}" goes to stdout (the serial console). Commands on stdin:
 * "stop" ends the senders, waits DRAIN_MS for the frames in flight, counts what never came back as
 * missing and prints "NETCHECK-FINAL {json}"; the program then waits for the next command ("exit").
 *
 * usage: netcheck IFACE STREAMS [PERIOD_MS]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ETHERTYPE_NETCHECK 0x88B5 /* IEEE local experimental */
#define MAGIC 0x5653514Du         /* "VSQM" */
#define MAX_STREAMS 8
#define WINDOW 128
#define RX_HOLD_MS 10
#define STALL_MS 300
#define DRAIN_MS 2000
#define MIN_FRAME 60
#define MAX_FRAME 1514
#define CORRUPT_REPORTS 8

/* Frame: dst[6] src[6] type[2] | magic le32 | stream le16 | len le16 | seq le64 | body (derived bytes). */
#define HDR_LEN 14
#define META_LEN 16

struct stream {
    _Atomic uint64_t sent;      /* frames handed to the kernel */
    _Atomic uint64_t expected;  /* next sequence number the receiver waits for */
    _Atomic uint64_t stalls;
    int cpu;
    int index;
};

static struct stream streams[MAX_STREAMS];
static int nstreams;
static int sock_fd, ifindex;
static unsigned char mac[6];
static _Atomic int sending = 1;
static _Atomic uint64_t n_ok, n_corrupt, n_missing, n_dup, n_foreign, n_send_errors;
static int corrupt_reported;
static struct timespec t_start;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double elapsed_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)(ts.tv_sec - t_start.tv_sec) + (double)(ts.tv_nsec - t_start.tv_nsec) / 1e9;
}

/* splitmix64: the frame's bytes, a pure function of (stream, seq, position). */
static uint64_t mix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static unsigned frame_len(int stream, uint64_t seq)
{
    return MIN_FRAME + (unsigned)(mix(seq * MAX_STREAMS + (uint64_t)stream) % (MAX_FRAME - MIN_FRAME + 1));
}

static void fill_body(unsigned char *body, unsigned n, int stream, uint64_t seq)
{
    uint64_t state = mix(seq ^ ((uint64_t)stream << 56) ^ MAGIC);
    for (unsigned i = 0; i < n; i += 8) {
        state = mix(state);
        for (unsigned k = 0; k < 8 && i + k < n; k++)
            body[i + k] = (unsigned char)(state >> (8 * k));
    }
}

static void put16(unsigned char *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put32(unsigned char *p, uint32_t v) { put16(p, v); put16(p + 2, v >> 16); }
static void put64(unsigned char *p, uint64_t v) { put32(p, v); put32(p + 4, v >> 32); }
static uint16_t get16(const unsigned char *p) { return p[0] | p[1] << 8; }
static uint32_t get32(const unsigned char *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }
static uint64_t get64(const unsigned char *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }

static unsigned build_frame(unsigned char *f, int stream, uint64_t seq)
{
    unsigned len = frame_len(stream, seq);
    memcpy(f, mac, 6);
    memcpy(f + 6, mac, 6);
    f[12] = ETHERTYPE_NETCHECK >> 8;
    f[13] = ETHERTYPE_NETCHECK & 0xff;
    put32(f + HDR_LEN, MAGIC);
    put16(f + HDR_LEN + 4, (uint16_t)stream);
    put16(f + HDR_LEN + 6, (uint16_t)len);
    put64(f + HDR_LEN + 8, seq);
    fill_body(f + HDR_LEN + META_LEN, len - HDR_LEN - META_LEN, stream, seq);
    return len;
}

static unsigned rate; /* frames per second per stream; 0: as fast as the window allows */

static void *sender(void *arg)
{
    struct stream *s = arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(s->cpu, &set);
    sched_setaffinity(0, sizeof(set), &set); /* one stream, one CPU, one TX queue (XPS) */
    unsigned char frame[MAX_FRAME];
    struct sockaddr_ll to = {.sll_family = AF_PACKET, .sll_ifindex = ifindex, .sll_halen = 6};
    memcpy(to.sll_addr, mac, 6);
    uint64_t seq = 0, t0 = now_ns();
    while (atomic_load(&sending)) {
        if (rate) { /* paced: frame seq leaves at t0 + seq / rate */
            uint64_t due = t0 + seq * 1000000000ull / rate, now = now_ns();
            if (due > now)
                usleep((useconds_t)((due - now) / 1000));
        }
        uint64_t waited_from = now_ns(), progress = atomic_load(&s->expected);
        while (seq - atomic_load(&s->expected) >= WINDOW && atomic_load(&sending)) {
            uint64_t e = atomic_load(&s->expected);
            if (e != progress) {
                progress = e;
                waited_from = now_ns();
            } else if (now_ns() - waited_from > STALL_MS * 1000000ull) {
                atomic_fetch_add(&s->stalls, 1);
                break;
            }
            usleep(200);
        }
        if (!atomic_load(&sending))
            break;
        unsigned len = build_frame(frame, s->index, seq);
        if (sendto(sock_fd, frame, len, 0, (struct sockaddr *)&to, sizeof(to)) != (ssize_t)len) {
            atomic_fetch_add(&n_send_errors, 1); /* ENOBUFS and the like: the same frame again */
            usleep(1000);
            continue;
        }
        seq++;
        atomic_store(&s->sent, seq);
    }
    return NULL;
}

static void check_frame(const unsigned char *f, unsigned n)
{
    static unsigned char want[MAX_FRAME];
    if (n < HDR_LEN + META_LEN || get32(f + HDR_LEN) != MAGIC) {
        atomic_fetch_add(&n_foreign, 1);
        return;
    }
    int stream = get16(f + HDR_LEN + 4);
    uint64_t seq = get64(f + HDR_LEN + 8);
    unsigned len = get16(f + HDR_LEN + 6);
    int bad_at = -1;
    if (stream >= nstreams || len != n || len != frame_len(stream, seq)) {
        bad_at = HDR_LEN + 4;
    } else {
        build_frame(want, stream, seq);
        for (unsigned i = 0; i < n; i++)
            if (f[i] != want[i]) {
                bad_at = (int)i;
                break;
            }
    }
    if (bad_at >= 0) {
        atomic_fetch_add(&n_corrupt, 1);
        if (corrupt_reported++ < CORRUPT_REPORTS)
            printf("NETCHECK-CORRUPT {\"t\": %.3f, \"stream\": %d, \"seq\": %llu, \"len\": %u, \"first_bad_byte\": %d}\n",
                   elapsed_s(), stream, (unsigned long long)seq, n, bad_at);
        return;
    }
    struct stream *s = &streams[stream];
    uint64_t e = atomic_load(&s->expected);
    if (seq < e) {
        atomic_fetch_add(&n_dup, 1);
        return;
    }
    if (seq > e)
        atomic_fetch_add(&n_missing, seq - e);
    atomic_fetch_add(&n_ok, 1);
    atomic_store(&s->expected, seq + 1);
}

static void report(const char *tag, uint64_t missing_extra)
{
    uint64_t sent = 0, stalls = 0;
    for (int i = 0; i < nstreams; i++) {
        sent += atomic_load(&streams[i].sent);
        stalls += atomic_load(&streams[i].stalls);
    }
    printf("%s {\"t\": %.3f, \"streams\": %d, \"sent\": %llu, \"ok\": %llu, \"corrupt\": %llu, \"missing\": %llu, "
           "\"dup\": %llu, \"stalls\": %llu, \"send_errors\": %llu, \"foreign\": %llu}\n",
           tag, elapsed_s(), nstreams, (unsigned long long)sent, (unsigned long long)atomic_load(&n_ok),
           (unsigned long long)atomic_load(&n_corrupt),
           (unsigned long long)(atomic_load(&n_missing) + missing_extra), (unsigned long long)atomic_load(&n_dup),
           (unsigned long long)stalls, (unsigned long long)atomic_load(&n_send_errors),
           (unsigned long long)atomic_load(&n_foreign));
    fflush(stdout);
}

/* One poll round of up to `timeout_ms`, then every frame queued; true if a frame came. */
static int receive_for(int timeout_ms)
{
    static unsigned char buf[65536];
    struct pollfd p = {.fd = sock_fd, .events = POLLIN};
    if (poll(&p, 1, timeout_ms) <= 0)
        return 0;
    for (;;) {
        struct sockaddr_ll from;
        socklen_t fl = sizeof(from);
        ssize_t n = recvfrom(sock_fd, buf, sizeof(buf), MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
        if (n < 0)
            return 1;
        if (from.sll_pkttype == PACKET_OUTGOING)
            continue;
        check_frame(buf, (unsigned)n);
    }
}

static uint64_t outstanding(void)
{
    uint64_t left = 0;
    for (int i = 0; i < nstreams; i++) {
        uint64_t sent = atomic_load(&streams[i].sent), e = atomic_load(&streams[i].expected);
        left += sent > e ? sent - e : 0;
    }
    return left;
}

/* A command line from the console, or NULL: stdin is the serial port, read without blocking. */
static const char *command(void)
{
    static char line[64];
    static size_t have;
    struct pollfd p = {.fd = 0, .events = POLLIN};
    while (poll(&p, 1, 0) > 0) {
        char c;
        if (read(0, &c, 1) != 1)
            return NULL;
        if (c == '\n' || c == '\r') {
            line[have] = 0;
            have = 0;
            if (line[0])
                return line;
        } else if (have < sizeof(line) - 1) {
            line[have++] = c;
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: netcheck IFACE STREAMS [PERIOD_MS]\n");
        return 2;
    }
    nstreams = atoi(argv[2]);
    int period_ms = argc > 3 ? atoi(argv[3]) : 1000;
    rate = argc > 4 ? (unsigned)atoi(argv[4]) : 0;
    if (nstreams < 1 || nstreams > MAX_STREAMS) {
        fprintf(stderr, "netcheck: 1..%d streams\n", MAX_STREAMS);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    sock_fd = socket(AF_PACKET, SOCK_RAW, htons(ETHERTYPE_NETCHECK));
    if (sock_fd < 0) {
        perror("netcheck: socket(AF_PACKET)");
        return 1;
    }
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", argv[1]);
    if (ioctl(sock_fd, SIOCGIFINDEX, &ifr) < 0 || (ifindex = ifr.ifr_ifindex, ioctl(sock_fd, SIOCGIFHWADDR, &ifr)) < 0) {
        perror("netcheck: interface");
        return 1;
    }
    memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    struct sockaddr_ll me = {.sll_family = AF_PACKET, .sll_protocol = htons(ETHERTYPE_NETCHECK), .sll_ifindex = ifindex};
    if (bind(sock_fd, (struct sockaddr *)&me, sizeof(me)) < 0) {
        perror("netcheck: bind");
        return 1;
    }
    int rcvbuf = 4 << 20;
    setsockopt(sock_fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf));
    clock_gettime(CLOCK_MONOTONIC, &t_start);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    pthread_t threads[MAX_STREAMS];
    for (int i = 0; i < nstreams; i++) {
        streams[i].index = i;
        streams[i].cpu = (int)(i % (ncpu > 0 ? ncpu : 1));
        pthread_create(&threads[i], NULL, sender, &streams[i]);
    }
    printf("NETCHECK-START {\"iface\": \"%s\", \"streams\": %d, \"cpus\": %ld, \"window\": %d}\n", argv[1], nstreams,
           ncpu, WINDOW);
    uint64_t next_report = now_ns() + (uint64_t)period_ms * 1000000ull;
    int stopped = 0;
    for (;;) {
        if (receive_for(20))
            usleep(RX_HOLD_MS * 1000);
        const char *cmd = command();
        if (cmd && !strcmp(cmd, "stop") && !stopped) {
            stopped = 1;
            atomic_store(&sending, 0);
            for (int i = 0; i < nstreams; i++)
                pthread_join(threads[i], NULL);
            uint64_t until = now_ns() + DRAIN_MS * 1000000ull;
            while (outstanding() && now_ns() < until)
                receive_for(20);
            report("NETCHECK-FINAL", outstanding());
        } else if (cmd && !strcmp(cmd, "report")) {
            report("NETCHECK", 0);
        } else if (cmd && !strcmp(cmd, "exit")) {
            return 0;
        }
        if (!stopped && now_ns() >= next_report) {
            report("NETCHECK", 0);
            next_report = now_ns() + (uint64_t)period_ms * 1000000ull; /* not +=: a migration pauses the clock's reader */
        }
    }
}
