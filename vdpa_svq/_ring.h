/*
 * _ring.h: the ring code both C extensions need, i.e. everything of a virtqueue seen from its
 * DEVICE side. The relay (vdpa_svq._relay) is the device of the guest's ring; the soft net
 * device's loopback (vdpa_svq.softdev._netloop) is the device of its two rings. So both need
 * _ring_access.h (barriers, relaxed loads/stores, need_event), the RingError helpers, the memory
 * tables, packed event arithmetic, the Chain, and the device side of a split and a packed ring (pop, push_used,
 * notify; the layout picked once, in the guest_* dispatchers). The driver side (the shadow ring)
 * is the relay's alone and stays in _relay.c.
 *
 * Each function is tagged with what it mirrors in the Python reference ("mirrors
 * split.py:SplitDeviceRing.pop" etc.), and keeps its rules exactly: ids, event indexes, error
 * reasons and indexes are the Python rings', so that the ring memory both produce is
 * byte-identical (see tests/differential).
 *
 * Why a header of static definitions and not a .c compiled into both extensions: this is the
 * per-descriptor path (a pop reads, checks and bounds every descriptor through mem_view), and a
 * copy in the one file of each extension that calls it keeps it inlinable there, as it was
 * before the split (no -flto in the build). The price: include it from ONE file per extension,
 * since its state (the exception classes below) is per file; ring_h_once_per_extension turns a
 * second include into a link error. What only one of the two users calls is marked unused.
 *
 * Trust: everything read from a ring is checked before it is used, and read once (a relaxed
 * atomic load is never re-read by the compiler), so the other side cannot change a value between
 * our check and our use.
 */
#ifndef VDPA_SVQ_RING_H
#define VDPA_SVQ_RING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "_ring_access.h"

/* A second file of the same extension that includes this header fails to link ("multiple
 * definition"), rather than run with exception classes it never imported (see above). */
__attribute__((visibility("hidden"))) const char ring_h_once_per_extension[] = "_ring.h";

/* ring/layout.py and ring/chain.py */
#define DESC_SIZE 16 /* addr (le64) + len (le32) + split: flags, next / packed: id, flags (le16 each) */
#define AVAIL_FLAGS 0
#define AVAIL_IDX 2
#define AVAIL_RING 4
#define USED_FLAGS 0
#define USED_IDX 2
#define USED_RING 4
#define USED_ELEM_SIZE 8 /* id (le32) + len (le32) */
#define EVENT_OFF_WRAP 0
#define EVENT_FLAGS 2
#define PACKED_EVENT_SIZE 4
#define DESC_LEN_OFF 8
#define DESC_ID_OFF 12
#define DESC_FLAGS_OFF 14
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_PACKED_DESC_F_AVAIL (1u << 7)
#define VRING_PACKED_DESC_F_USED (1u << 15)
#define MAX_CHAIN_BYTES 0xFFFFFFFFull /* a used length is le32: a chain may not describe more */
/* ring/event.py */
#define VRING_PACKED_EVENT_FLAG_ENABLE 0
#define VRING_PACKED_EVENT_FLAG_DISABLE 1
#define VRING_PACKED_EVENT_FLAG_DESC 2
#define WRAP_BIT 15
/* ring/split.py */
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

/* idx % num, the slot of a free-running split ring index. Without a division (tens of cycles, a
 * few of them per packet) when num is a power of two, as a split ring's size always is (2.7); a
 * ring of another size, which only a broken driver sets up, gets the modulo the Python rings take. */
static inline uint32_t ring_slot(uint32_t idx, uint32_t num)
{
    return (num & (num - 1)) == 0 ? idx & (num - 1) : idx % num;
}

/* ==== Errors: the Python classes, the same reasons and indexes ================================= */

/* The relay runs without the GIL (_pump.c: its notifiers are eventfds). Raising is its rare path:
 * each place that builds a Python object takes the GIL for it (WITH_GIL), and the exception waits
 * in this thread's state until the pump holds the GIL again. With the GIL held already (soft:net's
 * loop, a call from Python), Ensure and Release only check that. */
#define WITH_GIL(stmt)                                                                                                 \
    do {                                                                                                               \
        PyGILState_STATE gil_ = PyGILState_Ensure();                                                                   \
        stmt;                                                                                                          \
        PyGILState_Release(gil_);                                                                                      \
    } while (0)

static PyObject *RingError;       /* vdpa_svq.errors.RingError */
static PyObject *GuestRingError;  /* the driver (guest) broke the guest ring */
static PyObject *DeviceRingError; /* the device broke the shadow ring */
static PyObject *RingBroken;      /* an operation on a ring already marked broken */

