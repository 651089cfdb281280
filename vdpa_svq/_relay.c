/*
 * vdpa_svq._relay: the shadow virtqueue's hot loop in C.
 *
 * relay.py is the reference. This file mirrors it function for function, with the same names in
 * the same order (each tagged "mirrors relay.py:..."), and the driver side of the shadow ring from
 * ring/split.py and ring/packed.py (each tagged "mirrors split.py:SplitDriverRing.add" etc.). The
 * guest-visible ring is driven as its DEVICE (the code in _ring.h, which the soft net device
 * shares), the shadow ring as its DRIVER (here: only the relay drives a ring); split and packed
 * twins sit in their own sections and the layout is picked once, in the guest_* / shadow_*
 * dispatchers. The loop that runs relays, the Pump, is in _pump.c (same extension; _relay.h is
 * what the two files know of each other).
 *
 * What the C adds nothing to: the rules. Ids, free lists, event indexes, error reasons and indexes
 * are exactly the Python rings', so that the ring memory both produce is byte-identical (see
 * tests/differential). What it leaves out: policy, logging and allocation on the hot path. Every
 * array is sized at construction; the only allocation after that grows the scratch list of a guest
 * chain longer than any chain that can fit the shadow ring, i.e. on the way to a GuestRingError.
 *
 * Memory comes in as tables: guest (and shadow) memory regions (gpa, size, buffer) for reading
 * and writing rings and for checking addresses; the IOVA map (gpa, size, iova) for translation.
 * The relay holds buffer exports of the regions' mmaps and of the dirty bitmap, so that they
 * cannot be closed or resized under it; close() (or deallocation) releases them.
 *
 * Trust: as _ring.h says, everything read from either ring is checked before it is used, and
 * read once.
 */
#include "_ring.h" /* the one file of this extension that includes it (see there) */
#include "_relay.h"

#include <pthread.h>
#include <errno.h>
#include <unistd.h>

/* dirty.py */
#define PAGE_SHIFT 12

#define NO_NODE UINT32_MAX

/* ==== The IOVA map (memory/iova.py) ============================================================ */

typedef struct {
    uint64_t gpa, size, iova;
} IovaMapping;

/* The mapping that holds gpa, else NULL. The one found last is tried first: as in mem_region,
 * it is what the bisection would find, without its unpredictable branches. */
static inline const IovaMapping *iova_find(const IovaMapping *maps, Py_ssize_t nmaps, Py_ssize_t *hint, uint64_t gpa)
{
    if (*hint < nmaps && gpa >= maps[*hint].gpa && gpa - maps[*hint].gpa < maps[*hint].size)
        return &maps[*hint];
    Py_ssize_t lo = 0, hi = nmaps;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (gpa < maps[mid].gpa)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (lo == 0 || gpa - maps[lo - 1].gpa >= maps[lo - 1].size)
        return NULL;
    *hint = lo - 1;
    return &maps[lo - 1];
}

/* mirrors memory/iova.py:IovaMap.translate: append the pieces covering [gpa, gpa+length) to
 * dst (storing at most cap of them, counting the rest in *n). On a hole, -1 with the failing
 * (gpa, length) in *bad, as the GuestMemoryError of the reference carries them. Inlined into
 * svq_translate (once per segment, mostly one piece from the hinted mapping). */
static inline __attribute__((always_inline)) int iova_translate(const IovaMapping *maps, Py_ssize_t nmaps,
                                                                Py_ssize_t *hint, uint64_t gpa, uint64_t length,
                                                                Piece *dst, uint64_t cap, uint64_t *n, Piece *bad)
{
    for (;;) {
        const IovaMapping *m = iova_find(maps, nmaps, hint, gpa);
        if (m == NULL) {
            bad->addr = gpa;
            bad->len = length;
            return -1;
        }
        uint64_t room = m->size - (gpa - m->gpa);
        uint64_t take = length < room ? length : room;
        if (*n < cap) {
            dst[*n].addr = m->iova + (gpa - m->gpa);
            dst[*n].len = take;
        }
        (*n)++;
        if (take == length)
            return 0;
        gpa += take;
        length -= take;
    }
}

/* ==== The shadow ring: we are its DRIVER ======================================================= */

typedef struct {
    int packed, event_idx, broken, cb_enabled;
    uint32_t num;
    PyObject *name;
    uint8_t *desc, *driver, *device;
    int has_area;                 /* an IndirectArea: one table of area_max entries per buffer id */
    uint64_t area_gpa;
    uint32_t area_max;
    uint8_t *area_host;
    uint16_t *next;               /* split: free list and chain links; packed: free list of ids */
    uint32_t free_head, num_free;
    uint64_t num_added;
    uint8_t *in_use;              /* the reference's `_token[id] is not None` */
    uint32_t *count;              /* ring slots the chain of this head / id took */
    uint64_t *writable;           /* device-writable bytes of that chain */
    Token *tok;
    /* token arena: the writable guest segments of every chain in flight, one linked list each */
    uint64_t *arena_addr;
    uint32_t *arena_len, *arena_next;
    uint32_t arena_free;
    /* split */
    uint16_t avail_idx_shadow, last_used_idx_split;
    uint32_t used_event_off, avail_event_off;
    /* packed */
    uint32_t next_avail_idx, last_used_idx;
    int avail_wrap_counter, used_wrap_counter;
} DriverSide;

static int shadow_fail(DriverSide *s, long long index, const char *fmt, ...)
{
    va_list ap;
    s->broken = 1;
    va_start(ap, fmt);
    ring_failv(DeviceRingError, s->name, index, fmt, ap);
    va_end(ap);
    return -1;
}

/* The reference's `self._token[id] = token` (plus _count and _writable): keep what
 * forward_used() needs of the guest chain, its writable segments in the arena (inlined into both
 * adds: once per chain). */
static inline __attribute__((always_inline)) void token_store(DriverSide *s, uint32_t id, const Chain *chain,
                                                              uint32_t slots, uint64_t writable)
{
    Token *t = &s->tok[id];
    t->id = chain->id;
    t->ndescs = chain->ndescs;
    t->writable_bytes = chain->writable_bytes;
    t->seg_head = t->seg_tail = NO_NODE;
    t->nsegs = 0;
    for (uint32_t i = 0; i < chain->nsegs; i++) {
        if (!chain->segs[i].write)
            continue;
        /* Never empty: a writable segment is at least one translated piece, and the pieces in
         * flight are bounded by the ring (see relay_init). */
        uint32_t node = s->arena_free;
        s->arena_free = s->arena_next[node];
        s->arena_addr[node] = chain->segs[i].addr;
        s->arena_len[node] = chain->segs[i].len;
        if (t->seg_tail == NO_NODE)
            t->seg_head = node;
        else
            s->arena_next[t->seg_tail] = node;
        t->seg_tail = node;
        t->nsegs++;
    }
    s->in_use[id] = 1;
    s->count[id] = slots;
    s->writable[id] = writable;
}

/* The reference's `self._token[id] = None`. The nodes go back to the arena's free list but keep
 * their contents until the next add(): the caller still logs them (forward_used). */
static void token_release(DriverSide *s, uint32_t id)
{
    Token *t = &s->tok[id];
    if (t->nsegs) {
        s->arena_next[t->seg_tail] = s->arena_free;
        s->arena_free = t->seg_head;
    }
    s->in_use[id] = 0;
}

/* The i-th buffer of out + in_ as (addr, len, flags), as add() builds `segs`. */
static inline void seg_at(const Piece *out, uint32_t nout, const Piece *in, uint32_t i, uint64_t *addr,
                          uint32_t *len, uint16_t *flags)
{
    const Piece *p = i < nout ? &out[i] : &in[i - nout];
    *addr = p->addr;
    *len = (uint32_t)p->len;
    *flags = i < nout ? 0 : VRING_DESC_F_WRITE;
}

