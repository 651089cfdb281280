/*
 * NetLoop: the soft net device's datapath in C (softdev/net.py:SoftNetDevice.process is the
 * reference). Its own extension, vdpa_svq.softdev._netloop: the soft device's C, apart from the
 * relay's. What it shares with the relay is the device side of a ring (a device's rings are what
 * the relay's guest ring is to the relay), which both take from _ring.h; of the relay itself it
 * calls nothing: a relay in the same process kicks it through a Python callable (kick()).
 *
 * The loopback: every TX frame comes back on RX with num_buffers = 1; a TX chain stays in its ring
 * while RX has no buffer; a frame shorter than the virtio-net header is dropped (TX completed).
 * With MRG_RXBUF negotiated, a frame that fits its first RX buffer is the same (num_buffers 1);
 * one that needs more buffers is spread over them (netloop_deliver_merged), or waits whole until
 * there are enough. A header RX cannot take as it is (net.py:_offload_for_rx: a checksum to
 * complete, a GSO frame to drop) is punted.
 *
 * Only the regular case runs here. A chain the Python datapath would fault on (a ring rule broken,
 * an IOVA its IOTLB does not map or does not allow, an indirect chain without INDIRECT_DESC, a
 * segment across two mappings) is left where it is, both rings as they were before it, and
 * service() returns NETLOOP_PUNT: the Python datapath takes that chain and raises its own fault,
 * with its own words.
 *
 * Ownership: attach() takes the rings' indexes from the Python rings; from then on this object
 * owns them and the Python rings are stale until detach() gives the indexes (and the counters
 * since attach) back. SoftNetDevice detaches whenever anyone takes its lock (a control operation)
 * and whenever the IOTLB changes; it attaches only with the lock held. Every method runs with the
 * GIL held and never releases it, so each is atomic to the Python threads: the relay's pump may
 * kick() from its thread, without the device lock, while the device's own thread sleeps.
 */
#include "../_ring.h" /* the one file of this extension that includes it (see there) */

#include <errno.h>
#include <unistd.h>

enum { NET_RX = 0, NET_TX = 1, NET_HDR_SIZE = 12, NET_NUM_BUFFERS_OFF = 10 };
/* The longest TX packet the device takes (net.py's NET_MAX_PACKET): header + the largest IP
 * datagram with an Ethernet header and one VLAN tag. A GSO frame is no longer (net.py says why),
 * so nothing legitimate is; a longer chain is dropped unread, and the staging buffer never grows
 * past twice this. */
enum { NET_MAX_PACKET = NET_HDR_SIZE + 65535 + 18 };
enum { NETLOOP_IDLE = 0, NETLOOP_PUNT = 1 };
/* net.py's RX_TAKES_* (attach's rx_takes), and the virtio_net_hdr values they are about (5.1.6). */
enum { RX_TAKES_CSUM = 1, RX_TAKES_TSO4 = 2, RX_TAKES_TSO6 = 4, RX_TAKES_ECN = 8 };
enum { HDR_GSO_NONE = 0, HDR_GSO_TCPV4 = 1, HDR_GSO_TCPV6 = 4, HDR_GSO_ECN = 0x80 };

typedef struct {
    unsigned long long chains, read_bytes, written_bytes, kicks, calls, dropped;
} NetQueueStats; /* softdev/queue.py:QueueStats, counted since attach */

typedef struct {
    PyObject_HEAD
    int loaded;
    int indirect_ok;
    int mrg_rxbuf; /* VIRTIO_NET_F_MRG_RXBUF negotiated: a frame bigger than its RX buffer is punted */
    int rx_takes;  /* RX_TAKES_*: the offloads RX acked (a header it cannot take as it is is punted) */
    MemTable mem;        /* the IOTLB as attach saw it: iova -> host, with permissions */
    MemTable areas[2];   /* each ring's three areas, as the Python ring translated them at start */
    DeviceSide q[2];     /* NET_RX, NET_TX */
    Chain chain[2];
    int call_fd[2];
    NetQueueStats st[2];
    PyObject *punt_kick; /* punt_kick(index): the Python datapath's kick, when this one cannot serve */
    uint8_t *pkt;        /* one frame on its way from TX to RX */
    size_t pkt_cap;
    Chain *more;         /* a merged frame's RX buffers after the first (chain[NET_RX]) */
    uint32_t more_cap;
} NetLoop;

