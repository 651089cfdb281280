"""Notification suppression arithmetic shared by both layouts and both sides."""

from __future__ import annotations

VRING_PACKED_EVENT_FLAG_ENABLE = 0
VRING_PACKED_EVENT_FLAG_DISABLE = 1
VRING_PACKED_EVENT_FLAG_DESC = 2
WRAP_BIT = 15  # VRING_PACKED_EVENT_F_WRAP_CTR: bit of off_wrap that holds the wrap counter


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True when moving an index from old_idx to new_idx passes event_idx (VIRTIO 1.2, 2.7.10).

    All three are free-running 16-bit counters: notify when event_idx is in [old_idx, new_idx).
    """
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def packed_need_event(off_wrap: int, new_idx: int, moved: int, wrap_counter: int, num: int) -> bool:
    """need_event() for a packed ring, where positions are ring slots 0..num-1 plus a wrap bit.

    `new_idx` is the slot after the last one made available (or used), under `wrap_counter`;
    `moved` is how many slots were made available (used) since the last notification decision.
    off_wrap names a slot under the other wrap counter when its bit 15 differs: that slot lies one
    lap earlier, so it is moved back by num before comparing (everything stays 16-bit modular).
    """
    if moved >= num:
        # A whole lap or more since the last decision: the event slot was certainly passed.
        return True
    event_idx = off_wrap & ~(1 << WRAP_BIT) & 0xFFFF
    if (off_wrap >> WRAP_BIT) & 1 != wrap_counter:
        event_idx -= num
    return need_event(event_idx & 0xFFFF, new_idx, (new_idx - moved) & 0xFFFF)


def packed_notify_needed(event16: memoryview, new_idx: int, moved: int, wrap_counter: int, num: int,
                         event_idx: bool) -> bool:
    """Whether the other side of a packed ring wants a notification, by its event suppression
    structure `event16` (off_wrap, flags as a 16-bit view: each read whole, 2.8.10): DISABLE never,
    ENABLE always, DESC (with EVENT_IDX) when the `moved` slots up to `new_idx` passed the slot it
    named. Nothing moved: nothing to notify."""
    if moved == 0:
        return False
    flags = event16[1]
    off_wrap = event16[0]
    if flags == VRING_PACKED_EVENT_FLAG_DESC and event_idx:
        return packed_need_event(off_wrap, new_idx, moved, wrap_counter, num)
    return flags != VRING_PACKED_EVENT_FLAG_DISABLE