/* The checks add() makes before it writes anything (the relay never fails them: see _use_indirect). */
static int add_check(DriverSide *s, uint32_t total, int use_indirect)
{
    if (s->broken)
        return queue_broken(s->name);
    if (total == 0) {
        WITH_GIL(PyErr_SetString(PyExc_ValueError, "a chain needs at least one buffer"));
        return -1;
    }
    if (total > s->num) {
        WITH_GIL(PyErr_Format(PyExc_ValueError, "%U: a chain of %u descriptors is longer than the queue (%u)", s->name,
                              (unsigned)total, (unsigned)s->num));
        return -1;
    }
    if (use_indirect && (!s->has_area || total > s->area_max)) {
        WITH_GIL(PyErr_SetString(PyExc_ValueError, "indirect chain longer than the indirect area allows"));
        return -1;
    }
    return 0;
}

/* ---- split ----------------------------------------------------------------------------------- */

static inline void write_desc_split(uint8_t *d, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    st64(d, addr);
    st32(d + 8, len);
    st16(d + 12, flags);
    st16(d + 14, next);
}

/* mirrors split.py:SplitDriverRing.add: 0 when added, 1 when full (RingFull: nothing written). */
static int add_split(DriverSide *s, const Piece *out, uint32_t nout, const Piece *in, uint32_t nin,
                     const Chain *token, int indirect)
{
    uint32_t total = nout + nin;
    int use_indirect = indirect && total > 1;
    if (add_check(s, total, use_indirect) < 0)
        return -1;
    uint32_t slots = use_indirect ? 1 : total;
    if (slots > s->num_free)
        return 1;
    uint32_t head = s->free_head, last, i;
    uint64_t addr, writable = 0;
    uint32_t len;
    uint16_t flags;
    if (use_indirect) {
        uint64_t table = s->area_gpa + (uint64_t)head * s->area_max * DESC_SIZE;
        uint8_t *t = s->area_host + (size_t)head * s->area_max * DESC_SIZE;
        for (i = 0; i < total; i++) {
            seg_at(out, nout, in, i, &addr, &len, &flags);
            uint16_t nxt = i + 1 < total ? VRING_DESC_F_NEXT : 0;
            write_desc_split(t + (size_t)i * DESC_SIZE, addr, len, flags | nxt, nxt ? (uint16_t)(i + 1) : 0);
        }
        write_desc_split(s->desc + (size_t)head * DESC_SIZE, table, total * DESC_SIZE, VRING_DESC_F_INDIRECT, 0);
        last = head;
    } else {
        i = head;
        last = head;
        for (uint32_t n = 0; n < total; n++) {
            seg_at(out, nout, in, n, &addr, &len, &flags);
            uint16_t nxt = n + 1 < total ? VRING_DESC_F_NEXT : 0;
            write_desc_split(s->desc + (size_t)i * DESC_SIZE, addr, len, flags | nxt, nxt ? s->next[i] : 0);
            last = i;
            i = s->next[i];
        }
    }
    for (i = 0; i < nin; i++)
        writable += in[i].len;
    s->free_head = s->next[last];
    s->num_free -= slots;
    token_store(s, head, token, slots, writable);
    /* Put the head in the avail ring, then publish the index: the device reads avail->idx and
     * then the ring entry and the descriptors, so they must be visible first (2.7.13). */
    st16(s->driver + AVAIL_RING + 2 * ring_slot(s->avail_idx_shadow, s->num), (uint16_t)head);
    wmb();
    s->avail_idx_shadow++;
    st16(s->driver + AVAIL_IDX, s->avail_idx_shadow);
    s->num_added++;
    return 0;
}

/* mirrors split.py:SplitDriverRing.kick_needed */
static int kick_needed_split(DriverSide *s)
{
    /* The new avail idx must be visible before we read the device's suppression state, else the
     * device may go to sleep having missed it while we skip the kick. */
    mb();
    uint16_t new_ = s->avail_idx_shadow, old = (uint16_t)(new_ - (uint16_t)s->num_added);
    uint64_t added = s->num_added;
    s->num_added = 0;
    if (added == 0)
        return 0;
    if (s->event_idx)
        return need_event(ld16(s->device + s->avail_event_off), new_, old);
    return !(ld16(s->device + USED_FLAGS) & VRING_USED_F_NO_NOTIFY);
}

/* mirrors split.py:SplitDriverRing._free_chain */
static void free_chain_split(DriverSide *s, uint32_t head)
{
    uint32_t last = head;
    for (uint32_t k = 0; k + 1 < s->count[head]; k++)
        last = s->next[last];
    s->next[last] = (uint16_t)s->free_head;
    s->free_head = head;
    s->num_free += s->count[head];
    token_release(s, head);
}

/* mirrors split.py:SplitDriverRing.get_used: 1 with the token and written length, 0 when none. */
static int get_used_split(DriverSide *s, Token *tok, uint32_t *length)
{
    if (s->broken)
        return queue_broken(s->name);
    uint16_t used_idx = ld16(s->device + USED_IDX);
    if (used_idx == s->last_used_idx_split)
        return 0;
    if ((uint16_t)(used_idx - s->last_used_idx_split) > s->num)
        return shadow_fail(s, used_idx, "used idx jumped from %u to %u", s->last_used_idx_split, used_idx);
    /* Only read the used element after used->idx said it is there. */
    rmb();
    uint32_t slot = ring_slot(s->last_used_idx_split, s->num);
    const uint8_t *elem = s->device + USED_RING + USED_ELEM_SIZE * slot;
    uint32_t head = ld32(elem), len = ld32(elem + 4);
    if (head >= s->num)
        return shadow_fail(s, slot, "id %u out of range", head);
    if (!s->in_use[head])
        return shadow_fail(s, slot, "id %u is not a head in use", head);
    if (s->writable[head] == 0)
        len = 0; /* nothing writable, nothing written (split.py says who reports otherwise) */
    else if (len > s->writable[head])
        return shadow_fail(s, slot, "used length %u > writable %llu of id %u", len,
                           (unsigned long long)s->writable[head], head);
    *tok = s->tok[head];
    free_chain_split(s, head);
    s->last_used_idx_split++;
    if (s->event_idx && s->cb_enabled) {
        /* Ask for an interrupt at the next used entry; ordered before the next used->idx read. */
        st16(s->driver + s->used_event_off, s->last_used_idx_split);
        mb();
    }
    *length = len;
    return 1;
}

/* mirrors split.py:SplitDriverRing.disable_cb */
static void disable_cb_split(DriverSide *s)
{
    s->cb_enabled = 0;
    if (!s->event_idx)
        st16(s->driver + AVAIL_FLAGS, VRING_AVAIL_F_NO_INTERRUPT);
}

/* mirrors split.py:SplitDriverRing.enable_cb (_enable_cb_after(0)): 0 if used buffers are pending. */
static int enable_cb_split(DriverSide *s)
{
    s->cb_enabled = 1;
    if (s->event_idx)
        st16(s->driver + s->used_event_off, s->last_used_idx_split);
    else
        st16(s->driver + AVAIL_FLAGS, 0);
    /* The flag / used_event store must be visible before we look at used->idx once more. */
    mb();
    return (uint16_t)(ld16(s->device + USED_IDX) - s->last_used_idx_split) == 0;
}

/* ---- packed ---------------------------------------------------------------------------------- */

/* mirrors packed.py:_avail_flags: AVAIL/USED bits that make a descriptor available under `wrap`. */
static inline uint16_t avail_flags_packed(int wrap)
{
    return wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
}

