/*
 * Burst: the measuring loop of bench/latency.py's frontend in C (measure() there is the reference,
 * vdpa_svq/guest/burst.py the Python side that sets it up). A virtio-net driver's datapath only:
 * the control plane (memory, rings, kick/call fds, RX buffers posted) stays in Python; this object
 * takes over the driver side of an RX and a TX ring, split or packed (VIRTIO 1.2 2.7, 2.8), and
 * runs on a busy clock with the GIL released: every period it makes `burst` frames available on TX
 * (virtio-net header and frame in two descriptors, as the Python frontend chains them), kicks when the ring asks for it, busy-polls both used rings, checks every returned
 * frame byte for byte, reposts its RX buffer, and records each frame's round trip.
 *
 * Its own driver side, not _ring.h's device side; the rules are vdpa_svq/ring/split.py's and
 * packed.py's: never read back what we wrote (our copies of ids, addresses and lengths are the
 * truth), and check every value the device writes (used idx, id, length, flags) before using it.
 * A bad value ends the run with a RingError naming the ring and the value; nothing the device
 * writes is used as an address or an index unchecked. Like the Python frontend, it leaves used
 * buffer notifications on (with EVENT_IDX it moves used_event / off_wrap after each reap), so a
 * backend is asked for the same calls whichever frontend runs: only the frontend's cost differs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../_ring_access.h"

enum { NET_HDR = 12, SEQ_OFF = 14 + 4 }; /* the seq (le32) of frames.py's frames: Ethernet header, MAGIC */
enum { F_NEXT = 1, F_WRITE = 2, P_AVAIL = 1 << 7, P_USED = 1 << 15 };
enum { NO_NOTIFY = 1, EV_ENABLE = 0, EV_DISABLE = 1, EV_DESC = 2 };

static PyObject *RingError;

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.perf_counter_ns reads */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The driver side of one ring. Split: `avail` is the driver area, `used` the device area; indexes
 * are free-running. Packed: `drv_ev` / `dev_ev` the event suppression areas; indexes are slots. */
typedef struct {
    const char *name;
    int packed, event_idx, kick_fd;
    uint16_t num;
    uint8_t *desc, *avail, *used;
    uint8_t *drv_ev, *dev_ev; /* packed: le16 off_wrap, le16 flags */
    uint16_t avail_idx, avail_wrap; /* split: avail_idx_shadow; packed: next_avail_idx + counter */
    uint16_t last_used, used_wrap;
    uint32_t num_added;      /* made available since the last kick decision */
    uint16_t *free_ids;      /* a stack of the ids (split: heads) not in flight */
    uint32_t nfree;
    uint8_t *in_use;         /* per id: in flight */
    uint64_t *addr;          /* per id: the buffer's guest address (ours, never read back) */
    uint32_t *writable;      /* per id: device-writable bytes */
    uint8_t *count;          /* per id: descriptors (ring slots) its chain took */
    uint32_t slots_free;     /* descriptors (split) / slots (packed) free */
} Ring;

static int ring_fail(char *err, const Ring *r, const char *what, unsigned long long v)
{
    snprintf(err, 256, "%s: %s %llu", r->name, what, v);
    return -1;
}

/* Make buffer `id` available (2.7.13 / 2.8.21): `len` bytes at `gpa`, in one descriptor, or with
 * `hdr` > 0 in two, the first `hdr` bytes then the rest: header and frame, as NetDriver.send chains
 * them (so that the backend relays the same chains whichever frontend runs). A split chain of two
 * takes descriptors id and id + 1 (TX heads are even); a packed one the next two slots. */