/* The classes above, from vdpa_svq.errors: each extension's PyInit calls this first. */
static int ring_errors_import(void)
{
    PyObject *errors = PyImport_ImportModule("vdpa_svq.errors");
    if (errors == NULL)
        return -1;
    RingError = PyObject_GetAttrString(errors, "RingError");
    GuestRingError = PyObject_GetAttrString(errors, "GuestRingError");
    DeviceRingError = PyObject_GetAttrString(errors, "DeviceRingError");
    RingBroken = PyObject_GetAttrString(errors, "RingBroken");
    Py_DECREF(errors);
    return RingError && GuestRingError && DeviceRingError && RingBroken ? 0 : -1;
}

/* Raise cls(*args) (args: a new reference, or NULL with an exception); the GIL held. */
static void ring_raise(PyObject *cls, PyObject *args)
{
    PyObject *exc = args == NULL ? NULL : PyObject_CallObject(cls, args);
    Py_XDECREF(args);
    if (exc != NULL) {
        PyErr_SetObject(cls, exc);
        Py_DECREF(exc);
    }
}

/* Raise cls(queue, reason, index), reason formatted like the Python f-strings (0x%llx for {:#x}). */
static int ring_failv(PyObject *cls, PyObject *queue, long long index, const char *fmt, va_list ap)
{
    char reason[320];
    vsnprintf(reason, sizeof reason, fmt, ap);
    WITH_GIL(ring_raise(cls, Py_BuildValue("(OsL)", queue, reason, index)));
    return -1;
}

__attribute__((unused)) /* the relay's (the soft device raises through guest_fail only) */
static int ring_fail(PyObject *cls, PyObject *queue, long long index, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ring_failv(cls, queue, index, fmt, ap);
    va_end(ap);
    return -1;
}

/* cls(queue, reason): a failure at no particular ring index. */
__attribute__((unused)) /* the relay's */
static int ring_fail_noindex(PyObject *cls, PyObject *queue, const char *fmt, ...)
{
    char reason[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof reason, fmt, ap);
    va_end(ap);
    WITH_GIL(ring_raise(cls, Py_BuildValue("(Os)", queue, reason)));
    return -1;
}

static int queue_broken(PyObject *name)
{
    WITH_GIL(PyErr_Format(RingBroken, "%U: queue is broken", name));
    return -1;
}

/* ==== Memory: tables of regions ================================================================ */

#define PERM_READ 1  /* = VHOST_ACCESS_RO: the soft device's IOTLB permissions (guest memory is RW) */
#define PERM_WRITE 2 /* = VHOST_ACCESS_WO */

typedef struct {
    uint64_t gpa, size;
    uint8_t *host;
    int perm;
} Region;

typedef struct {
    Region *r;           /* sorted by gpa, non-overlapping (GuestMemory keeps them so) */
    Py_buffer *views;    /* the exports that keep each region's mmap open */
    Py_ssize_t n;
    Py_ssize_t hint;     /* the region found last: most lookups land in it again (checked before
                          * use, so a stale hint costs a bisection, never a wrong answer) */
} MemTable;

/* The region that holds all of [gpa, gpa+length), else NULL. */
static inline const Region *mem_region(MemTable *m, uint64_t gpa, uint64_t length)
{
    if (m->hint < m->n) {
        /* gpa strictly inside the hinted region: no other region can hold it (they don't
         * overlap), so this is what the bisection would find, without its unpredictable branches. */
        const Region *h = &m->r[m->hint];
        uint64_t off = gpa - h->gpa;
        if (gpa >= h->gpa && off < h->size && length <= h->size - off)
            return h;
    }
    Py_ssize_t lo = 0, hi = m->n; /* bisect_right(starts, gpa) */
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (gpa < m->r[mid].gpa)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (lo == 0)
        return NULL;
    const Region *r = &m->r[lo - 1];
    uint64_t off = gpa - r->gpa;
    if (off > r->size || length > r->size - off) /* gpa + length > region.end, without overflow */
        return NULL;
    m->hint = lo - 1;
    return r;
}

/* mirrors memory/guest.py:GuestMemory._locate (as view()/contains()): the host address of
 * [gpa, gpa+length) when one region holds all of it, else NULL. */
static inline uint8_t *mem_view(MemTable *m, uint64_t gpa, uint64_t length)
{
    const Region *r = mem_region(m, gpa, length);
    return r ? r->host + (gpa - r->gpa) : NULL;
}

/* mem_view for a device access that needs `perm` (PERM_READ / PERM_WRITE) of the region. */
static inline uint8_t *mem_access(MemTable *m, uint64_t addr, uint64_t length, int perm)
{
    const Region *r = mem_region(m, addr, length);
    return r && (r->perm & perm) == perm ? r->host + (addr - r->gpa) : NULL;
}

typedef struct {
    uint64_t addr, len;
} Piece; /* (iova, length) for the device; (gpa, length) for the dirty log */