/* mirrors packed.py:PackedDriverRing.add: 0 when added, 1 when full (RingFull: nothing written). */
static int add_packed(DriverSide *s, const Piece *out, uint32_t nout, const Piece *in, uint32_t nin,
                      const Chain *token, int indirect)
{
    uint32_t total = nout + nin;
    int use_indirect = indirect && total > 1;
    if (add_check(s, total, use_indirect) < 0)
        return -1;
    uint32_t slots = use_indirect ? 1 : total;
    if (slots > s->num_free)
        return 1;
    uint32_t buf_id = s->free_head, i;
    uint64_t addr, writable = 0;
    uint32_t len;
    uint16_t flags;
    uint32_t head = s->next_avail_idx;
    uint16_t head_flags;
    if (use_indirect) {
        uint64_t table = s->area_gpa + (uint64_t)buf_id * s->area_max * DESC_SIZE;
        uint8_t *t = s->area_host + (size_t)buf_id * s->area_max * DESC_SIZE;
        for (i = 0; i < total; i++) {
            uint8_t *d = t + (size_t)i * DESC_SIZE;
            seg_at(out, nout, in, i, &addr, &len, &flags);
            st64(d, addr);
            st32(d + DESC_LEN_OFF, len);
            st16(d + DESC_ID_OFF, 0);
            st16(d + DESC_FLAGS_OFF, flags);
        }
        /* The one ring descriptor: everything but its flags now, the flags last, below. */
        uint8_t *d = s->desc + (size_t)head * DESC_SIZE;
        head_flags = VRING_DESC_F_INDIRECT | avail_flags_packed(s->avail_wrap_counter);
        st64(d, table);
        st32(d + DESC_LEN_OFF, total * DESC_SIZE);
        st16(d + DESC_ID_OFF, (uint16_t)buf_id);
        if (++s->next_avail_idx == s->num) {
            s->next_avail_idx = 0;
            s->avail_wrap_counter ^= 1;
        }
    } else {
        head_flags = (total > 1 ? VRING_DESC_F_NEXT : 0) | (nout ? 0 : VRING_DESC_F_WRITE) |
                     avail_flags_packed(s->avail_wrap_counter);
        for (i = 0; i < total; i++) {
            uint32_t slot = s->next_avail_idx;
            uint8_t *d = s->desc + (size_t)slot * DESC_SIZE;
            seg_at(out, nout, in, i, &addr, &len, &flags);
            flags |= i + 1 < total ? VRING_DESC_F_NEXT : 0;
            st64(d, addr);
            st32(d + DESC_LEN_OFF, len);
            st16(d + DESC_ID_OFF, (uint16_t)buf_id);
            if (i != 0) /* the head's flags last, below */
                st16(d + DESC_FLAGS_OFF, flags | avail_flags_packed(s->avail_wrap_counter));
            if (++s->next_avail_idx == s->num) {
                s->next_avail_idx = 0;
                s->avail_wrap_counter ^= 1;
            }
        }
    }
    for (i = 0; i < nin; i++)
        writable += in[i].len;
    s->free_head = s->next[buf_id];
    s->num_free -= slots;
    s->num_added += slots;
    token_store(s, buf_id, token, slots, writable);
    /* "The driver MUST NOT make the first descriptor in the list available before all subsequent
     * descriptors comprising the list are made available" (2.8.21.1): the rest of the chain must
     * be visible before the head's flags flip it to available. */
    wmb();
    st16(s->desc + (size_t)head * DESC_SIZE + DESC_FLAGS_OFF, head_flags);
    return 0;
}

/* mirrors packed.py:PackedDriverRing.kick_needed */
static int kick_needed_packed(DriverSide *s)
{
    /* The head flags must be visible before we read the device's event suppression. */
    mb();
    uint64_t moved = s->num_added;
    s->num_added = 0;
    if (moved == 0)
        return 0;
    uint16_t off_wrap = ld16(s->device + EVENT_OFF_WRAP), flags = ld16(s->device + EVENT_FLAGS);
    if (flags == VRING_PACKED_EVENT_FLAG_DESC && s->event_idx)
        return packed_need_event(off_wrap, s->next_avail_idx, moved, s->avail_wrap_counter, s->num);
    return flags != VRING_PACKED_EVENT_FLAG_DISABLE;
}

/* mirrors packed.py:PackedDriverRing._is_used */
static inline int is_used_packed(const DriverSide *s, uint32_t slot, int wrap)
{
    uint16_t flags = ld16(s->desc + (size_t)slot * DESC_SIZE + DESC_FLAGS_OFF);
    int avail = (flags & VRING_PACKED_DESC_F_AVAIL) != 0;
    return avail == ((flags & VRING_PACKED_DESC_F_USED) != 0) && avail == (wrap != 0);
}

/* mirrors packed.py:PackedDriverRing.get_used: 1 with the token and written length, 0 when none. */
static int get_used_packed(DriverSide *s, Token *tok, uint32_t *length)
{
    if (s->broken)
        return queue_broken(s->name);
    uint32_t slot = s->last_used_idx;
    if (!is_used_packed(s, slot, s->used_wrap_counter))
        return 0;
    /* Only read id and len after the flags said the descriptor is used. */
    rmb();
    const uint8_t *d = s->desc + (size_t)slot * DESC_SIZE;
    uint32_t len = ld32(d + DESC_LEN_OFF);
    uint16_t buf_id = ld16(d + DESC_ID_OFF);
    /* 2.8.4 calls the length reserved without WRITE, but QEMU never sets WRITE in used descriptors
     * and Linux reads the length regardless: so do we (checked against the chain below). */
    if (buf_id >= s->num)
        return shadow_fail(s, slot, "id %u out of range", buf_id);
    if (!s->in_use[buf_id])
        return shadow_fail(s, slot, "id %u is not in use", buf_id);
    if (s->writable[buf_id] == 0)
        len = 0; /* nothing writable, nothing written: DPDK's packed vhost reports TX lengths */
    else if (len > s->writable[buf_id])
        return shadow_fail(s, slot, "used length %u > writable %llu of id %u", len,
                           (unsigned long long)s->writable[buf_id], buf_id);
    *tok = s->tok[buf_id];
    s->last_used_idx += s->count[buf_id];
    if (s->last_used_idx >= s->num) {
        s->last_used_idx -= s->num;
        s->used_wrap_counter ^= 1;
    }
    s->num_free += s->count[buf_id];
    token_release(s, buf_id);
    s->next[buf_id] = (uint16_t)s->free_head;
    s->free_head = buf_id;
    if (s->event_idx && s->cb_enabled) {
        /* Ask for an interrupt at the next used descriptor; ordered before the next flags read. */
        st16(s->driver + EVENT_OFF_WRAP, (uint16_t)(s->last_used_idx | (uint32_t)s->used_wrap_counter << WRAP_BIT));
        mb();
    }
    *length = len;
    return 1;
}

/* mirrors packed.py:PackedDriverRing.disable_cb */
static void disable_cb_packed(DriverSide *s)
{
    s->cb_enabled = 0;
    write_event_packed(s->driver, -1, VRING_PACKED_EVENT_FLAG_DISABLE);
}

/* mirrors packed.py:PackedDriverRing.enable_cb (_enable_cb_after(0)): 0 if a used buffer is pending. */
static int enable_cb_packed(DriverSide *s)
{
    s->cb_enabled = 1;
    uint32_t idx = s->last_used_idx;
    int wrap = s->used_wrap_counter;
    if (s->event_idx)
        write_event_packed(s->driver, (int32_t)(idx | (uint32_t)wrap << WRAP_BIT), VRING_PACKED_EVENT_FLAG_DESC);
    else
        write_event_packed(s->driver, -1, VRING_PACKED_EVENT_FLAG_ENABLE);
    /* The event store must be visible before we look at the ring once more. */
    mb();
    return !is_used_packed(s, idx, wrap);
}

/* ---- the shadow ring's API: the layout is picked here, once ----------------------------------- */

static inline int shadow_add(DriverSide *s, const Piece *out, uint32_t nout, const Piece *in, uint32_t nin,
                             const Chain *token, int indirect)
{
    return s->packed ? add_packed(s, out, nout, in, nin, token, indirect)
                     : add_split(s, out, nout, in, nin, token, indirect);
}
static inline int shadow_kick_needed(DriverSide *s) { return s->packed ? kick_needed_packed(s) : kick_needed_split(s); }
static inline int shadow_get_used(DriverSide *s, Token *tok, uint32_t *length)
{
    return s->packed ? get_used_packed(s, tok, length) : get_used_split(s, tok, length);
}
static inline void shadow_disable_cb(DriverSide *s)
{
    if (s->packed)
        disable_cb_packed(s);
    else
        disable_cb_split(s);
}
static inline int shadow_enable_cb(DriverSide *s) { return s->packed ? enable_cb_packed(s) : enable_cb_split(s); }

/* ==== The shadow virtqueue (relay.py) ========================================================== */