static void netloop_unload(NetLoop *n)
{
    for (int i = 0; i < 2; i++) {
        Py_CLEAR(n->q[i].name);
        PyMem_Free(n->q[i].in_flight);
        memset(&n->q[i], 0, sizeof n->q[i]);
    }
    mem_table_release(&n->mem);
    mem_table_release(&n->areas[0]);
    mem_table_release(&n->areas[1]);
    n->loaded = 0;
}

/* What a pop changes of its ring, besides in_flight[] (a whole DeviceSide would be copied twice
 * per frame: measurably slower). */
typedef struct {
    uint32_t next_avail_idx;
    int avail_wrap_counter, broken;
    uint16_t last_avail_idx;
} PopMark;

static inline PopMark pop_mark(const DeviceSide *g)
{
    PopMark m = {g->next_avail_idx, g->avail_wrap_counter, g->broken, g->last_avail_idx};
    return m;
}

/* Take a chain back out of the ring as if it had never been popped (m: the mark before it). */
static void unpop(DeviceSide *g, const PopMark *m, const Chain *c, int popped)
{
    if (popped)
        g->in_flight[c->id] = 0;
    g->next_avail_idx = m->next_avail_idx;
    g->avail_wrap_counter = m->avail_wrap_counter;
    g->broken = m->broken;
    g->last_avail_idx = m->last_avail_idx;
}

/* Copy [src, +len) to n->pkt at offset `at`, growing it as needed. 0, or -1 to punt. */
static int netloop_stage(NetLoop *n, size_t at, const uint8_t *src, size_t len)
{
    if (at + len > n->pkt_cap) {
        size_t cap = (at + len) * 2;
        uint8_t *p = PyMem_Realloc(n->pkt, cap);
        if (p == NULL)
            return -1; /* the Python datapath will manage, or say why not */
        n->pkt = p;
        n->pkt_cap = cap;
    }
    memcpy(n->pkt + at, src, len);
    return 0;
}

/* The frame: the TX chain's readable segments, in order (chainio.gather). A frame in one segment
 * (the usual case) is used where it is; one in several is gathered into n->pkt. 0 with *frame and
 * *len, or -1 to punt. */
static int netloop_gather(NetLoop *n, const Chain *c, const uint8_t **frame, size_t *len)
{
    size_t total = 0;
    for (uint32_t i = 0; i < c->nsegs; i++)
        total += c->segs[i].write ? 0 : c->segs[i].len;
    if (total > NET_MAX_PACKET) { /* dropped unread: *len 0 says so */
        *frame = NULL;
        *len = 0;
        return 0;
    }
    total = 0;
    const uint8_t *only = NULL;
    int pieces = 0;
    for (uint32_t i = 0; i < c->nsegs; i++) {
        const Seg *sg = &c->segs[i];
        if (sg->write || sg->len == 0)
            continue;
        const uint8_t *src = mem_access(&n->mem, sg->addr, sg->len, PERM_READ);
        if (src == NULL)
            return -1;
        if (++pieces == 1) {
            only = src;
            total = sg->len;
            continue;
        }
        if (pieces == 2 && netloop_stage(n, 0, only, total) < 0)
            return -1;
        if (netloop_stage(n, total, src, sg->len) < 0)
            return -1;
        total += sg->len;
    }
    *frame = pieces > 1 ? n->pkt : only;
    *len = total;
    return 0;
}