static void mem_table_release(MemTable *m)
{
    for (Py_ssize_t i = 0; i < m->n; i++)
        PyBuffer_Release(&m->views[i]);
    PyMem_Free(m->views);
    PyMem_Free(m->r);
    m->views = NULL;
    m->r = NULL;
    m->n = 0;
}

/* regions: a sequence of (gpa, size, buffer of at least size bytes[, perm]), sorted by gpa; perm
 * (PERM_READ | PERM_WRITE) is the device's access to the region, both when it is left out; the
 * buffer must be writable when perm has PERM_WRITE. */
static int mem_table_init(MemTable *m, PyObject *regions)
{
    PyObject *seq = PySequence_Fast(regions, "regions must be a sequence of (gpa, size, buffer)");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    m->r = PyMem_Calloc(n ? n : 1, sizeof(Region));
    m->views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    m->n = m->hint = 0;
    if (m->r == NULL || m->views == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long gpa, size;
        PyObject *obj;
        int perm = PERM_READ | PERM_WRITE;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKO|i", &gpa, &size, &obj, &perm))
            goto fail;
        if (PyObject_GetBuffer(obj, &m->views[i], perm & PERM_WRITE ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
            goto fail;
        m->n = i + 1;
        if ((unsigned long long)m->views[i].len < size || (i > 0 && gpa < m->r[i - 1].gpa + m->r[i - 1].size)) {
            PyErr_SetString(PyExc_ValueError, "regions must be sorted, disjoint and backed by enough bytes");
            goto fail;
        }
        m->r[i].gpa = gpa;
        m->r[i].size = size;
        m->r[i].host = m->views[i].buf;
        m->r[i].perm = perm;
    }
    Py_DECREF(seq);
    return 0;
fail:
    Py_DECREF(seq);
    return -1;
}

static uint8_t *area(MemTable *m, uint64_t gpa, uint64_t size, const char *what)
{
    uint8_t *p = mem_view(m, gpa, size);
    if (p == NULL) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s [0x%llx, +0x%llx) is not in the ring's memory", what, (unsigned long long)gpa,
                 (unsigned long long)size);
        PyErr_SetString(PyExc_ValueError, msg);
    }
    return p;
}

/* ==== Notification suppression arithmetic (ring/event.py) ===================================== */

/* mirrors event.py:packed_need_event */
static inline int packed_need_event(uint16_t off_wrap, uint32_t new_idx, uint64_t moved, int wrap_counter,
                                    uint32_t num)
{
    if (moved >= num)
        return 1; /* a whole lap or more since the last decision: the event slot was passed */
    uint32_t event_idx = off_wrap & ~(1u << WRAP_BIT) & 0xFFFF;
    if (((off_wrap >> WRAP_BIT) & 1) != (unsigned)wrap_counter)
        event_idx -= num; /* names a slot of the previous lap */
    return need_event((uint16_t)event_idx, (uint16_t)new_idx, (uint16_t)(new_idx - moved));
}

/* ==== Chains and tokens ========================================================================= */

typedef struct {
    uint64_t addr;
    uint32_t len;
    uint32_t write;
} Seg;

/* ring/chain.py:Chain: one available guest buffer as our device side saw it. */
typedef struct {
    Seg *segs;        /* readable first, then device-writable; scratch, reused for every chain */
    uint32_t nsegs, cap;
    uint16_t id;      /* what goes back in the used element */
    uint32_t ndescs;  /* guest ring slots it took (1 when indirect) */
    int indirect;
    uint64_t writable_bytes;
} Chain;

/* The shadow ring's token for one buffer id: what forward_used() needs of the guest chain (the
 * Python relay keeps the Chain object itself). Its writable segments live in the relay's token
 * arena. Here because push_used takes one: a device gives back id, ndescs and writable_bytes. */
typedef struct {
    uint16_t id;
    uint32_t ndescs;
    uint64_t writable_bytes;
    uint32_t seg_head, seg_tail, nsegs;
} Token;

/* chain_append's cold part: the scratch list doubled. In the relay, only a chain longer than
 * anything the shadow ring can take gets here (see the cap in relay_init): it is on its way to
 * "can never fit the shadow ring". The soft device's scratch starts at 64 segments and grows to its
 * longest chain. */
static __attribute__((noinline, cold)) int chain_grow(Chain *c)
{
    uint32_t cap = c->cap * 2;
    Seg *segs; /* PyMem_* needs the GIL (pymalloc), the relay runs without it */
    WITH_GIL(segs = PyMem_Realloc(c->segs, (size_t)cap * sizeof(Seg)); if (segs == NULL) PyErr_NoMemory());
    if (segs == NULL)
        return -1;
    c->segs = segs;
    c->cap = cap;
    return 0;
}