typedef struct {
    unsigned long long forwarded, returned, bytes_written, device_kicks, guest_calls, ring_full;
} RelayStats;

/* Dirty pages are gathered during one call (a burst) and put in the log at its end, one atomic
 * OR per page rather than per write: a burst's used elements share a page or two. Every write
 * is before its mark still, and no call returns with marks pending, so a sync of the log never
 * misses a page written before the relay stopped (as DPDK's vhost log cache does it). */
#define MARK_BATCH 64

typedef struct Relay {
    PyObject_HEAD
    PyObject *name;
    int indirect;
    PyObject *device_kick, *guest_call; /* callables, or None when the notifier is an eventfd */
    int device_kick_fd, guest_call_fd;  /* eventfds written directly, or -1 */
    PyObject *error; /* the RingError that stopped this queue, or None */
    RelayStats stats;
    int held;        /* the reference's `_held is not None`: chain, out and in_ wait below */
    Chain chain;     /* the guest chain being moved (or held) */
    Piece *out, *in; /* its translated buffers */
    uint64_t nout, nin, piece_cap;
    DeviceSide guest;
    DriverSide shadow;
    MemTable guest_mem, shadow_mem;
    IovaMapping *iova;
    Py_ssize_t niova, iova_hint;
    Py_buffer dirty_view; /* the DirtyBitmap's bytearray, when there is a dirty log */
    int has_dirty;
    uint64_t dirty_pages;
    uint64_t marks[MARK_BATCH]; /* pages written during the current call, not yet in the log */
    uint32_t nmarks;
    int ready;
    /* Held by whoever works on the relay: the pump (without the GIL), a Python method (with it).
     * See "Who touches a relay" below. Recursive: a notifier that is a Python callable may call
     * back into its own relay, as it could when the GIL was the lock. */
    pthread_mutex_t lock;
} Relay;

static int svq_mark_pages(Relay *q, uint64_t gpa, uint64_t length);

/* mirrors relay.py:ShadowVirtqueue._mark (and dirty.py:DirtyBitmap.mark): every page that
 * [gpa, gpa+length) touches, marked by the end of this call (svq_flush_marks). Called a few times
 * per chain, mostly for a page marked just before (a used ring's): that case is decided here,
 * inline; the rest (and the range check's error) in svq_mark_pages. */
static inline int svq_mark(Relay *q, uint64_t gpa, uint64_t length)
{
    if (!q->has_dirty || length == 0)
        return 0;
    uint64_t end, n = q->nmarks;
    if (__builtin_add_overflow(gpa, length - 1, &end) || (end >> PAGE_SHIFT) >= q->dirty_pages)
        return svq_mark_pages(q, gpa, length); /* beyond the log: the error */
    uint64_t page = gpa >> PAGE_SHIFT;
    if (page == end >> PAGE_SHIFT && ((n > 0 && q->marks[n - 1] == page) || (n > 1 && q->marks[n - 2] == page)))
        return 0; /* a used ring's page, again */
    return svq_mark_pages(q, gpa, length);
}
static inline int svq_use_indirect(const Relay *q, uint64_t n);

/* mirrors relay.py:ShadowVirtqueue._translate: q->chain's segments to q->out and q->in. */
static int svq_translate(Relay *q)
{
    Chain *c = &q->chain;
    Piece bad;
    q->nout = q->nin = 0;
    for (uint32_t i = 0; i < c->nsegs; i++) {
        const Seg *sg = &c->segs[i];
        Piece *dst = sg->write ? q->in : q->out;
        uint64_t *n = sg->write ? &q->nin : &q->nout;
        if (sg->len) {
            if (iova_translate(q->iova, q->niova, &q->iova_hint, sg->addr, sg->len, dst, q->piece_cap, n, &bad) < 0)
                goto unmapped;
        } else { /* keep an empty buffer as one, at its translated address */
            Piece first;
            uint64_t one = 0;
            if (iova_translate(q->iova, q->niova, &q->iova_hint, sg->addr, 1, &first, 1, &one, &bad) < 0)
                goto unmapped;
            if (*n < q->piece_cap) {
                dst[*n].addr = first.addr;
                dst[*n].len = 0;
            }
            (*n)++;
        }
    }
    uint64_t total = q->nout + q->nin;
    uint64_t slots = svq_use_indirect(q, total) ? 1 : total;
    if (slots > q->shadow.num)
        return ring_fail(GuestRingError, q->name, c->id, "chain of %llu descriptors can never fit the shadow ring",
                         (unsigned long long)slots);
    return 0;
unmapped:
    return ring_fail(GuestRingError, q->name, c->id, "chain %u: guest memory [0x%llx, +0x%llx): not mapped for the device",
                     c->id, (unsigned long long)bad.addr, (unsigned long long)bad.len);
}

/* mirrors relay.py:ShadowVirtqueue._use_indirect */
static inline int svq_use_indirect(const Relay *q, uint64_t n)
{
    return q->indirect && q->shadow.has_area && 1 < n && n <= q->shadow.area_max && n <= q->shadow.num;
}

/* Add one to an eventfd: 0, or the errno. EAGAIN is success: the counter is at its maximum (the
 * fds a peer sends are made non-blocking), so a wake-up is pending anyway. */
static int eventfd_signal(int fd)
{
    uint64_t one = 1;
    return write(fd, &one, sizeof one) < 0 && errno != EAGAIN ? errno : 0;
}

/* Notify the other side: an eventfd write when the notifier is an eventfd (no Python on the hot
 * path, no GIL), else a call of the Python callable, with the GIL taken for it. */
static int notify(int fd, PyObject *fn)
{
    if (fd >= 0) {
        int err = eventfd_signal(fd);
        if (err) {
            errno = err;
            WITH_GIL(PyErr_SetFromErrno(PyExc_OSError));
            return -1;
        }
        return 0;
    }
    PyObject *r;
    WITH_GIL(r = PyObject_CallNoArgs(fn); Py_XDECREF(r));
    return r == NULL ? -1 : 0;
}

/* mirrors relay.py:ShadowVirtqueue.forward_avail: chains moved, or -1 with an exception. */
static Py_ssize_t svq_forward_avail(Relay *q)
{
    Py_ssize_t moved = 0;
    guest_pop_burst(&q->guest);
    for (;;) {
        if (!q->held) {
            int r = guest_pop(&q->guest, &q->chain);
            if (r < 0)
                return -1;
            if (r == 0)
                break;
            if (svq_translate(q) < 0)
                return -1;
        }
        int r = shadow_add(&q->shadow, q->out, (uint32_t)q->nout, q->in, (uint32_t)q->nin, &q->chain,
                           svq_use_indirect(q, q->nout + q->nin));
        if (r < 0)
            return -1;
        if (r == 1) {
            /* Backpressure: keep this chain and take no more from the guest until the device
             * frees room (forward_used() retries it). */
            if (!q->held)
                q->stats.ring_full++;
            q->held = 1;
            break;
        }
        q->held = 0;
        moved++;
    }
    q->stats.forwarded += moved;
    if (moved && shadow_kick_needed(&q->shadow)) {
        q->stats.device_kicks++;
        if (notify(q->device_kick_fd, q->device_kick) < 0)
            return -1;
    }
    return moved;
}

static int svq_log_written(Relay *q, const Token *t, uint32_t written);

/* mirrors relay.py:ShadowVirtqueue.forward_used: buffers returned, or -1 with an exception. */
static Py_ssize_t svq_forward_used(Relay *q)
{
    Py_ssize_t moved = 0;
    Token t = {0};
    uint32_t written = 0;
    Piece spans[1];
    int failed = 0;
    for (;;) {
        int r = shadow_get_used(&q->shadow, &t, &written);
        if (r <= 0) {
            failed = r < 0;
            break;
        }
        if (svq_log_written(q, &t, written) < 0) {
            failed = 1;
            break;
        }
        guest_stage_used(&q->guest, &t, written, spans);
        q->stats.bytes_written += written;
        moved++;
        if (svq_mark(q, spans[0].addr, spans[0].len) < 0) {
            failed = 1;
            break;
        }
    }
    /* What the device made used together reaches the guest together; also on the way out of a
     * fault (relay.py says why). Marked either way: the guest sees the new used index. */
    if (guest_publish_used(&q->guest, spans) && svq_mark(q, spans[0].addr, spans[0].len) < 0)
        return -1;
    if (failed)
        return -1;
    q->stats.returned += moved;
    if (moved && guest_need_notify(&q->guest)) {
        q->stats.guest_calls++;
        if (q->guest_call_fd < 0)
            return notify(-1, q->guest_call) < 0 ? -1 : moved;
        int err = eventfd_signal(q->guest_call_fd);
        if (err) /* the peer's fd went bad: this queue stops, not the loop (relay.py says the same) */
            return ring_fail_noindex(GuestRingError, q->name, "the guest's call eventfd failed: %s", strerror(err));
    }
    return moved;
}