/* The frame into the RX chain's writable segments, truncated to what fits (chainio.scatter), with
 * num_buffers = 1 in its header when set_num_buffers: without MRG_RXBUF the device MUST set it so
 * (5.1.6.4.1), and with it a frame that fits one buffer has 1 too.
 * Bytes written, or -1 to punt (the Python datapath then writes the same bytes up to its fault). */
static int64_t netloop_scatter(NetLoop *n, const Chain *c, const uint8_t *frame, size_t len, int set_num_buffers)
{
    static const uint8_t num_buffers_le[2] = {1, 0};
    size_t done = 0;
    for (uint32_t i = 0; i < c->nsegs && done < len; i++) {
        const Seg *sg = &c->segs[i];
        if (!sg->write)
            continue;
        size_t k = sg->len < len - done ? sg->len : len - done;
        if (k == 0)
            continue;
        uint8_t *dst = mem_access(&n->mem, sg->addr, k, PERM_WRITE);
        if (dst == NULL)
            return -1;
        memmove(dst, frame + done, k); /* a driver may hand the same memory to TX and RX */
        for (size_t o = NET_NUM_BUFFERS_OFF; set_num_buffers && o < NET_NUM_BUFFERS_OFF + 2 && done < NET_HDR_SIZE; o++)
            if (done <= o && o < done + k)
                dst[o - done] = num_buffers_le[o - NET_NUM_BUFFERS_OFF];
        done += k;
    }
    return (int64_t)done;
}

/* mirrors net.py:SoftNetDevice._offload_for_rx: whether RX takes this header as it is (else the
 * Python datapath completes the checksum, or drops the GSO frame). */
static int netloop_header_passes(const NetLoop *n, const uint8_t *hdr)
{
    uint8_t flags = hdr[0], gso_type = hdr[1];
    if (gso_type != HDR_GSO_NONE) {
        uint8_t gso = gso_type & (uint8_t)~HDR_GSO_ECN;
        int takes = (gso == HDR_GSO_TCPV4 && (n->rx_takes & RX_TAKES_TSO4)) ||
                    (gso == HDR_GSO_TCPV6 && (n->rx_takes & RX_TAKES_TSO6));
        return takes && (!(gso_type & HDR_GSO_ECN) || (n->rx_takes & RX_TAKES_ECN));
    }
    return flags == 0 || (n->rx_takes & RX_TAKES_CSUM);
}

/* Ask for the line in exclusive state: the RX buffer's lines are in the driver's CPU cache,
 * shared at best, and a store would wait for that copy to be invalidated. __builtin_prefetch(p, 1)
 * is a plain read prefetch unless the target has PRFCHW; PREFETCHW decodes as a NOP where absent. */
static inline void prefetch_for_write(const void *p)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ volatile("prefetchw %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 1);
#endif
}

/* How many chains ahead of the copy their buffers are fetched: 4 measured 2-3% better than 1,
 * 8 no better than 4 (paired runs of serve soft:net). */
enum { NETLOOP_PREFETCH_AHEAD = 4 };

/* Start fetching the first buffer of the chain `ahead` places after the next one (0: the next one;
 * counting one descriptor a chain, as frames mostly are): its bytes are in the driver's CPU cache,
 * and the copy would wait for them. A peek only: nothing read here is trusted or kept, and an
 * address outside the IOTLB is skipped. */