static void ring_add(Ring *r, uint16_t id, uint64_t gpa, uint32_t len, uint16_t flags, uint32_t hdr)
{
    int n = hdr ? 2 : 1;
    uint64_t addr[2] = {gpa, gpa + hdr};
    uint32_t lens[2] = {hdr ? hdr : len, len - hdr};
    r->in_use[id] = 1;
    r->addr[id] = gpa;
    r->writable[id] = flags & F_WRITE ? len : 0;
    r->count[id] = (uint8_t)n;
    r->slots_free -= n;
    if (!r->packed) {
        for (int i = 0; i < n; i++) {
            uint8_t *d = r->desc + 16 * (size_t)(id + i);
            uint16_t f = flags | (i + 1 < n ? F_NEXT : 0), next = i + 1 < n ? id + i + 1 : 0;
            memcpy(d, &addr[i], 8);
            memcpy(d + 8, &lens[i], 4);
            memcpy(d + 12, &f, 2);
            memcpy(d + 14, &next, 2);
        }
        st16(r->avail + 4 + 2 * (r->avail_idx % r->num), id);
        wmb(); /* the entry and its descriptors before the index that publishes them */
        r->avail_idx++;
        st16(r->avail + 2, r->avail_idx);
        r->num_added++; /* split counts chains, packed slots (as the Python rings do) */
        return;
    }
    uint16_t head = r->avail_idx, head_flags = 0;
    for (int i = 0; i < n; i++) {
        uint8_t *d = r->desc + 16 * (size_t)r->avail_idx;
        uint16_t f = flags | (i + 1 < n ? F_NEXT : 0) | (r->avail_wrap ? P_AVAIL : P_USED);
        memcpy(d, &addr[i], 8);
        memcpy(d + 8, &lens[i], 4);
        memcpy(d + 12, &id, 2);
        if (i == 0)
            head_flags = f; /* the head last, below */
        else
            st16(d + 14, f);
        if (++r->avail_idx == r->num) {
            r->avail_idx = 0;
            r->avail_wrap ^= 1;
        }
    }
    wmb(); /* the rest of the chain before the head's flags make it available (2.8.21.1) */
    st16(r->desc + 16 * (size_t)head + 14, head_flags);
    r->num_added += n;
}

/* Whether the device wants a kick for what was added since the last call (2.7.10, 2.8.10). */
static int ring_kick_needed(Ring *r)
{
    mb(); /* the new index / flags visible before we read the device's suppression state */
    uint32_t added = r->num_added;
    r->num_added = 0;
    if (!added)
        return 0;
    if (!r->packed) {
        if (r->event_idx)
            return need_event(ld16(r->used + 4 + 8 * (size_t)r->num), r->avail_idx, (uint16_t)(r->avail_idx - added));
        return !(ld16(r->used) & NO_NOTIFY);
    }
    uint16_t flags = ld16(r->dev_ev + 2), off_wrap = ld16(r->dev_ev);
    if (flags == EV_DESC && r->event_idx) { /* event.py:packed_need_event */
        if (added >= r->num)
            return 1;
        uint16_t event = off_wrap & 0x7fff;
        if ((off_wrap >> 15) != r->avail_wrap)
            event -= r->num;
        return need_event(event, r->avail_idx, (uint16_t)(r->avail_idx - added));
    }
    return flags != EV_DISABLE;
}

static inline int ring_has_used(const Ring *r)
{
    if (!r->packed)
        return ld16(r->used + 2) != r->last_used;
    uint16_t f = ld16(r->desc + 16 * (size_t)r->last_used + 14);
    return !!(f & P_AVAIL) == !!(f & P_USED) && !!(f & P_AVAIL) == r->used_wrap;
}

/* The next used buffer: 1 and its id and written length, 0 if none, -1 (err set) if the device
 * wrote something no buffer of ours can be. */