/* mirrors relay.py:ShadowVirtqueue._log_written: the first `written` bytes of the writable
 * segments, in order (the token's arena nodes are intact until the next add). */
static int svq_log_written(Relay *q, const Token *t, uint32_t written)
{
    uint64_t left = written;
    uint32_t node = t->seg_head;
    for (uint32_t i = 0; i < t->nsegs; i++, node = q->shadow.arena_next[node]) {
        if (left == 0)
            break;
        uint64_t len = q->shadow.arena_len[node];
        uint64_t n = len < left ? len : left;
        if (svq_mark(q, q->shadow.arena_addr[node], n) < 0)
            return -1;
        left -= n;
    }
    return 0;
}

/* Put the call's pending marks in the log: one atomic OR per page, in the vhost log format. */
static void svq_flush_marks(Relay *q)
{
    uint8_t *bits = q->dirty_view.buf;
    for (uint32_t i = 0; i < q->nmarks; i++) {
        uint64_t page = q->marks[i];
        __atomic_fetch_or(&bits[page >> 3], (uint8_t)(1u << (page & 7)), __ATOMIC_RELAXED);
    }
    q->nmarks = 0;
}

/* svq_mark's slow path: the range checked against the log, each page not marked just before added
 * to the batch. */
static int svq_mark_pages(Relay *q, uint64_t gpa, uint64_t length)
{
    uint64_t first = gpa >> PAGE_SHIFT;
    uint64_t last = (uint64_t)(((unsigned __int128)gpa + length - 1) >> PAGE_SHIFT);
    if ((((unsigned __int128)gpa + length - 1) >> PAGE_SHIFT) >= q->dirty_pages) {
        char msg[128]; /* PyErr_Format has no %llx before 3.12 */
        snprintf(msg, sizeof msg, "dirty range [0x%llx, +0x%llx) beyond the log of %llu pages",
                 (unsigned long long)gpa, (unsigned long long)length, (unsigned long long)q->dirty_pages);
        WITH_GIL(PyErr_SetString(PyExc_ValueError, msg));
        return -1;
    }
    for (uint64_t page = first; page <= last; page++) {
        uint32_t n = q->nmarks;
        if ((n > 0 && q->marks[n - 1] == page) || (n > 1 && q->marks[n - 2] == page))
            continue; /* a used ring's page, again */
        if (n == MARK_BATCH)
            svq_flush_marks(q);
        q->marks[q->nmarks++] = page;
    }
    return 0;
}

static PyObject *guarded_from_python(Relay *q, int (*work)(Relay *));

/* mirrors relay.py:ShadowVirtqueue.on_guest_kick: relay what the guest made available, then ask
 * for the next kick, race-free. */
static PyObject *svq_on_guest_kick(Relay *q, PyObject *Py_UNUSED(ignored))
{
    return guarded_from_python(q, svq_drain_guest);
}

/* mirrors relay.py:ShadowVirtqueue.on_device_call: return used buffers, retry a held chain,
 * re-enable device interrupts. */
static PyObject *svq_on_device_call(Relay *q, PyObject *Py_UNUSED(ignored))
{
    return guarded_from_python(q, svq_drain_device);
}

static int svq_disable_guest_notify(Relay *q);
static int svq_enable_guest_notify(Relay *q);

/* mirrors relay.py:ShadowVirtqueue._drain_guest */
int svq_drain_guest(Relay *q)
{
    for (;;) {
        if (svq_disable_guest_notify(q) < 0)
            return -1;
        if (svq_forward_avail(q) < 0)
            return -1;
        if (q->held)
            return 0; /* ring full: the next device call resumes us */
        int ok = svq_enable_guest_notify(q);
        if (ok < 0)
            return -1;
        if (ok)
            return 0;
    }
}

/* mirrors relay.py:ShadowVirtqueue._drain_device */
int svq_drain_device(Relay *q)
{
    for (;;) {
        shadow_disable_cb(&q->shadow);
        if (svq_forward_used(q) < 0)
            return -1;
        if (q->held) {
            if (svq_forward_avail(q) < 0)
                return -1;
            if (!q->held && svq_drain_guest(q) < 0)
                return -1;
        }
        if (shadow_enable_cb(&q->shadow))
            return 0;
    }
}

/* mirrors relay.py:ShadowVirtqueue._disable_guest_notify */
static int svq_disable_guest_notify(Relay *q)
{
    guest_disable_notify(&q->guest);
    Piece area = guest_notify_area(&q->guest);
    return svq_mark(q, area.addr, area.len);
}

/* mirrors relay.py:ShadowVirtqueue._enable_guest_notify: 1 when no chain is waiting, -1 on error. */
static int svq_enable_guest_notify(Relay *q)
{
    int ok = guest_enable_notify(&q->guest);
    Piece area = guest_notify_area(&q->guest);
    if (svq_mark(q, area.addr, area.len) < 0)
        return -1;
    return ok;
}

/* ---- Who touches a relay ----------------------------------------------------------------------
 * The pump works on its relays without the GIL (_pump.c); Python may call any method of a relay
 * from any thread meanwhile (stats, ring_state, close, on_guest_kick, ...: the vhost-user message
 * thread, a test). The rule: everything that reads or writes the relay's state holds q->lock.
 * The pump takes it without the GIL; a method takes it with the GIL released while it waits
 * (lock_from_python), so that the order is always lock, then GIL: a pump that holds the lock and
 * needs the GIL (an error, a Python notifier) never waits on a thread that holds the GIL and waits
 * for the lock. q->error changes only with both held: readable with either. Session code stops
 * the pump before it hands back or closes (session.py), so there the lock is only a safety net. */

/* Take q->lock from a thread that holds the GIL (released while waiting, re-taken after). */
static void lock_from_python(Relay *q)
{
    if (pthread_mutex_trylock(&q->lock) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&q->lock);
    Py_END_ALLOW_THREADS
}

/* A failed work's exception, the GIL held: a RingError stops this queue (0), else -1 (raised). */
static int keep_ring_error(Relay *q)
{
    if (!PyErr_ExceptionMatches(RingError))
        return -1;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    Py_SETREF(q->error, value);
    return 0;
}

/* mirrors relay.py:ShadowVirtqueue._guarded: never trust either side; a RingError stops this
 * queue with a reason (kept in .error), other queues go on. q->lock held; the GIL held or not. */
static int guarded_locked(Relay *q, int (*work)(Relay *), int closed_ok)
{
    if (!q->ready) {
        if (closed_ok)
            return 0;
        WITH_GIL(PyErr_SetString(PyExc_ValueError, "the C relay is closed"));
        return -1;
    }
    if (q->error != Py_None)
        return 0;
    if (work(q) == 0) {
        svq_flush_marks(q);
        return 0;
    }
    svq_flush_marks(q); /* what was written before a failure is still written */
    int r;
    WITH_GIL(r = keep_ring_error(q));
    return r;
}

int svq_guarded(Relay *q, int (*work)(Relay *), int closed_ok)
{
    pthread_mutex_lock(&q->lock);
    int r = guarded_locked(q, work, closed_ok);
    pthread_mutex_unlock(&q->lock);
    return r;
}