static void netloop_prefetch(NetLoop *n, const DeviceSide *g, int write, uint32_t ahead)
{
    const uint8_t *d;
    if (g->packed) {
        uint32_t slot = g->next_avail_idx + ahead;
        int wrap = g->avail_wrap_counter;
        if (slot >= g->num) {
            slot -= g->num;
            wrap ^= 1;
        }
        if (slot >= g->num || !is_avail_packed(g, slot, wrap))
            return;
        d = g->desc + (size_t)slot * DESC_SIZE;
    } else {
        if ((uint16_t)(ld16(g->driver + AVAIL_IDX) - g->last_avail_idx) <= ahead)
            return;
        uint16_t head = ld16(g->driver + AVAIL_RING + 2 * ring_slot(g->last_avail_idx + ahead, g->num));
        if (head >= g->num)
            return;
        d = g->desc + (size_t)head * DESC_SIZE;
    }
    uint32_t len = ld32(d + DESC_LEN_OFF);
    len = len < 128 ? len : 128; /* a small frame and its header span two lines */
    const uint8_t *p = mem_view(&n->mem, ld64(d), len);
    if (p == NULL || len == 0)
        return;
    const uint8_t *last = p + len - 1;
    if (write) {
        prefetch_for_write(p);
        prefetch_for_write(last);
    } else {
        __builtin_prefetch(p, 0);
        __builtin_prefetch(last, 0);
    }
}

/* The used element of chain c, staged: netloop_process publishes every staged one of a ring at once,
 * when it returns (one used->idx store, or one head's flags, per pass rather than per frame). */
static void netloop_stage_used(DeviceSide *g, const Chain *c, uint32_t written)
{
    Token t = {.id = c->id, .ndescs = c->ndescs, .writable_bytes = c->writable_bytes};
    Piece spans[1];
    guest_stage_used(g, &t, written, spans);
}

/* Slot i of the chains a merged frame takes after its first, made as needed; NULL: no memory. */
static Chain *netloop_more_chain(NetLoop *n, uint32_t i)
{
    if (i >= n->more_cap) {
        uint32_t cap = n->more_cap ? n->more_cap * 2 : 8;
        Chain *p = PyMem_Realloc(n->more, (size_t)cap * sizeof(Chain));
        if (p == NULL)
            return NULL;
        memset(p + n->more_cap, 0, (size_t)(cap - n->more_cap) * sizeof(Chain));
        n->more = p;
        n->more_cap = cap;
    }
    Chain *c = &n->more[i];
    if (c->segs == NULL) {
        c->segs = PyMem_Calloc(64, sizeof(Seg));
        if (c->segs == NULL)
            return NULL;
        c->cap = 64;
    }
    return c;
}

enum { MRG_DELIVERED, MRG_DROPPED, MRG_HELD, MRG_PUNT };

/* mirrors net.py:SoftNetDevice._deliver_merged (with _take_rx_buffers and _push_together), for a
 * frame longer than its first RX buffer `rc` (popped already; rx0: the RX mark before it): the
 * next buffers popped until they hold it, the frame written across them in ring order, each but
 * the last to its full length, num_buffers in the first header, and their used elements
 * published at once (5.1.6.4.1). MRG_HELD (too few yet), MRG_DROPPED (every descriptor of the
 * ring is not enough) and MRG_PUNT (for the Python datapath) leave every RX buffer in its ring. */