static int ring_get_used(Ring *r, uint16_t *id_out, uint32_t *len_out, char *err)
{
    uint32_t id, len;
    if (!ring_has_used(r))
        return 0;
    if (!r->packed) {
        uint16_t used_idx = ld16(r->used + 2);
        if ((uint16_t)(used_idx - r->last_used) > r->num)
            return ring_fail(err, r, "used idx jumped to", used_idx);
        rmb(); /* the element only after the index said it is there */
        const uint8_t *e = r->used + 4 + 8 * (size_t)(r->last_used % r->num);
        memcpy(&id, e, 4);
        memcpy(&len, e + 4, 4);
    } else {
        rmb(); /* id and len only after the flags said the descriptor is used */
        const uint8_t *d = r->desc + 16 * (size_t)r->last_used;
        uint16_t id16;
        memcpy(&len, d + 8, 4);
        memcpy(&id16, d + 12, 2);
        id = id16;
    }
    if (id >= r->num)
        return ring_fail(err, r, "used id out of range:", id);
    if (!r->in_use[id])
        return ring_fail(err, r, "used id not in flight:", id);
    if (r->writable[id] == 0)
        len = 0; /* nothing writable, nothing written (split.py says why) */
    else if (len > r->writable[id])
        return ring_fail(err, r, "used length beyond the buffer's writable bytes:", len);
    r->in_use[id] = 0;
    r->free_ids[r->nfree++] = (uint16_t)id;
    r->slots_free += r->count[id];
    if (!r->packed) {
        r->last_used++;
    } else if ((r->last_used += r->count[id]) >= r->num) {
        r->last_used -= r->num;
        r->used_wrap ^= 1;
    }
    *id_out = (uint16_t)id;
    *len_out = len;
    return 1;
}

/* After a reap, with EVENT_IDX: ask for a call at the next used buffer, as the Python rings do. */
static void ring_reaped(Ring *r)
{
    if (!r->event_idx)
        return;
    if (!r->packed)
        st16(r->avail + 4 + 2 * (size_t)r->num, r->last_used);
    else
        st16(r->drv_ev, (uint16_t)(r->last_used | r->used_wrap << 15));
    mb();
}

typedef struct {
    PyObject_HEAD
    Py_buffer mem, frames;
    int have_mem, have_frames, running, broken;
    uint64_t base;
    Ring q[2]; /* RX, TX */
    size_t frame_len, nframes;
    int64_t period, next_send;
    uint64_t seq;
    int burst, started;
    unsigned long long limit; /* counted frames to send at most (0: no limit); a run ends once all are back */
    long long last_k;         /* the frame index returned last (-1: none yet) */
    unsigned long long reordered; /* frames that did not come back right after the one sent before them */
    int64_t *sent_at; /* per frame index: when it was made available in a counted run, else 0 */
    int64_t *rtts;
    size_t nrtts, cap;
    unsigned long long sent, late, full, kicks, fe_ns, outstanding;
    char err[256];
} Burst;

static int kick(Burst *b, int qi, int counting)
{
    static const uint64_t one = 1;
    if (!ring_kick_needed(&b->q[qi]))
        return 0;
    if (write(b->q[qi].kick_fd, &one, 8) < 0 && errno != EAGAIN) /* EAGAIN: the counter is full, kicked anyway */
        return snprintf(b->err, sizeof b->err, "%s: kick failed: %s", b->q[qi].name, strerror(errno)), -1;
    b->kicks += counting;
    return 0;
}

static int record(Burst *b, int64_t rtt)
{
    if (b->nrtts == b->cap) {
        size_t cap = b->cap ? 2 * b->cap : 65536;
        int64_t *p = realloc(b->rtts, cap * sizeof *p);
        if (!p)
            return snprintf(b->err, sizeof b->err, "out of memory for round trips"), -1;
        b->rtts = p;
        b->cap = cap;
    }
    b->rtts[b->nrtts++] = rtt;
    return 0;
}

