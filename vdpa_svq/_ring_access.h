/*
 * _ring_access.h: how any side of a ring touches ring memory, for every C extension (the device
 * side in _ring.h, the latency frontend's driver side in guest/_burst.c): the barriers, relaxed
 * loads and stores of the little-endian ring fields, and the event index arithmetic. Only static
 * inline definitions, so any number of files may include it.
 */
#ifndef VDPA_SVQ_RING_ACCESS_H
#define VDPA_SVQ_RING_ACCESS_H

#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vdpa_svq's C rings read the le16/le32/le64 ring fields as host values: little-endian hosts only"
#endif

/* ==== Barriers and ring memory access ========================================================= */

/* mirrors barrier.py:wmb: order earlier stores before later stores (a compiler barrier on x86-64). */
static inline void wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

/* mirrors barrier.py:rmb: order earlier loads before later loads (a compiler barrier on x86-64). */
static inline void rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }

/* mirrors barrier.py:mb: order earlier stores before later loads (mfence / a locked instruction). */
static inline void mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline uint16_t ld16(const uint8_t *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED); }
static inline uint32_t ld32(const uint8_t *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED); }
static inline uint64_t ld64(const uint8_t *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED); }
static inline void st16(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
static inline void st32(uint8_t *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED); }
static inline void st64(uint8_t *p, uint64_t v) { __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELAXED); }

/* ==== Notification suppression arithmetic (ring/event.py) ===================================== */

/* mirrors event.py:need_event: event_idx in [old_idx, new_idx), 16-bit free-running counters. */
static inline int need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

#endif