static int netloop_deliver_merged(NetLoop *n, const Chain *rc, const PopMark *rx0, const uint8_t *frame, size_t len)
{
    DeviceSide *rx = &n->q[NET_RX];
    uint64_t room = rc->writable_bytes, descs = rc->ndescs;
    uint32_t more = 0;
    int outcome = MRG_DELIVERED;
    while (room < len) {
        Chain *c = netloop_more_chain(n, more);
        int r = c == NULL ? -1 : guest_pop(rx, c);
        if (r == 0) {
            outcome = descs < rx->num ? MRG_HELD : MRG_DROPPED;
            break;
        }
        if (r < 0) {
            outcome = MRG_PUNT;
            break;
        }
        more++;
        if ((c->indirect && !n->indirect_ok) || c->writable_bytes < NET_HDR_SIZE) {
            outcome = MRG_PUNT;
            break;
        }
        room += c->writable_bytes;
        descs += c->ndescs;
    }
    /* Out of the TX buffer first (a driver may hand the same memory to TX and RX), and
     * num_buffers into the copy's header. */
    if (outcome == MRG_DELIVERED && frame != n->pkt && netloop_stage(n, 0, frame, len) < 0)
        outcome = MRG_PUNT;
    if (outcome == MRG_DELIVERED) {
        n->pkt[NET_NUM_BUFFERS_OFF] = (uint8_t)(more + 1);
        n->pkt[NET_NUM_BUFFERS_OFF + 1] = (uint8_t)((more + 1) >> 8);
        size_t done = 0;
        for (uint32_t i = 0; i <= more && outcome == MRG_DELIVERED; i++) {
            int64_t w = netloop_scatter(n, i ? &n->more[i - 1] : rc, n->pkt + done, len - done, 0);
            if (w < 0)
                outcome = MRG_PUNT;
            else
                done += (size_t)w;
        }
    }
    if (outcome != MRG_DELIVERED) {
        for (uint32_t i = 0; i < more; i++)
            rx->in_flight[n->more[i].id] = 0;
        unpop(rx, rx0, rc, 1);
        return outcome;
    }
    size_t done = 0;
    Piece spans[1];
    for (uint32_t i = 0; i <= more; i++) {
        const Chain *c = i ? &n->more[i - 1] : rc;
        size_t w = c->writable_bytes < len - done ? c->writable_bytes : len - done;
        Token t = {.id = c->id, .ndescs = c->ndescs, .writable_bytes = c->writable_bytes};
        guest_stage_used(rx, &t, (uint32_t)w, spans);
        done += w;
    }
    guest_publish_used(rx, spans);
    n->st[NET_RX].chains += more + 1;
    n->st[NET_RX].written_bytes += len;
    return MRG_DELIVERED;
}

/* netloop_process's frames, their used elements staged (the caller publishes them). */
static int netloop_process_frames(NetLoop *n)
{
    DeviceSide *rx = &n->q[NET_RX], *tx = &n->q[NET_TX];
    Chain *tc = &n->chain[NET_TX], *rc = &n->chain[NET_RX];
    int progress = 0;
    const uint32_t ahead = NETLOOP_PREFETCH_AHEAD;
    if (!guest_has_avail(tx))
        return 0; /* the usual second pass of a service: nothing to fetch ahead for */
    for (uint32_t k = 0; k < ahead; k++) {
        netloop_prefetch(n, tx, 0, k);
        netloop_prefetch(n, rx, 1, k);
    }
    while (guest_has_avail(tx)) {
        if (!guest_has_avail(rx))
            break; /* hold: the frame stays in the TX ring until RX buffers arrive */
        PopMark tx0 = pop_mark(tx), rx0 = pop_mark(rx);
        int tx_popped = 0, rx_popped = 0;
        size_t len = 0;
        const uint8_t *frame = NULL;
        int64_t written = -1;
        if (guest_pop(tx, tc) != 1 || (tc->indirect && !n->indirect_ok))
            goto punt;
        tx_popped = 1;
        netloop_prefetch(n, tx, 0, ahead - 1);
        if (netloop_gather(n, tc, &frame, &len) < 0)
            goto punt;
        if (len >= NET_HDR_SIZE) {
            if (!netloop_header_passes(n, frame))
                goto punt;
            if (guest_pop(rx, rc) != 1 || (rc->indirect && !n->indirect_ok))
                goto punt;
            rx_popped = 1;
            if (n->mrg_rxbuf && rc->writable_bytes < NET_HDR_SIZE)
                goto punt; /* the driver broke 5.1.6.3.1: the Python datapath says so, breaking RX */
            if (n->mrg_rxbuf && rc->writable_bytes < len) {
                int r = netloop_deliver_merged(n, rc, &rx0, frame, len);
                rx_popped = 0; /* used, or back in its ring */
                if (r == MRG_PUNT)
                    goto punt;
                if (r == MRG_HELD) {
                    unpop(tx, &tx0, tc, 1); /* the frame waits whole in the TX ring */
                    break;
                }
                if (r == MRG_DROPPED)
                    n->st[NET_TX].dropped++;
                goto tx_done;
            }
            netloop_prefetch(n, rx, 1, ahead - 1);
            /* Into several RX segments, a frame read in place could be overwritten by the first
             * before the next reads it (a driver may hand the same memory to TX and RX): copy it
             * out first, as the Python datapath does every frame. */
            if (rc->nsegs > 1 && frame != n->pkt) {
                if (netloop_stage(n, 0, frame, len) < 0)
                    goto punt;
                frame = n->pkt;
            }
            written = netloop_scatter(n, rc, frame, len, 1);
            if (written < 0)
                goto punt;
            netloop_stage_used(rx, rc, (uint32_t)written);
            n->st[NET_RX].chains++;
            n->st[NET_RX].written_bytes += (unsigned long long)written;
        } else {
            n->st[NET_TX].dropped++;
        }
    tx_done:
        netloop_stage_used(tx, tc, 0);
        n->st[NET_TX].chains++;
        n->st[NET_TX].read_bytes += len;
        progress = 1;
        continue;
    punt:
        PyErr_Clear(); /* a pop's RingError: the Python datapath will raise it again, for real */
        unpop(rx, &rx0, rc, rx_popped);
        unpop(tx, &tx0, tc, tx_popped);
        return NETLOOP_PUNT + 1;
    }
    return progress;
}