/* Reap both rings (TX first, as NetDriver.reap): each RX frame checked and its buffer reposted. */
static int reap(Burst *b, int64_t got, int counting)
{
    Ring *rx = &b->q[0], *tx = &b->q[1];
    uint16_t id;
    uint32_t len;
    int rc, reposted = 0;
    while ((rc = ring_get_used(tx, &id, &len, b->err)) > 0)
        ;
    if (rc < 0)
        return -1;
    ring_reaped(tx);
    const uint8_t *mem = b->mem.buf;
    while ((rc = ring_get_used(rx, &id, &len, b->err)) > 0) {
        uint64_t gpa = rx->addr[id];
        const uint8_t *frame = mem + (gpa - b->base) + NET_HDR;
        uint32_t k;
        if (len != NET_HDR + b->frame_len)
            return snprintf(b->err, sizeof b->err, "%s: a frame came back with %u bytes, not %zu", rx->name, len,
                            NET_HDR + b->frame_len), -1;
        memcpy(&k, frame + SEQ_OFF, 4);
        if (k >= b->nframes || memcmp(frame, (const uint8_t *)b->frames.buf + k * b->frame_len, b->frame_len))
            return snprintf(b->err, sizeof b->err, "frame %u came back damaged", k), -1;
        if (b->last_k >= 0 && k != (size_t)(b->last_k + 1) % b->nframes)
            b->reordered++;
        b->last_k = k;
        if (b->sent_at[k]) {
            if (record(b, got - b->sent_at[k]) < 0)
                return -1;
            b->sent_at[k] = 0;
            b->outstanding--;
        }
        ring_add(rx, rx->free_ids[--rx->nfree], gpa, rx->writable[id], F_WRITE, 0); /* the same buffer, again */
        reposted = 1;
    }
    if (rc < 0)
        return -1;
    ring_reaped(rx);
    if (reposted && kick(b, 0, counting) < 0)
        return -1;
    if (counting)
        b->fe_ns += now_ns() - got;
    return 0;
}

/* One tick: `burst` frames made available, one kick decision (measure()'s send half). */
static int tick(Burst *b, int64_t now, int counting)
{
    Ring *tx = &b->q[1];
    uint8_t *mem = b->mem.buf;
    if (now - b->next_send >= b->period) { /* behind: drop the backlog, do not burst to catch up */
        if (counting)
            b->late += (now - b->next_send) / b->period * b->burst;
        b->next_send = now;
    }
    for (int i = 0; i < b->burst; i++) {
        if (counting && b->limit && b->sent >= b->limit)
            break;
        if (!tx->nfree || tx->slots_free < 2) { /* ring full: the rest of this tick is not offered */
            if (counting)
                b->full += b->burst - i;
            break;
        }
        uint16_t id = tx->free_ids[--tx->nfree];
        size_t k = b->seq % b->nframes;
        uint8_t *buf = mem + (tx->addr[id] - b->base);
        memset(buf, 0, NET_HDR);
        memcpy(buf + NET_HDR, (const uint8_t *)b->frames.buf + k * b->frame_len, b->frame_len);
        ring_add(tx, id, tx->addr[id], (uint32_t)(NET_HDR + b->frame_len), 0, NET_HDR);
        int64_t t = now_ns(); /* each frame's round trip runs from its own availability */
        if (b->sent_at[k])
            b->outstanding--; /* never came back a lap of frames ago: no longer waited for */
        b->sent_at[k] = counting ? t : 0;
        if (counting) {
            b->sent++;
            b->outstanding++;
        }
        b->seq++;
    }
    if (kick(b, 1, counting) < 0)
        return -1;
    if (counting)
        b->fe_ns += now_ns() - now;
    b->next_send += b->period;
    return 0;
}

static int loop(Burst *b, int64_t seconds_ns, int counting, int draining)
{
    int64_t end = now_ns() + seconds_ns;
    if (!b->started) {
        b->next_send = now_ns();
        b->started = 1;
    }
    for (;;) {
        int64_t now = now_ns();
        if (now >= end || ((draining || (counting && b->limit && b->sent >= b->limit)) && !b->outstanding))
            return 0;
        if (!draining && now >= b->next_send && tick(b, now, counting) < 0)
            return -1;
        if (ring_has_used(&b->q[0]) || ring_has_used(&b->q[1]))
            if (reap(b, now_ns(), counting) < 0)
                return -1;
    }
}