static inline int chain_append(Chain *c, uint64_t addr, uint32_t len, int write)
{
    if (c->nsegs == c->cap && chain_grow(c) < 0)
        return -1;
    c->segs[c->nsegs].addr = addr;
    c->segs[c->nsegs].len = len;
    c->segs[c->nsegs].write = (uint32_t)write;
    c->nsegs++;
    return 0;
}

/* ==== The guest ring: we are its DEVICE ======================================================== */

typedef struct {
    int packed, event_idx, broken;
    uint32_t num;
    PyObject *name;
    uint64_t desc_addr, driver_addr, device_addr; /* guest-physical, for the dirty log */
    uint8_t *desc, *driver, *device;              /* host views of the three areas */
    MemTable *mem;
    uint8_t *in_flight; /* heads (split) / buffer ids (packed) popped and not yet used */
    /* split */
    uint16_t last_avail_idx, used_idx, signalled_used;
    uint16_t avail_idx_seen; /* avail->idx as pop_split read it last in this burst (guest_pop_burst) */
    uint16_t staged; /* used elements written after used->idx, not yet published */
    uint32_t used_event_off, avail_event_off;
    /* packed */
    uint32_t next_avail_idx, next_used_idx;
    int avail_wrap_counter, used_wrap_counter;
    uint64_t used_since_signal;
    int first_staged; /* a used descriptor waits for its flags: publish_used writes them last */
    uint32_t first_staged_slot;
    uint16_t first_staged_flags;
} DeviceSide;

static int guest_fail(DeviceSide *g, long long index, const char *fmt, ...)
{
    va_list ap;
    g->broken = 1;
    va_start(ap, fmt);
    ring_failv(GuestRingError, g->name, index, fmt, ap);
    va_end(ap);
    return -1;
}

/* The indirect table an indirect descriptor points to, checked (NULL: the guest ring failed).
 * mirrors chain.py:ChainReader.indirect_table */
static inline const uint8_t *take_indirect_table(DeviceSide *g, uint16_t head, uint64_t addr, uint32_t len)
{
    if (len == 0 || len % DESC_SIZE) {
        guest_fail(g, head, "indirect table length %u is not a multiple of 16", len);
        return NULL;
    }
    if (len / DESC_SIZE > (uint32_t)g->num) { /* 2.7.5.3.1: no chain is longer than the queue */
        guest_fail(g, head, "indirect table of %u descriptors is longer than the queue size %u", len / DESC_SIZE,
                   (unsigned)g->num);
        return NULL;
    }
    const uint8_t *table = mem_view(g->mem, addr, len);
    if (table == NULL)
        guest_fail(g, head, "indirect table [0x%llx, +0x%x) outside guest memory", (unsigned long long)addr, len);
    return table;
}

/* One buffer descriptor of a guest chain: the checks both layouts make, in the same order.
 * mirrors chain.py:ChainReader.take_segment */
/* (always inlined: called per descriptor, and its out-parameters stay in registers that way) */
static inline __attribute__((always_inline)) int take_segment(DeviceSide *g, Chain *c, uint16_t head, uint64_t addr,
                                                              uint32_t len, uint16_t flags, int *seen_write,
                                                              uint64_t *total, uint64_t *writable)
{
    int write = (flags & VRING_DESC_F_WRITE) != 0;
    if (write) {
        *seen_write = 1;
        *writable += len;
    } else if (*seen_write) {
        return guest_fail(g, head, "readable descriptor after a writable one");
    }
    if (mem_view(g->mem, addr, len) == NULL)
        return guest_fail(g, head, "buffer [0x%llx, +0x%x) outside guest memory", (unsigned long long)addr, len);
    *total += len;
    if (*total > MAX_CHAIN_BYTES)
        return guest_fail(g, head, "chain longer than 4 GiB");
    return chain_append(c, addr, len, write);
}

/* ---- split ----------------------------------------------------------------------------------- */

/* mirrors split.py:SplitDeviceRing.has_avail */
static int has_avail_split(const DeviceSide *g)
{
    return !g->broken && ld16(g->driver + AVAIL_IDX) != g->last_avail_idx;
}