/* mirrors net.py:SoftNetDevice.process: 1 if a frame moved, 0 if none, NETLOOP_PUNT + 1 to punt.
 * What it used, it publishes on every way out: a punted chain's predecessors are done. */
static int netloop_process(NetLoop *n)
{
    guest_pop_burst(&n->q[NET_RX]);
    guest_pop_burst(&n->q[NET_TX]);
    int r = netloop_process_frames(n);
    Piece spans[1];
    guest_publish_used(&n->q[NET_RX], spans);
    guest_publish_used(&n->q[NET_TX], spans);
    return r;
}

/* mirrors datapath.py:Datapath.signal */
static int netloop_signal(NetLoop *n)
{
    for (int i = 0; i < 2; i++) {
        if (!guest_need_notify(&n->q[i]) || n->call_fd[i] < 0)
            continue;
        uint64_t one = 1;
        if (write(n->call_fd[i], &one, sizeof one) < 0 && errno != EAGAIN) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        n->st[i].calls++;
    }
    return 0;
}

/* mirrors datapath.py:Datapath.service: process until idle, with the no-lost-kick dance.
 * NETLOOP_IDLE, NETLOOP_PUNT, or -1 with an exception. */
static int netloop_service(NetLoop *n)
{
    for (;;) {
        for (int i = 0; i < 2; i++)
            guest_disable_notify(&n->q[i]);
        int r = netloop_process(n);
        if (r > NETLOOP_PUNT)
            return NETLOOP_PUNT;
        if (netloop_signal(n) < 0)
            return -1;
        for (int i = 0; i < 2; i++)
            guest_enable_notify(&n->q[i]);
        r = netloop_process(n);
        if (r > NETLOOP_PUNT)
            return NETLOOP_PUNT;
        if (r == 0)
            return netloop_signal(n) < 0 ? -1 : NETLOOP_IDLE;
    }
}

/* attach(rx_spec, tx_spec, regions, (rx_call_fd, tx_call_fd), indirect_ok, mrg_rxbuf=False,
 * rx_takes=0): the specs as the C relay's guest spec (cinputs.device_ring_spec), whose regions
 * are the ring's three areas as the Python ring holds them (translated when the ring started, as
 * a device does at DRIVER_OK); regions: the IOTLB, as (iova, size, buffer, perm), for the
 * buffers; mrg_rxbuf: VIRTIO_NET_F_MRG_RXBUF negotiated; rx_takes: net.py's RX_TAKES_* bits. */