static PyObject *burst_run(Burst *b, PyObject *args, PyObject *kw)
{
    static char *names[] = {"seconds", "counting", "draining", NULL};
    double seconds;
    int counting = 0, draining = 0, rc;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "d|pp", names, &seconds, &counting, &draining))
        return NULL;
    if (!b->have_mem)
        return PyErr_SetString(PyExc_ValueError, "the loop is closed"), NULL;
    if (b->broken)
        return PyErr_Format(RingError, "the loop stopped: %s", b->err);
    if (b->running)
        return PyErr_SetString(PyExc_RuntimeError, "the loop is running in another thread"), NULL;
    b->running = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = loop(b, (int64_t)(seconds * 1e9), counting, draining);
    Py_END_ALLOW_THREADS
    b->running = 0;
    if (rc < 0) {
        b->broken = 1;
        return PyErr_Format(RingError, "%s", b->err);
    }
    Py_RETURN_NONE;
}

static PyObject *burst_poll_turn(Burst *b, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    int64_t t0, t1;
    if (n < 1)
        return PyErr_Occurred() ? NULL : (PyErr_SetString(PyExc_ValueError, "n must be positive"), NULL);
    if (!b->have_mem || b->running)
        return PyErr_SetString(PyExc_RuntimeError, "the loop is closed or running"), NULL;
    Py_BEGIN_ALLOW_THREADS
    t0 = now_ns();
    for (long i = 0; i < n; i++) /* what loop() does when there is nothing to send or reap */
        if (now_ns() < 0 || ring_has_used(&b->q[0]) || ring_has_used(&b->q[1]))
            break;
    t1 = now_ns();
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble((double)(t1 - t0) / n);
}

static PyObject *burst_stats(Burst *b, PyObject *unused)
{
    return Py_BuildValue("{sKsnsKsKsKsKsKsK}", "sent", b->sent, "returned", (Py_ssize_t)b->nrtts, "late", b->late,
                         "full", b->full, "kicks", b->kicks, "frontend_ns", b->fe_ns, "outstanding", b->outstanding,
                         "reordered", b->reordered);
}

static PyObject *burst_rtts(Burst *b, PyObject *unused)
{
    return PyBytes_FromStringAndSize((const char *)b->rtts, (Py_ssize_t)(b->nrtts * sizeof *b->rtts));
}

static void ring_free(Ring *r)
{
    free(r->free_ids);
    free(r->in_use);
    free(r->addr);
    free(r->writable);
    free(r->count);
    r->free_ids = NULL, r->in_use = NULL, r->addr = NULL, r->writable = NULL, r->count = NULL;
}

static PyObject *burst_close(Burst *b, PyObject *unused)
{
    if (b->running)
        return PyErr_SetString(PyExc_RuntimeError, "the loop is running in another thread"), NULL;
    if (b->have_mem)
        PyBuffer_Release(&b->mem);
    if (b->have_frames)
        PyBuffer_Release(&b->frames);
    b->have_mem = b->have_frames = 0;
    Py_RETURN_NONE;
}