/* mirrors split.py:SplitDeviceRing._read_chain */
static int read_chain_split(DeviceSide *g, uint16_t head, Chain *c)
{
    const uint8_t *table = g->desc;
    uint32_t count = g->num, index = head;
    uint32_t here = 0, ring_descs = 0; /* descriptors read in the current table; in the ring's table */
    int indirect = 0, seen_write = 0;
    uint64_t total = 0, writable = 0;

    c->nsegs = 0;
    for (;;) { /* ends: every pass appends a segment, and at most `count` fit */
        const uint8_t *d = table + (size_t)index * DESC_SIZE;
        uint64_t addr = ld64(d);
        uint32_t len = ld32(d + 8);
        uint16_t flags = ld16(d + 12), nxt = ld16(d + 14);
        if (flags & VRING_DESC_F_INDIRECT) {
            if (indirect)
                return guest_fail(g, head, "indirect descriptor inside an indirect table");
            if (flags & VRING_DESC_F_NEXT)
                return guest_fail(g, head, "indirect descriptor chained with others");
            if ((table = take_indirect_table(g, head, addr, len)) == NULL)
                return -1;
            ring_descs = here + 1;
            indirect = 1;
            count = len / DESC_SIZE;
            index = 0;
            here = 0;
            continue;
        }
        if (take_segment(g, c, head, addr, len, flags, &seen_write, &total, &writable) < 0)
            return -1;
        here++;
        if (!(flags & VRING_DESC_F_NEXT)) {
            c->id = head;
            c->ndescs = indirect ? ring_descs : c->nsegs;
            c->indirect = indirect;
            c->writable_bytes = writable;
            return 0;
        }
        if (nxt >= count)
            return guest_fail(g, head, "next %u out of range", nxt);
        if (here >= count)
            return guest_fail(g, head, "descriptor loop");
        index = nxt;
    }
}

/* mirrors split.py:SplitDeviceRing.pop: 1 with the next chain in *c, 0 when there is none. */
static int pop_split(DeviceSide *g, Chain *c)
{
    if (g->broken)
        return queue_broken(g->name);
    /* avail->idx once per burst (guest_pop_burst), not per chain: the driver writes its cache line
     * all the time (a read is a miss; DPDK's and the kernel's vhost read it per burst too), and
     * what it made available stays available. */
    if (g->avail_idx_seen == g->last_avail_idx) {
        uint16_t avail_idx = ld16(g->driver + AVAIL_IDX);
        if (avail_idx == g->last_avail_idx)
            return 0;
        if ((uint16_t)(avail_idx - g->last_avail_idx) > g->num)
            return guest_fail(g, avail_idx, "avail idx moved from %u to %u", g->last_avail_idx, avail_idx);
        /* Read the ring entries and descriptors only after avail->idx said they are there. */
        rmb();
        g->avail_idx_seen = avail_idx;
    }
    uint32_t slot = ring_slot(g->last_avail_idx, g->num);
    uint16_t head = ld16(g->driver + AVAIL_RING + 2 * slot);
    if (head >= g->num)
        return guest_fail(g, slot, "head %u out of range", head);
    if (g->in_flight[head])
        return guest_fail(g, slot, "head %u made available while still in flight", head);
    if (read_chain_split(g, head, c) < 0)
        return -1;
    g->in_flight[head] = 1;
    g->last_avail_idx++;
    return 1;
}

/* mirrors split.py:SplitDeviceRing.stage_used: the element written, not yet visible to the driver
 * (publish_used_split shows every staged one at once); its span goes to spans[0] (dirty log). */
static int stage_used_split(DeviceSide *g, const Token *t, uint32_t written, Piece spans[1])
{
    uint32_t slot = ring_slot((uint16_t)(g->used_idx + g->staged), g->num);
    uint8_t *elem = g->device + USED_RING + USED_ELEM_SIZE * slot;
    st32(elem, t->id);
    st32(elem + 4, written);
    g->in_flight[t->id] = 0;
    g->staged++;
    spans[0].addr = g->device_addr + USED_RING + USED_ELEM_SIZE * slot;
    spans[0].len = USED_ELEM_SIZE;
    return 1;
}

/* mirrors split.py:SplitDeviceRing.publish_used: one used->idx store for every staged element. */
static int publish_used_split(DeviceSide *g, Piece spans[1])
{
    if (!g->staged)
        return 0;
    /* The elements must be visible before used->idx covers them (2.7.14). */
    wmb();
    g->used_idx += g->staged;
    g->staged = 0;
    st16(g->device + USED_IDX, g->used_idx);
    spans[0].addr = g->device_addr + USED_IDX;
    spans[0].len = 2;
    return 1;
}

/* mirrors split.py:SplitDeviceRing.notify_area: flags and avail_event, i.e. the whole used ring. */
static Piece notify_area_split(const DeviceSide *g)
{
    Piece p = {g->device_addr, 6 + USED_ELEM_SIZE * (uint64_t)g->num};
    return p;
}

/* mirrors split.py:SplitDeviceRing.need_notify */
static int need_notify_split(DeviceSide *g)
{
    /* used->idx must be visible before we read the driver's suppression state. */
    mb();
    uint16_t old = g->signalled_used, new_ = g->used_idx;
    g->signalled_used = new_;
    if (old == new_)
        return 0;
    if (!g->event_idx)
        return !(ld16(g->driver + AVAIL_FLAGS) & VRING_AVAIL_F_NO_INTERRUPT);
    return need_event(ld16(g->driver + g->used_event_off), new_, old);
}