static PyObject *netloop_attach(NetLoop *n, PyObject *args)
{
    PyObject *specs[2], *regions;
    int indirect_ok, mrg_rxbuf = 0, rx_takes = 0;
    if (n->loaded) {
        PyErr_SetString(PyExc_RuntimeError, "NetLoop is attached already");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!O(ii)p|pi", &PyTuple_Type, &specs[NET_RX], &PyTuple_Type, &specs[NET_TX],
                          &regions, &n->call_fd[NET_RX], &n->call_fd[NET_TX], &indirect_ok, &mrg_rxbuf,
                          &rx_takes))
        return NULL;
    if (mem_table_init(&n->mem, regions) < 0)
        goto fail;
    for (int i = 0; i < 2; i++) {
        if (PyTuple_GET_SIZE(specs[i]) != 10) {
            PyErr_SetString(PyExc_TypeError, "a ring spec is a tuple of 10");
            goto fail;
        }
        if (mem_table_init(&n->areas[i], PyTuple_GET_ITEM(specs[i], 7)) < 0 ||
            device_side_setup(&n->q[i], &n->mem, &n->areas[i], specs[i]) < 0)
            goto fail;
        if (n->chain[i].segs == NULL) {
            n->chain[i].cap = 64;
            n->chain[i].segs = PyMem_Calloc(n->chain[i].cap, sizeof(Seg));
            if (n->chain[i].segs == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
        }
    }
    n->indirect_ok = indirect_ok;
    n->mrg_rxbuf = mrg_rxbuf;
    n->rx_takes = rx_takes;
    memset(n->st, 0, sizeof n->st);
    n->loaded = 1;
    Py_RETURN_NONE;
fail:
    netloop_unload(n);
    return NULL;
}

static PyObject *device_side_state(const DeviceSide *g)
{
    if (g->packed)
        return Py_BuildValue("{s:I,s:i,s:I,s:i,s:K}", "next_avail_idx", g->next_avail_idx, "avail_wrap_counter",
                             g->avail_wrap_counter, "next_used_idx", g->next_used_idx, "used_wrap_counter",
                             g->used_wrap_counter, "used_since_signal", (unsigned long long)g->used_since_signal);
    return Py_BuildValue("{s:H,s:H,s:H}", "last_avail_idx", g->last_avail_idx, "used_idx", g->used_idx,
                         "signalled_used", g->signalled_used);
}

static PyObject *net_stats(const NetQueueStats *s)
{
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K}", "chains", s->chains, "read_bytes", s->read_bytes,
                         "written_bytes", s->written_bytes, "kicks", s->kicks, "calls", s->calls, "dropped",
                         s->dropped);
}

/* detach() -> ((rx_state, tx_state), (rx_counts, tx_counts)): each ring's device-side state as
 * it stands now, under the names of its export_state() record (what the Python ring's
 * import_state() takes: last_avail_idx, used_idx, signalled_used / next_avail_idx,
 * avail_wrap_counter, next_used_idx, used_wrap_counter, used_since_signal), and the QueueStats
 * counts since attach; None when not attached. */
static PyObject *netloop_detach(NetLoop *n, PyObject *Py_UNUSED(ignored))
{
    if (!n->loaded)
        Py_RETURN_NONE;
    PyObject *out = Py_BuildValue("((NN)(NN))", device_side_state(&n->q[NET_RX]), device_side_state(&n->q[NET_TX]),
                                  net_stats(&n->st[NET_RX]), net_stats(&n->st[NET_TX]));
    netloop_unload(n);
    return out;
}

static PyObject *netloop_service_py(NetLoop *n, PyObject *Py_UNUSED(ignored))
{
    if (!n->loaded) {
        PyErr_SetString(PyExc_RuntimeError, "NetLoop is not attached");
        return NULL;
    }
    int r = netloop_service(n);
    return r < 0 ? NULL : PyLong_FromLong(r);
}

/* The kick of queue `index` from a driver in this process (the relay), served right here: no
 * eventfd, no thread wake-up. When not attached, or when a chain needs the Python datapath, the
 * kick goes the ordinary way (punt_kick) and the device's thread takes it. */