static void burst_dealloc(Burst *b)
{
    Py_XDECREF(burst_close(b, NULL));
    PyErr_Clear();
    for (int i = 0; i < 2; i++)
        ring_free(&b->q[i]);
    free(b->sent_at);
    free(b->rtts);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

/* A pointer to [gpa, gpa + len) of guest memory, aligned to `align`, or NULL (ValueError set). */
static uint8_t *at(Burst *b, unsigned long long gpa, unsigned long long len, unsigned align, const char *what)
{
    if (gpa < b->base || gpa - b->base > (unsigned long long)b->mem.len ||
        len > (unsigned long long)b->mem.len - (gpa - b->base) || gpa % align)
        return PyErr_Format(PyExc_ValueError, "%s at %#llx (+%llu) is not in guest memory, %u-aligned", what, gpa,
                            len, align), NULL;
    return (uint8_t *)b->mem.buf + (gpa - b->base);
}

/* (packed, num, desc, driver, device, event_idx, kick_fd, avail_idx, avail_wrap, used_idx, used_wrap),
 * from a driver ring's export_state(); `chains`: its buffers in flight as (id, gpa, writable). */
static int ring_init(Burst *b, Ring *r, const char *name, PyObject *spec, PyObject *chains, int pair_heads)
{
    unsigned long long desc, drv, dev;
    unsigned num, avail_idx, avail_wrap, used_idx, used_wrap;
    if (!PyArg_ParseTuple(spec, "pIKKKpiIIII", &r->packed, &num, &desc, &drv, &dev, &r->event_idx, &r->kick_fd,
                          &avail_idx, &avail_wrap, &used_idx, &used_wrap))
        return -1;
    r->name = name;
    if (num < 2 || num > 32768 || (!r->packed && (num & (num - 1))))
        return PyErr_Format(PyExc_ValueError, "%s: no ring has %u entries", name, num), -1;
    r->num = (uint16_t)num;
    if (!(r->desc = at(b, desc, 16ull * num, 16, "descriptor area")))
        return -1;
    if (!r->packed) {
        if (!(r->avail = at(b, drv, 6 + 2ull * num, 2, "avail ring")) ||
            !(r->used = at(b, dev, 6 + 8ull * num, 4, "used ring")))
            return -1;
    } else if (!(r->drv_ev = at(b, drv, 4, 4, "driver event area")) ||
               !(r->dev_ev = at(b, dev, 4, 4, "device event area"))) {
        return -1;
    }
    if ((r->packed && (avail_idx >= num || used_idx >= num)) || avail_idx > 0xffff || used_idx > 0xffff)
        return PyErr_Format(PyExc_ValueError, "%s: indexes %u / %u out of range", name, avail_idx, used_idx), -1;
    r->avail_idx = (uint16_t)avail_idx, r->avail_wrap = !!avail_wrap;
    r->last_used = (uint16_t)used_idx, r->used_wrap = !!used_wrap;
    r->free_ids = calloc(num, sizeof *r->free_ids);
    r->in_use = calloc(num, 1);
    r->addr = calloc(num, sizeof *r->addr);
    r->writable = calloc(num, sizeof *r->writable);
    r->count = calloc(num, 1);
    if (!r->free_ids || !r->in_use || !r->addr || !r->writable || !r->count)
        return PyErr_NoMemory(), -1;
    PyObject *seq = PySequence_Fast(chains, "chains must be a sequence");
    if (!seq)
        return -1;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        unsigned id, len;
        unsigned long long gpa;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "IKI", &id, &gpa, &len))
            return Py_DECREF(seq), -1;
        if (id >= num || r->in_use[id] || !at(b, gpa, len, 1, "buffer"))
            return Py_DECREF(seq), PyErr_Occurred() ? -1 : (PyErr_Format(PyExc_ValueError, "%s: bad id %u", name, id), -1);
        r->in_use[id] = 1, r->addr[id] = gpa, r->writable[id] = len, r->count[id] = 1;
    }
    r->slots_free = num - (unsigned)PySequence_Fast_GET_SIZE(seq);
    Py_DECREF(seq);
    for (unsigned id = num; id-- > 0;) /* split TX chains take descriptors id, id + 1: even heads only */
        if (!r->in_use[id] && !(pair_heads && !r->packed && id % 2))
            r->free_ids[r->nfree++] = (uint16_t)id;
    return 0;
}