/* mirrors split.py:SplitDeviceRing.disable_notify */
static void disable_notify_split(DeviceSide *g)
{
    if (!g->event_idx)
        st16(g->device + USED_FLAGS, VRING_USED_F_NO_NOTIFY);
}

/* mirrors split.py:SplitDeviceRing.enable_notify: 1 when no chain is already waiting. */
static int enable_notify_split(DeviceSide *g)
{
    if (g->event_idx)
        st16(g->device + g->avail_event_off, g->last_avail_idx);
    else
        st16(g->device + USED_FLAGS, 0);
    /* avail_event / flags must be visible before we read avail->idx again. */
    mb();
    return !has_avail_split(g);
}

/* ---- packed ---------------------------------------------------------------------------------- */

/* mirrors packed.py:PackedDeviceRing._is_avail */
static inline int is_avail_packed(const DeviceSide *g, uint32_t slot, int wrap)
{
    uint16_t flags = ld16(g->desc + (size_t)slot * DESC_SIZE + DESC_FLAGS_OFF);
    return ((flags & VRING_PACKED_DESC_F_AVAIL) != 0) == (wrap != 0) &&
           ((flags & VRING_PACKED_DESC_F_USED) != 0) != (wrap != 0);
}

/* mirrors packed.py:PackedDeviceRing.has_avail */
static int has_avail_packed(const DeviceSide *g)
{
    return !g->broken && is_avail_packed(g, g->next_avail_idx, g->avail_wrap_counter);
}

/* mirrors packed.py:PackedDeviceRing.pop: 1 with the next chain in *c, 0 when there is none. */
static int pop_packed(DeviceSide *g, Chain *c)
{
    if (g->broken)
        return queue_broken(g->name);
    uint32_t head = g->next_avail_idx;
    if (!is_avail_packed(g, head, g->avail_wrap_counter))
        return 0;
    /* Read the rest of the chain only after the head's flags said it is available. */
    rmb();
    uint32_t slot = head, slots = 0;
    int wrap = g->avail_wrap_counter, indirect = 0, seen_write = 0;
    uint64_t total = 0, writable = 0;
    uint16_t buf_id, flags;

    c->nsegs = 0;
    for (;;) {
        const uint8_t *d = g->desc + (size_t)slot * DESC_SIZE;
        uint64_t addr = ld64(d);
        uint32_t len = ld32(d + DESC_LEN_OFF);
        buf_id = ld16(d + DESC_ID_OFF);
        flags = ld16(d + DESC_FLAGS_OFF);
        slots++;
        slot++;
        if (slot == g->num) {
            slot = 0;
            wrap ^= 1;
        }
        if (flags & VRING_DESC_F_INDIRECT) {
            if (c->nsegs || (flags & VRING_DESC_F_NEXT))
                return guest_fail(g, head, "indirect descriptor chained with others");
            const uint8_t *table = take_indirect_table(g, head, addr, len);
            if (table == NULL)
                return -1;
            indirect = 1;
            for (uint32_t i = 0; i < len / DESC_SIZE; i++) {
                const uint8_t *e = table + (size_t)i * DESC_SIZE;
                uint64_t e_addr = ld64(e);
                uint32_t e_len = ld32(e + DESC_LEN_OFF);
                uint16_t e_flags = ld16(e + DESC_FLAGS_OFF);
                if (e_flags & VRING_DESC_F_INDIRECT)
                    return guest_fail(g, head, "indirect descriptor inside an indirect table");
                if (take_segment(g, c, head, e_addr, e_len, e_flags, &seen_write, &total, &writable) < 0)
                    return -1;
            }
        } else if (take_segment(g, c, head, addr, len, flags, &seen_write, &total, &writable) < 0) {
            return -1;
        }
        if (indirect || !(flags & VRING_DESC_F_NEXT))
            break;
        if (slots == g->num)
            return guest_fail(g, head, "chain longer than the ring");
    }
    /* The buffer id is the one of the last descriptor in the ring (2.8.6). */
    if (buf_id >= g->num)
        return guest_fail(g, head, "buffer id %u out of range", buf_id);
    if (g->in_flight[buf_id])
        return guest_fail(g, head, "buffer id %u made available while still in flight", buf_id);
    g->in_flight[buf_id] = 1;
    g->next_avail_idx = slot;
    g->avail_wrap_counter = wrap;
    c->id = buf_id;
    c->ndescs = slots;
    c->indirect = indirect;
    c->writable_bytes = writable;
    return 1;
}

/* mirrors packed.py:_used_flags: AVAIL/USED bits that mark a descriptor used under `wrap`. */
static inline uint16_t used_flags_packed(int wrap)
{
    return wrap ? (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) : 0;
}