static PyObject *netloop_kick(NetLoop *n, PyObject *arg)
{
    long index = PyLong_AsLong(arg);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (index != NET_RX && index != NET_TX) {
        PyErr_Format(PyExc_ValueError, "queue %ld: the loopback has rx (0) and tx (1)", index);
        return NULL;
    }
    if (n->loaded) {
        n->st[index].kicks++;
        int r = netloop_service(n);
        if (r < 0)
            return NULL;
        if (r == NETLOOP_IDLE)
            Py_RETURN_NONE;
        n->st[index].kicks--; /* counted again where the punted kick lands */
    }
    return PyObject_CallOneArg(n->punt_kick, arg);
}

static int netloop_init(NetLoop *n, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"punt_kick", NULL};
    PyObject *punt;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &punt))
        return -1;
    if (!PyCallable_Check(punt)) {
        PyErr_SetString(PyExc_TypeError, "punt_kick must be callable");
        return -1;
    }
    Py_XSETREF(n->punt_kick, Py_NewRef(punt));
    return 0;
}

static int netloop_traverse(NetLoop *n, visitproc visit, void *arg)
{
    Py_VISIT(n->punt_kick);
    return 0;
}

static int netloop_clear(NetLoop *n)
{
    Py_CLEAR(n->punt_kick);
    return 0;
}

static void netloop_dealloc(NetLoop *n)
{
    PyObject_GC_UnTrack(n);
    netloop_unload(n);
    netloop_clear(n);
    for (int i = 0; i < 2; i++)
        PyMem_Free(n->chain[i].segs);
    for (uint32_t i = 0; i < n->more_cap; i++)
        PyMem_Free(n->more[i].segs);
    PyMem_Free(n->more);
    PyMem_Free(n->pkt);
    Py_TYPE(n)->tp_free((PyObject *)n);
}

static PyObject *netloop_get_loaded(NetLoop *n, void *Py_UNUSED(closure)) { return PyBool_FromLong(n->loaded); }

static PyMethodDef netloop_methods[] = {
    {"attach", (PyCFunction)netloop_attach, METH_VARARGS,
     "attach(rx_spec, tx_spec, regions, (rx_call_fd, tx_call_fd), indirect_ok, mrg_rxbuf=False, rx_takes=0): "
     "take over the rings."},
    {"detach", (PyCFunction)netloop_detach, METH_NOARGS,
     "Give the rings back: ((rx_state, tx_state), (rx_counts, tx_counts)), or None."},
    {"service", (PyCFunction)netloop_service_py, METH_NOARGS,
     "Process until idle: 0, or 1 when a chain needs the Python datapath (left in its ring)."},
    {"kick", (PyCFunction)netloop_kick, METH_O, "kick(index): a driver's kick, served inline when attached."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef netloop_getset[] = {
    {"loaded", (getter)netloop_get_loaded, NULL, "Whether it owns the rings (attached).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject NetLoopType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vdpa_svq.softdev._netloop.NetLoop",
    .tp_basicsize = sizeof(NetLoop),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The soft net device's loopback datapath in C (softdev/net.py is the reference).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)netloop_init,
    .tp_dealloc = (destructor)netloop_dealloc,
    .tp_traverse = (traverseproc)netloop_traverse,
    .tp_clear = (inquiry)netloop_clear,
    .tp_methods = netloop_methods,
    .tp_getset = netloop_getset,
};

static struct PyModuleDef netloop_module = {
    PyModuleDef_HEAD_INIT, .m_name = "vdpa_svq.softdev._netloop",
    .m_doc = "The soft net device's loopback in C; vdpa_svq.softdev.net is the reference.", .m_size = -1,
};

PyMODINIT_FUNC PyInit__netloop(void)
{
    if (ring_errors_import() < 0)
        return NULL;
    if (PyType_Ready(&NetLoopType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&netloop_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "NetLoop", (PyObject *)&NetLoopType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
