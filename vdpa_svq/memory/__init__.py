"""Guest memory and address translation."""

from vdpa_svq.memory.guest import PAGE_SIZE, GuestMemory, MemoryRegion

__all__ = ["PAGE_SIZE", "GuestMemory", "MemoryRegion"]