/* mirrors packed.py:PackedDeviceRing.stage_used: the used descriptor written, not yet visible to
 * the driver: all but the first staged one get their flags now, the first one's wait for
 * publish_used_packed. Its span goes to spans[0] (dirty log). */
static int stage_used_packed(DeviceSide *g, const Token *t, uint32_t written, Piece spans[1])
{
    uint32_t slot = g->next_used_idx;
    uint8_t *d = g->desc + (size_t)slot * DESC_SIZE;
    st32(d + DESC_LEN_OFF, written);
    st16(d + DESC_ID_OFF, t->id);
    uint16_t flags = used_flags_packed(g->used_wrap_counter) | (t->writable_bytes ? VRING_DESC_F_WRITE : 0);
    if (!g->first_staged) {
        g->first_staged = 1;
        g->first_staged_slot = slot;
        g->first_staged_flags = flags;
    } else {
        /* id and len must be visible before the flags turn the descriptor into a used one. */
        wmb();
        st16(d + DESC_FLAGS_OFF, flags);
    }
    g->in_flight[t->id] = 0;
    g->next_used_idx += t->ndescs;
    if (g->next_used_idx >= g->num) {
        g->next_used_idx -= g->num;
        g->used_wrap_counter ^= 1;
    }
    g->used_since_signal += t->ndescs;
    spans[0].addr = g->desc_addr + (uint64_t)slot * DESC_SIZE;
    spans[0].len = DESC_SIZE;
    return 1;
}

/* mirrors packed.py:PackedDeviceRing.publish_used: the first staged descriptor's flags, last. */
static int publish_used_packed(DeviceSide *g, Piece spans[1])
{
    if (!g->first_staged)
        return 0;
    g->first_staged = 0;
    /* Every staged id, len and later flags must be visible before the first flags expose them. */
    wmb();
    st16(g->desc + (size_t)g->first_staged_slot * DESC_SIZE + DESC_FLAGS_OFF, g->first_staged_flags);
    spans[0].addr = g->desc_addr + (uint64_t)g->first_staged_slot * DESC_SIZE;
    spans[0].len = DESC_SIZE;
    return 1;
}

/* mirrors packed.py:PackedDeviceRing.notify_area: the device event structure. */
static Piece notify_area_packed(const DeviceSide *g)
{
    Piece p = {g->device_addr, PACKED_EVENT_SIZE};
    return p;
}

/* mirrors packed.py:PackedDeviceRing.need_notify */
static int need_notify_packed(DeviceSide *g)
{
    /* The used flags must be visible before we read the driver's event suppression. */
    mb();
    uint64_t moved = g->used_since_signal;
    g->used_since_signal = 0;
    if (moved == 0)
        return 0;
    uint16_t off_wrap = ld16(g->driver + EVENT_OFF_WRAP), flags = ld16(g->driver + EVENT_FLAGS);
    if (flags == VRING_PACKED_EVENT_FLAG_DESC && g->event_idx)
        return packed_need_event(off_wrap, g->next_used_idx, moved, g->used_wrap_counter, g->num);
    return flags != VRING_PACKED_EVENT_FLAG_DISABLE;
}

/* mirrors packed.py:_write_event (off_wrap < 0: flags only) */
static inline void write_event_packed(uint8_t *event, int32_t off_wrap, uint16_t flags)
{
    if (off_wrap >= 0) {
        st16(event + EVENT_OFF_WRAP, (uint16_t)off_wrap);
        /* The other side reads flags, then off_wrap: off_wrap must be there first. */
        wmb();
    }
    st16(event + EVENT_FLAGS, flags);
}

/* mirrors packed.py:PackedDeviceRing.disable_notify */
static void disable_notify_packed(DeviceSide *g)
{
    write_event_packed(g->device, -1, VRING_PACKED_EVENT_FLAG_DISABLE);
}

/* mirrors packed.py:PackedDeviceRing.enable_notify: 1 when no chain is already waiting. */
static int enable_notify_packed(DeviceSide *g)
{
    if (g->event_idx)
        write_event_packed(g->device, (int32_t)(g->next_avail_idx | (uint32_t)g->avail_wrap_counter << WRAP_BIT),
                           VRING_PACKED_EVENT_FLAG_DESC);
    else
        write_event_packed(g->device, -1, VRING_PACKED_EVENT_FLAG_ENABLE);
    /* The event store must be visible before we look at the ring once more. */
    mb();
    return !has_avail_packed(g);
}

/* ---- the guest ring's API: the layout is picked here, once ------------------------------------ */