static PyObject *guarded_from_python(Relay *q, int (*work)(Relay *))
{
    lock_from_python(q);
    int r = guarded_locked(q, work, 0);
    pthread_mutex_unlock(&q->lock);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ==== The Python type: construction from tables, attributes, methods =========================== */

static int device_side_init(Relay *q, PyObject *spec)
{
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 10) {
        PyErr_SetString(PyExc_TypeError, "the guest spec is a tuple of 10");
        return -1;
    }
    if (mem_table_init(&q->guest_mem, PyTuple_GET_ITEM(spec, 7)) < 0)
        return -1;
    return device_side_setup(&q->guest, &q->guest_mem, &q->guest_mem, spec);
}

/* The shadow ring's three areas and its indirect area (area_spec: None or (gpa, max_entries)),
 * checked to lie in shadow memory. */
static int driver_side_areas(DriverSide *s, MemTable *m, uint64_t desc, uint64_t driver, uint64_t device,
                             PyObject *area_spec)
{
    s->desc = area(m, desc, (uint64_t)DESC_SIZE * s->num, "shadow descriptor area");
    s->driver = area(m, driver, s->packed ? PACKED_EVENT_SIZE : 6 + 2 * (uint64_t)s->num, "shadow driver area");
    s->device = area(m, device, s->packed ? PACKED_EVENT_SIZE : 6 + 8 * (uint64_t)s->num, "shadow device area");
    if (!s->desc || !s->driver || !s->device)
        return -1;
    if (area_spec != Py_None) {
        unsigned long long gpa;
        unsigned int max_entries;
        if (!PyArg_ParseTuple(area_spec, "KI", &gpa, &max_entries))
            return -1;
        s->has_area = 1;
        s->area_gpa = gpa;
        s->area_max = max_entries;
        s->area_host = area(m, gpa, (uint64_t)s->num * max_entries * DESC_SIZE, "shadow indirect area");
        if (s->area_host == NULL)
            return -1;
    }
    return 0;
}

/* The per-entry arrays, sized once (the hot loop allocates nothing), and the arena of writable
 * segments in flight with its free list. */
static int driver_side_alloc(DriverSide *s, int indirect)
{
    s->next = PyMem_Calloc(s->num, sizeof(uint16_t));
    s->in_use = PyMem_Calloc(s->num, 1);
    s->count = PyMem_Calloc(s->num, sizeof(uint32_t));
    s->writable = PyMem_Calloc(s->num, sizeof(uint64_t));
    s->tok = PyMem_Calloc(s->num, sizeof(Token));
    /* Writable guest segments in flight <= translated pieces in flight <= num * max(1, area_max):
     * a direct chain takes one slot per piece, an indirect one a slot for up to area_max. */
    uint64_t per_slot = (indirect && s->has_area && s->area_max > 1) ? s->area_max : 1;
    uint64_t arena = (uint64_t)s->num * per_slot;
    s->arena_addr = PyMem_Calloc(arena, sizeof(uint64_t));
    s->arena_len = PyMem_Calloc(arena, sizeof(uint32_t));
    s->arena_next = PyMem_Calloc(arena, sizeof(uint32_t));
    if (!s->next || !s->in_use || !s->count || !s->writable || !s->tok || !s->arena_addr || !s->arena_len ||
        !s->arena_next) {
        PyErr_NoMemory();
        return -1;
    }
    for (uint64_t i = 0; i < arena; i++)
        s->arena_next[i] = i + 1 < arena ? (uint32_t)(i + 1) : NO_NODE;
    s->arena_free = 0;
    return 0;
}

/* The free list of descriptor ids (split: next; packed: next_id), as the Python ring hands it over. */
static int driver_side_free_list(DriverSide *s, PyObject *next)
{
    PyObject *seq = PySequence_Fast(next, "next must be a sequence of ints");
    if (seq == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != s->num) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "next must have one entry per ring entry");
        return -1;
    }
    for (uint32_t i = 0; i < s->num; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred() || v > s->num) {
            Py_DECREF(seq);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "free list entry out of range");
            return -1;
        }
        s->next[i] = (uint16_t)v;
    }
    Py_DECREF(seq);
    return 0;
}

/* The shadow ring (its DRIVER side), from the tuple cinputs.shadow_ring_spec builds. */
static int driver_side_init(Relay *q, PyObject *spec, int indirect)
{
    DriverSide *s = &q->shadow;
    unsigned long long desc, driver, device, st[8];
    PyObject *regions, *area_spec, *next;
    if (!PyArg_ParseTuple(spec, "pIKKKpUOO(KKKKKKKK)O", &s->packed, &s->num, &desc, &driver, &device, &s->event_idx,
                          &s->name, &regions, &area_spec, &st[0], &st[1], &st[2], &st[3], &st[4], &st[5], &st[6],
                          &st[7], &next))
        return -1;
    Py_INCREF(s->name);
    if (s->num == 0 || s->num > 32768) {
        PyErr_SetString(PyExc_ValueError, "ring size out of range");
        return -1;
    }
    if (mem_table_init(&q->shadow_mem, regions) < 0)
        return -1;
    if (driver_side_areas(s, &q->shadow_mem, desc, driver, device, area_spec) < 0)
        return -1;
    /* (free_head, num_free, num_added, cb_enabled, avail_idx_shadow | next_avail_idx,
     *  avail_wrap_counter, last_used_idx, used_wrap_counter) */
    s->free_head = (uint32_t)st[0];
    s->num_free = (uint32_t)st[1];
    s->num_added = st[2];
    s->cb_enabled = st[3] != 0;
    if (s->packed) {
        s->next_avail_idx = (uint32_t)st[4];
        s->avail_wrap_counter = (int)(st[5] & 1);
        s->last_used_idx = (uint32_t)st[6];
        s->used_wrap_counter = (int)(st[7] & 1);
    } else {
        s->avail_idx_shadow = (uint16_t)st[4];
        s->last_used_idx_split = (uint16_t)st[6];
        s->used_event_off = AVAIL_RING + 2 * s->num;
        s->avail_event_off = USED_RING + 8 * s->num;
    }
    if (s->num_free != s->num || s->free_head > s->num) {
        PyErr_SetString(PyExc_ValueError, "the C relay takes over a shadow ring with nothing in flight");
        return -1;
    }
    if (driver_side_alloc(s, indirect) < 0)
        return -1;
    return driver_side_free_list(s, next);
}

static int relay_clear(Relay *q)
{
    Py_CLEAR(q->device_kick);
    Py_CLEAR(q->guest_call);
    Py_CLEAR(q->error);
    return 0;
}

static int relay_traverse(Relay *q, visitproc visit, void *arg)
{
    Py_VISIT(q->device_kick);
    Py_VISIT(q->guest_call);
    Py_VISIT(q->error);
    return 0;
}

static void relay_release(Relay *q)
{
    q->ready = 0;
    mem_table_release(&q->guest_mem);
    mem_table_release(&q->shadow_mem);
    if (q->has_dirty) {
        PyBuffer_Release(&q->dirty_view);
        q->has_dirty = 0;
    }
}