static int burst_init(Burst *b, PyObject *args, PyObject *kw)
{
    static char *names[] = {"mem", "base", "rx", "rx_chains", "tx", "tx_buffers", "frames", "frame_len", "period_ns",
                            "burst", "limit", NULL};
    PyObject *mem, *rx, *rx_chains, *tx, *tx_buffers, *frames;
    unsigned long long base;
    Py_ssize_t frame_len;
    long long period;
    int burst;
    unsigned long long limit = 0;
    if (b->have_mem)
        return PyErr_SetString(PyExc_RuntimeError, "already initialised"), -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OKOOOOOnLi|K", names, &mem, &base, &rx, &rx_chains, &tx,
                                     &tx_buffers, &frames, &frame_len, &period, &burst, &limit))
        return -1;
    if (PyObject_GetBuffer(mem, &b->mem, PyBUF_WRITABLE) < 0)
        return -1;
    b->have_mem = 1;
    if (PyObject_GetBuffer(frames, &b->frames, PyBUF_SIMPLE) < 0)
        return -1;
    b->have_frames = 1;
    b->base = base;
    if (frame_len < SEQ_OFF + 4 || frame_len > 65535 || b->frames.len % frame_len || !b->frames.len)
        return PyErr_Format(PyExc_ValueError, "frames: a whole number of frames of %zd bytes (at least %d)", frame_len,
                            SEQ_OFF + 4), -1;
    if (period < 1 || burst < 1 || burst > 32768)
        return PyErr_SetString(PyExc_ValueError, "period_ns and burst must be positive"), -1;
    b->frame_len = (size_t)frame_len;
    b->nframes = (size_t)(b->frames.len / frame_len);
    b->period = period;
    b->burst = burst;
    b->limit = limit;
    b->last_k = -1;
    PyObject *none = PyTuple_New(0); /* TX: nothing in flight */
    int rc = none ? ring_init(b, &b->q[0], "rx", rx, rx_chains, 0) : -1;
    rc = rc < 0 ? rc : ring_init(b, &b->q[1], "tx", tx, none, 1);
    Py_XDECREF(none);
    if (rc < 0)
        return -1;
    PyObject *seq = PySequence_Fast(tx_buffers, "tx_buffers must be a sequence");
    if (!seq)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != b->q[1].num || b->q[1].slots_free != b->q[1].num)
        return Py_DECREF(seq), PyErr_SetString(PyExc_ValueError, "tx_buffers: one per TX ring entry, none in flight"), -1;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        unsigned long long gpa = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred() || !at(b, gpa, NET_HDR + b->frame_len, 1, "TX buffer"))
            return Py_DECREF(seq), -1;
        b->q[1].addr[i] = gpa;
    }
    Py_DECREF(seq);
    if (!(b->sent_at = calloc(b->nframes, sizeof *b->sent_at)))
        return PyErr_NoMemory(), -1;
    return 0;
}

static PyMethodDef burst_methods[] = {
    {"run", (PyCFunction)(void (*)(void))burst_run, METH_VARARGS | METH_KEYWORDS,
     "run(seconds, counting=False, draining=False): the loop for `seconds`, GIL released. counting: count and "
     "time what it sends; draining: send nothing, stop once every counted frame is back."},
    {"stats", (PyCFunction)burst_stats, METH_NOARGS, "Counters since the start, as a dict."},
    {"poll_turn", (PyCFunction)burst_poll_turn, METH_O,
     "poll_turn(n): ns of one idle turn of the loop (clock + both rings polled), over n turns."},
    {"rtts", (PyCFunction)burst_rtts, METH_NOARGS, "The round trips (ns) recorded, as native int64 bytes."},
    {"close", (PyCFunction)burst_close, METH_NOARGS, "Release guest memory and the frames (the rings stay as they are)."},
    {NULL},
};

static PyTypeObject BurstType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vdpa_svq.guest._burst.Burst",
    .tp_basicsize = sizeof(Burst),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A virtio-net driver's measuring loop (burst.py says how to make one).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)burst_init,
    .tp_dealloc = (destructor)burst_dealloc,
    .tp_methods = burst_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "vdpa_svq.guest._burst", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__burst(void)
{
    if (PyType_Ready(&BurstType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    RingError = PyErr_NewException("vdpa_svq.guest._burst.RingError", PyExc_RuntimeError, NULL);
    if (PyModule_AddObject(m, "RingError", RingError) < 0 || PyModule_AddObjectRef(m, "Burst", (PyObject *)&BurstType) < 0)
        return NULL;
    return m;
}