static inline int guest_has_avail(const DeviceSide *g)
{
    return g->packed ? has_avail_packed(g) : has_avail_split(g);
}
static inline int guest_pop(DeviceSide *g, Chain *c) { return g->packed ? pop_packed(g, c) : pop_split(g, c); }
/* A burst of pops starts: pop_split reads avail->idx afresh at its first pop, and then only when
 * the chains it said were there run out. Within a burst that is a race the driver may win or lose
 * either way; between bursts, each pop sees what the Python ring's pop would. */
static inline void guest_pop_burst(DeviceSide *g) { g->avail_idx_seen = g->last_avail_idx; }
static inline int guest_stage_used(DeviceSide *g, const Token *t, uint32_t written, Piece spans[1])
{
    return g->packed ? stage_used_packed(g, t, written, spans) : stage_used_split(g, t, written, spans);
}
static inline int guest_publish_used(DeviceSide *g, Piece spans[1])
{
    return g->packed ? publish_used_packed(g, spans) : publish_used_split(g, spans);
}
/* mirrors split.py/packed.py push_used: stage and publish one; up to 2 spans written. */
static inline int guest_push_used(DeviceSide *g, const Token *t, uint32_t written, Piece spans[2])
{
    int n = guest_stage_used(g, t, written, spans);
    return n + guest_publish_used(g, spans + n);
}
static inline Piece guest_notify_area(const DeviceSide *g)
{
    return g->packed ? notify_area_packed(g) : notify_area_split(g);
}
static inline int guest_need_notify(DeviceSide *g) { return g->packed ? need_notify_packed(g) : need_notify_split(g); }
static inline void guest_disable_notify(DeviceSide *g)
{
    if (g->packed)
        disable_notify_packed(g);
    else
        disable_notify_split(g);
}
static inline int guest_enable_notify(DeviceSide *g)
{
    return g->packed ? enable_notify_packed(g) : enable_notify_split(g);
}

/* ---- the guest ring from its spec ------------------------------------------------------------- */

/* A device side from its spec: (packed, num, desc, driver, device, event_idx, name, regions, state,
 * in_flight): buffers in `mem`, the three ring areas in `areas` (the spec's regions are the
 * caller's business). */
static int device_side_setup(DeviceSide *g, MemTable *mem, MemTable *areas, PyObject *spec)
{
    unsigned long long desc, driver, device, st[5];
    PyObject *regions, *in_flight;
    Py_buffer inf;
    if (!PyArg_ParseTuple(spec, "pIKKKpUO(KKKKK)O", &g->packed, &g->num, &desc, &driver, &device, &g->event_idx,
                          &g->name, &regions, &st[0], &st[1], &st[2], &st[3], &st[4], &in_flight))
        return -1;
    Py_INCREF(g->name);
    if (g->num == 0 || g->num > 32768) {
        PyErr_SetString(PyExc_ValueError, "ring size out of range");
        return -1;
    }
    g->mem = mem;
    g->desc_addr = desc;
    g->driver_addr = driver;
    g->device_addr = device;
    g->desc = area(areas, desc, (uint64_t)DESC_SIZE * g->num, "guest descriptor area");
    g->driver = area(areas, driver, g->packed ? PACKED_EVENT_SIZE : 6 + 2 * (uint64_t)g->num, "guest driver area");
    g->device = area(areas, device, g->packed ? PACKED_EVENT_SIZE : 6 + 8 * (uint64_t)g->num, "guest device area");
    if (!g->desc || !g->driver || !g->device)
        return -1;
    if (g->packed) {
        g->next_avail_idx = (uint32_t)st[0];
        g->avail_wrap_counter = (int)(st[1] & 1);
        g->next_used_idx = (uint32_t)st[2];
        g->used_wrap_counter = (int)(st[3] & 1);
        g->used_since_signal = st[4];
        if (g->next_avail_idx >= g->num || g->next_used_idx >= g->num) {
            PyErr_SetString(PyExc_ValueError, "packed ring state out of range");
            return -1;
        }
    } else {
        g->last_avail_idx = g->avail_idx_seen = (uint16_t)st[0];
        g->used_idx = (uint16_t)st[1];
        g->signalled_used = (uint16_t)st[2];
        g->used_event_off = AVAIL_RING + 2 * g->num;
        g->avail_event_off = USED_RING + 8 * g->num;
    }
    g->staged = 0;
    g->first_staged = 0;
    g->in_flight = PyMem_Calloc(g->num, 1);
    if (g->in_flight == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (PyObject_GetBuffer(in_flight, &inf, PyBUF_SIMPLE) < 0)
        return -1;
    if (inf.len != g->num) {
        PyBuffer_Release(&inf);
        PyErr_SetString(PyExc_ValueError, "in_flight must have one byte per ring entry");
        return -1;
    }
    memcpy(g->in_flight, inf.buf, g->num);
    PyBuffer_Release(&inf);
    return 0;
}

#endif /* VDPA_SVQ_RING_H */