static void relay_dealloc(Relay *q)
{
    PyObject_GC_UnTrack(q);
    relay_release(q);
    relay_clear(q);
    Py_CLEAR(q->name);
    Py_CLEAR(q->guest.name);
    Py_CLEAR(q->shadow.name);
    PyMem_Free(q->chain.segs);
    PyMem_Free(q->out);
    PyMem_Free(q->in);
    PyMem_Free(q->iova);
    PyMem_Free(q->guest.in_flight);
    DriverSide *s = &q->shadow;
    PyMem_Free(s->next);
    PyMem_Free(s->in_use);
    PyMem_Free(s->count);
    PyMem_Free(s->writable);
    PyMem_Free(s->tok);
    PyMem_Free(s->arena_addr);
    PyMem_Free(s->arena_len);
    PyMem_Free(s->arena_next);
    pthread_mutex_destroy(&q->lock);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

/* A notifier is an eventfd number (written from C) or a Python callable. */
static int notifier_init(PyObject *spec, PyObject **fn, int *fd, const char *what)
{
    *fd = -1;
    if (PyLong_Check(spec)) {
        long v = PyLong_AsLong(spec);
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (v < 0 || v > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: %ld is not a file descriptor", what, v);
            return -1;
        }
        *fd = (int)v;
        *fn = Py_NewRef(Py_None);
        return 0;
    }
    if (!PyCallable_Check(spec)) {
        PyErr_Format(PyExc_TypeError, "%s must be an eventfd number or a callable", what);
        return -1;
    }
    *fn = Py_NewRef(spec);
    return 0;
}

/* mirrors relay.py:ShadowVirtqueue.__init__, from tables (vdpa_svq.cinputs builds them, for
 * relay_impl.py, from a ShadowVirtqueue whose rings nothing has used yet). */
static int relay_init(Relay *q, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "indirect", "device_kick", "guest_call", "guest", "shadow",
                             "iova", "dirty_bits", "dirty_pages", NULL};
    PyObject *name, *device_kick, *guest_call, *guest, *shadow, *iova, *dirty_bits;
    int indirect;
    unsigned long long dirty_pages;
    if (q->ready || q->name != NULL) {
        PyErr_SetString(PyExc_TypeError, "CShadowVirtqueue is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "UpOOO!O!OOK", kwlist, &name, &indirect, &device_kick, &guest_call,
                                     &PyTuple_Type, &guest, &PyTuple_Type, &shadow, &iova, &dirty_bits, &dirty_pages))
        return -1;
    if (notifier_init(device_kick, &q->device_kick, &q->device_kick_fd, "device_kick") < 0 ||
        notifier_init(guest_call, &q->guest_call, &q->guest_call_fd, "guest_call") < 0)
        return -1;
    q->name = Py_NewRef(name);
    q->indirect = indirect;
    q->error = Py_NewRef(Py_None);
    if (device_side_init(q, guest) < 0 || driver_side_init(q, shadow, indirect) < 0)
        return -1;

    PyObject *seq = PySequence_Fast(iova, "iova must be a sequence of (gpa, size, iova)");
    if (seq == NULL)
        return -1;
    q->niova = PySequence_Fast_GET_SIZE(seq);
    q->iova = PyMem_Calloc(q->niova ? q->niova : 1, sizeof(IovaMapping));
    if (q->iova == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < q->niova; i++) {
        unsigned long long g, n, v;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKK", &g, &n, &v)) {
            Py_DECREF(seq);
            return -1;
        }
        q->iova[i].gpa = g;
        q->iova[i].size = n;
        q->iova[i].iova = v;
    }
    Py_DECREF(seq);

    if (dirty_bits != Py_None) {
        if (PyObject_GetBuffer(dirty_bits, &q->dirty_view, PyBUF_WRITABLE) < 0)
            return -1;
        q->has_dirty = 1;
        if ((unsigned long long)q->dirty_view.len * 8 < dirty_pages) {
            PyErr_SetString(PyExc_ValueError, "dirty bitmap smaller than its page count");
            return -1;
        }
        q->dirty_pages = dirty_pages;
    }

    /* Scratch for one chain. A chain that fits the shadow ring has at most piece_cap pieces
     * (direct: num slots; indirect: area_max entries) and so at most that many segments; a
     * direct guest chain has at most the guest ring's size. Longer ones only exist on the way
     * to an error: their segments grow the scratch (cold), their extra pieces are only counted. */
    q->piece_cap = q->shadow.num;
    if (q->shadow.has_area && q->shadow.area_max > q->piece_cap)
        q->piece_cap = q->shadow.area_max;
    q->chain.cap = (uint32_t)(q->piece_cap > q->guest.num ? q->piece_cap : q->guest.num);
    q->chain.segs = PyMem_Calloc(q->chain.cap, sizeof(Seg));
    q->out = PyMem_Calloc(q->piece_cap, sizeof(Piece));
    q->in = PyMem_Calloc(q->piece_cap, sizeof(Piece));
    if (!q->chain.segs || !q->out || !q->in) {
        PyErr_NoMemory();
        return -1;
    }
    q->ready = 1;
    return 0;
}

/* forward_avail() / forward_used() from Python: one pass, its marks flushed, how many it moved. */
static PyObject *relay_forward(Relay *q, Py_ssize_t (*forward)(Relay *))
{
    lock_from_python(q);
    Py_ssize_t n = -1;
    if (!q->ready)
        PyErr_SetString(PyExc_ValueError, "the C relay is closed");
    else {
        n = forward(q);
        svq_flush_marks(q);
    }
    pthread_mutex_unlock(&q->lock);
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

static PyObject *relay_forward_avail(Relay *q, PyObject *Py_UNUSED(ignored))
{
    return relay_forward(q, svq_forward_avail);
}

static PyObject *relay_forward_used(Relay *q, PyObject *Py_UNUSED(ignored))
{
    return relay_forward(q, svq_forward_used);
}

static PyObject *relay_close(Relay *q, PyObject *Py_UNUSED(ignored))
{
    lock_from_python(q);
    relay_release(q);
    pthread_mutex_unlock(&q->lock);
    Py_RETURN_NONE;
}

/* The datapath state the C relay owns, under the Python rings' attribute names. */
static PyObject *ring_state_locked(Relay *q);

static PyObject *relay_ring_state(Relay *q, PyObject *Py_UNUSED(ignored))
{
    lock_from_python(q);
    PyObject *state = ring_state_locked(q);
    pthread_mutex_unlock(&q->lock);
    return state;
}

static PyObject *ring_state_locked(Relay *q)
{
    const DeviceSide *g = &q->guest;
    const DriverSide *s = &q->shadow;
    unsigned int in_flight = 0;
    for (uint32_t i = 0; i < s->num; i++)
        in_flight += s->in_use[i];
    PyObject *guest, *shadow;
    if (g->packed)
        guest = Py_BuildValue("{s:I,s:i,s:I,s:i,s:i}", "next_avail_idx", g->next_avail_idx, "avail_wrap_counter",
                              g->avail_wrap_counter, "next_used_idx", g->next_used_idx, "used_wrap_counter",
                              g->used_wrap_counter, "broken", g->broken);
    else
        guest = Py_BuildValue("{s:H,s:H,s:H,s:i}", "last_avail_idx", g->last_avail_idx, "used_idx", g->used_idx,
                              "signalled_used", g->signalled_used, "broken", g->broken);
    if (s->packed)
        shadow = Py_BuildValue("{s:I,s:i,s:I,s:i,s:I,s:I,s:K,s:I,s:i}", "next_avail_idx", s->next_avail_idx,
                               "avail_wrap_counter", s->avail_wrap_counter, "last_used_idx", s->last_used_idx,
                               "used_wrap_counter", s->used_wrap_counter, "free_head", s->free_head, "num_free",
                               s->num_free, "num_added", (unsigned long long)s->num_added, "in_flight", in_flight,
                               "broken", s->broken);
    else
        shadow = Py_BuildValue("{s:H,s:H,s:I,s:I,s:K,s:I,s:i}", "avail_idx_shadow", s->avail_idx_shadow,
                               "last_used_idx", s->last_used_idx_split, "free_head", s->free_head, "num_free",
                               s->num_free, "num_added", (unsigned long long)s->num_added, "in_flight", in_flight,
                               "broken", s->broken);
    if (guest == NULL || shadow == NULL) {
        Py_XDECREF(guest);
        Py_XDECREF(shadow);
        return NULL;
    }
    return Py_BuildValue("{s:N,s:N}", "guest", guest, "shadow", shadow);
}

static PyObject *relay_get_stats(Relay *q, void *Py_UNUSED(closure))
{
    lock_from_python(q);
    RelayStats st = q->stats;
    pthread_mutex_unlock(&q->lock);
    return Py_BuildValue("(KKKKKK)", st.forwarded, st.returned, st.bytes_written, st.device_kicks, st.guest_calls,
                         st.ring_full);
}

/* fn() with the relay's lock held, as any method that works on the relay holds it: for the tests
 * of the locking rule (a pump waits meanwhile). */
static PyObject *relay_locked(Relay *q, PyObject *fn)
{
    lock_from_python(q);
    PyObject *r = PyObject_CallNoArgs(fn);
    pthread_mutex_unlock(&q->lock);
    return r;
}

static PyObject *relay_get_error(Relay *q, void *Py_UNUSED(closure)) { return Py_NewRef(q->error); }

static int relay_set_error(Relay *q, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL)
        value = Py_None;
    lock_from_python(q);
    Py_SETREF(q->error, Py_NewRef(value));
    pthread_mutex_unlock(&q->lock);
    return 0;
}

static PyObject *relay_get_broken(Relay *q, void *Py_UNUSED(closure)) { return PyBool_FromLong(q->error != Py_None); }
static PyObject *relay_get_held(Relay *q, void *Py_UNUSED(closure)) { return PyBool_FromLong(q->held); }
static PyObject *relay_get_name(Relay *q, void *Py_UNUSED(closure)) { return Py_NewRef(q->name ? q->name : Py_None); }

static PyMethodDef relay_methods[] = {
    {"on_guest_kick", (PyCFunction)svq_on_guest_kick, METH_NOARGS, "The guest made chains available: relay them."},
    {"on_device_call", (PyCFunction)svq_on_device_call, METH_NOARGS, "The device used buffers: return them."},
    {"forward_avail", (PyCFunction)relay_forward_avail, METH_NOARGS, "Move available guest chains to the shadow ring."},
    {"forward_used", (PyCFunction)relay_forward_used, METH_NOARGS, "Return used shadow buffers to the guest."},
    {"ring_state", (PyCFunction)relay_ring_state, METH_NOARGS, "{'guest': {...}, 'shadow': {...}}: ring indexes."},
    {"close", (PyCFunction)relay_close, METH_NOARGS, "Release the memory and dirty-log buffers."},
    {"locked", (PyCFunction)relay_locked, METH_O, "locked(fn): fn() with the relay's lock held (a pump waits)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef relay_getset[] = {
    {"stats", (getter)relay_get_stats, NULL,
     "(forwarded, returned, bytes_written, device_kicks, guest_calls, ring_full)", NULL},
    {"error", (getter)relay_get_error, (setter)relay_set_error, "Why this queue stopped, if it did.", NULL},
    {"broken", (getter)relay_get_broken, NULL, "Whether a RingError stopped this queue.", NULL},
    {"held", (getter)relay_get_held, NULL, "Whether a chain waits for room in the shadow ring.", NULL},
    {"name", (getter)relay_get_name, NULL, "The queue's name (for errors).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Relay *q = (Relay *)PyType_GenericNew(type, args, kwds);
    if (q == NULL)
        return NULL;
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&q->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    return (PyObject *)q;
}

PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vdpa_svq._relay.CShadowVirtqueue",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The datapath of one shadow virtqueue (relay.py's ShadowVirtqueue, in C).",
    .tp_new = relay_new,
    .tp_init = (initproc)relay_init,
    .tp_dealloc = (destructor)relay_dealloc,
    .tp_traverse = (traverseproc)relay_traverse,
    .tp_clear = (inquiry)relay_clear,
    .tp_methods = relay_methods,
    .tp_getset = relay_getset,
};

/* ==== What the pump asks of a relay (_relay.h) ================================================= */

static int relay_live(const Relay *q) { return q->ready && q->error == Py_None; }

/* Whether the shadow ring has a used buffer for us (read-only: safe without the GIL). */
static int shadow_has_used(const DriverSide *s)
{
    if (s->broken)
        return 0;
    if (s->packed)
        return is_used_packed(s, s->last_used_idx, s->used_wrap_counter);
    return ld16(s->device + USED_IDX) != s->last_used_idx_split;
}

/* Work for the poller on this relay (read-only; no GIL). A relay that someone else works on (a
 * Python method holds its lock) has none for now: the re-arm after the polling phase, which waits
 * for the lock, relays what it left and re-checks after enabling notifications. */
/* mirrors relay.py:ShadowVirtqueue.has_work */
int relay_has_work(Relay *q)
{
    if (pthread_mutex_trylock(&q->lock) != 0)
        return 0;
    int work = relay_live(q) && (shadow_has_used(&q->shadow) || (!q->held && guest_has_avail(&q->guest)));
    pthread_mutex_unlock(&q->lock);
    return work;
}

/* One polling round on one relay, notifications off: used buffers back first (that frees room
 * for a held chain), then what the guest made available. */
/* mirrors relay.py:ShadowVirtqueue.poll_once */
int svq_poll_once(Relay *q)
{
    if (svq_disable_guest_notify(q) < 0)
        return -1;
    shadow_disable_cb(&q->shadow);
    if (svq_forward_used(q) < 0)
        return -1;
    return svq_forward_avail(q) < 0 ? -1 : 0;
}

/* Back to notifications: the drains turn them on and relay whatever raced in meanwhile. */
/* mirrors relay.py:ShadowVirtqueue.rearm */
int svq_rearm(Relay *q)
{
    if (svq_drain_device(q) < 0)
        return -1;
    return q->held ? 0 : svq_drain_guest(q);
}

/* A source of this relay that is not a working eventfd any more (kick: the guest's, else the
 * device's call fd): the relay stops with the reason, unless something stopped it already. */
int relay_hung_up(Relay *q, int kick)
{
    pthread_mutex_lock(&q->lock);
    PyObject *exc = Py_None;
    if (q->error == Py_None)
        WITH_GIL(exc = PyObject_CallFunction(kick ? GuestRingError : DeviceRingError, "Os", q->name,
                                             kick ? "the guest's kick fd hung up or is not an eventfd"
                                                  : "the device's call fd hung up or is not an eventfd");
                 if (exc != NULL) Py_SETREF(q->error, exc));
    pthread_mutex_unlock(&q->lock);
    return exc == NULL ? -1 : 0;
}

/* ==== The dirty log's harvest ==================================================================== */

/* The bitmap's bits, and the bitmap cleared, in one step that no mark (an atomic OR, GIL held or
 * not) can fall between: each word is exchanged with zero. */
static PyObject *harvest(PyObject *Py_UNUSED(module), PyObject *bitmap)
{
    Py_buffer view;
    if (PyObject_GetBuffer(bitmap, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, view.len);
    if (out != NULL) {
        uint8_t *src = view.buf, *dst = (uint8_t *)PyBytes_AS_STRING(out);
        Py_ssize_t i = 0;
        for (; i < view.len && ((uintptr_t)(src + i) & 7); i++)
            dst[i] = __atomic_exchange_n(src + i, 0, __ATOMIC_RELAXED);
        for (; i + 8 <= view.len; i += 8) {
            uint64_t w = __atomic_exchange_n((uint64_t *)(src + i), 0, __ATOMIC_RELAXED);
            memcpy(dst + i, &w, 8);
        }
        for (; i < view.len; i++)
            dst[i] = __atomic_exchange_n(src + i, 0, __ATOMIC_RELAXED);
    }
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef module_methods[] = {
    {"harvest", harvest, METH_O, "harvest(bitmap) -> bytes: the bits, and the bitmap cleared, atomically."},
    {"adapt_window", py_adapt_window, METH_VARARGS,
     "adapt_window(window_ns, gap_ns, cap_ns) -> the adaptive pump's next polling window."},
    {"spin_credit", py_spin_credit, METH_VARARGS,
     "spin_credit(left_ns, busy_ns, window_ns) -> how long an adaptive polling phase may still spin idle."},
    {"contended", py_contended, METH_VARARGS,
     "contended(longest_yield_ns) -> whether a polling phase whose longest yield took that long shared its CPU\n"
     "with a busy thread."},
    {"contention_pause", py_contention_pause, METH_VARARGS,
     "contention_pause(pause_ns, was_contended) -> how long polling pauses after a polling phase."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef relay_module = {
    PyModuleDef_HEAD_INIT, .m_name = "vdpa_svq._relay",
    .m_doc = "The shadow virtqueue's hot loop in C; vdpa_svq.relay is the reference.", .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__relay(void)
{
    if (ring_errors_import() < 0)
        return NULL;
    if (PyType_Ready(&RelayType) < 0 || PyType_Ready(&PumpType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&relay_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "CShadowVirtqueue", (PyObject *)&RelayType) < 0 ||
        PyModule_AddObjectRef(m, "Pump", (PyObject *)&PumpType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
